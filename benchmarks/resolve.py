"""How long does matching a rule set take, and does caching make it free?

For a BERT-base-like tree (201 leaves) and a deep narrow one (777 leaves),
with 2, 14, 50 and 200 rules, measures in one process:

* ``layerwise cold``: build a rule set and resolve it once (every selector
  against every leaf, plus the unmatched/unused/shadowed checks);
* ``layerwise cached``: resolve the same structure again, as a transformation
  does at every trace;
* ``hand-written``: what users write today, ``tree_map_with_path`` with a
  first-match loop over ``fnmatch`` patterns, no checks, per call.

Prints medians (ms) and the ratios to the hand-written labeller, and writes
them as JSON (``--out``).

Run:  python benchmarks/resolve.py [--repeats 20] [--out resolve.json]
"""

import argparse
import fnmatch
import json
import platform
import statistics
import time

import jax

import layerwise as lw
from layerwise import _resolve

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
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
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": platform.platform(), "python": platform.python_version(),
                 "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
