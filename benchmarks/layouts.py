"""What does reading one value per leaf from the state cost XLA:CPU's compile?

The record behind ``layerwise._core.factors``. Each variant multiplies every
update of ``optax.adamw`` by a per-leaf float32 factor held in the optimizer
state, and differs only in how the factors reach the leaves' kernels:

* ``plain``: ``optax.adamw`` alone (the reference);
* ``shared``: one scalar in the state for every leaf (the floor: one factor,
  no per-leaf read);
* ``scalars``: one scalar array per leaf in the state (one more array per
  leaf in every jitted call);
* ``static``: one vector, read at constant offsets (``vector[i]``): every
  leaf's kernel carries its own offset;
* ``indices``: one vector, read at per-leaf int32 indices that are arrays of
  the state (one more array per leaf);
* ``layerwise``: ``lw.scale_by_rules`` with a distinct multiplier per leaf
  (one vector, read at runtime indices that come out of conditionals of 128
  entries: ``_core.factors``);
* ``one_cond``: the same with a single conditional for all the indices.

Prints the compile time of each (``jax.clear_caches()`` before every
lower+compile; median of ``--repeats``, interleaved) as a ratio to
``plain``, and the number of distinct fused computations (kernels) of the
compiled step.

Run:  python benchmarks/layouts.py [--blocks 120] [--repeats 1] [--out layouts.json]

``--blocks 120`` is a tree of 1,929 small leaves (``_trees.transformer(120,
64, 128, 1024)``); ``--blocks 312`` is ``many_leaves`` (5,001).
"""

import argparse
import json
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import layerwise as lw
from layerwise import _paths  # pylint: disable=protected-access

import _trees


def _entry(vector, index):
  return lax.dynamic_slice(vector, (index,), (1,))[0]


def _factor_tx(init_state, read):
  """Multiplies leaf ``i`` by ``read(state)[i]``."""
  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    return treedef.unflatten([u * f for u, f in zip(leaves, read(state))]), state
  return optax.GradientTransformation(lambda params: init_state(), update)


def _one_cond(vector, n):
  consts = tuple(np.int32(i) for i in range(n))
  index = lax.cond(vector[0] == vector[0], lambda: consts, lambda: consts)
  return [_entry(vector, i) for i in index]


def variants(tree):
  n = len(jax.tree_util.tree_leaves(tree))
  factors = np.linspace(0.5, 1.0, n, dtype=np.float32)
  paths = _paths.flatten_with_paths(tree)[0]
  adamw = lambda: optax.adamw(1e-4, weight_decay=0.01)
  vector = lambda: jnp.asarray(factors)
  return n, {
      "plain": adamw,
      "shared": lambda: optax.chain(adamw(), _factor_tx(
          lambda: jnp.float32(0.7), lambda s: [s] * n)),
      "scalars": lambda: optax.chain(adamw(), _factor_tx(
          lambda: tuple(jnp.float32(f) for f in factors), lambda s: s)),
      "static": lambda: optax.chain(adamw(), _factor_tx(
          vector, lambda v: [v[i] for i in range(n)])),
      "indices": lambda: optax.chain(adamw(), _factor_tx(
          lambda: (vector(), tuple(jnp.int32(i) for i in range(n))),
          lambda s: [_entry(s[0], i) for i in s[1]])),
      "layerwise": lambda: optax.chain(adamw(), lw.scale_by_rules(
          {p: float(f) for p, f in zip(paths, factors)})),
      "one_cond": lambda: optax.chain(adamw(), _factor_tx(
          vector, lambda v: _one_cond(v, n))),
  }


def compile_once(tx, tree):
  state = jax.eval_shape(tx.init, tree)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax.clear_caches()
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(tree, state, tree).compile()
  seconds = time.perf_counter() - t0
  return seconds, distinct_kernels(compiled.as_text())


def distinct_kernels(text):
  """The number of distinct fused computations in a compiled step's HLO
  text: with their names and metadata taken out, equal bodies compile to
  one kernel (as tests/test_compile.py counts them)."""
  bodies = set()
  for body in re.findall(r"\n(%?fused_computation[^\n]*\{\n(?:  [^\n]*\n)*)\}",
                         text):
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    body = re.sub(r"%[\w.\-]+", "%x", body)
    body = re.sub(r"\bparam_[\d.]+", "p", body)
    bodies.add(body.split("\n", 1)[1])
  return len(bodies)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=120)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--only", default="")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  tree = _trees.transformer(args.blocks, 64, 128, 1024)
  n, txs = variants(tree)
  if args.only:
    txs = {k: v for k, v in txs.items() if k in ("plain", *args.only.split(","))}
  times = {k: [] for k in txs}
  kernels = {}
  compile_once(txs["plain"](), _trees.transformer(2, 64, 128, 1024))  # warm-up
  for _ in range(args.repeats):
    for name, make in txs.items():
      seconds, kernels[name] = compile_once(make(), tree)
      times[name].append(seconds)
  base = statistics.median(times["plain"])
  print(f"{n} leaves; jax {jax.__version__}, {platform.platform()}")
  print("| variant | compile | ratio | kernels |\n|---|---:|---:|---:|")
  rows = []
  for name in txs:
    m = statistics.median(times[name])
    rows.append({"variant": name, "compile_s": m, "ratio": m / base,
                 "kernels": kernels[name]})
    print(f"| {name} | {m:.2f} s | {m / base:.2f}x | {kernels[name]} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "machine": platform.platform(),
                 "leaves": n, "command": "python benchmarks/layouts.py "
                 f"--blocks {args.blocks} --repeats {args.repeats}",
                 "results": rows}, f, indent=1)


if __name__ == "__main__":
  main()
