"""Charts and tables for docs/benchmarks.md, from the scripts' JSON.

Reads ``benchmarks/results/{groups,frozen,frozen_used,roofline}_{machine}.json``
(written by the scripts' ``--out``), draws one PNG per benchmark into
``docs/images/`` (each names the machine, the versions and the command) and
prints the tables of docs/benchmarks.md as Markdown (``stacked*.json``: tables
only).

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
    "groups": "python benchmarks/groups.py --steps 10 --repeats 3 "
              "--compile-repeats 3 (many_leaves: --steps 5 --compile-repeats 1)",
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
  """Compile and step time against the number of groups, as ratios to
  plain adamw: today's CPU run (every tree), the CPU run before the
  hyperparameters were read at runtime indices (groups_cpu_v0.json, for the
  record), and the H100 run."""
  now = load(results, "groups", "cpu")
  before = load(results, "groups_v0", "cpu")
  gpu = load(results, "groups", "h100")
  panels = [(title, data) for title, data in (
      ("CPU", now), ("CPU, before (static indices)", before), ("H100", gpu))
      if data]
  if not panels:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"layerwise": "o-", "lw.partition": "^-", "partition": "s--"}
  for title, data in panels:
    trees = dict.fromkeys(r["tree"] for r in data["results"])
    for tree in trees:
      rows = [r for r in data["results"] if r["tree"] == tree
              and isinstance(r["groups"], int)]
      for variant, style in styles.items():
        pts = [r for r in rows if r["variant"] == variant]
        if not pts or (title != "CPU" and variant != "layerwise"):
          continue
        label = f"{variant}, {tree} ({title})"
        kw = {"alpha": 0.45} if title != "CPU" else {}
        g = [r["groups"] for r in pts]
        axes[0].plot(g, [r["compile_ratio"] for r in pts], style, label=label, **kw)
        axes[1].plot(g, [r["step_ratio"] for r in pts], style, label=label, **kw)
  for ax, what in zip(axes, ("compile time", "step time")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("groups (each its own learning rate)")
    ax.set_ylabel(f"{what}, ratio to optax.adamw")
    ax.set_title(what, fontsize=10)
    ax.legend(fontsize=6)
  fig.suptitle("AdamW with per-group learning rates against plain optax.adamw\n"
               + caption(now or panels[0][1], COMMANDS["groups"]).replace("\n", " "),
               fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(images, "bench_groups.png"), dpi=110)
  plt.close(fig)
  for title, data in panels:
    print(f"\n### groups, {title} (jax {data['jax']}, optax {data['optax']})\n")
    variants = [v for v in ("layerwise", "lw.partition", "partition")
                if any(r["variant"] == v for r in data["results"])]
    print("| tree | groups | plain step ms | plain compile s | "
          + " | ".join(f"`{v}` step | `{v}` compile" for v in variants) + " |")
    print("| --- | ---: | ---: | ---: |" + " ---: | ---: |" * len(variants))
    by = {}
    for r in data["results"]:
      if isinstance(r["groups"], int):
        by.setdefault((r["tree"], r["groups"]), {})[r["variant"]] = r
    for (tree, g), v in by.items():
      cells = [f"{v[x]['step_ratio']:.2f}x | {v[x]['compile_ratio']:.2f}x"
               if x in v else "- | -" for x in variants]
      print(f"| `{tree}` | {g} | {v['plain']['step_ms']:.1f} | "
            f"{v['plain']['compile_s']:.2f} | " + " | ".join(cells) + " |")
    special = [r for r in data["results"] if not isinstance(r["groups"], int)]
    if special:
      print("\n| tree | rows | variant | step | compile | state | arrays |")
      print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
      for r in special:
        print(f"| `{r['tree']}` | {r['groups']} | `{r['variant']}` | "
              f"{r['step_ratio']:.2f}x | {r['compile_ratio']:.2f}x | "
              f"{r['state_ratio']:.2f}x | {r.get('arrays', '-')} |")


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
    print("| variant | step ms | step | flops | peak memory | optimizer state "
          "| gradient function's peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
      grads = (f"{r['grads_peak_ratio']:.2f}x ({r['grads_peak_bytes'] / 2**20:.0f} MiB)"
               if "grads_peak_bytes" in r else "-")  # not in older results
      print(f"| `{r['variant']}` | {r['step_ms']:.1f} | {r['step_ratio']:.2f}x | "
            f"{r['flops_ratio']:.2f}x | {r['peak_ratio']:.2f}x "
            f"({r['peak_bytes'] / 2**20:.0f} MiB) | {r['state_ratio']:.2f}x "
            f"({r['state_bytes'] / 2**20:.0f} MiB) | {grads} |")
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


def stacked_table(results):
  """The tables of benchmarks/stacked.py's runs (``stacked_*cpu.json``)."""
  for name in sorted(os.listdir(results)):
    if not (name.startswith("stacked") and name.endswith(".json")):
      continue
    with open(os.path.join(results, name)) as f:
      data = json.load(f)
    load = data.get("load_average", {})
    print(f"\n### {name}: `{data['command']}` (jax {data['jax']}, optax "
          f"{data['optax']}; load average {load.get('start', ['?'])[0]:.1f} "
          f"to {load.get('end', ['?'])[0]:.1f} on {data.get('cores', '?')} cores)\n")
    print("| tree | leaves | variant | compile s | compile x | compile x (CPU s) "
          "| step ms | step x | kernels | arrays |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in data["results"]:
      print(f"| `{r['tree']}` | {r['leaves']} | `{r['variant']}` | "
            f"{r['compile_s']:.2f} | {r['compile_ratio']:.2f}x | "
            f"{r['compile_cpu_ratio']:.2f}x | {r['step_ms']:.1f} | "
            f"{r['step_ratio']:.2f}x | {r['kernels']} | {r['arrays']} |")
    if data.get("layouts"):
      print("\n| multipliers reach the stacked leaves as | compile x | "
            "compile x (CPU s) | kernels |")
      print("| --- | ---: | ---: | ---: |")
      for r in data["layouts"]:
        print(f"| `{r['variant']}` | {r['compile_ratio']:.2f}x | "
              f"{r['compile_cpu_ratio']:.2f}x | {r['kernels']} |")


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
  stacked_table(args.results)


if __name__ == "__main__":
  main()
