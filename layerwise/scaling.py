"""Per-layer learning rates: multipliers, layer-wise decay, discriminative rates.

One inner optimizer, many rules: ``scale_by_rules`` multiplies each leaf's
update by its rule's multiplier, placed after the inner optimizer in an
``optax.chain``. The helpers below build rule sets of multipliers
(layer-wise learning-rate decay as in BEiT/ELECTRA and timm, and fastai's
discriminative rates) for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _paths, _rules

# ---------------------------------------------------------------- scale_by_rules


class ScaleByRulesState(NamedTuple):
  """State of :func:`scale_by_rules`.

  Attributes:
    count: the number of updates made so far (schedules are evaluated at it).
    multipliers: a float32 vector with one entry per parameter leaf, in
      the order of ``rules.paths``: the constant factor of each leaf's
      multiplier (the rule's value, or 1.0 for a schedule).
      :func:`set_scale` changes it between steps; ``dict(zip(state.rules.paths,
      state.multipliers.tolist()))`` reads it by path. One array rather
      than one scalar per leaf, so that a jitted step takes one more
      argument, not one per leaf: on a GPU, where an optimizer step takes
      a millisecond, dispatching ~200 extra scalars cost about as much.
    rules: static metadata: each leaf's path, rule and value as given.
  """
  count: jax.Array
  multipliers: Any
  rules: _rules.StaticRules


def _check_multiplier(value: Any, text: str, what: str = "multiplier",
                      where: str | None = None) -> Any:
  """A multiplier (or a weight decay) is a finite number >= 0 or a schedule.

  ``where`` starts the error message, up to the value (``"Rule <text> has
  <what>"`` by default).
  """
  where = f"Rule {text} has {what}" if where is None else where
  if callable(value) and not isinstance(value, type):
    _rules.check_arity(value, 1, lambda: (
        f"{where} {_rules._text_of(value)}, which cannot be "
        "called as schedule(count); a schedule takes the number of updates "
        "made so far and returns a number, such as "
        "optax.linear_schedule(0.0, 1.0, 1000) or lambda count: 0.5."))
    return value
  if isinstance(value, bool) or not isinstance(value,
                                               (int, float, np.number)):
    hint = ""
    if type(value).__module__ == "layerwise.clipping":
      hint = " A clipper goes in lw.clip_by_rules."
    elif isinstance(value, optax.GradientTransformation):
      hint = " An optimizer per group goes in lw.partition."
    elif isinstance(value, (jax.Array, np.ndarray)):
      hint = (" Multipliers live in the optimizer state, as numbers given "
              "here: change them between steps with lw.set_scale. Under "
              "optax.inject_hyperparams, which turns number arguments into "
              "arrays, list them in static_args (static_args=('default',)).")
    raise TypeError(
        f"{where} {value!r} ({type(value).__name__}); a "
        f"{what} is a number or a schedule (count -> number), such as "
        "optax.linear_schedule(0.0, 1.0, 1000)." + hint)
  if not math.isfinite(value) or value < 0:
    hint = (" (0 gives a zero update; to freeze leaves without optimizer "
            "state, use lw.freeze)" if what == "multiplier" else "")
    raise ValueError(
        f"{where} {value!r}; a {what} must be finite and "
        f">= 0{hint}.")
  return float(value)


def _is_inexact(dtype: Any) -> bool:
  """Whether leaves of ``dtype`` (float or complex) can be scaled."""
  return jnp.issubdtype(dtype, jnp.inexact)


def _check_inexact(fn: str, res: _rules.Resolution, what: str,
                   neutral: float, hint: str) -> None:
  """Raises for an integer or bool leaf whose rule would change it: only
  ``neutral`` (the value that leaves an update as it is) passes them."""
  for i, (path, spec, v) in enumerate(zip(res.paths, res.specs, res.values)):
    if not _is_inexact(spec.dtype) and (callable(v) or v != neutral):
      shown = "a schedule" if callable(v) else repr(v)
      raise TypeError(
          f"{fn}: parameter {path!r} has dtype {spec.dtype} and {what} "
          f"{shown} (rule {res.rule_text(i)}); only floating point leaves "
          f"can {hint}. Give it the {what} {neutral!r} (a rule "
          f"{{{path!r}: {neutral!r}}} before the others) to leave it as it "
          "is, or keep it out of the params (lw.freeze and lw.partition "
          "with None also leave it alone).")


def _checked_rules(rules: _rules.Rules, default: Any,
                   what: str) -> tuple[_rules.RuleSet, Any]:
  """A rule set of multipliers (or weight decays), each checked, and the
  checked default."""
  rule_set = _rules.RuleSet(rules, what=what).map_values(
      lambda v, text: _check_multiplier(v, text, what))
  if default is not _rules.MISSING:
    default = _check_multiplier(default, "default", what)
  return rule_set, default


def _schedule_value(fn: str, schedule: Callable[[Any], Any],
                    count: jax.Array, text: str, path: str) -> jax.Array:
  """``schedule(count)``, checked (at trace time) to be a real scalar."""
  raw = schedule(count)
  try:
    value = jnp.asarray(raw)
  except (TypeError, ValueError):
    value = None
  if value is None or not (jnp.issubdtype(value.dtype, jnp.floating)
                           or jnp.issubdtype(value.dtype, jnp.integer)
                           or value.dtype == jnp.bool_):
    shown = (f"dtype {value.dtype}" if value is not None
             else f"{raw!r} ({type(raw).__name__})")
    raise TypeError(
        f"{fn}: the schedule of rule {text} returned {shown} for parameter "
        f"{path!r}; a schedule in a rule must return a real number, as "
        "optax.linear_schedule(0.0, 1.0, 1000) or lambda count: "
        "(count >= 100).astype(jnp.float32) do.")
  if value.shape != ():
    raise ValueError(
        f"{fn}: the schedule of rule {text} returned shape {value.shape} for "
        f"parameter {path!r}; a schedule in a rule must return a scalar, one "
        "number for all the leaves of its rule. For values per leaf, write "
        "one rule per leaf.")
  return value


def scale_by_rules(
    rules: _rules.Rules,
    *,
    default: Any = _rules.MISSING,
    strict: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Multiplies each parameter's update by its rule's multiplier.

  Placed after the inner optimizer in an ``optax.chain``, this gives every
  parameter group its own learning rate with a single optimizer: for any
  optax optimizer whose learning rate is its last scale (sgd, momentum,
  nesterov, adam, adamw, rmsprop, lion, ...), ``chain(opt(lr),
  scale_by_rules(r))`` updates group ``g`` exactly as ``opt(lr * r_g)``
  would, which is what PyTorch param groups with ``lr_g = lr * r_g`` do.
  Coupled weight decay (``add_decayed_weights`` before the optimizer) is
  scaled along with the learning rate, as in PyTorch.

  A multiplier is a number or a schedule ``count -> number`` (any optax
  schedule), evaluated at the number of updates made so far (0 at the first
  update, as ``optax.scale_by_schedule``), so a group can warm up, decay or
  unfreeze on its own clock while the optimizer keeps the global schedule.
  A multiplier of 0 gives a zero update; the inner optimizer still keeps
  (and updates) its state for that group, which is what gradual unfreezing
  needs: moments are warm when the multiplier becomes positive.

  The multipliers live in the state as one float32 vector (an entry per
  leaf), so :func:`set_scale` can change them between jitted steps without
  recompiling. The scaled update keeps its dtype (bf16 stays bf16).
  Integer and bool leaves (step counters, masks) are never scaled: their
  rule must give them 1.0, and their updates (``float0`` gradients
  included) pass through.

  Args:
    rules: ``{selector: multiplier}``; see :func:`layerwise.resolve`.
    default: the multiplier of leaves no rule matches (``1.0`` keeps them
      as they are). Without it, unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError, ValueError: for a multiplier that is not a finite number
      >= 0 or a schedule; :class:`layerwise.RuleError` at ``init`` for
      rules that do not fit the params; ``TypeError`` at ``init`` for an
      integer or bool leaf whose multiplier is not 1.0; ``ValueError`` at
      ``update`` for updates whose paths or shapes differ from the params
      at ``init``, and an error at the first ``update`` (when it is traced)
      for a schedule that does not return a real scalar.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  lw.scale_by_rules({"backbone/**": 0.1, "head/**": 1.0}))
    >>> state = tx.init(params)
    >>> grads = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["backbone"]["w"], updates["head"]["w"]
    (Array([-0.01, -0.01], dtype=float32), Array([-0.1, -0.1], dtype=float32))

    A group that warms up over 100 steps on its own clock:

    >>> tx = lw.scale_by_rules(
    ...     {"head/**": optax.linear_schedule(0.0, 1.0, 100), "**": 1.0})
    >>> updates, _ = tx.update(grads, tx.init(params))
    >>> updates["head"]["w"], updates["backbone"]["w"]
    (Array([0., 0.], dtype=float32), Array([1., 1.], dtype=float32))
  """
  rule_set, default = _checked_rules(rules, default, "multiplier")

  def init_fn(params):
    res = rule_set.resolve(params, default=default, strict=strict)
    _check_inexact("scale_by_rules", res, "multiplier", 1.0, "be scaled")
    constants = [1.0 if callable(v) else float(v) for v in res.values]
    return ScaleByRulesState(
        count=jnp.zeros([], jnp.int32),
        multipliers=jnp.asarray(constants, jnp.float32),
        rules=_rules.StaticRules.from_resolution("scale", res))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted, as optax.chain passes them, and unused
    del params
    info = state.rules
    leaves, treedef = info.check_tree("scale_by_rules", updates)
    factors = _unboxed(state.multipliers)
    out = []
    for i, (u, value, text, path) in enumerate(zip(leaves, info.values,
                                                   info.rule_texts, info.paths)):
      dtype = jnp.result_type(u)
      if not _is_inexact(dtype):  # integer, bool and float0 pass through
        out.append(u)
        continue
      m = factors[i]
      if callable(value):
        m = m * _schedule_value("scale_by_rules", value, state.count, text,
                                path)
      out.append(u * m.astype(dtype))
    new_state = state._replace(count=optax.safe_int32_increment(state.count))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_scale(opt_state: Any, selector: _rules.SelectorLike,
              value: Any) -> Any:
  """Returns ``opt_state`` with new multipliers for the leaves ``selector`` picks.

  ``opt_state`` may be the state of :func:`scale_by_rules` itself or of any
  optax transformation containing it (``optax.chain``, ``MultiSteps``,
  ``inject_hyperparams``, ``partition``, ...); every ``scale_by_rules`` state
  inside is updated. The new state has the same structure, shapes and dtypes,
  so a jitted step takes it without recompiling. For a leaf whose rule is a
  schedule, ``value`` multiplies the schedule.

  Args:
    opt_state: an optimizer state.
    selector: any selector (glob, regex, callable), matched against the
      paths of the params the state was initialised with.
    value: the new multiplier, a finite number >= 0 (or a scalar array).
      Integer and bool leaves stay unscaled whatever their multiplier.

  Returns:
    The new state.

  Raises:
    ValueError: if the state holds no ``scale_by_rules`` state, the
      selector matches no parameter in any of them (with the closest paths),
      or ``value`` is negative or not finite.
    TypeError: for a ``value`` that is a schedule, not a number, or an
      array that is not a real scalar.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0}))
    >>> state = lw.set_scale(tx.init(params), "backbone/**", 0.0)
    >>> updates, _ = tx.update(params, state)
    >>> updates["backbone"]["w"], updates["head"]["w"]
    (Array([0., 0.], dtype=float32), Array([-1., -1.], dtype=float32))
  """
  if callable(value):
    raise TypeError(
        "set_scale takes a number, not a schedule: schedules are part of the "
        "transformation's structure. Build scale_by_rules with the schedule "
        "instead.")
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.shape != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                 or jnp.issubdtype(value.dtype, jnp.integer)):
      raise TypeError(
          f"set_scale: value must be a number or a real scalar array, got an "
          f"array of shape {value.shape} and dtype {value.dtype}. Each "
          "leaf's multiplier is one number; call set_scale once per group "
          "for different values.")
    try:
      concrete = float(value)
    except jax.errors.ConcretizationTypeError:  # traced: checked by no one
      concrete = None
    if concrete is not None:
      _check_multiplier(concrete, "", where="set_scale: the new multiplier is")
  else:
    value = _check_multiplier(value, "",
                              where="set_scale: the new multiplier is")
  states = [s for s in _rules.find_static(opt_state)
            if isinstance(s, ScaleByRulesState)]
  if not states:
    raise ValueError(
        "set_scale: this optimizer state holds no lw.scale_by_rules state; "
        "chain lw.scale_by_rules(...) into the optimizer to set multipliers.")
  matched = {id(s): s.rules.select(selector) for s in states}
  if not any(matched.values()):
    paths = [p for s in states for p in s.rules.paths]
    near = _rules.close(_rules.compile_selector(selector).pattern,
                         _rules._path_candidates(paths))
    raise ValueError(
        f"set_scale: selector {_rules.compile_selector(selector).text} "
        "matches no parameter" + (f" (closest: {_rules._quote_all(near)})"
                                  if near else "") + ". Fix the selector: "
        "it is matched against the paths of the params the state was "
        "initialised with (lw.paths(params) lists them).")

  def replace(node):
    if not isinstance(node, ScaleByRulesState) or not matched[id(node)]:
      return node
    old = node.multipliers
    # A Flax box (the Variables of an nnx.Optimizer's state before flax
    # 0.11) stays one. The new vector is computed from the old one, so that
    # a committed state (restored, sharded) stays committed where it was
    # and a jitted step takes it without compiling again.
    boxed = isinstance(old, _paths.box_types())
    vector = _unboxed(old)
    mask = np.zeros(vector.shape, bool)
    mask[list(matched[id(node)])] = True
    new = jnp.where(mask, jnp.asarray(value, vector.dtype), vector)
    return node._replace(multipliers=old.replace(value=new) if boxed else new)

  return jax.tree_util.tree_map(
      replace, opt_state, is_leaf=lambda x: isinstance(x, ScaleByRulesState))


def _unboxed(multipliers: Any) -> Any:
  """The multipliers' vector, out of the Flax box it may be in."""
  (vector,) = jax.tree_util.tree_leaves(multipliers)
  return vector.value if isinstance(vector, _paths.box_types()) else vector

# ------------------------------------------------------- add_decayed_weights

#: The usual "no weight decay" selector: biases, normalization scales and
#: every other parameter with at most one dimension (scalars included).
#: Hugging Face's ``Trainer`` leaves biases and LayerNorm weights undecayed,
#: timm's ``param_groups_weight_decay`` every 1-D parameter and every
#: ``.bias``; ``NO_DECAY`` is the union. It is a :class:`~layerwise.Selector`,
#: so it extends with ``|``: ``lw.NO_DECAY | "**/pos_embed"`` (timm's ViT also
#: exempts its position embedding and class token).
NO_DECAY = _rules.Selector(
    _rules.any_of(_rules.ndim_at_most(1), "**/bias"), "lw.NO_DECAY")


class AddDecayedWeightsState(NamedTuple):
  """State of :func:`add_decayed_weights`.

  Attributes:
    count: the number of updates made so far (schedules are evaluated at it).
    rules: static metadata: each leaf's path, rule and weight decay as given.
  """
  count: jax.Array
  rules: _rules.StaticRules


def add_decayed_weights(
    rules: _rules.Rules,
    *,
    default: Any = _rules.MISSING,
    strict: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Adds each parameter times its rule's weight decay to its update.

  Per-group weight decay, as PyTorch param groups give it: the update of
  leaf ``p`` becomes ``u + wd_g * p``, with ``wd_g`` the coefficient of the
  first rule that matches ``p`` (0 leaves the update as it is; the leaf
  costs nothing). With one rule it is ``optax.add_decayed_weights``.

  Where it sits in the chain decides which weight decay it is:

  * before the optimizer, it is L2 regularization, "coupled" weight decay,
    as in PyTorch ``SGD(weight_decay=...)`` and ``Adam``:
    ``optax.chain(lw.add_decayed_weights(r), optax.sgd(lr))``;
  * between the adaptive scaling and the learning rate, it is decoupled
    weight decay, as in PyTorch ``AdamW`` (the decay is scaled by the
    learning rate and by any per-group multiplier after it)::

      optax.chain(optax.scale_by_adam(), lw.add_decayed_weights(r),
                  optax.scale_by_learning_rate(lr), lw.scale_by_rules(m))

  A coefficient is a number >= 0 or a schedule ``count -> number``,
  evaluated at the number of updates made so far (0 at the first). The
  coefficients are constants of the compiled step, not state: change them
  over time with a schedule. :data:`NO_DECAY` selects the parameters that
  are usually left undecayed (biases, norm scales, 1-D parameters).

  Args:
    rules: ``{selector: weight_decay}``; see :func:`layerwise.resolve`.
    default: the weight decay of leaves no rule matches. Without it,
      unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params``.

  Raises:
    TypeError, ValueError: for a coefficient that is not a finite number
      >= 0 or a schedule; :class:`layerwise.RuleError` at ``init`` for rules
      that do not fit the params; ``TypeError`` at ``init`` for an integer
      or bool leaf whose weight decay is not 0.0; ``ValueError`` at
      ``update`` without ``params``, or with updates or params whose paths
      or shapes differ from the params at ``init``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> tx = lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1})
    >>> grads = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["dense"]["kernel"], updates["dense"]["bias"]
    (Array([[0.1, 0.1],
           [0.1, 0.1]], dtype=float32), Array([0., 0.], dtype=float32))
    >>> print(lw.describe(tx, params))
    path          shape   dtype    size  weight_decay  state_bytes
    ------------  ------  -------  ----  ------------  -----------
    dense/bias    (2,)    float32     2  0.0                     0
    dense/kernel  (2, 2)  float32     4  0.1                     0
    <BLANKLINE>
    weight_decay  leaves  params   share  state bytes
    0.0                1       2   33.3%            0
    0.1                1       4   66.7%            0
    total              2       6  100.0%            4
    (total state bytes include 4 not held by one parameter, such as step counts)

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  rule_set, default = _checked_rules(rules, default, "weight decay")

  def init_fn(params):
    res = rule_set.resolve(params, default=default, strict=strict)
    _check_inexact("add_decayed_weights", res, "weight decay", 0.0,
                   "be decayed")
    return AddDecayedWeightsState(
        count=jnp.zeros([], jnp.int32),
        rules=_rules.StaticRules.from_resolution("weight_decay", res))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted, as optax.chain passes them, and unused
    if params is None:
      raise ValueError(
          "lw.add_decayed_weights needs the params: call "
          "tx.update(updates, state, params).")
    info = state.rules
    leaves, treedef = info.check_tree("add_decayed_weights", updates)
    p_leaves = _rules.flatten_like("add_decayed_weights", treedef, params)
    out = []
    for u, p, wd, text, path in zip(leaves, p_leaves, info.values,
                                    info.rule_texts, info.paths):
      if callable(wd):
        wd = _schedule_value("add_decayed_weights", wd, state.count, text,
                             path).astype(jnp.result_type(u))
      elif wd == 0.0:
        out.append(u)
        continue
      out.append(u + wd * p)
    new_state = state._replace(count=optax.safe_int32_increment(state.count))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------- layer_decay / discriminative
#: The default ``block`` of :func:`layer_decay`: a path segment ``layers_3``,
#: ``blocks_3``, ``layer_3``, ``block_3``, ``h_3`` (linen submodule names), or
#: the same names followed by an index segment, ``layers/3`` (NNX lists,
#: Equinox, HF Flax ``h/3``). The capture group is the block index.
DEFAULT_BLOCK = r"(?:^|/)(?:layers|blocks|layer|block|h)[_/](\d+)(?:/|$)"

#: Module names that :data:`DEFAULT_HEAD` treats as the head, at any depth.
HEAD_NAMES = ("head", "heads", "classifier", "pooler", "pre_logits",
              "fc_norm", "attn_pool", "lm_head")

#: The default ``head`` of :func:`layer_decay`: any parameter inside a module
#: named in :data:`HEAD_NAMES`. It is a :class:`~layerwise.Selector`, so it
#: extends with ``|``: ``head=DEFAULT_HEAD | "out_proj/**"``.
DEFAULT_HEAD = _rules.any_of(*(f"**/{name}/**" for name in HEAD_NAMES))

#: Module names that the default ``after`` of :func:`layer_decay` treats as a
#: final norm when they sit beside the blocks.
FINAL_NORM_NAMES = ("norm", "final_norm", "encoder_norm", "final_layer_norm",
                    "final_layernorm", "norm_f", "ln_f", "layernorm",
                    "post_layernorm", "post_norm")


class _FinalNorms:
  """The default ``after`` of :func:`layer_decay`: final norms by name."""

  def __repr__(self) -> str:
    return "<final norms beside the blocks>"


#: The default ``after`` of :func:`layer_decay`: a module named in
#: :data:`FINAL_NORM_NAMES` that sits beside the blocks' container (``norm``
#: beside ``blocks_*``, ``model/norm`` beside ``model/layers/*``).
FINAL_NORMS: Any = _FinalNorms()


def _real(fn: str, name: str, x: Any) -> float:
  """``x`` as a Python float; a ``TypeError`` for what is not a number."""
  if isinstance(x, (bool, str, bytes)) or x is None:
    raise TypeError(f"{fn}: {name} must be a number, got "
                    f"{type(x).__name__} {x!r}.")
  try:
    return float(x)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{fn}: {name} must be a concrete number (a Python float, not a "
        f"traced or multi-element array), got {type(x).__name__}.") from e


def _pattern(regex: re.Pattern[str]) -> str:
  """A regex as the user would write it: r'...'."""
  p = regex.pattern
  return f"r'{p}'" if "'" not in p and not p.endswith("\\") else repr(p)


def _block_regex(block: Any) -> re.Pattern[str]:
  if isinstance(block, str):
    try:
      regex = re.compile(block)
    except re.error as e:
      raise ValueError(
          f"layer_decay: block={block!r} is not a valid regular expression "
          f"({e}). Pass a regex with one capture group around the block "
          r"index, such as r'(?:^|/)layers_(\d+)(?:/|$)'.") from e
  elif isinstance(block, re.Pattern):
    regex = block
  else:
    raise TypeError(
        f"layer_decay: block must be a regex (a string or re.compile(...)) "
        f"with one capture group around the block index, got "
        f"{type(block).__name__} {block!r}.")
  if regex.groups != 1:
    raise ValueError(
        f"layer_decay: the block pattern {_pattern(regex)} has "
        f"{regex.groups} capture groups; it needs exactly one, around the "
        r"block index, as in r'(?:^|/)layers_(\d+)(?:/|$)'. Write any other "
        "group as (?:...).")
  return regex


class _Block(NamedTuple):
  """Where a path's block is: its index, stack, parent and name."""
  index: int
  container: str  # the stack, with the index as '*': 'encoder/layers_*'
  parent: str     # the path holding the stack: 'encoder', or ''
  label: str      # the block's own name: 'layers_3', 'layers/3'


class _Depths:
  """Classifies a path into its depth: embeddings 0, block i i+1, head L+1."""

  def __init__(self, regex: re.Pattern[str], head: Any, after: Any,
               final_norms: bool):
    self.regex = regex
    self.head = head              # a compiled selector, or None
    self.after = after            # a compiled selector, or None
    self.final_norms = final_norms
    self.num_blocks = 0
    self.parent = ""
    self._memo: dict[Any, int] = {}

  def block(self, path: str) -> _Block | None:
    m = self.regex.search(path)
    if m is None:
      return None
    index = m.group(1)
    if index is None or not re.fullmatch("[0-9]+", index):
      raise ValueError(
          f"layer_decay: the block pattern {_pattern(self.regex)} captured "
          f"{index!r} from {path!r}, which is not a block index. Its capture "
          r"group must match the index's digits only, as (\d+) does.")
    start, end = m.span(1)
    seg_start = path.rfind("/", 0, start) + 1
    seg_end = path.find("/", end)
    seg_end = len(path) if seg_end < 0 else seg_end
    if start == seg_start and end == seg_end and seg_start > 0:
      # The index is a segment of its own ('layers/3'): the stack is the
      # segment before it.
      owner = path.rfind("/", 0, seg_start - 1) + 1
    else:
      owner = seg_start
    return _Block(int(index), path[:start] + "*" + path[end:seg_end],
                  path[:max(owner - 1, 0)], path[owner:seg_end])

  def is_head(self, path: str, spec: Any) -> bool:
    return self.head is not None and self.head.match(path, spec)

  def is_after(self, path: str, spec: Any) -> bool:
    if self.after is not None:
      return self.after.match(path, spec)
    if not self.final_norms:
      return False
    if self.parent:
      if not path.startswith(self.parent + "/"):
        return False
      path = path[len(self.parent) + 1:]
    return path.split("/", 1)[0] in FINAL_NORM_NAMES

  def depth(self, path: str, spec: Any) -> int:
    key = (path, tuple(spec.shape), str(spec.dtype))
    depth = self._memo.get(key)
    if depth is None:
      if self.is_head(path, spec):
        depth = self.num_blocks + 1
      elif (b := self.block(path)) is not None:
        depth = b.index + 1
      elif self.is_after(path, spec):
        depth = self.num_blocks
      else:
        depth = 0
      self._memo[key] = depth
    return depth


def _names(paths: Sequence[str], n: int = 2) -> str:
  """The modules holding ``paths`` (a leaf's path without its last name)."""
  modules = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in paths))
  text = ", ".join(modules[:n])
  return text + (f" and {len(modules) - n} more" if len(modules) > n else "")


def layer_decay(
    decay: float,
    params: Any,
    *,
    block: str | re.Pattern[str] = DEFAULT_BLOCK,
    head: _rules.SelectorLike | None = DEFAULT_HEAD,
    after: _rules.SelectorLike | None = FINAL_NORMS,
    min_scale: float = 0.0,
    freeze_below: float | None = None,
) -> list[tuple[_rules.Selector, float]]:
  r"""Layer-wise learning-rate decay: a rule set of multipliers per depth.

  Layer-wise learning-rate decay (LLRD) fine-tunes a pretrained transformer
  with rates that shrink geometrically from the head down to the embeddings,
  so the layers that hold the most general features move least (ELECTRA,
  BEiT, and timm's ``param_groups_layer_decay``). For a model of ``L``
  blocks each parameter gets a depth:

  * the head (``head``): ``L + 1``;
  * block ``i`` (its index found in the path by ``block``): ``i + 1``;
  * parameters after the last block that are not the head, such as a final
    norm (``after``): ``L``, the last block's depth, as timm's ViT
    ``group_matcher`` puts ``norm`` with the last block;
  * everything else, the embeddings and whatever comes before the first
    block: ``0``;

  and the multiplier ``max(min_scale, decay ** (L + 1 - depth))``: 1.0 for
  the head, ``decay`` for the last block, ``decay ** (L + 1)`` for the
  embeddings. These are timm's ``lr_scale``\ s; multiply by the base rate of
  the inner optimizer (``optax.chain(optax.adamw(lr), lw.scale_by_rules(
  rules))``) to get its per-group rates.

  The head is found by name, not by position: paths are ordered by name, not
  by the order of the forward pass, so "after the last block" cannot be read
  from them. Check the outcome with ``lw.describe(rules, params)``.

  Args:
    decay: the ratio between the rates of a layer and the layer above it, in
      ``(0, 1]``; 0.65 to 0.9 are usual, 1.0 gives every leaf 1.0.
    params: the parameters the rule set is for (arrays, an ``nnx.State`` or
      ``jax.ShapeDtypeStruct``\ s; only paths, shapes and dtypes are read).
      ``L`` is the largest block index found in them, plus one.
    block: a regex (a string or ``re.compile(...)``) searched in each path
      (``re.search``), whose one capture group is the block index. The
      default, :data:`DEFAULT_BLOCK`, finds ``layers_3``, ``blocks_3``,
      ``layer_3``, ``block_3``, ``h_3`` and ``layers/3`` (an NNX list) as a
      whole path segment. Every block must belong to one stack (one
      ``encoder/layers_*``): to decay one stack of several, anchor the
      pattern to it (``r"^encoder/layers_(\d+)/"``).
    head: a selector (glob, compiled regex or callable ``(path, leaf) ->
      bool``) for the head, which gets multiplier 1.0; it takes precedence
      over ``block``. The default, :data:`DEFAULT_HEAD`, is any parameter
      inside a module named ``head``, ``heads``, ``classifier``, ``pooler``,
      ``pre_logits``, ``fc_norm``, ``attn_pool`` or ``lm_head``, the modules
      timm leaves to the head's group. ``None``: the model has no head (the
      last block still gets ``decay``).
    after: a selector for the parameters after the last block that are not
      the head, which share the last block's depth ``L``. The default,
      :data:`FINAL_NORMS`, takes a module named in
      :data:`FINAL_NORM_NAMES` (``norm``, ``encoder_norm``, ``ln_f``,
      ``layernorm``, ...) that sits beside the blocks' stack: ``norm`` beside
      ``blocks_*``, ``model/norm`` beside ``model/layers/*``, but not
      ``patch_embed/norm``. ``None``: nothing comes after the blocks. To put
      a final norm with the head instead (as BEiT does), add it to ``head``.
    min_scale: a floor on every multiplier, in ``[0, 1]`` (timm's
      ``min_scale``: ``max(min_scale, decay ** k)``).
    freeze_below: if given, a depth whose multiplier (after ``min_scale``)
      is below it gets 0.0: its parameters are frozen (timm's
      ``no_opt_scale``). In ``[0, 1]``; the head is never frozen. A
      multiplier of 0.0 gives a zero update (weight decay included, when
      ``scale_by_rules`` comes last in the chain) but the inner optimizer
      still holds state for those leaves.

  Returns:
    A rule set: a list of ``(selector, multiplier)`` pairs, one per depth
    that has parameters, from the head down, with Python float
    multipliers. Each selector is a :class:`~layerwise.Selector` named
    ``depth d (what)``, such as ``depth 3 (layers_2)``. The last rule also
    takes any leaf that the others do not, so the rule set covers every
    leaf, and it passes strict resolution on ``params``.

  Raises:
    ValueError: for ``decay``, ``min_scale`` or ``freeze_below`` out of
      range; a ``block`` pattern without exactly one capture group, one that
      captures something other than digits, one that matches no path, or
      one that matches blocks in two stacks; a ``head`` that matches no
      parameter (name it, or pass ``head=None``); an ``after`` selector that
      matches no parameter.
    TypeError: for a value of the wrong type, or a ``head`` or ``after``
      that is not a selector.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"embed": jnp.ones((10, 4)),
    ...           "layers_0": {"w": jnp.ones((4, 4))},
    ...           "layers_1": {"w": jnp.ones((4, 4))},
    ...           "norm": {"scale": jnp.ones(4)},
    ...           "head": {"w": jnp.ones((4, 2))}}
    >>> rules = lw.layer_decay(0.5, params)
    >>> rules
    [(depth 3 (head), 1.0), (depth 2 (layers_1, norm), 0.5),
    (depth 1 (layers_0), 0.25), (depth 0 (embeddings), 0.125)]
    >>> lw.resolve(rules, params)
    {'embed': 0.125, 'head': {'w': 1.0}, 'layers_0': {'w': 0.25},
    'layers_1': {'w': 0.5}, 'norm': {'scale': 0.5}}
    >>> lw.resolve(lw.layer_decay(0.5, params, min_scale=0.2,
    ...                           freeze_below=0.25), params)["embed"]
    0.0

  References:
    Clark et al., `ELECTRA: Pre-training Text Encoders as Discriminators
    Rather Than Generators <https://arxiv.org/abs/2003.10555>`_, 2020.

    Bao et al., `BEiT: BERT Pre-Training of Image Transformers
    <https://arxiv.org/abs/2106.08254>`_, 2021.

    timm, ``timm/optim/_param_groups.py`` (``param_groups_layer_decay``)
    and ``timm/models/_manipulate.py`` (``group_with_matcher``).
  """
  fn = "layer_decay"
  decay = _real(fn, "decay", decay)
  if not (math.isfinite(decay) and 0.0 < decay <= 1.0):
    raise ValueError(
        f"layer_decay: decay must be in (0, 1], got {decay!r}. Each layer "
        "learns at decay times the rate of the layer above it: 0.65 to 0.9 "
        "are usual, 1.0 turns the decay off.")
  min_scale = _real(fn, "min_scale", min_scale)
  if not (math.isfinite(min_scale) and 0.0 <= min_scale <= 1.0):
    raise ValueError(
        f"layer_decay: min_scale must be in [0, 1], got {min_scale!r}. It is "
        "a floor on the multipliers (0.0, the default, sets none).")
  if freeze_below is not None:
    freeze_below = _real(fn, "freeze_below", freeze_below)
    if not (math.isfinite(freeze_below) and 0.0 <= freeze_below <= 1.0):
      raise ValueError(
          f"layer_decay: freeze_below must be in [0, 1] or None, got "
          f"{freeze_below!r}. Depths whose multiplier is below it are "
          "frozen (multiplier 0.0).")
  regex = _block_regex(block)
  head_c = None if head is None else _rules.compile_selector(head)
  explicit_after = after is not None and after is not FINAL_NORMS
  after_c = _rules.compile_selector(after) if explicit_after else None
  depths = _Depths(regex, head_c, after_c, final_norms=after is FINAL_NORMS)

  path_strs, specs, _ = _rules.paths_and_specs(params)

  # The blocks: every leaf outside the head that the pattern finds.
  in_head = [depths.is_head(p, s) for p, s in zip(path_strs, specs)]
  blocks: dict[str, _Block] = {}
  for p, h in zip(path_strs, in_head):
    if not h and (b := depths.block(p)) is not None:
      blocks[p] = b
  if not blocks:
    shown = ", ".join(repr(p) for p in path_strs[:4])
    more = ", ..." if len(path_strs) > 4 else ""
    raise ValueError(
        f"layer_decay found no block: the block pattern {_pattern(regex)} "
        f"matches none of the {len(path_strs)} parameter paths "
        f"{'outside the head ' if any(in_head) else ''}({shown}{more}). Pass "
        "block=<regex> whose one capture group is the block index, e.g. "
        r"block=r'(?:^|/)encoderblock_(\d+)(?:/|$)' for paths like "
        "'Transformer/encoderblock_3/...' (lw.paths(params) lists the "
        "paths).")
  stacks: dict[str, list[str]] = {}
  for p, b in blocks.items():
    stacks.setdefault(b.container, []).append(p)
  if len(stacks) > 1:
    counts = {c: len({blocks[p].index for p in ps}) for c, ps in stacks.items()}
    listed = "; ".join(
        f"{c!r} ({k} block{'' if k == 1 else 's'}, e.g. {stacks[c][0]!r})"
        for c, k in counts.items())
    raise ValueError(
        f"layer_decay needs one stack of blocks, but the block pattern "
        f"{_pattern(regex)} finds {len(stacks)}: {listed}. Anchor the "
        "pattern to the stack whose depth should decay (e.g. "
        r"block=r'^encoder/layers_(\d+)/'); the others then count as "
        "embeddings, or as head or after if you name them so.")
  first = next(iter(blocks.values()))
  depths.num_blocks = max(b.index for b in blocks.values()) + 1
  depths.parent = first.parent
  num_blocks = depths.num_blocks

  leaf_depths = [depths.depth(p, s) for p, s in zip(path_strs, specs)]
  if head_c is not None and not any(in_head):
    raise ValueError(
        f"layer_decay found no head: no parameter matches head={head_c.text}. "
        "Name the head's parameters with any selector (e.g. "
        "head='classifier/**'; lw.paths(params) lists the paths), or pass "
        "head=None for a model without a head.")
  after_paths = [p for p, s, d in zip(path_strs, specs, leaf_depths)
                 if d == num_blocks and p not in blocks]
  if explicit_after and not after_paths:
    raise ValueError(
        f"layer_decay: after={after_c.text} matches no parameter outside "
        "the head and the blocks. Fix the selector (lw.paths(params) lists "
        "the paths), or leave after at its default.")

  labels = {0: "embeddings", num_blocks + 1: "head"}
  for b in blocks.values():
    labels.setdefault(b.index + 1, b.label)
  if after_paths:
    labels[num_blocks] += ", " + _names(after_paths)

  def multiplier(depth: int) -> float:
    scale = max(min_scale, decay ** (num_blocks + 1 - depth))
    if freeze_below and scale < freeze_below:
      return 0.0
    return float(scale)

  present = sorted(set(leaf_depths), reverse=True)
  rules = []
  for k, d in enumerate(present):
    text = f"depth {d} ({labels[d]})"
    if k == len(present) - 1:  # the last rule takes every leaf left
      selector = _rules.Selector(lambda path, leaf: True, text)
    else:
      selector = _rules.Selector(
          lambda path, leaf, d=d: depths.depth(path, leaf) == d, text)
    rules.append((selector, multiplier(d)))
  return rules


def discriminative(groups: Sequence[_rules.SelectorLike], lo: float,
                   hi: float | None = None) -> list[tuple[Any, float]]:
  r"""Discriminative rates as in fastai: multipliers spaced evenly in log.

  fastai trains a model split into parameter groups (lowest layers first,
  head last) with ``lr=slice(lo, hi)``: the groups' rates are spaced
  geometrically from ``lo`` to ``hi`` (``even_mults``); with
  ``lr=slice(hi)`` the last group gets ``hi`` and every other group
  ``hi / 10``. ``discriminative(groups, lo, hi)`` and
  ``discriminative(groups, hi)`` give the same numbers, as multipliers for
  ``scale_by_rules``: group ``k`` of ``n`` gets ``lo * step ** k`` with
  ``step = (hi / lo) ** (1 / (n - 1))``, computed as fastai's
  ``even_mults`` does, so the values are fastai's to the last bit (a single
  group gets ``hi``).

  The name is ULMFiT's ("discriminative fine-tuning"); the single value
  means the top rate, as in ``slice(hi)`` and ``range(stop)``.

  The multipliers scale the inner optimizer's rate, so a group's rate is
  ``lr_base * multiplier``. To train with fastai's absolute rates, pass them
  here and give the inner optimizer a rate of 1.0 (its schedule, if any,
  then multiplies them as fastai's ``fit_one_cycle`` does); or pass ratios
  to a base rate, ``discriminative(groups, lo / lr, hi / lr)`` with the
  optimizer at ``lr`` (equal up to rounding).

  Args:
    groups: selectors (globs, compiled regexes or callables), one per
      group, lowest layers first. A leaf takes the first group that matches
      it, as in any rule set, so put a catch-all (``"**"``) last if the
      rest should get the top rate.
    lo: the first group's multiplier, or, when ``hi`` is not given, the
      last group's (the others get ``lo / 10``). Finite and > 0.
    hi: the last group's multiplier. Finite and > 0.

  Returns:
    A rule set: a list of ``(selector, multiplier)`` pairs in group order,
    with the selectors as given and Python float multipliers.

  Raises:
    ValueError: for no groups, or ``lo`` or ``hi`` not finite and > 0.
    TypeError: for ``groups`` that is not a sequence of selectors.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> lw.discriminative(["embed/**", "encoder/**", "**"], 0.01, 1.0)
    [('embed/**', 0.01), ('encoder/**', 0.1), ('**', 1.0)]
    >>> lw.discriminative(["embed/**", "encoder/**", "**"], 1.0)  # slice(1.0)
    [('embed/**', 0.1), ('encoder/**', 0.1), ('**', 1.0)]
    >>> params = {"embed": jnp.ones(3), "encoder": {"w": jnp.ones(3)},
    ...           "head": jnp.ones(3)}
    >>> lw.resolve(lw.discriminative(["embed", "encoder/**", "head"], 0.25, 1.0),
    ...            params)
    {'embed': 0.25, 'encoder': {'w': 0.5}, 'head': 1.0}

  References:
    Howard and Ruder, `Universal Language Model Fine-tuning for Text
    Classification <https://arxiv.org/abs/1801.06146>`_, 2018.

    fastai, ``fastai/optimizer.py`` (``_BaseOptimizer.set_hyper``) and
    fastcore, ``fastcore/basics.py`` (``even_mults``).
  """
  fn = "discriminative"
  if (isinstance(groups, (str, bytes, re.Pattern, Mapping))
      or callable(groups) or not isinstance(groups, Sequence)):
    raise TypeError(
        "discriminative: groups must be a list of selectors, one per group "
        f"(lowest layers first), got {type(groups).__name__} {groups!r}. "
        "For one group, write [selector].")
  groups = list(groups)
  if not groups:
    raise ValueError(
        "discriminative needs at least one group: pass a list of selectors, "
        "lowest layers first, such as ['embed/**', 'encoder/**', '**'].")
  for selector in groups:
    _rules.compile_selector(selector)  # a TypeError for a non-selector
  lo = _real(fn, "lo", lo)
  if hi is not None:
    hi = _real(fn, "hi", hi)
  for name, value in (("lo", lo), ("hi", hi)):
    if value is not None and not (math.isfinite(value) and value > 0.0):
      raise ValueError(
          f"discriminative: {name} must be finite and > 0, got {value!r}. "
          "The multipliers are spaced geometrically, which needs positive "
          "ends; to freeze a group, give it multiplier 0.0 in a rule of its "
          "own.")
  n = len(groups)
  if hi is None:  # fastai's slice(hi): the last group hi, the others hi / 10
    multipliers = [lo / 10] * (n - 1) + [lo]
  elif n == 1:  # fastcore's even_mults(lo, hi, 1) is hi
    multipliers = [hi]
  else:  # fastcore's even_mults(lo, hi, n), operation for operation
    step = (hi / lo)**(1 / (n - 1))
    multipliers = [lo * (step**k) for k in range(n)]
  return list(zip(groups, multipliers))
