"""Stacked (scanned) layers: do per-layer rules keep the stacked model's costs?

A transformer-like tree of 48 layers of width 256 (attention query, key,
value and output kernels and biases, an MLP of width 1024, two LayerNorms),
held two ways:

* ``stacked``: each kind of layer parameter one array with a layer axis 0
  (``layers/attn/query/kernel`` of shape ``(48, 256, 256)``), as ``nn.scan``
  or ``nnx.vmap`` build it: 21 leaves;
* ``unrolled``: its twin with one subtree per layer (``layers/3/attn/query/
  kernel``, shape ``(256, 256)``): 773 leaves;

both with an unstacked embedding, final norm and head. On each, in one
process, interleaved:

* ``plain``: ``optax.adamw`` (one rate), the baseline of its tree;
* ``layerwise``: ``optax.chain(optax.adamw(lr), lw.scale_by_rules(
  lw.layer_decay(0.75, params, stacks=S), stacks=S))``, timm's layer-wise
  decay: a distinct multiplier per layer, embedding and head; ``S =
  {"layers": 0}`` on the stacked tree, ``{}`` on the unrolled one (the
  unrolled model's rule set gives the stacked one the same multipliers,
  which the script checks).

Compile time: ``jax.clear_caches()`` before every lower+compile (no
persistent cache), median of ``--compile-repeats`` interleaved compiles,
in wall seconds and in this process's CPU seconds (steadier on a shared
machine);
step time: median over ``--repeats`` interleaved rounds of ``--steps``
donated steps, after warm-up. Both are printed with their ratio to
``plain`` on the same tree, with the number of distinct fused computations
(kernels) of the compiled step.

``--layouts`` adds what each way of reading the per-layer multipliers of a
stacked leaf costs (as ``benchmarks/layouts.py`` does for unstacked leaves):
``adamw`` followed by a multiplication of every stacked leaf by an
``(L,)`` vector of the state broadcast along axis 0, the vector reaching the
kernels as

* ``shared``: one ``(L,)`` vector for every stacked leaf (the floor);
* ``static``: slices of one vector at constant offsets;
* ``runtime``: slices at runtime offsets, one per leaf, from one
  conditional (what ``_core.leaf_factors`` does on the CPU);
* ``runtime_zero``: the same, with ``scale_by_rules``'s exact zero (a
  select where the factor is 0);
* ``one_offset``: slices at constant offsets from one runtime base;
* ``arrays``: one ``(L,)`` array per stacked leaf in the state.

Run:  python benchmarks/stacked.py [--layers 48] [--width 256] [--steps 10]
      [--repeats 3] [--compile-repeats 5] [--trees stacked,unrolled]
      [--layouts] [--layout-variants shared,runtime,...] [--out stacked.json]
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import layerwise as lw

import groups
import layouts

LR, WD, DECAY = 1e-4, 0.01, 0.75


def _layer(s, d, ff):
  """One layer's leaves; ``s(*shape)`` makes a leaf."""
  dense = lambda i, o: {"kernel": s(i, o), "bias": s(o)}
  norm = lambda: {"scale": s(d), "bias": s(d)}
  return {
      "attn": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d),
               "out": dense(d, d)},
      "attn_norm": norm(),
      "mlp": {"in": dense(d, ff), "out": dense(ff, d)},
      "mlp_norm": norm(),
  }


def trees(layers, d, ff, vocab, dtype=jnp.float32):
  """``(stacked, unrolled)`` as ``jax.ShapeDtypeStruct``s."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  outer = lambda body: {
      "embed": {"embedding": s(vocab, d)},
      "layers": body,
      "final_norm": {"scale": s(d), "bias": s(d)},
      "head": {"kernel": s(d, vocab), "bias": s(vocab)},
  }
  stacked = outer(_layer(lambda *shape: s(layers, *shape), d, ff))
  unrolled = outer([_layer(s, d, ff) for _ in range(layers)])
  return stacked, unrolled


def optimizers(rules, stacks):
  return {
      "plain": optax.adamw(LR, weight_decay=WD),
      "layerwise": optax.chain(optax.adamw(LR, weight_decay=WD),
                               lw.scale_by_rules(rules, stacks=stacks)),
  }


# ------------------------------------------------- how the multipliers reach

def _stacked_leaves(tree):
  return [i for i, x in enumerate(jax.tree_util.tree_leaves(tree))
          if x.ndim >= 2 and x.shape[0] == _L]


_L = 48


def _factor_tx(tree, init_state, read, exact_zero=False):
  """Multiplies stacked leaf ``k`` (the ``k``-th leaf with a leading layer
  axis) by ``read(state)[k]``, an ``(L,)`` vector, along axis 0 (with
  ``exact_zero``, selecting 0 where the factor is 0, as
  ``lw.scale_by_rules`` does)."""
  stacked = _stacked_leaves(tree)

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    vectors = read(state)
    for k, i in enumerate(stacked):
      u = leaves[i]
      f = jnp.reshape(vectors[k], (-1,) + (1,) * (u.ndim - 1))
      leaves[i] = (jnp.where(f == 0, jnp.zeros((), f.dtype), u * f)
                   if exact_zero else u * f)
    return treedef.unflatten(leaves), state
  return optax.GradientTransformation(lambda params: init_state(), update)


def _slice(v, start, length):
  return lax.dynamic_slice(v, (start,), (length,))


def layout_variants(tree):
  n = len(_stacked_leaves(tree))
  flat = np.linspace(0.5, 1.0, n * _L, dtype=np.float32)
  starts = [k * _L for k in range(n)]
  adamw = lambda: optax.adamw(LR, weight_decay=WD)
  vector = lambda: jnp.asarray(flat)

  def runtime(v):
    consts = tuple(np.int32(s) for s in starts)
    idx = lax.cond(v[0] == v[0], lambda: consts, lambda: consts)
    return [_slice(v, i, _L) for i in idx]

  def one_offset(v):
    base = lax.cond(v[0] == v[0], lambda: np.int32(0), lambda: np.int32(0))
    return [_slice(v, base + s, _L) for s in starts]

  def chain(init, read, exact_zero=False):
    return lambda: optax.chain(adamw(), _factor_tx(tree, init, read, exact_zero))

  return {
      "shared": chain(lambda: jnp.asarray(flat[:_L]), lambda v: [v] * n),
      "static": chain(vector, lambda v: [v[s:s + _L] for s in starts]),
      "runtime": chain(vector, runtime),
      "runtime_zero": chain(vector, runtime, exact_zero=True),
      "one_offset": chain(vector, one_offset),
      "arrays": chain(lambda: tuple(jnp.asarray(flat[s:s + _L]) for s in starts),
                      list),
  }


# --------------------------------------------------------------- measuring

def compile_fresh(tx, tree):
  """One lower+compile of the donated step with jax's caches emptied first:
  ``(wall seconds, process CPU seconds, distinct kernels)``.

  The CPU seconds (every thread of this process) are the steadier number on
  a machine that other jobs share: wall time also counts the time waiting
  for a core.
  """
  state = jax.eval_shape(tx.init, tree)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax.clear_caches()
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(tree, state, tree).compile()
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return wall, cpu, layouts.distinct_kernels(compiled.as_text())


def _compiles(txs, tree, repeats):
  """``{name: ([wall s], [cpu s], kernels)}``, compiles interleaved."""
  out = {name: ([], [], 0) for name in txs}
  for _ in range(repeats):
    for name, make in txs.items():
      wall, cpu, kernels = compile_fresh(make(), tree)
      out[name][0].append(wall)
      out[name][1].append(cpu)
      out[name] = out[name][:2] + (kernels,)
  return out


def compare(tree_name, tree, txs, args):
  """Compiles (fresh caches), builds and times ``txs`` interleaved; prints
  one row each, with ratios to the first."""
  compiles = _compiles({k: lambda tx=tx: tx for k, tx in txs.items()}, tree,
                       args.compile_repeats)
  built = {name: groups.build(tx, tree, jax.random.PRNGKey(0))
           for name, tx in txs.items()}
  samples = {name: [] for name in txs}
  for compiled, carry, grads, _ in built.values():  # warm-up
    groups.time_steps(compiled, carry, grads, 2)
  for _ in range(args.repeats):
    for name, (compiled, carry, grads, _) in built.items():
      samples[name] += groups.time_steps(compiled, carry, grads, args.steps)
  leaves = len(jax.tree_util.tree_leaves(tree))
  base, rows = None, []
  for name in txs:
    walls, cpus, kernels = compiles[name]
    row = dict(tree=tree_name, leaves=leaves, variant=name,
               compile_s=statistics.median(walls), compile_all_s=walls,
               compile_cpu_s=statistics.median(cpus), compile_cpu_all_s=cpus,
               step_ms=1e3 * statistics.median(samples[name]),
               kernels=kernels,
               state_bytes=groups.state_bytes(txs[name], tree),
               arrays=groups.call_arrays(txs[name], tree))
    base = base or row
    row.update(compile_ratio=row["compile_s"] / base["compile_s"],
               compile_cpu_ratio=row["compile_cpu_s"] / base["compile_cpu_s"],
               step_ratio=row["step_ms"] / base["step_ms"])
    rows.append(row)
    print(f"{tree_name:<9} {leaves:>6} {name:<11} {row['compile_s']:>9.2f} "
          f"{row['compile_ratio']:>9.2f} {row['compile_cpu_ratio']:>7.2f} "
          f"{row['step_ms']:>8.1f} {row['step_ratio']:>7.2f} "
          f"{row['kernels']:>7} {row['arrays']:>6}", flush=True)
  return rows


def layout_compiles(tree, args):
  """Compile time of each way of reading the stacked leaves' multipliers."""
  txs = {"plain": lambda: optax.adamw(LR, weight_decay=WD),
         **layout_variants(tree)}
  if args.layout_variants:
    txs = {k: v for k, v in txs.items()
           if k in ("plain", *args.layout_variants.split(","))}
  compiles = _compiles(txs, tree, args.compile_repeats)
  base_wall = statistics.median(compiles["plain"][0])
  base_cpu = statistics.median(compiles["plain"][1])
  rows = []
  print(f"\n{'layout':<11} {'compile s':>9} {'compile x':>9} {'cpu x':>7} "
        f"{'kernels':>7}")
  for name in txs:
    walls, cpus, kernels = compiles[name]
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    rows.append({"variant": name, "compile_s": wall, "compile_all_s": walls,
                 "compile_cpu_s": cpu, "compile_cpu_all_s": cpus,
                 "compile_ratio": wall / base_wall,
                 "compile_cpu_ratio": cpu / base_cpu, "kernels": kernels})
    print(f"{name:<11} {wall:>9.2f} {wall / base_wall:>9.2f} "
          f"{cpu / base_cpu:>7.2f} {kernels:>7}", flush=True)
  return rows


def main():
  global _L  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=48)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--compile-repeats", type=int, default=5,
                      help="compiles per variant (median reported)")
  parser.add_argument("--trees", default="stacked,unrolled")
  parser.add_argument("--layouts", action="store_true",
                      help="also time the ways of reading per-layer multipliers")
  parser.add_argument("--layout-variants", default="",
                      help="only these layouts (comma-separated; plain always)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  _L = args.layers

  stacked, unrolled = trees(args.layers, args.width, 4 * args.width, 8192)
  setups = {"stacked": (stacked, {"layers": 0}), "unrolled": (unrolled, {})}
  rules = {name: lw.layer_decay(DECAY, tree, stacks=stacks)
           for name, (tree, stacks) in setups.items()}
  # The unrolled model's rule set gives the stacked one the same multipliers.
  assert (lw.resolve(rules["unrolled"], stacked, stacks={"layers": 0})
          == lw.resolve(rules["stacked"], stacked, stacks={"layers": 0}))
  groups.print_versions()
  t0, load = time.time(), [os.getloadavg()]
  print(f"load average {load[0][0]:.2f} {load[0][1]:.2f} {load[0][2]:.2f} "
        f"on {os.cpu_count()} cores")
  header = (f"{'tree':<9} {'leaves':>6} {'variant':<11} {'compile s':>9} "
            f"{'compile x':>9} {'cpu x':>7} {'step ms':>8} {'step x':>7} "
            f"{'kernels':>7} {'arrays':>6}")
  print(header + "\n" + "-" * len(header))
  compile_fresh(optax.adamw(LR), trees(2, 64, 128, 1024)[0])  # warm-up
  rows = []
  for name in filter(None, args.trees.split(",")):
    tree, stacks = setups[name]
    rows += compare(name, tree, optimizers(rules[name], stacks), args)
  layout_rows = layout_compiles(stacked, args) if args.layouts else []
  load.append(os.getloadavg())
  print(f"load average at the end {load[1][0]:.2f} {load[1][1]:.2f} "
        f"{load[1][2]:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "optax": optax.__version__,
                 "machine": platform.platform(),
                 "command": "python benchmarks/stacked.py " + " ".join(
                     f"--{k.replace('_', '-')} {v if v != '' else chr(34) * 2}"
                     for k, v in vars(args).items()
                     if k not in ("out", "layouts")
                     and not (k == "layout_variants" and not v)) +
                 (" --layouts" if args.layouts else ""),
                 "seconds": time.time() - t0, "cores": os.cpu_count(),
                 "load_average": {"start": load[0], "end": load[1]},
                 "results": rows, "layouts": layout_rows}, f, indent=1)


if __name__ == "__main__":
  main()
