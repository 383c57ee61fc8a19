"""How long does matching a rule set take, and does caching make it free?

For a BERT-base-like tree (201 leaves) and a deep narrow one (777 leaves),
with 2, 14, 50 and 200 rules, measures in one process:

* ``layerwise cold``: build a rule set and resolve it once (each leaf's
  first rule, plus the unmatched/unused/shadowed checks);
* ``layerwise cached``: resolve the same structure again, as a transformation
  does at every trace;
* ``hand-written``: what users write today, ``tree_map_with_path`` with a
  first-match loop over ``fnmatch`` patterns, no checks, per call.

Then, at scale (``--scale``), on trees of 5,000, 10,000 and 50,000 leaves
(fresh trees: nothing cached), the seconds of:

* ``layer_decay``: ``lw.resolve(lw.layer_decay(0.75, tree), tree)``, its
  rule set included (one rule per depth: 3,127 rules at 50,000 leaves);
* ``1000 globs``, ``1000 regexes``: a rule set of 1,000 module rules
  (``encoder/layer_3/query/**``, ``re.compile(r"encoder/layer_3/query/.*")``);
* ``describe rules``: ``lw.describe(rules, tree)`` with the table printed;
* ``describe lw``: ``lw.describe(tx, tree)`` of ``clip_by_rules`` +
  ``add_decayed_weights`` + ``scale_by_rules(layer_decay)``;
* ``describe +adam``: the same with ``optax.adam`` in the chain, and
  ``adam alone``, ``jax.eval_shape(optax.adam(1e-3).init, tree)``, which
  describe cannot avoid: a state's structure comes from its init.

Prints medians (ms) and the ratios to the hand-written labeller, and writes
them as JSON (``--out``).

Run:  python benchmarks/resolve.py [--repeats 20] [--scale] [--out resolve.json]
"""

import argparse
import fnmatch
import json
import platform
import re
import statistics
import time

import jax
import optax

import layerwise as lw
from layerwise import _paths, _resolve

import _trees


def hand_written(selectors, tree):
  """First-match fnmatch labelling, as users write it by hand."""

  def label(keypath, _):
    path = "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in keypath)
    for i, pattern in enumerate(selectors):
      if pattern == "**" or fnmatch.fnmatchcase(path, pattern.replace("**", "*")):
        return i
    return -1

  return jax.tree_util.tree_map_with_path(label, tree)


def median_ms(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def seconds(fn):
  """Seconds of ``fn()``, cold: layerwise's caches of paths and shapes per
  structure, and jax's of traced functions, are emptied first."""
  _paths._PATHS.clear()  # pylint: disable=protected-access
  _resolve._SPECS.clear()  # pylint: disable=protected-access
  jax.clear_caches()
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def at_scale():
  """Seconds for the rows at scale (see the module's docstring)."""
  rows = []
  header = (f"{'leaves':>7} {'layer_decay':>11} {'1000 globs':>10} "
            f"{'1000 regexes':>12} {'describe rules':>14} {'describe lw':>11} "
            f"{'describe +adam':>14} {'adam alone':>10}")
  print("\nat scale, seconds, cold")
  print(header)
  print("-" * len(header))
  for blocks in (312, 625, 3125):
    t = _trees.transformer(blocks, 16, 32, 100)
    row = {"leaves": len(jax.tree_util.tree_leaves(t))}
    row["layer_decay"] = seconds(lambda: lw.resolve(lw.layer_decay(0.75, t), t))
    modules = _trees.group_selectors(t, 1001)[:1000]
    row["globs_1000"] = seconds(lambda: lw.resolve(
        {m: k for k, m in enumerate(modules)}, t, default=-1, strict=False))
    regexes = [re.compile(re.escape(m[:-3]) + "/.*") for m in modules]
    row["regexes_1000"] = seconds(lambda: lw.resolve(
        {r: k for k, r in enumerate(regexes)}, t, default=-1, strict=False))
    rules = lw.layer_decay(0.75, t)
    row["describe_rules"] = seconds(lambda: str(lw.describe(rules, t)))
    chain = [lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}),
             lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01})]
    tx = optax.chain(*chain, lw.scale_by_rules(rules))
    row["describe_lw"] = seconds(lambda: str(lw.describe(tx, t)))
    tx = optax.chain(*chain, optax.adam(1e-3), lw.scale_by_rules(rules))
    row["describe_adam"] = seconds(lambda: str(lw.describe(tx, t)))
    row["adam_alone"] = seconds(lambda: jax.eval_shape(optax.adam(1e-3).init, t))
    rows.append(row)
    print(f"{row['leaves']:>7} {row['layer_decay']:>11.2f} "
          f"{row['globs_1000']:>10.2f} {row['regexes_1000']:>12.2f} "
          f"{row['describe_rules']:>14.2f} {row['describe_lw']:>11.2f} "
          f"{row['describe_adam']:>14.2f} {row['adam_alone']:>10.2f}",
          flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--scale", action="store_true",
                      help="also the rows on 5,000 to 50,000 leaves")
  parser.add_argument("--out", default=None, help="write results as JSON")
  args = parser.parse_args()

  results = []
  header = (f"{'tree':<12} {'leaves':>6} {'rules':>5} {'hand ms':>8} "
            f"{'cold ms':>8} {'cached ms':>9} {'cold/hand':>9} {'cached/hand':>11}")
  print(header)
  print("-" * len(header))
  for name, tree in [("bert_base", _trees.bert_base()),
                     ("deep_narrow", _trees.deep_narrow())]:
    leaves = len(jax.tree_util.tree_leaves(tree))
    for groups in (2, 14, 50, 200):
      selectors = _trees.group_selectors(tree, groups)
      rules = {s: i for i, s in enumerate(selectors)}
      # Same answers from both before timing anything.
      assert lw.resolve(rules, tree) == hand_written(selectors, tree)
      hand = median_ms(lambda: hand_written(selectors, tree), args.repeats)
      cold = median_ms(lambda: _resolve.RuleSet(rules).resolve(tree),
                       args.repeats)
      rule_set = _resolve.RuleSet(rules)
      rule_set.resolve(tree)
      cached = median_ms(lambda: rule_set.resolve(tree), args.repeats)
      row = dict(tree=name, leaves=leaves, rules=groups, hand_ms=hand,
                 cold_ms=cold, cached_ms=cached, cold_ratio=cold / hand,
                 cached_ratio=cached / hand)
      results.append(row)
      print(f"{name:<12} {leaves:>6} {groups:>5} {hand:>8.2f} {cold:>8.2f} "
            f"{cached:>9.2f} {cold / hand:>9.2f} {cached / hand:>11.2f}")
  scale = at_scale() if args.scale else []
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": platform.platform(), "python": platform.python_version(),
                 "jax": jax.__version__, "results": results, "scale": scale},
                f, indent=1)


if __name__ == "__main__":
  main()
