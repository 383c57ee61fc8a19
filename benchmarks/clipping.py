"""Per-group clipping: what does it cost next to optax.clip_by_global_norm?

For a BERT-base-like tree (12 blocks, ~110M parameters, 201 leaves), times
the step ``params <- params + clip(grads)`` with donated buffers, warm-up
steps and interleaved rounds, in sections; each section's first row is its
baseline, measured in the same run, and the others are ratios to it:

* ``group``: ``global`` = ``optax.clip_by_global_norm(1.0)``;
  ``lw.global`` = ``lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})``;
  ``lw.G`` = G rules, each ``clip_group_norm`` of its own group (G = 14, 50,
  200: blocks' modules, then single leaves); ``part.G`` = what users write
  today for per-group clipping, an ``optax.partition`` with one
  ``clip_by_global_norm`` per group.
* ``leaf``: ``global`` again; ``lw.leaf`` = ``clip_norm`` of every leaf
  (Keras ``clipnorm``); ``lw.auto``/``lw.zclip`` = ``clip_quantile(0.9,
  100)`` and ``clip_zscore()`` per group, 14 groups.
* ``value``: ``optax.clip(1e-3)`` against ``lw.clip_value(1e-3)`` (which
  also records each leaf's norm and largest entry).
* ``agc``: ``optax.adaptive_grad_clip(0.01)`` against ``lw.clip_adaptive``.

Only one section's buffers are alive at a time. ``--with-adamw`` puts
``optax.adamw`` after each clipper (the step users run). Prints compile
time, median step time and state bytes with ratios, and writes JSON
(``--out``).

Run:  python benchmarks/clipping.py [--steps 10] [--repeats 3]
      [--compile-repeats 1] [--groups 14,50,200] [--with-adamw] [--out clipping.json]
"""

import argparse

import optax

import layerwise as lw

import _trees
import groups as bench


def sections(tree, group_counts):
  """``{section: {variant: transformation}}``, the baseline first."""
  group = {"global": optax.clip_by_global_norm(1.0),
           "lw.global": lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})}
  for g in group_counts:
    selectors = _trees.group_selectors(tree, g)
    group[f"lw.{g}"] = lw.clip_by_rules(
        {s: lw.clip_group_norm(1.0) for s in selectors})
    labels = lw.labels({s: f"g{k}" for k, s in enumerate(selectors)})
    group[f"part.{g}"] = optax.partition(
        {f"g{k}": optax.clip_by_global_norm(1.0)
         for k in range(len(selectors))}, labels)
  selectors = _trees.group_selectors(tree, 14)
  return {
      "group": group,
      "leaf": {
          "global": optax.clip_by_global_norm(1.0),
          "lw.leaf": lw.clip_by_rules({"**": lw.clip_norm(1.0)}),
          "lw.auto": lw.clip_by_rules(
              {s: lw.clip_quantile(0.9, 100) for s in selectors}),
          "lw.zclip": lw.clip_by_rules(
              {s: lw.clip_zscore() for s in selectors}),
      },
      "value": {"optax.clip": optax.clip(1e-3),
                "lw.value": lw.clip_by_rules({"**": lw.clip_value(1e-3)})},
      "agc": {"optax.agc": optax.adaptive_grad_clip(0.01),
              "lw.adapt": lw.clip_by_rules({"**": lw.clip_adaptive(0.01)})},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--compile-repeats", type=int, default=1)
  parser.add_argument("--groups", default="14,50,200")
  parser.add_argument("--with-adamw", action="store_true",
                      help="chain optax.adamw after each clipper")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  bench.print_header("section")
  tree = _trees.bert_base()
  results = []
  for name, txs in sections(
      tree, [int(g) for g in args.groups.split(",")]).items():
    if args.with_adamw:
      txs = {k: optax.chain(v, optax.adamw(1e-4, weight_decay=0.01))
             for k, v in txs.items()}
    results += bench.compare("bert_base", tree, name, txs, args)
  bench.write_json(args.out, results)


if __name__ == "__main__":
  main()
