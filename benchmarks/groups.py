"""Per-group learning rates: does the cost grow with the number of groups?

For a BERT-base-like tree (12 blocks, ~110M parameters, 201 leaves) and a deep
narrow tree (48 blocks, 777 leaves), with 2, 14, 50 and 200 groups, compares
in one process, interleaved, with donated buffers and warm-up steps:

* ``plain``: ``optax.adamw`` (one learning rate);
* ``partition``: what users write today, ``optax.partition`` with one
  ``adamw(lr * r_g)`` per group;
* ``layerwise``: ``optax.chain(optax.adamw(lr), lw.scale_by_rules(r))``.

Then, in rows marked ``frz``, the embeddings and the lower half of the
blocks frozen: plain ``adamw`` (training everything), ``lw.freeze(adamw,
frozen)``, and the hand-written ``optax.partition`` with ``set_to_zero``.

Prints compile time (median of ``--compile-repeats`` interleaved compiles),
median step time and optimizer-state bytes, each as a ratio to plain adamw,
and writes the numbers as JSON (``--out``).

Run:  python benchmarks/groups.py [--steps 10] [--repeats 3] [--compile-repeats 3]
      [--trees bert_base,deep_narrow]
      [--groups 2,14,50,200] [--no-partition] [--no-freeze] [--out groups.json]
"""

import argparse
import json
import platform
import statistics
import time

import jax
import optax

import layerwise as lw

import _trees

LR, WD = 1e-4, 0.01


def group_rates(tree, groups):
  """``groups`` selectors and a distinct learning-rate multiplier for each."""
  selectors = _trees.group_selectors(tree, groups)
  return selectors, [0.5 ** (k / max(groups - 1, 1)) for k in range(groups)]


def optimizers(tree, groups, with_partition):
  selectors, mults = group_rates(tree, groups)
  out = {
      "plain": optax.adamw(LR, weight_decay=WD),
      "layerwise": optax.chain(
          optax.adamw(LR, weight_decay=WD),
          lw.scale_by_rules(dict(zip(selectors, mults)))),
  }
  if with_partition:
    labels = lw.labels({s: f"g{k}" for k, s in enumerate(selectors)})
    out["partition"] = optax.partition(
        {f"g{k}": optax.adamw(LR * m, weight_decay=WD)
         for k, m in enumerate(mults)}, labels)
  return out


def frozen_optimizers(tree):
  """Embeddings and the lower half of the blocks frozen, the rest adamw."""
  blocks = sorted({p.split("/")[1] for p in jax.tree_util.tree_leaves(lw.paths(tree))
                   if p.startswith("encoder/")}, key=lambda b: int(b.split("_")[1]))
  frozen = lw.any_of("embeddings/**",
                     *(f"encoder/{b}/**" for b in blocks[:len(blocks) // 2]))
  labels = lw.labels({frozen: "frozen", "**": "train"})
  return {
      "plain": optax.adamw(LR, weight_decay=WD),
      "lw.freeze": lw.freeze(optax.adamw(LR, weight_decay=WD), frozen),
      "partition": optax.partition(
          {"train": optax.adamw(LR, weight_decay=WD),
           "frozen": optax.set_to_zero()}, labels),
  }


def compare(tree_name, tree, groups, txs, args):
  """Builds, warms up and times ``txs`` interleaved; prints one row each.

  Compile time is the median of ``--compile-repeats`` compiles, interleaved
  across the variants (one compile varies by 10-20% on a busy machine).
  """
  built = {name: build(tx, tree, jax.random.PRNGKey(0)) for name, tx in txs.items()}
  compiles = {name: [b[3]] for name, b in built.items()}
  for _ in range(args.compile_repeats - 1):
    for name, tx in txs.items():
      compiles[name].append(
          compile_step(tx, tree, jax.eval_shape(tx.init, tree), tree)[1])
  samples = {name: [] for name in txs}
  for name, (compiled, carry, grads, _) in built.items():  # warm-up
    time_steps(compiled, carry, grads, 2)
  for _ in range(args.repeats):  # interleaved rounds
    for name, (compiled, carry, grads, _) in built.items():
      samples[name] += time_steps(compiled, carry, grads, args.steps)
  base, rows = None, []
  for name in txs:
    row = dict(tree=tree_name, groups=groups, variant=name,
               compile_s=statistics.median(compiles[name]),
               step_ms=1e3 * statistics.median(samples[name]),
               state_bytes=state_bytes(txs[name], tree))
    base = base or row
    row.update(compile_ratio=row["compile_s"] / base["compile_s"],
               step_ratio=row["step_ms"] / base["step_ms"],
               state_ratio=(row["state_bytes"] / base["state_bytes"]
                            if base["state_bytes"] else float("nan")))
    rows.append(row)
    print(f"{tree_name:<12} {groups:>6} {name:<10} {row['compile_s']:>9.2f} "
          f"{row['step_ms']:>9.1f} {row['state_bytes'] / 2**20:>9.1f} "
          f"{row['compile_ratio']:>9.2f} {row['step_ratio']:>7.2f} "
          f"{row['state_ratio']:>7.2f}", flush=True)
  return rows


def state_bytes(tx, tree):
  state = jax.eval_shape(tx.init, tree)
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def cost_analysis(compiled):
  """XLA's cost analysis of a compiled step as one dict ({} if none): older
  jax returns a list with one dict per computation."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return cost or {}


def compile_step(tx, params, state, grads):
  """Lowers and compiles the donated step; returns it and the seconds taken.

  The arguments may be arrays or ``jax.ShapeDtypeStruct``s.
  """
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  return compiled, time.perf_counter() - t0


def params_and_grads(tree, key):
  """Random params shaped like ``tree`` and gradients derived from them."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  params = treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) * 0.02 for k, x in zip(keys, leaves)])
  return params, jax.tree_util.tree_map(lambda p: p * 1e-3 + 1e-4, params)


def build(tx, tree, key):
  """Allocates params, grads and state; compiles a donated step."""
  params, grads = params_and_grads(tree, key)
  state = jax.jit(tx.init)(params)
  compiled, compile_s = compile_step(tx, params, state, grads)
  return compiled, [params, state], grads, compile_s


def time_steps(compiled, carry, grads, steps):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
    jax.block_until_ready(carry[0])
    times.append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--trees", default="bert_base,deep_narrow")
  parser.add_argument("--groups", default="2,14,50,200")
  parser.add_argument("--no-partition", action="store_true",
                      help="skip the hand-written optax.partition (slow to compile)")
  parser.add_argument("--compile-repeats", type=int, default=3,
                      help="compiles per variant (median reported)")
  parser.add_argument("--no-freeze", action="store_true",
                      help="skip the frozen-layers comparison (rows 'frz')")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  print_header("groups")
  results = []
  for tree_name in args.trees.split(","):
    tree = getattr(_trees, tree_name)()
    for groups in map(int, args.groups.split(",")):
      results += compare(tree_name, tree, groups,
                         optimizers(tree, groups, not args.no_partition), args)
    if not args.no_freeze:
      results += compare(tree_name, tree, "frz", frozen_optimizers(tree), args)
  write_json(args.out, results)


def print_versions():
  """The versions and the machine, the first line of every benchmark."""
  print(f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.devices()[0].platform}, {platform.platform()}")


def print_header(second_column):
  """The versions, the machine, and the header of ``compare``'s rows."""
  print_versions()
  header = (f"{'tree':<12} {second_column:>6} {'variant':<10} {'compile s':>9} "
            f"{'step ms':>9} {'state MB':>9} {'compile x':>9} {'step x':>7} {'state x':>7}")
  print(header)
  print("-" * len(header))


def write_json(path, results):
  """``results`` with the versions and the machine, if ``path`` is given."""
  if path:
    with open(path, "w") as f:
      json.dump({"jax": jax.__version__, "optax": optax.__version__,
                 "machine": platform.platform(), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
