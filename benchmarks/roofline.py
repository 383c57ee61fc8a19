"""The AdamW step against the memory-bandwidth limit, and against PyTorch.

An AdamW step is memory-bound: per float32 parameter it reads the parameter,
its gradient and two moments and writes three arrays back, 28 bytes. With
clipping by a norm the gradients must be read once more (the norm is needed
before the first update), so 32 bytes. For a BERT-base-like tree (~110M
parameters, 201 leaves) this script measures, in one process:

* ``copy``: the machine's copy bandwidth, bytes read plus bytes written by a
  large jitted ``x + 1`` (and by ``torch``'s ``copy_`` where PyTorch is
  installed); the best of them is the ceiling;
* ``optax``: ``optax.adamw(lr, weight_decay=wd)``, the baseline;
* ``optax+clip``: ``optax.clip_by_global_norm(1.0)`` before it, the
  baseline of the rows with clipping;
* ``lw.G``: G groups (14: embeddings, blocks, head; 200: single leaves), each
  with its own learning rate and weight decay::

      optax.chain(optax.scale_by_adam(), lw.add_decayed_weights(wds),
                  optax.scale_by_learning_rate(lr), lw.scale_by_rules(mults))

* ``lw.G+clip``: the same after ``lw.clip_by_rules`` with one
  ``clip_group_norm(1.0)`` per group;
* with ``--torch`` (the default where PyTorch sees a GPU): ``torch.G`` =
  ``torch.optim.AdamW(groups, fused=True)`` with the same groups (``lr_g =
  lr * mult_g``, ``weight_decay = wd_g``), and ``torch.G+clip`` with
  ``torch.nn.utils.clip_grad_norm_(group, 1.0, foreach=True)`` per group
  first. Before timing, one step of each PyTorch variant is checked against
  the layerwise variant it mirrors, from the same parameters and gradients.

Each variant is timed two ways, interleaved round by round (the median round
is reported):

* ``loop``: the jitted step (parameters and state donated) called from a
  Python loop, as a training loop calls it: the time includes JAX's
  dispatch, which for ~800 arrays per call can exceed the GPU's work. For
  PyTorch, the eager ``step()``.
* ``device``: ``--inner`` steps inside one jitted ``lax.fori_loop`` (the
  gradients rescaled by a carried scalar each step so nothing can be
  hoisted out of the loop), which leaves the dispatch out: the optimizer's
  own cost, as it is inside a jitted training step. For PyTorch, the step
  captured in a CUDA graph (``capturable=True``) and replayed.

Each row gives both times, the ratio of each to ``optax``'s, the achieved
bandwidth of the device time (the variant's minimal bytes over the time) as
a fraction of the copy bandwidth, and XLA's own count of the bytes the
compiled step accesses (``cost_analysis``) over the minimal bytes: above 1
means the compiled step moves more than it must.

Run:  python benchmarks/roofline.py [--steps 20] [--inner 20] [--repeats 5] [--groups 14,200]
      [--torch | --no-torch] [--hlo-dir DIR] [--out roofline.json]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise as lw

import _trees
import groups as bench

LR, WD = 1e-3, 0.01


def group_settings(tree, groups):
  """Selectors and each group's learning-rate multiplier and weight decay."""
  selectors, mults = bench.group_rates(tree, groups)
  wds = [0.0 if k % 3 == 2 else WD * (1 + k % 2) for k in range(groups)]
  return selectors, mults, wds


def layerwise_adamw(selectors, mults, wds, clip):
  tx = optax.chain(
      optax.scale_by_adam(),
      lw.add_decayed_weights(dict(zip(selectors, wds))),
      optax.scale_by_learning_rate(LR),
      lw.scale_by_rules(dict(zip(selectors, mults))))
  if clip:
    tx = optax.chain(
        lw.clip_by_rules({s: lw.clip_group_norm(1.0) for s in selectors}), tx)
  return tx


def variants(tree, group_counts):
  """``{name: (transformation, minimal bytes per parameter, settings)}``."""
  out = {"optax": (optax.adamw(LR, weight_decay=WD), 28, None),
         "optax+clip": (optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.adamw(LR, weight_decay=WD)), 32, None)}
  for g in group_counts:
    settings = group_settings(tree, g)
    out[f"lw.{g}"] = (layerwise_adamw(*settings, clip=False), 28, settings)
    out[f"lw.{g}+clip"] = (layerwise_adamw(*settings, clip=True), 32, settings)
  return out


def copy_bandwidth(nbytes, repeats, torch=None):
  """Best bytes/s (read + written) of a jitted ``x + 1`` and torch's copy."""
  n = nbytes // 4
  x = jnp.ones((n,), jnp.float32)
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = add(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(5):
      x = add(x)
    x.block_until_ready()
    times.append((time.perf_counter() - t0) / 5)
  out = {"jax": 8 * n / min(times)}
  del x
  if torch is not None:
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      for _ in range(5):
        dst.copy_(src)
      torch.cuda.synchronize()
      times.append((time.perf_counter() - t0) / 5)
    out["torch"] = 8 * n / min(times)
    del src, dst
  return out


def xla_bytes(compiled):
  """Bytes the compiled step accesses, by XLA's cost analysis (or None)."""
  try:
    cost = bench.cost_analysis(compiled)
  except Exception:  # pylint: disable=broad-except
    return None
  return float(cost["bytes accessed"]) if "bytes accessed" in cost else None


def compile_device_loop(tx, params, state, grads, inner):
  """``inner`` steps in one jitted fori_loop, params and state donated."""
  def steps(params, state, grads):
    def body(_, carry):
      p, s, k = carry
      g = jax.tree_util.tree_map(lambda x: x * k, grads)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, k * jnp.float32(1.0000001)
    p, s, _ = jax.lax.fori_loop(0, inner, body, (params, state, jnp.float32(1.0)))
    return p, s
  return jax.jit(steps, donate_argnums=(0, 1)).lower(params, state, grads).compile()


def run_device(compiled, carry, grads, inner):
  t0 = time.perf_counter()
  carry[0], carry[1] = compiled(carry[0], carry[1], grads)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / inner


def run_jax(compiled, carry, grads, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / steps


class TorchAdamW:
  """PyTorch's fused AdamW on copies of the same params, grads and groups."""

  def __init__(self, torch, tree, params, grads, settings, clip, graph=False):
    self.torch, self.clip, self.graph = torch, clip, None
    self.params = [torch.tensor(np.asarray(p), device="cuda").requires_grad_()
                   for p in jax.tree_util.tree_leaves(params)]
    for p, g in zip(self.params, jax.tree_util.tree_leaves(grads)):
      p.grad = torch.tensor(np.asarray(g), device="cuda")
    selectors, mults, wds = settings
    index = jax.tree_util.tree_leaves(
        lw.resolve(dict(zip(selectors, range(len(selectors)))), tree))
    self.groups = [[p for p, i in zip(self.params, index) if i == k]
                   for k in range(len(selectors))]
    # For graph capture the learning rates must be tensors on the device.
    lr = (lambda x: torch.tensor(x, device="cuda")) if graph else float
    self.opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr(LR * m), "weight_decay": wd}
         for ps, m, wd in zip(self.groups, mults, wds) if ps],
        lr=lr(LR), fused=True, capturable=graph)
    if graph:
      side = torch.cuda.Stream()
      side.wait_stream(torch.cuda.current_stream())
      with torch.cuda.stream(side):  # warm-up before capture, as torch asks
        for _ in range(3):
          self.step()
      torch.cuda.current_stream().wait_stream(side)
      self.graph = torch.cuda.CUDAGraph()
      with torch.cuda.graph(self.graph):
        self.step()

  def step(self):
    if self.clip:
      for ps in self.groups:
        if ps:
          self.torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
    self.opt.step()

  def run(self, steps):
    self.torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
      if self.graph is not None:
        self.graph.replay()
      else:
        self.step()
    self.torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def check_torch(name, runner, tx, params, grads):
  """One step of ``runner`` equals one step of ``tx`` from the same start."""
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  expected = jax.tree_util.tree_leaves(optax.apply_updates(params, updates))
  runner.step()
  worst = 0.0
  for p, e in zip(runner.params, expected):
    e = np.asarray(e, np.float64)
    got = p.detach().cpu().numpy().astype(np.float64)
    worst = max(worst, float(np.linalg.norm(got - e) / max(np.linalg.norm(e), 1e-30)))
  status = "ok" if worst < 1e-5 else "MISMATCH"
  print(f"check {name}: one step, worst relative difference to layerwise "
        f"{worst:.1e} ({status})", flush=True)
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="steps per round")
  parser.add_argument("--inner", type=int, default=20,
                      help="steps per device-loop call")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--groups", default="14,200")
  parser.add_argument("--torch", dest="torch", action="store_true", default=None,
                      help="also time torch.optim.AdamW(fused=True) (needs CUDA)")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--hlo-dir", default=None,
                      help="write each variant's optimized HLO there")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  torch = None
  if args.torch is not False:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      if not torch.cuda.is_available():
        torch = None
    except ImportError:
      torch = None
    if args.torch and torch is None:
      parser.error("--torch needs PyTorch with a CUDA GPU")

  device = jax.devices()[0]
  bench.print_versions()
  print(f"device: {device.device_kind}"
        + (f"; torch {torch.__version__}" if torch is not None else ""))
  tree = _trees.bert_base()
  n = sum(x.size for x in jax.tree_util.tree_leaves(tree))
  bw = copy_bandwidth(4 * n, args.repeats, torch)
  ceiling = max(bw.values())
  print("copy bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items())
        + f"; {n / 1e6:.1f}M parameters, 28 bytes each: floor "
        f"{28 * n / ceiling * 1e3:.2f} ms", flush=True)

  txs = variants(tree, [int(g) for g in args.groups.split(",")])
  built, info = {}, {}
  for name, (tx, per_param, settings) in txs.items():
    compiled, carry, grads, compile_s = bench.build(tx, tree, jax.random.PRNGKey(0))
    device_loop = compile_device_loop(tx, *carry, grads, args.inner)
    built[name] = (compiled, device_loop, carry, grads)
    info[name] = dict(per_param=per_param, compile_s=compile_s,
                      xla_bytes=xla_bytes(compiled))
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
  runners = {}
  if torch is not None:
    params0, grads0 = bench.params_and_grads(tree, jax.random.PRNGKey(0))
    for name, (tx, per_param, settings) in txs.items():
      if settings is None:
        continue
      clip = name.endswith("+clip")
      tname = "torch." + name[len("lw."):]
      eager = TorchAdamW(torch, tree, params0, grads0, settings, clip)
      worst = check_torch(tname, eager, tx, params0, grads0)
      try:
        graph = TorchAdamW(torch, tree, params0, grads0, settings, clip, graph=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{tname}: no CUDA graph ({e!r:.200}); its device time is the eager time")
        graph = eager
      runners[tname] = (eager, graph)
      info[tname] = dict(per_param=per_param, compile_s=None, xla_bytes=None,
                         check=worst)
    del params0, grads0

  for compiled, device_loop, carry, grads in built.values():  # warm-up
    run_jax(compiled, carry, grads, 3)
    run_device(device_loop, carry, grads, args.inner)
  for eager, graph in runners.values():
    eager.run(3)
    graph.run(3)
  loop = {name: [] for name in list(built) + list(runners)}
  on_device = {name: [] for name in loop}
  for _ in range(args.repeats):
    for name, (compiled, device_loop, carry, grads) in built.items():
      loop[name].append(run_jax(compiled, carry, grads, args.steps))
      on_device[name].append(run_device(device_loop, carry, grads, args.inner))
    for name, (eager, graph) in runners.items():
      loop[name].append(eager.run(args.steps))
      on_device[name].append(graph.run(args.steps))

  header = (f"{'variant':<16} {'loop ms':>8} {'x optax':>8} {'device ms':>9} "
            f"{'x optax':>8} {'GB/s':>7} {'of copy':>8} {'xla bytes/min':>13} "
            f"{'compile s':>9}")
  print(header)
  print("-" * len(header))
  nan = float("nan")
  base_loop = statistics.median(loop["optax"])
  base_device = statistics.median(on_device["optax"])
  results = []
  for name in loop:
    t_loop, t_device = statistics.median(loop[name]), statistics.median(on_device[name])
    row = dict(variant=name, loop_ms=1e3 * t_loop, loop_ratio=t_loop / base_loop,
               device_ms=1e3 * t_device, device_ratio=t_device / base_device,
               min_bytes=info[name]["per_param"] * n,
               **{k: v for k, v in info[name].items() if k != "per_param"})
    row["bandwidth"] = row["min_bytes"] / t_device
    row["of_copy"] = row["bandwidth"] / ceiling
    xb = row["xla_bytes"]
    results.append(row)
    print(f"{name:<16} {row['loop_ms']:>8.2f} {row['loop_ratio']:>8.2f} "
          f"{row['device_ms']:>9.2f} {row['device_ratio']:>8.2f} "
          f"{row['bandwidth'] / 1e9:>7.1f} {row['of_copy']:>8.2f} "
          f"{(xb / row['min_bytes']) if xb else nan:>13.2f} "
          f"{row['compile_s'] if row['compile_s'] is not None else nan:>9.2f}",
          flush=True)
  bench.write_json(args.out, dict(
      device=device.device_kind, platform=device.platform,
      torch=torch.__version__ if torch is not None else None,
      parameters=n, copy_bandwidth=bw, rows=results))


if __name__ == "__main__":
  main()
