"""The bad input catalogue: every mistake the library names, and how.

Each row of ``CATALOGUE`` is one bad input to a public function or
transformation: the call that makes it, the exception it must raise, and
fragments that its message must contain. The fragments prove that the
message names the offending path or value *and* says what to do instead;
no row may fail later, or with an opaque JAX error. ``docs/errors.md``
lists the same rows, with the same ids in the same order (checked below).

Rows made with :func:`at_init` and :func:`at_update` check the stage too:
the transformation must build (and init) without complaint, and the error
must come at ``init``, or at the first ``update`` under ``jax.jit`` (its
trace, never its run).
"""

import dataclasses
import math
import pathlib
import re
from typing import Any, Callable, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

# A small model: an embedding, an encoder layer and a head.
PARAMS = {
    "embed": jnp.ones((4, 2)),
    "encoder": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
    "head": {"w": jnp.ones((2, 3))},
}
# The same with an integer leaf (a step counter kept with the params).
WITH_STEP = {**PARAMS, "step": jnp.zeros((), jnp.int32)}
# The model as it must not be given to update after init: a leaf more, a
# leaf less, a leaf reshaped, a leaf renamed.
EXTRA = {**PARAMS, "extra": jnp.ones(3)}
LESS = {k: v for k, v in PARAMS.items() if k != "embed"}
RESHAPED = {**PARAMS, "embed": jnp.ones((5, 2))}
RENAMED = {"embedding": PARAMS["embed"], "encoder": PARAMS["encoder"],
           "head": PARAMS["head"]}
# Pretrained weights with a head of another size, for transplant.
PRETRAINED = {**PARAMS, "head": {"w": jnp.ones((2, 5))}}
# Two layers stacked on axis 0, and an unrolled linen checkpoint of them.
TWO_LAYERS = {"layers": {"w": jnp.ones((2, 3))}}
TWO_UNROLLED = {"layers_0": {"w": jnp.ones(3)}, "layers_1": {"w": jnp.ones(3)}}


def _on_two_processes(fn: Callable[[], Any]) -> Any:
  """``fn()`` as process 0 of two, whose process 1 has a value 1 larger
  (the 2-process run of tests/test_multihost.py checks the real thing)."""
  from jax.experimental import multihost_utils
  with mock.patch.object(jax, "process_count", lambda: 2), \
       mock.patch.object(multihost_utils, "process_allgather",
                         lambda x: np.stack([x, x + 1])):
    return fn()


class Row(NamedTuple):
  """One bad input: ``trigger()`` must raise ``error`` with a message that
  contains every one of ``fragments`` (literal substrings)."""
  id: str
  trigger: Callable[[], Any]
  error: type
  fragments: tuple[str, ...]


def _early(fn: Callable[[], Any], stage: str) -> Any:
  """``fn()``, which must not raise: the row's error belongs to a later
  stage than ``stage``."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    raise AssertionError(
        f"raised at {stage}, earlier than the catalogue says: {e!r}") from e


def at_init(make: Callable[[], Any], params: Any = PARAMS) -> Callable[[], Any]:
  """A trigger: builds the transformation (no error allowed), then inits."""

  def trigger():
    tx = _early(make, "construction")
    return tx.init(params)

  return trigger


_SAME = object()


def at_update(make: Callable[[], Any], updates: Any, *,
              params: Any = PARAMS,
              update_params: Any = _SAME) -> Callable[[], Any]:
  """A trigger: builds and inits (no error allowed), then traces a jitted
  update with ``updates`` and ``update_params`` (``params`` by default)."""

  def trigger():
    tx = _early(make, "construction")
    state = _early(lambda: tx.init(params), "init")
    given = params if update_params is _SAME else update_params
    return jax.jit(tx.update)(updates, state, given)

  return trigger


def at_update_with_state(make: Callable[[], Any],
                         state: Any) -> Callable[[], Any]:
  """A trigger: builds (no error allowed), then updates with ``state``, as
  restored from a checkpoint without a target."""

  def trigger():
    tx = _early(make, "construction")
    return tx.update(PARAMS, state, PARAMS)

  return trigger


def scale_state(rules: Any = None) -> Any:
  """An optimizer state holding a scale_by_rules state."""
  tx = optax.chain(optax.sgd(0.1), lw.scale_by_rules(rules or {"**": 1.0}))
  return tx.init(PARAMS)


def _sum_loss(params: Any) -> Any:
  """A loss of the small model, for lw.grad."""
  return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(params))


def _inner_typo() -> Any:
  """lw.partition whose inner rule set has a selector that matches no leaf
  of the whole model (naming another group's leaves is allowed)."""
  return lw.partition({
      "head/**": lw.scale_by_rules({"encoder/**": 0.5, "encodr/**": 0.1,
                                    "**": 1.0}),
      "**": optax.sgd(0.1)})


def _changed_injected_default() -> Any:
  """An eager update after changing a default that inject_hyperparams
  holds: the rebuilt transformation would keep the state's multipliers."""
  tx = optax.inject_hyperparams(lw.scale_by_rules)({"head/**": 0.5},
                                                   default=1.0)
  state = _early(lambda: tx.init(PARAMS), "init")
  state.hyperparams["default"] = jnp.float32(0.25)
  return tx.update(PARAMS, state)


def _describe_with_wrong_state() -> Any:
  tx = lw.scale_by_rules({"**": 1.0})
  return lw.describe(tx, PARAMS, opt_state=optax.sgd(0.1).init(PARAMS))


# The state of chain(clip_by_rules, sgd, scale_by_rules) as orbax restores it
# without a target: lists and dicts, the static rules gone.
RESTORED_PLAIN = [{"norms": jnp.ones(4), "scales": jnp.ones(4),
                   "thresholds": jnp.ones(4), "stats": {}, "rules": None},
                  [{}, None],
                  {"count": jnp.int32(1), "multipliers": jnp.ones(4),
                   "rules": None}]


# Twelve layers stacked on axis 0 (a scanned model's params).
STACKED = {"embed": jnp.ones((4, 2)),
           "layers": {"w": jnp.ones((12, 2, 2)), "b": jnp.ones((12, 2))}}


def _two_marked_stacks() -> Any:
  """Two scanned stacks of one length whose metadata marks the layer axis:
  the subtree holding both also holds an unstacked leaf."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  def marked(shape):
    return nn.Partitioned(jnp.ones(shape), names=("layers", None, None))

  return {"embed": jnp.ones((4, 2)),
          "encoder": {"w": marked((3, 2, 2))},
          "decoder": {"w": marked((3, 2, 2))}}


# Fragments shared by the structure rows.
INIT_AGAIN = "call init again with the new params"
NOT_AT_INIT = "do not have the structure of the params given to init"

CATALOGUE = [
    # ------------------------------------------------------- rule sets
    Row("rules-string", lambda: lw.scale_by_rules("encoder/**"), TypeError,
        ("got str: 'encoder/**'", "{'encoder/**': <multiplier>}")),
    Row("rules-set", lambda: lw.clip_by_rules({"encoder/**", "head/**"}),
        TypeError, ("got set", "write a dict {selector: clipper, ...}")),
    Row("rules-number", lambda: lw.scale_by_rules(0.5), TypeError,
        ("got float: 0.5", "write {'**': 0.5}")),
    Row("rules-list-of-selectors", lambda: lw.resolve(["encoder/**"], PARAMS),
        TypeError, ("Rule 0 is 'encoder/**'",
                    "write [(selector, value), ...]")),
    Row("selector-wrong-type", lambda: lw.any_of("**/b", 3), TypeError,
        ("3 (int) is not a selector", "A selector is a glob string")),
    Row("selector-wrong-signature",
        lambda: lw.resolve({lambda path: True: 1.0}, PARAMS), TypeError,
        ("cannot be called as selector(path, leaf)",
         "lambda path, leaf: leaf.ndim == 1")),
    Row("selector-class-not-callable", lambda: lw.Selector("**/b", "biases"),
        TypeError, ("got str and str", "lw.Selector(lambda path, leaf:")),
    Row("selector-returns-non-bool",
        lambda: lw.resolve({lambda path, leaf: leaf.shape: 0.1, "**": 1.0},
                           PARAMS), TypeError,
        ("returned tuple for parameter 'embed'", "must return a Python bool")),
    Row("combinator-empty", lambda: lw.all_of(), ValueError,
        ("all_of() needs at least one selector",)),
    Row("ndim-negative", lambda: lw.ndim_at_most(-1), ValueError,
        ("ndim_at_most(k) needs a non-negative int k, got -1",)),
    Row("glob-unclosed-bracket",
        lambda: lw.resolve({"layers_[01/**": 0.1, "**": 1.0}, PARAMS),
        ValueError, ("'layers_[01/**' has an unclosed '['",
                     "Close the character class")),
    Row("glob-empty-segment", lambda: lw.resolve({"encoder//w": 0.1}, PARAMS),
        ValueError, ("'encoder//w' has an empty path segment", "Remove it")),
    Row("glob-partial-double-star", lambda: lw.resolve({"enc**": 0.1}, PARAMS),
        ValueError, ("segment 'enc**'", "Use '*' to match part of one")),
    Row("glob-empty", lambda: lw.resolve({"": 0.1}, PARAMS), ValueError,
        ("Glob selector '' is empty", "Use '**' to select every parameter")),
    Row("glob-bracket-number-range",
        lambda: lw.resolve({"layers_[0-11]/**": 0.1, "**": 1.0}, PARAMS),
        ValueError, ("'layers_[0-11]/**' has the character class '[0-11]'",
                     "matches one character, '0', '1',",
                     "write 'layers_{0..11}/**'")),
    Row("glob-range-reversed",
        lambda: lw.resolve({"layers_{5..2}/**": 0.1, "**": 1.0}, PARAMS),
        ValueError, ("the range '{5..2}' is empty", "Write '{2..5}'")),
    Row("glob-range-not-numbers",
        lambda: lw.resolve({"layers_{a..b}/**": 0.1, "**": 1.0}, PARAMS),
        ValueError, ("'{a..b}' is not a numeric range",
                     "two decimal integers, as in 'layers_{0..11}'",
                     "write '[{]' for a literal '{'")),
    Row("glob-range-unclosed",
        lambda: lw.resolve({"layers_{0..11/**": 0.1, "**": 1.0}, PARAMS),
        ValueError, ("'layers_{0..11/**' has an unclosed '{'",
                     "Close the numeric range")),
    Row("selector-typo",
        lambda: lw.resolve({"encodr/**": 0.1, "**": 1.0}, PARAMS),
        lw.RuleError, ("rule 0: 'encodr/**'", "closest: 'encoder/**'",
                       "Fix the pattern", "lw.paths(params)")),
    Row("regex-partial-match",
        lambda: lw.resolve({re.compile("enc"): 0.1, "**": 1.0}, PARAMS),
        lw.RuleError, ("rule 0: re.compile('enc')",
                       "must match the whole path", "r'.*bias'")),
    Row("leaf-unmatched", lambda: lw.resolve({"encoder/**": 0.1}, PARAMS),
        lw.RuleError, ("2 parameter(s) match no rule", "'embed'", "'head/w'",
                       "catch-all '**'", "default=<value>")),
    Row("rule-shadowed",
        lambda: lw.resolve({"**": 1.0, "head/**": 0.1}, PARAMS), lw.RuleError,
        ("rule 1: 'head/**' never applies", "taken by rule 0 ('**')",
         "put more specific rules first")),
    Row("params-none-at-init", at_init(lambda: lw.scale_by_rules({"**": 1.0}),
                                       None),
        lw.RuleError, ("rule 0: '**'", "no array leaves at all",
                       "pass the params")),
    Row("leaf-not-an-array",
        lambda: lw.resolve({"**": 1.0}, {"w": jnp.ones(2), "name": "bert"}),
        TypeError, ("Parameter 'name' is a str",
                    "keep other values out of the tree")),
    Row("label-none", lambda: lw.labels({"head/**": None, "**": "train"}),
        TypeError, ("label None of rule 'head/**'", "(use strings)")),
    # ---------------------------------------------- stacked (scanned) layers
    Row("stacks-not-a-mapping", lambda: lw.paths(PARAMS, stacks=0),
        TypeError, ("stacks must be a mapping {stack_path: layer_axis}",
                    "got int: 0")),
    Row("stacks-empty-name", lambda: lw.paths(PARAMS, stacks=""), ValueError,
        ("stacks='' names no metadata axis", "stacks={} for none")),
    Row("stacks-axis-not-int",
        lambda: lw.resolve({"**": 1.0}, STACKED, stacks={"layers": "0"}),
        TypeError, ("the layer axis of stack 'layers' must be an int",
                    "0 for (L, ...) leaves, 1 for (d, L, ...)", "got str '0'")),
    Row("stacks-nested",
        lambda: lw.paths(STACKED, stacks={"layers": 0, "layers/w": 0}),
        ValueError, ("stack 'layers/w' is inside stack 'layers'",
                     "Declare one of them")),
    Row("stacks-no-subtree",
        at_init(lambda: lw.scale_by_rules({"**": 1.0},
                                          stacks={"encoder/layers": 0})),
        ValueError, ("stack 'encoder/layers' names no subtree of the params",
                     "(closest: 'encoder/w'",
                     "lw.paths(params, stacks={}) lists the paths")),
    Row("stacks-axis-out-of-range",
        lambda: lw.paths(STACKED, stacks={"layers": 2}), ValueError,
        ("stack 'layers' has layer axis 2, but its leaf 'layers/b' has shape "
         "(12, 2) (2 axes)", "Give the axis the layers are on")),
    Row("stacks-lengths-differ",
        lambda: lw.paths({"layers": {"w": jnp.ones((12, 2, 2)),
                                     "b": jnp.ones((2,))}},
                         stacks={"layers": 0}), ValueError,
        ("the leaves of stack 'layers' have different lengths on layer axis "
         "0 (2: 'layers/b'; 12: 'layers/w')", "Check the axis (MaxText's is 1)",
         "declare the stack's subtrees separately")),
    Row("stacks-index-past-last-layer",
        at_init(lambda: lw.scale_by_rules({"layers/12/**": 0.1, "**": 1.0},
                                          stacks={"layers": 0}), STACKED),
        lw.RuleError, ("rule 0: 'layers/12/**'",
                       "stack 'layers' has 12 layers (0..11)",
                       "Fix the pattern")),
    Row("stacks-metadata-ambiguous",
        lambda: lw.paths(_two_marked_stacks()), ValueError,
        ("marks 2 parameter(s) as stacked on a 'layers' axis of length 3",
         "layerwise cannot tell which subtree is the stack",
         "stacks={'<stack path>': 0}")),
    # ---------------------------------------------- multipliers and decay
    Row("multiplier-string", lambda: lw.scale_by_rules({"**": "0.1"}),
        TypeError, ("rule '**' has multiplier '0.1' (str)",
                    "a number or a schedule")),
    Row("multiplier-clipper",
        lambda: lw.scale_by_rules({"head/**": lw.clip_norm(1.0), "**": 1.0}),
        TypeError, ("rule 'head/**' has multiplier clip_norm(1.0)",
                    "A clipper goes in lw.clip_by_rules")),
    Row("multiplier-optimizer",
        lambda: lw.scale_by_rules({"head/**": optax.adam(1e-3)}), TypeError,
        ("rule 'head/**' has multiplier", "goes in lw.partition")),
    Row("multiplier-injected-array",
        at_update(lambda: optax.inject_hyperparams(lw.scale_by_rules)(
            {"head/**": 0.5}, default=1.0), PARAMS), TypeError,
        ("default has multiplier", "It is a traced value", "lw.set_scale",
         "static_args=('default',)")),
    Row("multiplier-injected-changed", _changed_injected_default, ValueError,
        ("the multiplier of default is 0.25 in this transformation",
         "initialised with 1.0 (parameter 'embed')", "would not apply",
         "static_args=('default',)", "lw.set_scale")),
    Row("multiplier-complex",
        lambda: lw.scale_by_rules({"**": jnp.complex64(1.0)}), TypeError,
        ("rule '**' has multiplier Array(1.+0.j, dtype=complex64)",
         "a number or a schedule")),
    Row("multiplier-negative",
        lambda: lw.scale_by_rules({"head/**": -0.5, "**": 1.0}), ValueError,
        ("rule 'head/**' has multiplier -0.5", "finite and >= 0",
         "use lw.freeze")),
    Row("multiplier-nan",
        lambda: lw.scale_by_rules({"head/**": math.nan, "**": 1.0}),
        ValueError, ("rule 'head/**' has multiplier nan", "finite and >= 0")),
    Row("multiplier-inf", lambda: lw.scale_by_rules({"**": math.inf}),
        ValueError, ("rule '**' has multiplier inf", "finite and >= 0")),
    Row("multiplier-on-integer-leaf",
        at_init(lambda: lw.scale_by_rules({"**": 0.5}), WITH_STEP), TypeError,
        ("parameter 'step' has dtype int32 and multiplier 0.5",
         "Give it the multiplier 1.0", "{'step': 1.0}")),
    Row("schedule-on-bool-leaf",
        at_init(lambda: lw.scale_by_rules(
            {"mask": optax.linear_schedule(0.0, 1.0, 10), "**": 1.0}),
            {**PARAMS, "mask": jnp.array([True, False])}), TypeError,
        ("parameter 'mask' has dtype bool and multiplier a schedule",
         "{'mask': 1.0}")),
    Row("schedule-wrong-signature",
        lambda: lw.scale_by_rules({"**": lambda: 1.0}), TypeError,
        ("cannot be called as schedule(count)", "lambda count: 0.5")),
    Row("schedule-returns-vector",
        at_update(lambda: lw.scale_by_rules(
            {"head/**": lambda count: jnp.ones(2), "**": 1.0}), PARAMS),
        ValueError, ("schedule of rule 'head/**' returned shape (2,) for "
                     "parameter 'head/w'", "write one rule per leaf")),
    Row("schedule-returns-non-number",
        at_update(lambda: lw.scale_by_rules({"**": lambda count: "fast"}),
                  PARAMS), TypeError,
        ("returned 'fast' (str) for parameter 'embed'",
         "must return a real number")),
    Row("weight-decay-negative",
        lambda: lw.add_decayed_weights({"head/**": -0.1, "**": 0.0}),
        ValueError, ("rule 'head/**' has weight decay -0.1",
                     "finite and >= 0")),
    Row("weight-decay-on-integer-leaf",
        at_init(lambda: lw.add_decayed_weights({"**": 0.1}), WITH_STEP),
        TypeError, ("parameter 'step' has dtype int32 and weight decay 0.1",
                    "Give it the weight decay 0.0")),
    Row("weight-decay-schedule-returns-vector",
        at_update(lambda: lw.add_decayed_weights(
            {"**": lambda count: jnp.full(3, 0.1)}), PARAMS), ValueError,
        ("returned shape (3,) for parameter 'embed'", "one rule per leaf")),
    Row("weight-decay-params-none",
        at_update(lambda: lw.add_decayed_weights({"**": 0.1}), PARAMS,
                  update_params=None), ValueError,
        ("needs the params", "tx.update(updates, state, params)")),
    Row("weight-decay-params-other-tree",
        at_update(lambda: lw.add_decayed_weights({"**": 0.1}), PARAMS,
                  update_params=EXTRA), ValueError,
        ("only in the params: 'extra'", "Pass the params the updates are for")),
    Row("weight-decay-toward-string",
        lambda: lw.add_decayed_weights({"**": 0.1}, toward="pretrained"),
        ValueError, ("lw.add_decayed_weights: toward='pretrained' is not a "
                     "tree of weights", "the one string it takes is 'init'")),
    Row("weight-decay-toward-not-an-array",
        lambda: lw.add_decayed_weights({"**": 0.1},
                                       toward={**PARAMS, "head": {"w": 0.5}}),
        TypeError, ("lw.add_decayed_weights: toward 'head/w' is a float, not "
                    "an array", "a tree of arrays with the params' paths",
                    "None for the leaves or subtrees that decay toward zero")),
    Row("weight-decay-toward-other-tree",
        at_init(lambda: lw.add_decayed_weights({"**": 0.1}, toward=LESS)),
        ValueError, ("toward does not have the structure of the params given "
                     "to init (missing from toward: 'embed')",
                     "lw.paths(params) lists them")),
    Row("weight-decay-toward-shape",
        at_init(lambda: lw.add_decayed_weights({"**": 0.1}, toward=RESHAPED)),
        ValueError, ("toward 'embed' has shape (5, 2), the parameter (4, 2)",
                     "such as the pretrained params after lw.transplant")),
    Row("weight-decay-toward-dtype",
        at_init(lambda: lw.add_decayed_weights({"**": 0.1}, toward={
            **PARAMS, "embed": PARAMS["embed"].astype(jnp.bfloat16)})),
        TypeError, ("toward 'embed' has dtype bfloat16, the parameter float32",
                    "toward.astype(param.dtype)")),
    Row("weight-decay-toward-not-in-state",
        lambda: _early(lambda: lw.add_decayed_weights(
            {"**": 0.1}, toward=PARAMS), "construction").update(
                PARAMS, lw.add_decayed_weights({"**": 0.1}).init(PARAMS),
                PARAMS), ValueError,
        ("decays toward= given weights, but the state was initialised "
         "without them", "every leaf would decay toward zero",
         "Pass the state this transformation's init returned")),
    # ------------------------------------------------------------ set_scale
    Row("set-scale-typo", lambda: lw.set_scale(scale_state(), "encodr/**", 0.5),
        ValueError, ("selector 'encodr/**' matches no parameter",
                     "closest: 'encoder/**'", "Fix the selector")),
    Row("set-scale-uncovered",
        lambda: lw.set_scale(lw.partition({
            "encoder/**": optax.chain(optax.sgd(0.1),
                                      lw.scale_by_rules({"**": 1.0})),
            "**": optax.sgd(0.1)}).init(PARAMS), "head/**", 0.5), ValueError,
        ("selector 'head/**' matches 1 parameter(s) of the model ('head/w'), "
         "but none that a lw.scale_by_rules covers",
         "covers 2 parameters: 'encoder/**' (2)",
         "the PartitionState found gives them group '**'",
         "add a rule for them to a lw.scale_by_rules in the optimizer of "
         "their group, or chain lw.scale_by_rules outside the partition")),
    Row("set-scale-negative",
        lambda: lw.set_scale(scale_state(), "head/**", -1),
        ValueError, ("the new multiplier is -1", "finite and >= 0")),
    Row("set-scale-nan",
        lambda: lw.set_scale(scale_state(), "head/**", jnp.float32(jnp.nan)),
        ValueError, ("the new multiplier is nan", "finite and >= 0")),
    Row("set-scale-schedule",
        lambda: lw.set_scale(scale_state(), "**",
                             optax.linear_schedule(0.0, 1.0, 10)),
        TypeError, ("takes a number, not a schedule",
                    "Build scale_by_rules with the schedule")),
    Row("set-scale-vector",
        lambda: lw.set_scale(scale_state(), "head/**", jnp.ones(3)), TypeError,
        ("array of shape (3,)", "call set_scale once per group")),
    Row("set-weight-decay-negative",
        lambda: lw.set_weight_decay(
            lw.add_decayed_weights({"**": 0.1}).init(PARAMS), "**", -0.1),
        ValueError, ("lw.set_weight_decay: the new weight decay is -0.1",
                     "finite and >= 0")),
    Row("set-weight-decay-no-state",
        lambda: lw.set_weight_decay(scale_state(), "**", 0.1), ValueError,
        ("holds no lw.add_decayed_weights state",
         "chain lw.add_decayed_weights(...) into the optimizer")),
    Row("set-threshold-out-of-range",
        lambda: lw.set_threshold(lw.clip_by_rules(
            {"**": lw.clip_quantile(0.5, window=4)}).init(PARAMS), "**", 90),
        ValueError, ("lw.set_threshold: the new quantile must be in [0, 1], "
                     "got 90",)),
    Row("set-threshold-unclipped",
        lambda: lw.set_threshold(lw.clip_by_rules(
            {"head/**": None, "**": lw.clip_norm(1.0)}).init(PARAMS),
            "head/**", 0.5), ValueError,
        ("selector 'head/**' matches 1 parameter(s), but lw.clip_by_rules "
         "leaves them alone", "Select parameters that it covers")),
    Row("set-scale-no-state",
        lambda: lw.set_scale(optax.sgd(0.1).init(PARAMS), "**", 0.5),
        ValueError, ("holds no lw.scale_by_rules state",
                     "chain lw.scale_by_rules(...) into the optimizer")),
    Row("set-scale-differs-between-processes", lambda: _on_two_processes(
        lambda: lw.set_scale(scale_state(), "head/**", 0.5)), ValueError,
        ("lw.set_scale: the value differs between processes (process 0: 0.5, "
         "process 1: 1.5)", "Values must be the same on every process",
         "broadcast_one_to_all")),
    Row("state-shardings-unplaced",
        lambda: lw.state_shardings(optax.adam(1e-3), {"w": np.ones(2)}),
        ValueError, ("lw.state_shardings: parameter 'w' (ndarray) has no "
                     "sharding", "jax.device_put(params, shardings)",
                     "jax.ShapeDtypeStruct(shape, dtype, sharding=...)")),
    Row("state-shardings-no-params",
        lambda: lw.state_shardings(optax.adam(1e-3), {}), ValueError,
        ("lw.state_shardings: params has no array leaves",
         "pass the params the state is for, placed on their devices")),
    # -------------------------------------------- layer_decay, discriminative
    Row("layer-decay-out-of-range",
        lambda: lw.layer_decay(0.0, {"layers_0": {"w": jnp.ones(2)}}),
        ValueError, ("decay must be in (0, 1], got 0.0",
                     "0.65 to 0.9 are usual")),
    Row("layer-decay-no-block",
        lambda: lw.layer_decay(0.7, PARAMS), ValueError,
        ("found no block", "'embed'", "Pass block=<regex>")),
    Row("layer-decay-stacked-undeclared",
        lambda: lw.layer_decay(0.7, {"embed": jnp.ones((4, 2)),
                                     "layers": {"w": jnp.ones((3, 2, 2))}},
                               stacks={}),
        ValueError, ("found no block", "'layers/w'",
                     "declare it: stacks={'layers': 0}")),
    Row("layer-decay-no-head",
        lambda: lw.layer_decay(0.7, {"layers_0": {"w": jnp.ones(2)}}),
        ValueError, ("found no head", "or pass head=None")),
    Row("layer-decay-unnamed-module",
        lambda: lw.layer_decay(0.7, {"layers_0": {"w": jnp.ones(2)},
                                     "aux": {"w": jnp.ones(2)},
                                     "head": {"w": jnp.ones(2)}}),
        ValueError, ("1 parameter(s) are in none of the stem, the blocks",
                     "'aux/w'", "head=lw.DEFAULT_HEAD | 'aux/**'",
                     "stem=lw.DEFAULT_STEM | 'aux/**'", "stem='**'")),
    Row("discriminative-non-positive",
        lambda: lw.discriminative(["embed", "**"], -1.0, 1.0), ValueError,
        ("lo must be finite and > 0, got -1.0",
         "give it multiplier 0.0 in a rule of its own")),
    Row("discriminative-groups-string",
        lambda: lw.discriminative("encoder/**", 1.0), TypeError,
        ("groups must be a list of selectors", "write [selector]")),
    # ------------------------------------------------------------- clipping
    Row("clip-rule-number", lambda: lw.clip_by_rules({"**": 1.0}), TypeError,
        ("rule '**' has value 1.0 (float)", "must be a clipper",
         "lw.clip_group_norm(1.0)")),
    Row("clip-value-zero", lambda: lw.clip_value(0), ValueError,
        ("lw.clip_value: threshold must be finite and > 0, got 0.0",
         "to freeze leaves, use lw.freeze")),
    Row("clip-value-negative", lambda: lw.clip_value(-1.0), ValueError,
        ("lw.clip_value: threshold must be finite and > 0, got -1.0",)),
    Row("clip-norm-nan", lambda: lw.clip_norm(math.nan), ValueError,
        ("lw.clip_norm: threshold must be finite and > 0, got nan",)),
    Row("clip-norm-ord", lambda: lw.clip_norm(1.0, ord=3), ValueError,
        ("ord must be 1, 2 or inf", "got 3")),
    Row("clip-group-norm-negative", lambda: lw.clip_group_norm(-1.0),
        ValueError, ("lw.clip_group_norm: threshold must be finite and > 0",)),
    Row("clip-adaptive-zero", lambda: lw.clip_adaptive(0.0), ValueError,
        ("lw.clip_adaptive: clipping must be finite and > 0, got 0.0",)),
    Row("clip-adaptive-eps-negative", lambda: lw.clip_adaptive(0.01, eps=-1),
        ValueError, ("eps must be finite and >= 0, got -1.0",)),
    Row("clip-adaptive-params-none",
        at_update(lambda: lw.clip_by_rules({"**": lw.clip_adaptive(0.1)}),
                  PARAMS, update_params=None), ValueError,
        ("clip_adaptive(0.1) (group 'embed') needs the params",
         "call tx.update(updates, state, params)")),
    Row("clip-adaptive-params-other-tree",
        at_update(lambda: lw.clip_by_rules({"**": lw.clip_adaptive(0.1)}),
                  PARAMS, update_params=RENAMED), ValueError,
        ("only in the params: 'embedding'", "only in the updates: 'embed'",
         "Pass the params the updates are for")),
    Row("clip-adaptive-no-unit",
        at_init(lambda: lw.clip_by_rules({"**": lw.clip_adaptive(0.1)}),
                {"w": jnp.ones((1, 2, 1, 2, 1, 2))}), ValueError,
        ("parameter 'w' has shape (1, 2, 1, 2, 1, 2)", "Pass axis=...")),
    Row("clip-quantile-percent", lambda: lw.clip_quantile(90, 100), ValueError,
        ("q must be in [0, 1], got 90", "0.9, not 90")),
    Row("clip-quantile-negative", lambda: lw.clip_quantile(-0.1, 100),
        ValueError, ("q must be in [0, 1], got -0.1",)),
    Row("clip-quantile-nan", lambda: lw.clip_quantile(math.nan, 100),
        ValueError, ("q must be in [0, 1], got nan",)),
    Row("clip-quantile-window-zero", lambda: lw.clip_quantile(0.9, 0),
        ValueError, ("window must be >= 1, got 0",)),
    Row("clip-quantile-window-float", lambda: lw.clip_quantile(0.9, 2.5),
        TypeError, ("window must be an int, got 2.5",)),
    Row("clip-zscore-z-zero", lambda: lw.clip_zscore(z=0), ValueError,
        ("lw.clip_zscore: z must be finite and > 0, got 0.0",)),
    Row("clip-zscore-alpha-one", lambda: lw.clip_zscore(alpha=1.0), ValueError,
        ("alpha must be in (0, 1), got 1.0",)),
    Row("clip-zscore-warmup-zero", lambda: lw.clip_zscore(warmup=0),
        ValueError, ("warmup must be >= 1, got 0",)),
    Row("clip-integer-leaf",
        at_init(lambda: lw.clip_by_rules({"**": lw.clip_norm(1.0)}),
                WITH_STEP), TypeError,
        ("parameter 'step' has dtype int32", "Give it the rule None")),
    Row("clip-value-complex-leaf",
        at_init(lambda: lw.clip_by_rules({"**": lw.clip_value(1.0)}),
                {"z": jnp.ones(2, jnp.complex64)}), TypeError,
        ("parameter 'z' has dtype complex64", "complex numbers have no order",
         "lw.clip_norm")),
    # ---------------------------------------------- track_norms, map_updates
    Row("track-norms-name-not-string", lambda: lw.track_norms({"**": 1}),
        TypeError, ("rule '**' has value 1 (int)",
                    "must be a group name (a string")),
    Row("track-norms-unknown-field", lambda: lw.track_norms({"**": "{layer}"}),
        ValueError, ("has name '{layer}'", "write literal braces")),
    Row("track-norms-integer-leaf",
        at_init(lambda: lw.track_norms({"**": "{path}"}), WITH_STEP),
        TypeError, ("parameter 'step' has dtype int32",
                    "Give it the rule None")),
    Row("map-fn-not-callable", lambda: lw.map_updates(0.5), TypeError,
        ("fn must be callable (update, param, path) -> update",)),
    Row("map-fn-wrong-signature", lambda: lw.map_updates(lambda u, p: u),
        TypeError, ("cannot be called as fn(update, param, path)",
                    "lambda u, p, path:")),
    Row("map-fn-needs-params",
        at_update(lambda: lw.map_updates(lambda u, p, path: u + 0.1 * p),
                  PARAMS, update_params=None), TypeError,
        ("fn failed for parameter 'embed' with param=None",
         "call tx.update(updates, state, params)")),
    Row("map-fn-wrong-shape",
        at_update(lambda: lw.map_updates(lambda u, p, path: u.sum()), PARAMS),
        ValueError, ("fn returned shape () for parameter 'embed' of shape "
                     "(4, 2)", "it must keep the update's shape")),
    Row("map-fn-returns-none",
        at_update(lambda: lw.map_updates(lambda u, p, path: None), PARAMS),
        TypeError, ("fn returned None (NoneType) for parameter 'embed'",
                    "it must return the new update")),
    Row("map-where-typo",
        at_init(lambda: lw.map_updates(lambda u, p, path: u, "haed/**")),
        lw.RuleError, ("rule 0: 'haed/**'", "closest: 'head/**'")),
    # ------------------------------------- partition, freeze, stop_gradient
    Row("partition-value-string", lambda: lw.partition({"**": "adam"}),
        TypeError, ("lw.partition: rule '**' has value 'adam' (str)",
                    "must be an optax transformation", "or None to freeze")),
    Row("partition-value-factory", lambda: lw.partition({"**": optax.adam}),
        TypeError, ("has value <function adam", "Call the factory")),
    Row("partition-params-other-tree",
        at_update(lambda: lw.partition({"head/**": None, "**": optax.sgd(0.1)}),
                  PARAMS, update_params=RENAMED), ValueError,
        ("lw.partition: the params passed to update",
         "only in the params: 'embedding'", "Pass the params the updates are for")),
    Row("partition-inner-rule-typo", at_init(_inner_typo),
        lw.RuleError, ("rule 1: 'encodr/**'", "closest: 'encoder/**'",
                       "holds 1 of the model's 4 parameter(s)",
                       "checked against the whole model")),
    Row("partition-group-partly-none",
        at_update(lambda: lw.partition({"encoder/**": optax.adam(0.1),
                                        "**": optax.sgd(0.1)}),
                  {**PARAMS, "encoder": {"w": None, "b": jnp.ones(2)}}),
        ValueError, ("lw.partition: the updates hold None",
                     "for 1 of the 2 parameters of the optimizer of "
                     "'encoder/**' ('encoder/w')",
                     "or None for all of them to skip its step")),
    Row("freeze-inner-not-transformation",
        lambda: lw.freeze("adam", "embed"), TypeError,
        ("lw.freeze wraps an optax transformation, got str",
         "lw.freeze(optax.adam(...), frozen)")),
    Row("freeze-flag-not-bool",
        lambda: lw.freeze(optax.sgd(0.1), {"embed": 1, "**": 0}), TypeError,
        ("rule 'embed' has value 1", "True (frozen) or False (trained)")),
    Row("freeze-typo", at_init(lambda: lw.freeze(optax.sgd(0.1), "embd")),
        lw.RuleError, ("rule 0: 'embd'", "closest: 'embed'")),
    Row("freeze-params-other-tree",
        at_update(lambda: lw.freeze(optax.sgd(0.1), "embed"), PARAMS,
                  update_params=LESS), ValueError,
        ("lw.freeze: the params passed to update",
         "only in the updates: 'embed'", "Pass the params the updates are for")),
    Row("stop-gradient-typo", lambda: lw.stop_gradient(PARAMS, "embd/**"),
        lw.RuleError, ("rule 0: 'embd/**'", "(closest: ", "'embed'")),
    Row("grad-typo", lambda: lw.grad(_sum_loss, "embd/**")(PARAMS),
        lw.RuleError, ("rule 0: 'embd/**'", "(closest: ", "'embed'")),
    Row("grad-fn-not-callable", lambda: lw.grad("loss", "embed"), TypeError,
        ("lw.grad: fn must be the function to differentiate, fn(params, "
         "...), got str",)),
    Row("grad-argnums-not-int",
        lambda: lw.value_and_grad(_sum_loss, "embed", argnums=(0, 1)),
        TypeError, ("lw.value_and_grad: argnums must be one int", "got (0, 1)",
                    "put several in one tuple or dict")),
    Row("grad-argnums-out-of-range",
        lambda: lw.grad(_sum_loss, "embed", argnums=1)(PARAMS), TypeError,
        ("lw.grad: the params are argument argnums=1 of fn, but it was "
         "called with 1 positional argument(s)",
         "set argnums to their position")),
    # -------------------------------------------------------- reparameterize
    Row("reparam-scale-zero",
        lambda: lw.reparameterize(optax.sgd(0.1), {"head/**": 0.0, "**": 1.0}),
        ValueError, ("the scale of rule 'head/**' must be finite and > 0, "
                     "got 0.0", "to freeze leaves, use lw.freeze")),
    Row("reparam-scale-negative",
        lambda: lw.reparameterize(optax.sgd(0.1), {"**": -2.0}), ValueError,
        ("the scale of rule '**' must be finite and > 0, got -2.0",)),
    Row("reparam-scale-nan",
        lambda: lw.reparameterize(optax.sgd(0.1), {"**": math.nan}),
        ValueError, ("the scale of rule '**' must be finite and > 0, "
                     "got nan",)),
    Row("reparam-scale-schedule",
        lambda: lw.reparameterize(optax.sgd(0.1),
                                  {"**": optax.linear_schedule(1.0, 0.1, 10)}),
        TypeError, ("the scale of rule '**' must be a number",
                    "chain lw.scale_by_rules with a schedule")),
    Row("reparam-inner-not-transformation",
        lambda: lw.reparameterize("adam", {"**": 1.0}), TypeError,
        ("inner must be an optax transformation", "got str 'adam'")),
    Row("reparam-integer-leaf",
        at_init(lambda: lw.reparameterize(optax.sgd(0.1), {"**": 2.0}),
                WITH_STEP), TypeError,
        ("parameter 'step' has dtype int32 and scale 2.0",
         "Give it the scale 1.0")),
    Row("reparam-params-none",
        at_update(lambda: lw.reparameterize(optax.adamw(0.1), {"**": 0.5}),
                  PARAMS, update_params=None), ValueError,
        ("lw.reparameterize: the inner optimizer needs the params",
         "call tx.update(updates, state, params)")),
    Row("reparam-params-other-tree",
        at_update(lambda: lw.reparameterize(optax.adamw(0.1), {"**": 0.5}),
                  PARAMS, update_params=LESS), ValueError,
        ("only in the updates: 'embed'",
         "Pass the params the updates are for")),
    Row("equivalent-unknown-optimizer",
        lambda: lw.equivalent_multipliers(0.5, "adamm"), ValueError,
        ("unknown optimizer 'adamm'", "known: adabelief")),
    Row("equivalent-no-multiplier",
        lambda: lw.equivalent_multipliers({"**": 0.5}, "adafactor"),
        ValueError, ("no per-layer multiplier equals a reparameterization "
                     "for 'adafactor'",
                     "Use lw.reparameterize(inner, scales)")),
    Row("equivalent-scales-zero",
        lambda: lw.equivalent_scales({"head/**": 0.0, "**": 1.0}, "sgd"),
        ValueError, ("the multiplier of rule 'head/**' must be finite and > 0",
                     "use lw.freeze")),
    Row("mup-different-paths", lambda: lw.mup_scales(PARAMS, EXTRA),
        ValueError, ("Not in the base model: ['extra']",
                     "Build the base model from the same code")),
    Row("mup-three-width-dims",
        lambda: lw.mup_scales({"w": jnp.ones((2, 2, 2))},
                              {"w": jnp.ones((4, 4, 4))}), ValueError,
        ("parameter 'w' has shape (4, 4, 4)", "override={'w': multiplier}")),
    Row("mup-override-negative",
        lambda: lw.mup_scales(PARAMS, PARAMS, override={"head/**": -1.0}),
        ValueError, ("the override of rule 'head/**' must be finite and > 0",)),
    Row("mup-different-depth",
        lambda: lw.mup_scales({"layers": {"w": jnp.ones((2, 2, 2))}},
                              {"layers": {"w": jnp.ones((3, 4, 4))}},
                              stacks={"layers": 0}), ValueError,
        ("Not in the base model: ['layers/2/w']",
         "and as many layers in each stack")),
    # ------------------------------------------------------------- transplant
    Row("transplant-shape-mismatch",
        lambda: lw.transplant(PARAMS, PRETRAINED, "**"), ValueError,
        ("'head/w': target (2, 3), source (2, 5)",
         "Leave these layers new (exclude them from the rules)")),
    Row("transplant-missing-source-leaf",
        lambda: lw.transplant(EXTRA, PARAMS, "**"), ValueError,
        ("1 selected leaf is not in the source", "'extra'",
         "map their paths with rename=", "strict=False")),
    Row("transplant-dtype-mismatch",
        lambda: lw.transplant(PARAMS, jax.tree_util.tree_map(
            lambda x: x.astype(jnp.bfloat16), PARAMS), "embed"), ValueError,
        ("'embed': target float32, source bfloat16", "Pass cast=True")),
    Row("transplant-typo", lambda: lw.transplant(PARAMS, PARAMS, "haed/**"),
        lw.RuleError, ("rule 0: 'haed/**'", "closest: 'head/**'")),
    Row("transplant-rename-not-callable",
        lambda: lw.transplant(PARAMS, PARAMS, "**", rename="backbone/"),
        TypeError, ("rename must be a function from a target path to a source "
                    "path", "got 'backbone/'")),
    Row("transplant-unrolled-into-stacked",
        lambda: lw.transplant(TWO_LAYERS, TWO_UNROLLED, "**", stacks={"layers": 0}),
        ValueError, ("2 selected leaves are not in the source",
                     "'layers/0/w'  (closest in source: 'layers_0/w'",
                     'rename=lambda p: re.sub(r"^layers/(\\d+)", '
                     'r"layers_\\1", p)')),
    Row("transplant-abstract-partial-stack",
        lambda: lw.transplant(jax.eval_shape(lambda: TWO_LAYERS), TWO_LAYERS,
                              "layers/0/**", stacks={"layers": 0},
                              source_stacks={"layers": 0}, strict=False),
        ValueError, ("1 selected leaf is abstract (a jax.ShapeDtypeStruct) "
                     "but only partly copied",
                     "'layers/w': 1 of 2 layers copied",
                     "Give the target's values")),
    Row("transplant-source-stacks-no-subtree",
        lambda: lw.transplant(STACKED, STACKED, "**", stacks={"layers": 0},
                              source_stacks={"layerz": 0}), ValueError,
        ("lw.transplant: in the source (source_stacks=): stack 'layerz' names "
         "no subtree", "closest: 'layers'")),
    # ---------------------------------------------------------- checkpoints
    Row("restore-state-misfit",
        lambda: lw.restore_state(lw.scale_by_rules({"**": 1.0}).init(PARAMS),
                                 {"count": jnp.int32(1), "mu": jnp.ones(3)}),
        ValueError, ("the restored arrays do not fit the target",
                     "not in the target: 'mu'",
                     "Build the target with the transformation")),
    Row("update-plain-dict-state",
        at_update_with_state(lambda: lw.scale_by_rules({"**": 1.0}),
                             {"count": jnp.int32(0),
                              "multipliers": jnp.ones(4)}), TypeError,
        ("the state passed to update is a dict", "restored without a target",
         "lw.restore_state(tx.init(params), restored)")),
    Row("norms-plain-dict-state",
        lambda: lw.norms(RESTORED_PLAIN), TypeError,
        ("lw.norms: opt_state is a list of plain dicts, lists and arrays, "
         "not an optimizer state", "lw.restore_state(tx.init(params), "
                                   "restored)")),
    Row("set-scale-plain-dict-state",
        lambda: lw.set_scale(RESTORED_PLAIN, "**", 0.5), TypeError,
        ("lw.set_scale: opt_state is a list of plain dicts",
         "restore against jax.eval_shape(tx.init, params)",
         "lw.restore_state(tx.init(params), restored)")),
    # -------------------------------------------------------------- describe
    Row("describe-not-rules", lambda: lw.describe(0.1, PARAMS), TypeError,
        ("describe() takes a rule set", "got float")),
    Row("describe-wrong-state", _describe_with_wrong_state, ValueError,
        ("opt_state does not have the structure of tx.init(params)",
         "pass the state of this transformation")),
    Row("describe-plain-dict-state",
        lambda: lw.describe(lw.scale_by_rules({"**": 0.5}), PARAMS,
                            opt_state=jax.tree_util.tree_map(
                                jnp.asarray, {"count": 0, "multipliers": [0.5]})),
        TypeError, ("lw.describe: opt_state is a dict of plain dicts",
                    "lw.restore_state")),
    Row("describe-group-by-unknown",
        lambda: dataclasses.replace(lw.describe({"**": 1.0}, PARAMS),
                                    group_by="scale"), ValueError,
        ("lw.describe: group_by='scale' is not a column of this description",
         "choose one of 'path', 'shape', 'dtype', 'size', 'rule', 'value'")),
    # ------------------------------- placement in a chain (lw.check)
    Row("check-not-a-transformation", lambda: lw.check({"**": 0.1}, PARAMS),
        TypeError, ("lw.check takes an optax transformation, got dict",
                    "lw.check(tx, params)")),
    Row("check-scale-before-adaptive",
        lambda: lw.check(optax.chain(lw.scale_by_rules({"head/**": 0.1,
                                                        "**": 1.0}),
                                     optax.adam(1e-3)), PARAMS), ValueError,
        ("[scale-before-adaptive]", "multipliers of 'head/w'",
         "cancel out", "put lw.scale_by_rules after the optimizer")),
    Row("check-scale-after-schedule-free",
        lambda: lw.check(optax.chain(optax.contrib.schedule_free_sgd(1.0),
                                     lw.scale_by_rules({"**": 0.5})), PARAMS),
        ValueError, ("[scale-after-schedule-free]",
                     "multiply the base optimizer's update, inside "
                     "schedule_free")),
    Row("check-frozen-gradients-reach-updates",
        lambda: lw.check(optax.chain(optax.clip_by_global_norm(1.0),
                                     lw.freeze(optax.adam(1e-3), "embed")),
                         PARAMS), ValueError,
        ("[frozen-gradients-reach-updates]", "frozen 'embed'",
         "every update NaN", "put it inside the freeze")),
    Row("check-apply-if-finite-around-freeze",
        lambda: lw.check(optax.apply_if_finite(
            lw.freeze(optax.adam(1e-3), "embed"), 3), PARAMS), ValueError,
        ("[apply-if-finite-around-freeze]", "gives up",
         "lw.freeze(optax.apply_if_finite(optimizer, "
         "max_consecutive_errors), frozen)")),
    # ------------------------------- trees that changed between init and update
    Row("changed-scale-by-rules-extra-leaf",
        at_update(lambda: lw.scale_by_rules({"**": 0.5}), EXTRA), ValueError,
        ("scale_by_rules: the updates " + NOT_AT_INIT,
         "not in the params at init: 'extra'", INIT_AGAIN)),
    Row("changed-add-decayed-weights-missing-leaf",
        at_update(lambda: lw.add_decayed_weights({"**": 0.1}), LESS,
                  update_params=LESS), ValueError,
        ("add_decayed_weights: the updates " + NOT_AT_INIT,
         "missing from the updates: 'embed'", INIT_AGAIN)),
    Row("changed-clip-by-rules-shape",
        at_update(lambda: lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}),
                  RESHAPED), ValueError,
        ("lw.clip_by_rules: the updates " + NOT_AT_INIT,
         "'embed' has shape (5, 2) now, (4, 2) at init", INIT_AGAIN)),
    Row("changed-track-norms-renamed-leaf",
        at_update(lambda: lw.track_norms({"**": "{path}"}), RENAMED),
        ValueError, ("lw.track_norms: the updates " + NOT_AT_INIT,
                     "not in the params at init: 'embedding'",
                     "missing from the updates: 'embed'", INIT_AGAIN)),
    Row("changed-map-updates-shape",
        at_update(lambda: lw.map_updates(lambda u, p, path: -u), RESHAPED),
        ValueError, ("lw.map_updates: the updates " + NOT_AT_INIT,
                     "'embed' has shape (5, 2) now", INIT_AGAIN)),
    Row("changed-partition-shape",
        at_update(lambda: lw.partition({"embed": optax.adam(0.1),
                                        "**": optax.sgd(0.1)}), RESHAPED),
        ValueError, ("lw.partition: the updates " + NOT_AT_INIT,
                     "'embed' has shape (5, 2) now, (4, 2) at init",
                     INIT_AGAIN)),
    Row("changed-freeze-list-for-dict",
        at_update(lambda: lw.freeze(optax.adam(0.1), "encoder/**"),
                  list(jax.tree_util.tree_leaves(PARAMS))), ValueError,
        ("lw.freeze: the updates " + NOT_AT_INIT,
         "not in the params at init: '0', '1', '2', '3'", INIT_AGAIN)),
    Row("changed-none-gradients",
        at_update(lambda: optax.chain(lw.reparameterize(
            optax.adam(0.1), {"**": 0.5}), lw.partition(
                {"head/**": optax.adam(0.1), "**": optax.sgd(0.1)})),
                  {**PARAMS, "head": None}), ValueError,
        ("lw.reparameterize: the updates hold None (or optax.MaskedNode()) "
         "for 1 parameter(s) ('head/w')",
         "does not take parameters without gradients: lw.partition, "
         "lw.freeze, lw.scale_by_rules",
         "Put lw.reparameterize inside the optimizer of each group")),
    Row("changed-reparameterize-extra-leaf",
        at_update(lambda: lw.reparameterize(optax.adam(0.1), {"**": 0.5}),
                  EXTRA, update_params=EXTRA), ValueError,
        ("lw.reparameterize: the updates " + NOT_AT_INIT,
         "not in the params at init: 'extra'", INIT_AGAIN)),
]


def _pattern(fragments: tuple[str, ...]) -> str:
  """A regex that finds every fragment, in any order."""
  return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in CATALOGUE])
def test_bad_input_raises_a_clear_error(row):
  with pytest.raises(row.error, match=_pattern(row.fragments)):
    row.trigger()


def test_catalogue_ids_are_unique_kebab_case():
  ids = [row.id for row in CATALOGUE]
  assert len(ids) == len(set(ids))
  for i in ids:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i), i


def _docs_table() -> list[list[str]]:
  """The cells of each row of the table in docs/errors.md."""
  text = (DOCS / "errors.md").read_text(encoding="utf-8")
  rows = []
  for line in text.splitlines():
    if line.startswith("| `"):
      rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return rows


def test_docs_table_lists_the_catalogue_in_order():
  ids = [cells[0].strip("`") for cells in _docs_table()]
  assert ids == [row.id for row in CATALOGUE], (
      "docs/errors.md and CATALOGUE disagree: list the same ids, in the same "
      "order, one table row per catalogue row.")


# Public names that take no input that could be wrong in a way worth a row.
_NO_BAD_INPUT = {
    "NO_DECAY", "AddDecayedWeightsState", "ClipByRulesState", "Description",
    "FreezeState", "MapUpdatesState", "PartitionState", "ReparameterizeState",
    "RuleError", "ScaleByRulesState", "TrackNormsState", "TransplantReport",
    "hyperparams", "paths", "DEFAULT_HEAD", "DEFAULT_STEM", "Rules", "SelectorLike",
    "Flags", "ScalarOrSchedule",
}


def test_every_public_function_has_a_row():
  raised_by = " ".join(cells[2] for cells in _docs_table())
  named = set(re.findall(r"lw\.(\w+)", raised_by))
  missing = sorted(set(lw.__all__) - _NO_BAD_INPUT - named)
  assert not missing, (
      f"no row of docs/errors.md is raised by {missing}: add catalogue rows "
      "for their bad input (or list them in _NO_BAD_INPUT).")


def test_a_changed_tree_is_reported_before_the_optimizers_wrapped():
  """lw.partition and lw.freeze check the updates before their optimizers
  see them; in a plain chain, optax's transformations before the first
  layerwise one fail first, with optax's error (the documented limit), and
  a layerwise transformation placed first reports it instead."""
  inner = lambda: optax.chain(optax.adam(0.1), lw.scale_by_rules({"**": 1.0}))
  for make, fn in [
      (lambda: lw.freeze(inner(), "head/**"), "lw.freeze"),
      (lambda: lw.partition({"head/**": inner(), "**": optax.adam(0.1)}),
       "lw.partition"),
      (lambda: optax.chain(lw.track_norms({"**": "all"}), inner()),
       "lw.track_norms")]:
    for changed, detail in [(EXTRA, "not in the params at init: 'extra'"),
                            (RESHAPED, "'embed' has shape (5, 2) now")]:
      with pytest.raises(ValueError, match=_pattern(
          (f"{fn}: the updates " + NOT_AT_INIT, detail, INIT_AGAIN))):
        at_update(make, changed, update_params=changed)()
  with pytest.raises(TypeError, match="incompatible shapes for broadcasting"):
    at_update(inner, RESHAPED, update_params=RESHAPED)()


# ------------------------------------------- integer leaves that pass through


def test_integer_leaves_pass_through_where_documented():
  """An integer leaf with a neutral rule keeps its update and dtype (frozen:
  a zero of its dtype), and so does its float0 gradient
  (``jax.grad(..., allow_int=True)``) where no optimizer sees it."""
  params = WITH_STEP
  grads = jax.grad(lambda p: jnp.sum(p["embed"]) * p["step"],
                   allow_int=True)(params)
  assert grads["step"].dtype == jax.dtypes.float0
  ints = {**grads, "step": jnp.array(7, jnp.int32)}
  for tx, expected in [
      (lw.scale_by_rules({"step": 1.0, "**": 0.5}), 7),
      (lw.add_decayed_weights({"step": 0.0, "**": 0.1}), 7),
      (lw.clip_by_rules({"step": None, "**": lw.clip_norm(1.0)}), 7),
      (lw.track_norms({"step": None, "**": "all"}), 7),
      (lw.freeze(optax.adam(0.1), "step"), 0),
      (lw.partition({"step": None, "**": optax.adam(0.1)}), 0),
  ]:
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    assert updates["step"].dtype == jax.dtypes.float0
    updates, _ = jax.jit(tx.update)(ints, state, params)
    assert updates["step"].dtype == jnp.int32
    assert int(updates["step"]) == expected
