"""Charts and tables for docs/benchmarks.md, from the scripts' JSON.

Reads ``benchmarks/results/{groups,frozen,frozen_used,roofline}_{machine}.json``
(written by the scripts' ``--out``), draws one PNG per benchmark into
``docs/images/`` (each names the machine, the versions and the command) and
prints the tables of docs/benchmarks.md as Markdown.

Run:  python benchmarks/report.py [--results benchmarks/results] [--images docs/images]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

MACHINES = {"cpu": "2-core x86-64 CPU", "h100": "NVIDIA H100 80GB HBM3"}
COMMANDS = {  # as run for the committed results (CPU/GPU where they differ)
    "groups": "python benchmarks/groups.py --trees bert_base --no-freeze "
              "--steps 5/30 --repeats 3/5 --compile-repeats 1",
    "frozen": "python benchmarks/frozen.py [--model bert_base] [--grads-used]",
    "roofline": "python benchmarks/roofline.py",
}


def load(results, name, machine):
  path = os.path.join(results, f"{name}_{machine}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def caption(data, command):
  return (f"{data['machine'][:60]}\njax {data['jax']}, optax {data['optax']}: "
          f"{command}")


def groups_chart(results, images):
  runs = {m: load(results, "groups", m) for m in MACHINES}
  runs = {m: d for m, d in runs.items() if d}
  if not runs:
    return
  fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
  for row, (machine, data) in zip(axes, runs.items()):
    for variant, style in (("plain", "k--"), ("layerwise", "o-"), ("partition", "s-")):
      rows = [r for r in data["results"] if r["variant"] == variant]
      g = [r["groups"] for r in rows]
      label = {"plain": "optax.adamw", "partition": "optax.partition"}.get(variant, variant)
      row[0].plot(g, [r["step_ms"] for r in rows], style, label=label)
      row[1].plot(g, [r["compile_s"] for r in rows], style, label=label)
    for ax, what in zip(row, ("step time, ms", "compile time, s")):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("groups (each its own learning rate)")
      ax.set_ylabel(what)
      ax.set_title(f"{MACHINES[machine]}: {what.split(',')[0]}", fontsize=10)
      ax.legend(fontsize=8)
  fig.suptitle("AdamW on bert_base (110M parameters), per-group learning rates\n"
               + caption(next(iter(runs.values())), COMMANDS["groups"]).replace("\n", " "),
               fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(images, "bench_groups.png"), dpi=110)
  plt.close(fig)
  for machine, data in runs.items():
    print(f"\n### groups, {MACHINES[machine]} (jax {data['jax']}, optax {data['optax']})\n")
    print("| groups | plain step ms | layerwise step | layerwise compile | "
          "`optax.partition` step | `optax.partition` compile |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    by = {}
    for r in data["results"]:
      by.setdefault(r["groups"], {})[r["variant"]] = r
    for g, v in by.items():
      print(f"| {g} | {v['plain']['step_ms']:.1f} | {v['layerwise']['step_ratio']:.2f}x | "
            f"{v['layerwise']['compile_ratio']:.2f}x | {v['partition']['step_ratio']:.2f}x | "
            f"{v['partition']['compile_ratio']:.2f}x |")


def frozen_chart(results, images):
  runs = []
  for machine in MACHINES:
    for name in ("frozen", "frozen_used"):
      data = load(results, name, machine)
      if data:
        runs.append((machine, name, data))
  if not runs:
    return
  fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
  metrics = (("step_ratio", "step time"), ("flops_ratio", "flops"),
             ("peak_ratio", "peak memory"), ("state_ratio", "optimizer state"))
  for ax, (machine, name, data) in zip(axes[0], runs):
    rows = data["results"]["rows"]
    width = 0.8 / len(metrics)
    for k, (key, label) in enumerate(metrics):
      ax.bar([i + k * width for i in range(len(rows))], [r[key] for r in rows],
             width, label=label)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_ylim(0, 1.4)
    ax.set_xticks([i + 0.3 for i in range(len(rows))])
    ax.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ratio to full fine-tuning")
    used = name == "frozen_used"
    ax.set_title(f"{MACHINES[machine]}, {data['results']['model']}"
                 + ("\nsteps also log the gradients' norm" if used else ""), fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    print(f"\n### {name}, {MACHINES[machine]}, model {data['results']['model']} "
          f"(jax {data['jax']}, optax {data['optax']})\n")
    print("| variant | step ms | step | flops | peak memory | optimizer state |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
      print(f"| `{r['variant']}` | {r['step_ms']:.1f} | {r['step_ratio']:.2f}x | "
            f"{r['flops_ratio']:.2f}x | {r['peak_ratio']:.2f}x "
            f"({r['peak_bytes'] / 2**20:.0f} MiB) | {r['state_ratio']:.2f}x "
            f"({r['state_bytes'] / 2**20:.0f} MiB) |")
  first = runs[0][2]
  fig.suptitle("A transformer encoder with the embeddings and 9 of 12 blocks frozen: "
               "one training step\n" + caption(first, COMMANDS["frozen"])
               .replace("\n", "; "), fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(images, "bench_frozen.png"), dpi=110)
  plt.close(fig)


def roofline_chart(results, images):
  runs = {m: load(results, "roofline", m) for m in MACHINES}
  runs = {m: d for m, d in runs.items() if d}
  if not runs:
    return
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
  for ax, (machine, data) in zip(axes[0], runs.items()):
    res = data["results"]
    rows = res["rows"]
    names = [r["variant"] for r in rows]
    ax.bar(names, [r["of_copy"] for r in rows],
           color=["C0" if n.startswith("optax") else "C2" if n.startswith("lw")
                  else "C3" for n in names])
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("achieved bytes/s over copy bandwidth")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    bw = max(res["copy_bandwidth"].values())
    ax.set_title(f"{MACHINES[machine]}: copy {bw / 1e9:.0f} GB/s"
                 + (f", torch {res['torch']}" if res.get("torch") else ""), fontsize=9)
    print(f"\n### roofline, {MACHINES[machine]} (jax {data['jax']}, optax {data['optax']}"
          + (f", torch {res['torch']}" if res.get("torch") else "")
          + f"; copy bandwidth {bw / 1e9:.0f} GB/s)\n")
    print("| variant | loop ms | loop x optax | device ms | device x optax | of copy bandwidth |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
      print(f"| `{r['variant']}` | {r['loop_ms']:.2f} | {r['loop_ratio']:.2f}x | "
            f"{r['device_ms']:.2f} | {r['device_ratio']:.2f}x | {r['of_copy']:.2f} |")
  first = next(iter(runs.values()))
  fig.suptitle("One AdamW step of bert_base (110M parameters, 28 bytes each; 32 with "
               "clipping), device time\n" + caption(first, COMMANDS["roofline"])
               .replace("\n", "; "), fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(images, "bench_roofline.png"), dpi=110)
  plt.close(fig)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=os.path.join(here, "results"))
  parser.add_argument("--images", default=os.path.join(here, "..", "docs", "images"))
  args = parser.parse_args()
  os.makedirs(args.images, exist_ok=True)
  groups_chart(args.results, args.images)
  frozen_chart(args.results, args.images)
  roofline_chart(args.results, args.images)


if __name__ == "__main__":
  main()
