"""Per-layer learning rates and per-group weight decay.

One inner optimizer, many rules: ``scale_by_rules`` multiplies each leaf's
update by its rule's multiplier, placed after the inner optimizer in an
``optax.chain``; ``add_decayed_weights`` adds each leaf's own weight decay.
Rule sets of multipliers by depth (layer-wise decay, discriminative rates)
are built by :mod:`layerwise.layer_rates`.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise import _core, _validate
from layerwise._resolve import MISSING, Resolution, Rules, RuleSet
from layerwise._selectors import Selector, SelectorLike, any_of, ndim_at_most
from layerwise._types import ArrayLike, PyTree, ScalarOrSchedule, Stacks

__all__ = ["NO_DECAY", "AddDecayedWeightsState", "ScaleByRulesState",
           "add_decayed_weights", "scale_by_rules", "set_scale",
           "set_weight_decay"]

def _rate_rules(fn: str, rules: Rules, default: Any,
                what: str) -> tuple[RuleSet, Any]:
  """A rule set of multipliers (or weight decays), each checked, and the
  checked default."""
  rule_set = RuleSet(rules, what=what).map_values(
      lambda v, text: _validate.rate(fn, f"rule {text} has {what}", v, what))
  if default is not MISSING:
    default = _validate.rate(fn, f"default has {what}", default, what)
  return rule_set, default


def _unchanged(fn: str, rule_set: RuleSet, default: Any,
               what: str) -> Any:
  """A check, for ``update``, that the state's plan was made from these
  rules: ``plan -> None``, run once per plan.

  A state keeps the rates it was initialised with, in its vector. A
  transformation rebuilt with other values and given that state would
  silently keep the old ones: that is what ``optax.inject_hyperparams``
  does with a changed ``default`` (it rebuilds the transformation at every
  update, with the hyperparameters as arrays, concrete outside ``jit``).
  """
  texts = collections.Counter(c.text for c in rule_set.selectors)
  given = {c.text: v for c, v in zip(rule_set.selectors, rule_set.values)
           if texts[c.text] == 1}  # a text two rules share tells nothing
  if default is not MISSING:
    given["(default)"] = default
  checked: set[_core.Plan] = set()

  def shown(v: Any) -> str:
    return "a schedule" if _validate.is_schedule(v) else repr(v)

  def check(plan: _core.Plan) -> None:
    if plan in checked:
      return
    for path, text, value in zip(plan.paths, plan.rule_texts, plan.values):
      if text not in given or given[text] is value:
        continue
      if (_validate.is_schedule(value) or _validate.is_schedule(given[text])
          or value != given[text]):
        name = "default" if text == "(default)" else f"rule {text}"
        static = ("list default in static_args (static_args=('default',))"
                  if text == "(default)" else
                  "list the argument that holds it in static_args")
        raise ValueError(
            f"{fn}: the {what} of {name} is {shown(given[text])} in this "
            f"transformation, but the state was initialised with "
            f"{shown(value)} (parameter {path!r}), and keeps it: the new "
            "value would not apply. Under optax.inject_hyperparams, which "
            "rebuilds the transformation with the changed hyperparameter "
            f"and the old state, {static} and change {what}s between steps "
            f"with {_validate.SETTERS[what]}; otherwise, pass the state made "
            "by this transformation's init.")
    checked.add(plan)

  return check


def _check_dtypes(fn: str, res: Resolution, what: str, neutral: float,
                  verb: str) -> None:
  _validate.check_dtypes(
      fn, res.paths, res.specs, res.values,
      [res.rule_text(i) for i in range(len(res.paths))], what=what,
      neutral=neutral, verb=verb)


def _live_vector(res: Resolution) -> jax.Array:
  """The state vector of a rule set of rates: each leaf's constant factor
  (the rule's number, or 1.0 for a schedule, which it multiplies)."""
  return jnp.asarray([1.0 if _validate.is_schedule(v) else float(v)
                      for v in res.values], jnp.float32)


def _rates(fn: str, step: _core.Step, vector: Any,
           count: jax.Array) -> list[Any]:
  """Each leaf's rate now, in its update's dtype: its entry of the state
  vector, times its schedule at ``count`` if its rule is one (``None`` for
  integer, bool and ``float0`` leaves, which no rate changes, and for
  absent updates, ``None``: frozen by :func:`layerwise.grad`).

  A stacked leaf's rate is a vector of its layers' rates, shaped to
  broadcast along its layer axis."""
  plan = step.plan
  constants = _core.leaf_factors(vector, plan)
  out: list[Any] = []
  for j, u in enumerate(step.updates):
    if u is None:
      out.append(None)
      continue
    dtype = jnp.result_type(u)
    if not _validate.is_inexact(dtype):
      out.append(None)
      continue
    rate = constants[j]
    layers = plan.span(j)
    if any(_validate.is_schedule(plan.values[k]) for k in layers):
      rate = rate * _core.spread(plan, j, [
          _validate.schedule_value(fn, plan.values[k], count,
                                   plan.rule_texts[k], plan.paths[k])
          if _validate.is_schedule(plan.values[k]) else 1.0
          for k in layers])
    out.append(rate.astype(dtype))
  return out


def _scaled(update: Any, rate: Any) -> Any:
  """``update * rate``, exactly zero where the rate is 0 (``0 * nan`` is
  NaN): the rate is a runtime value, so the zero is a select, in the same
  kernel as the product (leaves of one shape still share it)."""
  return jnp.where(rate == 0, jnp.zeros((), rate.dtype), update * rate)


def _decayed(update: Any, param: Any, weight_decay: Any,
             toward: Any = None) -> Any:
  """``update + weight_decay * (param - toward)`` (``toward`` 0 if ``None``),
  the update itself where the weight decay is 0 (a NaN or inf param does
  not reach it)."""
  away = param if toward is None else param - toward
  return jnp.where(weight_decay == 0, update, update + weight_decay * away)

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
  count: jax.Array  # type: ignore[assignment]  # a field, as in optax
  multipliers: Any
  rules: _core.Plan

  def live(self) -> dict[str, _core.Live]:
    """The multipliers, one entry per leaf (the state protocol)."""
    return {"scale": _core.Live("leaf", self.multipliers)}

  def replace_live(self, name: str, vector: Any) -> "ScaleByRulesState":
    assert name == "scale", name
    return self._replace(multipliers=vector)


def scale_by_rules(
    rules: Rules[ScalarOrSchedule],
    *,
    default: ScalarOrSchedule = MISSING,
    strict: bool = True,
    stacks: Stacks = None,
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
  A multiplier of 0 gives an update of exactly zero, whatever the update
  it is given (NaN and inf included), whether it is the rule's, set by
  :func:`set_scale` or a schedule's value; the inner optimizer still keeps
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
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter takes
      its own rule (``"layers/3/**"``), its multipliers applied as one
      vector along the layer axis.

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
  fn = "lw.scale_by_rules"
  rule_set, default = _rate_rules(fn, rules, default, "multiplier")
  unchanged = _unchanged(fn, rule_set, default, "multiplier")

  def init(res: Resolution, params: list[Any]) -> ScaleByRulesState:
    del params
    _check_dtypes(fn, res, "multiplier", 1.0, "be scaled")
    return ScaleByRulesState(
        count=jnp.zeros([], jnp.int32),
        multipliers=_live_vector(res),
        rules=_core.Plan.of("scale", res))

  def update(step: _core.Step, state: ScaleByRulesState
             ) -> tuple[list[Any], ScaleByRulesState]:
    unchanged(step.plan)
    rates = _rates(fn, step, state.multipliers, state.count)
    out = [u if m is None else _scaled(u, m)
           for u, m in zip(step.updates, rates)]
    return out, state._replace(count=optax.safe_int32_increment(state.count))

  return _core.ruled(fn, rule_set, default=default, strict=strict,
                     init=init, update=update, skips=True, stacks=stacks)


def set_scale(opt_state: PyTree, selector: SelectorLike,
              value: ArrayLike) -> PyTree:
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
      paths of the params the state was initialised with; with stacks, the
      layer paths (``"layers/[0-3]/**"`` sets those layers of each stacked
      parameter).
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
  fn = "lw.set_scale"
  return _core.set_live(fn, opt_state, "scale", selector,
                        _live_number(fn, value, "multiplier",
                                     "scale_by_rules"), what="multipliers",
                        transformation="lw.scale_by_rules")


def _live_number(fn: str, value: Any, what: str, builder: str) -> Any:
  """A new live rate: a number >= 0, or a real scalar array (checked when
  it is concrete; a traced one, inside a jitted function, is taken as is)."""
  if _validate.is_schedule(value):
    raise TypeError(
        f"{fn} takes a number, not a schedule: schedules are part of the "
        f"transformation's structure. Build {builder} with the schedule "
        f"instead (for a leaf whose rule is a schedule, the {what} set here "
        "multiplies it).")
  value = _validate.live_value(fn, value)
  if isinstance(value, jax.core.Tracer):
    return value
  return _validate.rate(fn, f"the new {what} is", value, what)

# ------------------------------------------------------- add_decayed_weights

#: The usual "no weight decay" selector: biases, normalization scales and
#: every other parameter with at most one dimension (scalars included).
#: Hugging Face's ``Trainer`` leaves biases and LayerNorm weights undecayed,
#: timm's ``param_groups_weight_decay`` every 1-D parameter and every
#: ``.bias``; ``NO_DECAY`` is the union. It is a :class:`~layerwise.Selector`,
#: so it extends with ``|``: ``lw.NO_DECAY | "**/pos_embed"`` (timm's ViT also
#: exempts its position embedding and class token).
NO_DECAY = Selector(any_of(ndim_at_most(1), "**/bias"), "lw.NO_DECAY")


_TOWARD_HINT = ("Pass the weights to decay toward as a tree of arrays with "
                "the params' paths, shapes and dtypes (lw.paths(params) "
                "lists them), such as the pretrained params after "
                "lw.transplant, with None for the leaves or subtrees that "
                "decay toward zero.")


class AddDecayedWeightsState(NamedTuple):
  """State of :func:`add_decayed_weights`.

  Attributes:
    count: the number of updates made so far (schedules are evaluated at it).
    weight_decays: a float32 vector with one entry per parameter leaf (per
      layer of a stacked parameter), in the order of ``rules.paths``: the constant factor of each leaf's
      weight decay (the rule's value, or 1.0 for a schedule, which it
      multiplies). :func:`set_weight_decay` changes it between steps.
    rules: static metadata: each leaf's path, rule and weight decay as given.
    toward: the weights each leaf decays toward (``toward=``, a copy made
      at ``init``), a tree of the params' structure with ``None`` for the
      leaves that decay toward zero; ``None`` (no arrays, the state's
      format without ``toward=``) when every leaf decays toward zero.
      ``update`` decays toward the state's weights (after a restore, the
      checkpoint's).
  """
  count: jax.Array  # type: ignore[assignment]  # a field, as in optax
  weight_decays: Any
  rules: _core.Plan
  toward: Any = None

  def live(self) -> dict[str, _core.Live]:
    """The weight decays, one entry per leaf (the state protocol)."""
    return {"weight_decay": _core.Live("leaf", self.weight_decays)}

  def replace_live(self, name: str,
                   vector: Any) -> "AddDecayedWeightsState":
    assert name == "weight_decay", name
    return self._replace(weight_decays=vector)


def add_decayed_weights(
    rules: Rules[ScalarOrSchedule],
    *,
    default: ScalarOrSchedule = MISSING,
    strict: bool = True,
    toward: PyTree | None = None,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds each parameter times its rule's weight decay to its update.

  Per-group weight decay, as PyTorch param groups give it: the update of
  leaf ``p`` becomes ``u + wd_g * p``, with ``wd_g`` the coefficient of the
  first rule that matches ``p`` (0 leaves the update as it is, even for a
  NaN or inf param). With one rule it is ``optax.add_decayed_weights``.

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
  coefficients live in the state as one float32 vector (an entry per leaf),
  so :func:`set_weight_decay` changes them between jitted steps without
  recompiling, and a sweep over them reuses one compiled step.
  :data:`NO_DECAY` selects the parameters that are usually left undecayed
  (biases, norm scales, 1-D parameters).

  With ``toward=p0``, each leaf decays toward its weights in ``p0`` rather
  than toward zero: its update becomes ``u + wd_g * (p - p0)``. Given the
  pretrained weights (the params after :func:`layerwise.transplant`), this
  is L2-SP: fine-tuning is pulled back to the starting point, not away
  from what the model knows. ``p0`` is a tree of the params' paths, shapes
  and dtypes, checked at ``init``; ``None`` in it (for a leaf or a subtree,
  a new head) keeps the decay toward zero there, as the L2-SP paper does
  for the new layers. ``init`` copies ``p0`` into the state
  (:attr:`AddDecayedWeightsState.toward`), so it is saved and restored
  with the optimizer state, and donating the params does not delete it; it
  costs one copy of the leaves it holds (``lw.describe`` counts them in
  ``state_bytes``). Inside :func:`layerwise.partition` or
  :func:`layerwise.freeze`, ``p0`` is of the whole model, like their rule
  sets; inside :func:`layerwise.reparameterize`, whose inner optimizer sees
  ``phi = theta / lam``, give ``p0 / lam``. ``toward="init"`` takes ``p0``
  from the params ``init`` is given, which needs no second tree, works
  inside ``reparameterize`` as it is, and keeps a jitted ``init`` free of
  ``p0`` as a constant (a tree given as ``toward=`` is one there).

  Args:
    rules: ``{selector: weight_decay}``; see :func:`layerwise.resolve`.
    default: the weight decay of leaves no rule matches. Without it,
      unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.
    toward: the weights to decay toward, a tree like the params (``None``
      for leaves that decay toward zero); ``"init"``: the params given to
      ``init`` (the pretrained weights when ``init`` is called on them,
      and, under ``jax.jit(tx.init)``, an argument rather than a constant
      baked into the compiled init); ``None``: every leaf decays toward
      zero. With stacks, it is a tree of the real (stacked) arrays, like
      the params.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter takes
      its own rule (``"layers/3/**"``) and is judged by its own shape, so
      :data:`NO_DECAY` leaves a stacked LayerNorm scale of shape ``(L, D)``
      undecayed, as it does the unrolled model's ``(D,)`` scales; the
      coefficients apply as one vector along the layer axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params``.

  Raises:
    TypeError, ValueError: for a coefficient that is not a finite number
      >= 0 or a schedule; :class:`layerwise.RuleError` at ``init`` for rules
      that do not fit the params; ``TypeError`` at ``init`` for an integer
      or bool leaf whose weight decay is not 0.0; ``TypeError`` for a leaf
      of ``toward`` that is not an array, and at ``init`` for one whose
      dtype is not its parameter's; ``ValueError`` at ``init`` for a
      ``toward`` whose paths or shapes are not the params'; ``ValueError``
      at ``update`` without ``params``, or with updates or params whose
      paths or shapes differ from the params at ``init``.

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
    total              2       6  100.0%           12
    (total state bytes include 12 not held by one parameter, such as step counts)

    Toward the pretrained weights (L2-SP), the new head toward zero:

    >>> import jax
    >>> pretrained = {"dense": {"kernel": jnp.full((2, 2), 0.5),
    ...                         "bias": jnp.zeros(2)},
    ...               "head": {"kernel": jnp.zeros((2, 2))}}
    >>> params = jax.tree.map(jnp.ones_like, pretrained)
    >>> tx = lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1},
    ...                             toward={**pretrained, "head": None})
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> for path, u in zip(jax.tree.leaves(lw.paths(params)),
    ...                    jax.tree.leaves(updates)):
    ...   print(path, u[0])
    dense/bias 0.0
    dense/kernel [0.05 0.05]
    head/kernel [0.1 0.1]

    A stacked (scanned) model: each layer is judged by its own shape, so
    :data:`NO_DECAY` leaves the stacked LayerNorm scales ``(L, D)`` alone,
    and ``layers/0/**`` is the first layer:

    >>> stacked = {"layers": {"kernel": jnp.ones((3, 2, 2)),
    ...                       "scale": jnp.ones((3, 2))}}
    >>> tx = lw.add_decayed_weights(
    ...     {lw.NO_DECAY: 0.0, "layers/0/**": 0.0, "**": 0.1},
    ...     stacks={"layers": 0})
    >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, stacked),
    ...                        tx.init(stacked), stacked)
    >>> updates["layers"]["kernel"][:, 0, 0], updates["layers"]["scale"][:, 0]
    (Array([0. , 0.1, 0.1], dtype=float32), Array([0., 0., 0.], dtype=float32))

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.

    Li, Grandvalet and Davoine, `Explicit Inductive Bias for Transfer
    Learning with Convolutional Networks <https://arxiv.org/abs/1802.01483>`_,
    ICML 2018 (L2-SP).
  """
  fn = "lw.add_decayed_weights"
  rule_set, default = _rate_rules(fn, rules, default, "weight decay")
  unchanged = _unchanged(fn, rule_set, default, "weight decay")
  if isinstance(toward, str):
    if toward != "init":
      raise ValueError(
          f"{fn}: toward={toward!r} is not a tree of weights; the one string "
          "it takes is 'init' (decay toward the params given to init). "
          + _TOWARD_HINT)
  elif toward is not None:
    _validate.arrays(fn, "toward", toward, _TOWARD_HINT)

  def init(res: Resolution, params: list[Any]) -> AddDecayedWeightsState:
    _check_dtypes(fn, res, "weight decay", 0.0, "be decayed")
    p0 = None
    if toward == "init":
      # The params themselves: arguments of a jitted init, not constants.
      p0 = res.treedef.unflatten([jnp.array(x, copy=True) for x in params])
    elif toward is not None:
      p0 = res.treedef.unflatten([
          None if x is None else jnp.array(x, copy=True)
          for x in _core.like_params(fn, "toward", toward, res, _TOWARD_HINT)])
    return AddDecayedWeightsState(
        count=jnp.zeros([], jnp.int32),
        weight_decays=_live_vector(res),
        rules=_core.Plan.of("weight_decay", res), toward=p0)

  def update(step: _core.Step, state: AddDecayedWeightsState
             ) -> tuple[list[Any], AddDecayedWeightsState]:
    assert step.params is not None  # needs_params says so
    unchanged(step.plan)
    if toward is not None and state.toward is None:
      raise ValueError(
          f"{fn}: this transformation decays toward= given weights, but the "
          "state was initialised without them (by an add_decayed_weights "
          "without toward=), and holds none: every leaf would decay toward "
          "zero. Pass the state this transformation's init returned, or "
          "restore a checkpoint against it (lw.restore_state("
          "tx.init(params), restored)).")
    rates = _rates(fn, step, state.weight_decays, state.count)
    p0 = ([None] * len(rates) if state.toward is None
          else step.plan.check_holes(fn, state.toward)[0])
    out = [u if wd is None else _decayed(u, p, wd, t)
           for u, p, wd, t in zip(step.updates, step.params, rates, p0)]
    return out, state._replace(count=optax.safe_int32_increment(state.count))

  return _core.ruled(fn, rule_set, default=default, strict=strict,
                     init=init, update=update, skips=True,
                     needs_params=lambda plan: "weight decay", stacks=stacks)


def set_weight_decay(opt_state: PyTree, selector: SelectorLike,
                     value: ArrayLike) -> PyTree:
  """Returns ``opt_state`` with new weight decays for the leaves ``selector`` picks.

  The sibling of :func:`set_scale` for :func:`add_decayed_weights`: every
  ``add_decayed_weights`` state inside ``opt_state`` (a chain,
  ``MultiSteps``, ``partition``, ...) gets the new coefficient for the
  leaves the selector matches. The new state has the same structure,
  shapes and dtypes, so a jitted step takes it without recompiling. For a
  leaf whose rule is a schedule, ``value`` multiplies the schedule.

  Args:
    opt_state: an optimizer state.
    selector: any selector, matched against the paths of the params the
      state was initialised with; with stacks, the layer paths
      (``"layers/[0-3]/**"`` sets those layers of each stacked parameter).
    value: the new weight decay, a finite number >= 0 (or a scalar array).

  Returns:
    The new state.

  Raises:
    ValueError: if the state holds no ``add_decayed_weights`` state, the
      selector matches no parameter in any of them, or ``value`` is
      negative or not finite.
    TypeError: for a schedule, or an array that is not a real scalar.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> tx = lw.add_decayed_weights({"**": 0.1})
    >>> state = lw.set_weight_decay(tx.init(params), "b", 0.0)
    >>> updates, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, state,
    ...                        params)
    >>> updates["w"], updates["b"]
    (Array([0.1, 0.1], dtype=float32), Array([0., 0.], dtype=float32))
  """
  fn = "lw.set_weight_decay"
  return _core.set_live(fn, opt_state, "weight_decay", selector,
                        _live_number(fn, value, "weight decay",
                                     "add_decayed_weights"),
                        what="weight decays",
                        transformation="lw.add_decayed_weights")
