"""Route parameter groups to optimizers; freeze leaves at no cost.

``partition`` sends each group of parameters (chosen by a rule set) to its
own optax transformation; ``freeze`` wraps one optimizer so that some leaves
get a zero update and hold no optimizer state; ``stop_gradient`` stops the
backward pass at frozen leaves. All three resolve their rules once, from
the tree's paths, shapes and dtypes, so nothing is matched inside ``jit``.

The mechanism is shared: every leaf is assigned statically to one group (an
inner transformation) or to none (frozen). Each inner transformation sees a
tree in which the leaves of other groups are ``optax.MaskedNode()`` (empty
subtrees, as ``optax.masked`` does), so it holds state for its own leaves
only, and computes its norms, counts and statistics over them alone. Frozen
leaves get a zero update of their own dtype: they hold no state anywhere and
add nothing to any norm computed downstream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise import _rules

__all__ = ["FreezeState", "PartitionState", "freeze", "partition",
           "stop_gradient"]

#: The group name of frozen leaves in :func:`partition`'s ``describe`` column.
FROZEN = "frozen"


class PartitionState(NamedTuple):
  """State of :func:`partition`.

  Attributes:
    inner_states: the state of each group's transformation, in the order the
      transformations first appear in the rules; frozen leaves have none.
    rules: static metadata: each leaf's path, rule and group name (the
      selector text of the group's first rule, or ``"frozen"``).
  """
  inner_states: tuple[Any, ...]
  rules: _rules.StaticRules


class FreezeState(NamedTuple):
  """State of :func:`freeze`.

  Attributes:
    inner_state: the wrapped optimizer's state, for the trainable leaves only.
    rules: static metadata: each leaf's path and whether it is frozen.
  """
  inner_state: Any
  rules: _rules.StaticRules


def _zero_like(x: jax.Array) -> jax.Array:
  """Zeros shaped, typed and (under ``jit``) sharded like ``x``.

  ``jnp.zeros_like`` of a traced array is a constant with no sharding, which
  a jitted step returns replicated: a full copy of a sharded parameter on
  every device. Selecting from ``x`` lets sharding propagation place the
  zeros like ``x``; the select of a constant condition compiles to the
  constant, and NaN or inf in ``x`` never reaches the result. A ``float0``
  gradient (of an integer leaf) holds no values and is its own zero.
  """
  if jnp.result_type(x) == jax.dtypes.float0:
    return x
  return jnp.where(False, x, jnp.zeros((), jnp.result_type(x)))


class _Routes:
  """Each leaf's group (an index into the transformations, or -1: frozen)."""

  def __init__(self, groups: Sequence[int], treedef: Any, fn: str):
    self.groups = tuple(groups)
    self.treedef = treedef
    self.fn = fn

  def mask(self, leaves: Sequence[Any] | None, group: int) -> Any:
    """The tree of ``leaves`` (flattened with ``treedef``), with the leaves
    of other groups replaced by ``MaskedNode``; ``None`` stays ``None``."""
    if leaves is None:
      return None
    return self.treedef.unflatten(
        [x if g == group else optax.MaskedNode()
         for x, g in zip(leaves, self.groups)])

  def flatten(self, tree: Any) -> list[Any] | None:
    """The leaves of the (optional) params, which must have the structure
    of the updates."""
    return None if tree is None else _rules.flatten_like(self.fn, self.treedef,
                                                         tree)

  def init(self, txs: Sequence[Any], params: Any,
           names: Sequence[str]) -> tuple[Any, ...]:
    states = []
    param_leaves = self.flatten(params)
    for k, tx in enumerate(txs):
      try:
        states.append(tx.init(self.mask(param_leaves, k)))
      except _rules.RuleError as e:
        # A rule set inside sees the group's leaves only: say so.
        n = sum(g == k for g in self.groups)
        raise _rules.RuleError(
            f"{e}\n\n(This rule set belongs to the optimizer of {names[k]}, "
            f"which sees only its {n} parameter(s); the other parameters are "
            "hidden from it, so its rules must not name them. Pass "
            "strict=False to a rule set shared with other groups.)",
            unmatched=e.unmatched, unused=e.unused,
            shadowed=e.shadowed) from None
    return tuple(states)

  def update(self, txs: Sequence[Any], updates: Any, states: Sequence[Any],
             params: Any, extra_args: Mapping[str, Any]) -> tuple[Any, Any]:
    leaves = self.treedef.flatten_up_to(updates)  # a None tree has none
    param_leaves = self.flatten(params)
    out: list[Any] = [None] * len(leaves)
    new_states = []
    for k, (tx, state) in enumerate(zip(txs, states)):
      members = [i for i, g in enumerate(self.groups) if g == k]
      new_updates, new_state = tx.update(
          self.mask(leaves, k), state, self.mask(param_leaves, k),
          **extra_args)
      new_leaves = jax.tree_util.tree_leaves(new_updates)
      if len(new_leaves) != len(members):
        raise ValueError(
            f"The transformation of group {k} returned {len(new_leaves)} "
            f"updates for {len(members)} parameters; a transformation must "
            "keep the structure of the updates it is given.")
      for i, u in zip(members, new_leaves):
        out[i] = u
      new_states.append(new_state)
    for i, g in enumerate(self.groups):
      if g < 0:  # frozen: exactly zero, whatever the gradient (NaN included)
        out[i] = _zero_like(leaves[i])
    return self.treedef.unflatten(out), tuple(new_states)


# ---------------------------------------------------------------- partition


def partition(
    rules: _rules.Rules,
    *,
    default: Any = _rules.MISSING,
    strict: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Sends each parameter group to its own optimizer; ``None`` freezes.

  Like ``optax.partition``, but the groups are a rule set: ``{selector:
  transformation or None}``, first match wins, with the rule language's
  errors for typos, unmatched and shadowed rules. Rules that give the same
  transformation object share one group (and one state). Leaves whose rule
  is ``None`` are frozen: a zero update and no optimizer state.

  Each transformation sees only its group's leaves (the others are
  ``optax.MaskedNode()``, as in ``optax.masked``), so its state, and any
  norm or statistic it computes (``clip_by_global_norm``, say), covers its
  group alone. The groups are found once, from the paths, shapes and dtypes;
  nothing is matched inside ``jit``. Extra arguments of ``update`` (such as
  ``value`` for ``optax.contrib`` optimizers) are passed to every group.

  Args:
    rules: ``{selector: transformation or None}``; see
      :func:`layerwise.resolve`.
    default: the transformation (or ``None``: frozen) of leaves no rule
      matches. Without it, unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: for a rule value that is neither a transformation nor
      ``None``. :class:`layerwise.RuleError` at ``init`` for rules that do
      not fit the params.

  Examples:
    A GAN: the generator and the discriminator train with their own Adam,
    and the frozen feature extractor holds no state:

    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"generator": {"w": jnp.ones(2)},
    ...           "discriminator": {"w": jnp.ones(2)},
    ...           "features": {"w": jnp.ones(2)}}
    >>> tx = lw.partition({"generator/**": optax.adam(1e-3),
    ...                    "discriminator/**": optax.adam(4e-3),
    ...                    "features/**": None})
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["generator"]["w"], updates["features"]["w"]
    (Array([-0.001, -0.001], dtype=float32), Array([0., 0.], dtype=float32))
    >>> print(lw.describe(tx, params))
    path             shape  dtype    size  group               state_bytes
    ---------------  -----  -------  ----  ------------------  -----------
    discriminator/w  (2,)   float32     2  'discriminator/**'           16
    features/w       (2,)   float32     2  frozen                        0
    generator/w      (2,)   float32     2  'generator/**'               16
    <BLANKLINE>
    group               leaves  params   share  state bytes
    'discriminator/**'       1       2   33.3%           16
    frozen                   1       2   33.3%            0
    'generator/**'           1       2   33.3%           16
    total                    3       6  100.0%           40
    (total state bytes include 8 not held by one parameter, such as step counts)

    A Muon-style split, matrices to one optimizer and the rest to another:

    >>> tx = lw.partition({lw.ndim_at_least(2): optax.sgd(0.1, momentum=0.9),
    ...                    "**": optax.adam(1e-3)})
  """
  given = _rules.RuleSet(rules, what="optimizer")
  txs: list[Any] = []
  names: list[str] = []
  index: dict[int, int] = {}
  rule_group: list[int] = []

  def group_of(value: Any, text: str) -> int:
    if value is None:
      return -1
    tx = _rules.as_transformation(value)
    if tx is None:
      raise TypeError(
          f"Rule {text} of lw.partition has value {value!r} "
          f"({type(value).__name__}); each value must be an optax "
          "transformation (optax.adam(1e-3), optax.chain(...)) or None to "
          "freeze the leaves." + (" Call the factory: optax.adam(1e-3), not "
                                  "optax.adam." if callable(value) else ""))
    if id(value) not in index:
      index[id(value)] = len(txs)
      txs.append(tx)
      names.append(text)
    return index[id(value)]

  for c, v in zip(given.selectors, given.values):
    rule_group.append(group_of(v, c.text))
  rule_set = _rules.RuleSet(list(zip(given.selectors, rule_group)),
                            what="optimizer")
  if default is not _rules.MISSING:
    default = group_of(default, "default")

  def resolve(tree: Any) -> tuple[_rules.Resolution, _Routes]:
    res = rule_set.resolve(tree, default=default, strict=strict)
    return res, _Routes(res.values, res.treedef, "lw.partition")

  def static(res: _rules.Resolution) -> _rules.StaticRules:
    return _rules.StaticRules.from_resolution(
        "group", res, [FROZEN if g < 0 else names[g] for g in res.values])

  def init_fn(params):
    res, routes = resolve(params)
    return PartitionState(routes.init(txs, params, names), static(res))

  def update_fn(updates, state, params=None, **extra_args):
    state.rules.check_tree("lw.partition", updates)
    res, routes = resolve(updates)
    new_updates, inner = routes.update(txs, updates, state.inner_states,
                                       params, extra_args)
    return new_updates, PartitionState(inner, state.rules)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------ freeze / stop_gradient


def _frozen_rules(fn: str, frozen: Any) -> tuple[_rules.RuleSet, Any]:
  """``frozen`` as a rule set of bools, and its default."""
  return _rules.flag_rules(fn, frozen, what="frozen flag",
                           meaning="True (frozen) or False (trained)")


@functools.lru_cache(maxsize=32)
def _stop_gradient_rules(frozen: Any) -> tuple[_rules.RuleSet, Any]:
  return _frozen_rules("lw.stop_gradient", frozen)


def freeze(
    inner: optax.GradientTransformation,
    frozen: Any,
    *,
    strict: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that the ``frozen`` leaves do not train, for free.

  Frozen leaves get an update of exactly zero (whatever their gradient,
  NaN included), hold **no optimizer state** (``inner`` never sees them:
  they are ``optax.MaskedNode()`` in the tree it gets), and are left out of
  every norm: wrap the whole chain, clipping included, so that
  ``optax.clip_by_global_norm`` inside it measures the trainable leaves
  only; a norm computed after ``freeze`` sees zeros. To also skip their
  backward computation, apply :func:`stop_gradient` in the loss function.

  To unfreeze a group later without recompiling, or to warm it up, use a
  multiplier of 0 in :func:`layerwise.scale_by_rules` instead: the inner
  optimizer then keeps state for the group (see the docs on gradual
  unfreezing).

  Args:
    inner: the optimizer of the trainable leaves.
    frozen: a selector (glob, regex, callable) of the leaves to freeze, or a
      rule set ``{selector: bool}`` (``True``: frozen), which must cover
      every leaf.
    strict: as in :func:`layerwise.resolve`: a selector that matches no leaf
      is an error (a typo must not train what should be frozen).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: for a rule set whose values are not bools.
    :class:`layerwise.RuleError`: at ``init``, for a selector that matches
      nothing (with the closest paths).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"backbone": {"w": jnp.ones((256, 256))}, "head": {"w": jnp.ones(2)}}
    >>> tx = lw.freeze(optax.adam(1e-3), "backbone/**")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> updates["backbone"]["w"].sum(), updates["head"]["w"]
    (Array(0., dtype=float32), Array([-0.001, -0.001], dtype=float32))
    >>> sum(x.nbytes for x in jax.tree_util.tree_leaves(state))  # 2 moments of head/w
    20
  """
  tx = _rules.as_transformation(inner)
  if tx is None:
    raise TypeError(
        f"lw.freeze wraps an optax transformation, got "
        f"{type(inner).__name__}; call lw.freeze(optax.adam(...), frozen).")
  rule_set, default = _frozen_rules("lw.freeze", frozen)
  txs = [tx]

  def resolve(tree: Any) -> tuple[_rules.Resolution, _Routes]:
    res = rule_set.resolve(tree, default=default, strict=strict)
    return res, _Routes([-1 if f else 0 for f in res.values], res.treedef,
                        "lw.freeze")

  def init_fn(params):
    res, routes = resolve(params)
    (inner_state,) = routes.init(txs, params, ["the trainable leaves"])
    return FreezeState(inner_state,
                       _rules.StaticRules.from_resolution("frozen", res))

  def update_fn(updates, state, params=None, **extra_args):
    state.rules.check_tree("lw.freeze", updates)
    res, routes = resolve(updates)
    new_updates, (inner_state,) = routes.update(
        txs, updates, (state.inner_state,), params, extra_args)
    return new_updates, FreezeState(inner_state, state.rules)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stop_gradient(params: Any, frozen: Any, *, strict: bool = True) -> Any:
  """``params`` with ``jax.lax.stop_gradient`` on the frozen leaves.

  Call it on the params inside the loss function: the frozen leaves then
  get a zero gradient, and XLA drops the backward computation that only
  they needed (their weight gradients, and the backward pass below the
  lowest trainable layer), so frozen layers cost a forward pass only.
  Use the same ``frozen`` as in :func:`freeze`. Values are unchanged.

  Args:
    params: the parameters (any pytree; NNX states and linen variables
      included).
    frozen: a selector, or a rule set ``{selector: bool}``, as in
      :func:`freeze`.
    strict: as in :func:`layerwise.resolve`.

  Returns:
    A pytree with the structure and values of ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"backbone": jnp.array(2.0), "head": jnp.array(3.0)}
    >>> def loss(p):
    ...   p = lw.stop_gradient(p, "backbone")
    ...   return p["backbone"] * p["head"]
    >>> jax.grad(loss)(params)
    {'backbone': Array(0., dtype=float32, weak_type=True), 'head': Array(2., dtype=float32, weak_type=True)}
  """
  # Called in the loss, often eagerly at every step: reuse the rule set (and
  # its per-structure match cache) for the same ``frozen``.
  try:
    hash(frozen)
  except TypeError:  # a dict: build the rule set for this call
    rule_set, default = _frozen_rules("lw.stop_gradient", frozen)
  else:
    rule_set, default = _stop_gradient_rules(frozen)
  res = rule_set.resolve(params, default=default, strict=strict)
  leaves = res.treedef.flatten_up_to(params)
  return res.treedef.unflatten(
      [jax.lax.stop_gradient(x) if f else x
       for x, f in zip(leaves, res.values)])
