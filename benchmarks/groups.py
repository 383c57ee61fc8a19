"""Per-group hyperparameters: does the cost grow with the number of groups?

For a BERT-base-like tree (12 blocks, ~110M parameters, 201 leaves), a deep
narrow tree (48 blocks, 777 leaves) and a tree of many small leaves (312
blocks, 5,001 leaves), with 2, 14, 50 and 200 groups, compares in one
process, interleaved, with donated buffers and warm-up steps:

* ``plain``: ``optax.adamw`` (one learning rate);
* ``layerwise``: ``optax.chain(optax.adamw(lr), lw.scale_by_rules(r))``;
* ``partition`` and ``lw.partition``: one ``adamw(lr * r_g, b1_g)`` per
  group (per-group betas, which ``scale_by_rules`` cannot express), with
  ``optax.partition`` as users write it and with ``lw.partition``.

Then, in rows marked ``frz``, the embeddings and the lower half of the
blocks frozen: plain ``adamw`` (training everything), ``lw.freeze(adamw,
frozen)``, and the hand-written ``optax.partition`` with ``set_to_zero``;
and in rows marked ``ft``, a whole fine-tuning chain: ``lw.freeze`` of
``clip_by_rules`` (14 groups) + ``add_decayed_weights`` (``NO_DECAY``) +
adam + ``scale_by_rules`` (200 groups), against its plain-optax twin
(``optax.masked`` and ``optax.freeze`` around ``clip_by_global_norm`` +
``adamw(mask=...)``).

Prints compile time (median of ``--compile-repeats`` interleaved compiles),
median step time, optimizer-state bytes and the number of arrays a jitted
step takes (params, state and grads), each as a ratio to the first row, and
writes the numbers as JSON (``--out``).

Run:  python benchmarks/groups.py [--steps 10] [--repeats 3] [--compile-repeats 3]
      [--trees bert_base,deep_narrow,many_leaves]
      [--groups 2,14,50,200] [--no-partition] [--no-freeze] [--no-finetune]
      [--out groups.json]
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
    # Per-group betas: b1 from 0.9 down by 0.001 a group.
    group = lambda k, m: optax.adamw(LR * m, b1=0.9 - 0.001 * k, weight_decay=WD)
    labels = lw.labels({s: f"g{k}" for k, s in enumerate(selectors)})
    out["partition"] = optax.partition(
        {f"g{k}": group(k, m) for k, m in enumerate(mults)}, labels)
    out["lw.partition"] = lw.partition(
        {s: group(k, m) for k, (s, m) in enumerate(zip(selectors, mults))})
  return out


def finetune_optimizers(tree):
  """The fine-tuning chain of docs/recipes.md, and its plain-optax twin."""
  frozen = _frozen(tree)
  selectors = _trees.group_selectors(tree, 200)
  mults = [0.5 ** (k / 199) for k in range(200)]
  clip_groups = _trees.group_selectors(tree, 14)
  lw_chain = lw.freeze(optax.chain(
      lw.clip_by_rules({s: lw.clip_group_norm(1.0 + k)
                        for k, s in enumerate(clip_groups)}, strict=False),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": WD}),
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(LR),
      lw.scale_by_rules(dict(zip(selectors, mults)), strict=False)), frozen)
  mask = lw.labels({frozen: False, "**": True})
  decay = lw.labels({lw.NO_DECAY: False, "**": True})
  twin = optax.chain(
      optax.masked(optax.chain(optax.clip_by_global_norm(1.0),
                               optax.adamw(LR, weight_decay=WD, mask=decay)),
                   mask),
      optax.masked(optax.set_to_zero(), lambda p: jax.tree_util.tree_map(
          lambda m: not m, mask(p))))
  return {"optax twin": twin, "lw chain": lw_chain}


def _frozen(tree):
  """The embeddings and the lower half of the blocks."""
  blocks = sorted({p.split("/")[1] for p in jax.tree_util.tree_leaves(lw.paths(tree))
                   if p.startswith("encoder/")}, key=lambda b: int(b.split("_")[1]))
  return lw.any_of("embeddings/**",
                   *(f"encoder/{b}/**" for b in blocks[:len(blocks) // 2]))


def frozen_optimizers(tree):
  """Embeddings and the lower half of the blocks frozen, the rest adamw."""
  frozen = _frozen(tree)
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
               state_bytes=state_bytes(txs[name], tree),
               arrays=call_arrays(txs[name], tree))
    base = base or row
    row.update(compile_ratio=row["compile_s"] / base["compile_s"],
               step_ratio=row["step_ms"] / base["step_ms"],
               state_ratio=(row["state_bytes"] / base["state_bytes"]
                            if base["state_bytes"] else float("nan")))
    rows.append(row)
    print(f"{tree_name:<12} {groups:>6} {name:<12} {row['compile_s']:>9.2f} "
          f"{row['step_ms']:>9.1f} {row['state_bytes'] / 2**20:>9.1f} "
          f"{row['arrays']:>7} {row['compile_ratio']:>9.2f} "
          f"{row['step_ratio']:>7.2f} {row['state_ratio']:>7.2f}", flush=True)
  return rows


def call_arrays(tx, tree):
  """The arrays a jitted step takes: the params, the state and the grads
  (each a dispatch on a GPU, where a step of BERT-base takes 1.5 ms)."""
  state = jax.eval_shape(tx.init, tree)
  return (2 * len(jax.tree_util.tree_leaves(tree))
          + len(jax.tree_util.tree_leaves(state)))


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
  parser.add_argument("--trees", default="bert_base,deep_narrow,many_leaves")
  parser.add_argument("--groups", default="2,14,50,200")
  parser.add_argument("--no-partition", action="store_true",
                      help="skip the hand-written optax.partition (slow to compile)")
  parser.add_argument("--compile-repeats", type=int, default=3,
                      help="compiles per variant (median reported)")
  parser.add_argument("--no-freeze", action="store_true",
                      help="skip the frozen-layers comparison (rows 'frz')")
  parser.add_argument("--no-finetune", action="store_true",
                      help="skip the fine-tuning chain (rows 'ft')")
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
    if not args.no_finetune:
      results += compare(tree_name, tree, "ft", finetune_optimizers(tree), args)
  write_json(args.out, results)


def print_versions():
  """The versions and the machine, the first line of every benchmark."""
  print(f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.devices()[0].platform}, {platform.platform()}")


def print_header(second_column):
  """The versions, the machine, and the header of ``compare``'s rows."""
  print_versions()
  header = (f"{'tree':<12} {second_column:>6} {'variant':<12} {'compile s':>9} "
            f"{'step ms':>9} {'state MB':>9} {'arrays':>7} {'compile x':>9} "
            f"{'step x':>7} {'state x':>7}")
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
