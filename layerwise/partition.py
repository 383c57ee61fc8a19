"""Route parameter groups to optimizers; freeze leaves at no cost.

``partition`` sends each group of parameters (chosen by a rule set) to its
own optax transformation; ``freeze`` wraps one optimizer so that some leaves
get a zero update and hold no optimizer state; ``stop_gradient`` stops the
backward pass at frozen leaves, and ``grad`` / ``value_and_grad`` make no
gradient for them at all (``None`` in their place). All resolve their rules
once, from the tree's paths, shapes and dtypes, so nothing is matched inside
``jit``.

The mechanism is shared: every leaf is assigned statically to one group (an
inner transformation) or to none (frozen). Each inner transformation sees a
tree of its own group's leaves only, nested dicts keyed by their path
segments (so rule sets inside see the same paths), and holds state for them
alone, computing its norms, counts and statistics over them. The other
leaves are not in its tree at all: ``optax.partition`` and ``optax.masked``
put an ``optax.MaskedNode()`` there instead, and with 50 groups of a
777-leaf model those 78,000 placeholders made each call of a jitted step
unflatten 78,000 NamedTuples (a 7x slower step). Frozen leaves get a zero
update of their own dtype: they hold no state anywhere and add nothing to
any norm computed downstream.

With stacks (``stacks=``), leaves are assigned by layer: a stacked leaf
whose layers are in several groups (or partly frozen) is given whole to
each group that owns some of its layers, its gradient zeroed on the
others and its update selected on its own layers (a static layer mask);
the inner transformations resolve their own rule sets with the
partition's stacks (:func:`~layerwise._resolve.stacks_of`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _core, _diagnostics, _paths, _validate
from layerwise._resolve import (MISSING, Flags, Resolution, Rules, RuleSet,
                                Whole, flag_rules, stacks_of, whole_model)
from layerwise._types import PyTree, Stacks

__all__ = ["FreezeState", "PartitionState", "freeze", "grad", "partition",
           "stop_gradient", "value_and_grad"]

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
  rules: _core.Plan

  def notes(self) -> list[str]:
    """The extra state of stacked leaves split between groups (the state
    protocol; printed by :func:`layerwise.describe`)."""
    return _split_notes(self.rules, self.inner_states)


class FreezeState(NamedTuple):
  """State of :func:`freeze`.

  Attributes:
    inner_state: the wrapped optimizer's state, for the trainable leaves only.
    rules: static metadata: each leaf's path and whether it is frozen.
  """
  inner_state: Any
  rules: _core.Plan

  def notes(self) -> list[str]:
    """The extra state of stacked leaves partly frozen (the state
    protocol; printed by :func:`layerwise.describe`)."""
    return _split_notes(self.rules, (self.inner_state,))


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


def _zero_of(step: _core.Step, j: int) -> jax.Array:
  """The zero update of real leaf ``j``: like its gradient, or, where it
  has none, like its param (sharded like it), or made from the plan's shape
  and dtype when ``update`` got no params."""
  if step.updates[j] is not None:
    return _zero_like(step.updates[j])
  if step.params is not None and step.params[j] is not None:
    return _zero_like(jnp.asarray(step.params[j]))
  plan = step.plan
  return jnp.zeros(plan.leaf_shapes[j], plan.dtypes[plan.span(j).start])


#: What a leaf's group can be: an optax transformation, or ``None`` (frozen).
Transformation = Union[optax.GradientTransformation, None]


def _nested(paths: Sequence[str], leaves: Sequence[Any]) -> Any:
  """``leaves`` as nested dicts keyed by the segments of their ``paths``,
  which :func:`layerwise.paths` names by the same paths (a root leaf, path
  ``''``, stays itself)."""
  if len(paths) == 1 and paths[0] == "":
    return leaves[0]
  tree: dict[str, Any] = {}
  for path, leaf in zip(paths, leaves):
    *parents, last = path.split("/")
    node = tree
    for seg in parents:
      node = node.setdefault(seg, {})
    node[last] = leaf
  return tree


def _layer_mask(plan: _core.Plan, j: int, owned: Sequence[bool]) -> np.ndarray:
  """A static bool mask, ``True`` on the layers ``owned``, shaped to
  broadcast along real leaf ``j``'s layer axis."""
  shape = [1] * len(plan.leaf_shapes[j])
  axis = plan.axis(j)
  assert axis is not None
  shape[axis] = -1
  return np.reshape(np.asarray(owned, bool), shape)


def _where_owned(mask: np.ndarray, x: Any, other: Any = None) -> Any:
  """``x`` on the layers of ``mask``, ``other`` (zero if ``None``) on the
  rest: a select, so a NaN or inf of ``x`` elsewhere never reaches the
  result."""
  if jnp.result_type(x) == jax.dtypes.float0:
    return x
  if other is None:
    other = jnp.zeros((), jnp.result_type(x))
  return jnp.where(mask, x, other)


class _Group(NamedTuple):
  """A group's leaves: the real leaves it holds, in the order of the
  group's own tree, and that tree's structure (``None``: the group holds
  every leaf, and its tree is the whole tree as given).

  A stacked leaf whose layers are in several groups (or partly frozen) is
  held whole by each group that owns some of its layers: ``masks`` gives,
  for each member, ``None`` (it owns every layer of it) or the layers it
  owns (a tuple of bools). ``stacks`` is the stacks key its inner
  transformation resolves with by default (the partition's stacks that
  hold some of its leaves).
  """
  members: tuple[int, ...]
  treedef: Any
  masks: tuple[tuple[bool, ...] | None, ...]
  stacks: tuple[Any, ...]

  @classmethod
  def of(cls, plan: _core.Plan, group: int) -> "_Group":
    n = len(plan.leaf_paths)
    if plan.layers is None:
      members = list(plan.members(group))
      owns: dict[int, tuple[bool, ...]] = {}
      stacks: tuple[Any, ...] = ("declared", ())
    else:
      assert plan.groups is not None
      members, owns = [], {}
      for j in range(n):
        owned = tuple(plan.groups[k] == group for k in plan.span(j))
        if any(owned):
          members.append(j)
          if not all(owned):
            owns[j] = owned
      roots = tuple((root, axis) for root, axis, _ in plan.layers.roots
                    if any(_paths.is_under(plan.leaf_paths[j], root)
                           for j in members))
      stacks = ("declared", roots)
    if len(members) == n:
      order, treedef = tuple(members), None
    else:
      leaves, treedef = jax.tree_util.tree_flatten(
          _nested([plan.leaf_paths[j] for j in members], list(members)))
      order = tuple(leaves)
    return cls(order, treedef, tuple(owns.get(j) for j in order), stacks)

  def tree(self, leaves: Sequence[Any] | None, whole: Any) -> Any:
    """The group's tree of ``leaves`` (all the real leaves, of the tree
    ``whole``'s structure); ``None`` stays ``None``."""
    if leaves is None:
      return None
    if self.treedef is None:
      return whole.unflatten(leaves)
    return self.treedef.unflatten([leaves[i] for i in self.members])

  def masked(self, plan: _core.Plan, updates: list[Any]) -> list[Any]:
    """``updates`` with zeros on the layers of its members' stacked leaves
    that the group does not own (so its norms and statistics, a global-norm
    clip's say, cover its own layers only, as on the unrolled model)."""
    if not any(m is not None for m in self.masks):
      return updates
    updates = list(updates)
    for j, owned in zip(self.members, self.masks):
      if owned is not None and updates[j] is not None:
        updates[j] = _where_owned(_layer_mask(plan, j, owned), updates[j])
    return updates


class _Routing(NamedTuple):
  """How a plan's leaves are routed: each group, the real leaves every
  layer of which is frozen, and those split between groups (or partly
  frozen), each with its layers' groups."""
  groups: tuple[_Group, ...]
  frozen: tuple[int, ...]
  split: tuple[tuple[int, tuple[int, ...]], ...]


@functools.lru_cache(maxsize=64)
def _routing(plan: _core.Plan) -> _Routing:
  assert plan.groups is not None
  groups = tuple(_Group.of(plan, k) for k in range(len(plan.group_names)))
  frozen, split = [], []
  for j in range(len(plan.leaf_paths)):
    layer_groups = tuple(plan.groups[k] for k in plan.span(j))
    if all(g < 0 for g in layer_groups):
      frozen.append(j)
    elif len(set(layer_groups)) > 1:
      split.append((j, layer_groups))
  return _Routing(groups, tuple(frozen), tuple(split))


def _owned_bytes(state: Any, paths: Sequence[str]) -> list[int]:
  """The bytes of ``state`` held for each of ``paths`` (a state leaf is
  held for the path its own path ends with, as :func:`layerwise.describe`
  counts them)."""
  index = {p: i for i, p in enumerate(paths)}
  out = [0] * len(paths)
  state_paths, leaves, _ = _paths.flatten_with_paths(state)
  for path, leaf in zip(state_paths, leaves):
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      continue
    segs = path.split("/")
    owner = next((index[t] for t in ("/".join(segs[k:])
                                     for k in range(len(segs)))
                  if t in index), None)
    if owner is not None:
      out[owner] += math.prod(shape) * np.dtype(dtype).itemsize
  return out


def _runs(layer_groups: Sequence[int], names: Sequence[str]) -> str:
  """``0-1 frozen, 2-3 'head/**'``: a stacked leaf's layers by
  group, in runs."""
  parts = []
  start = 0
  for i in range(1, len(layer_groups) + 1):
    if i == len(layer_groups) or layer_groups[i] != layer_groups[start]:
      g = layer_groups[start]
      span = str(start) if i - 1 == start else f"{start}-{i - 1}"
      parts.append(f"{span} {FROZEN if g < 0 else names[g]}")
      start = i
  return ", ".join(parts)


def _split_notes(plan: _core.Plan, inner_states: Sequence[Any]) -> list[str]:
  """A line per stacked leaf whose layers are split between groups (or
  partly frozen): which groups hold state for its layers they do not
  train, and how many bytes of it (their share of the state the group
  holds for the whole array)."""
  if plan.layers is None:
    return []
  routing = _routing(plan)
  if not routing.split:
    return []
  names = plan.group_names
  held: dict[int, list[int]] = {}  # group -> bytes per member
  lines = []
  for j, layer_groups in routing.split:
    parts = []
    for k, group in enumerate(routing.groups):
      if j not in group.members:
        continue
      at = group.members.index(j)
      owned = group.masks[at]
      if owned is None:
        continue
      if k not in held:
        held[k] = _owned_bytes(inner_states[k],
                               [plan.leaf_paths[i] for i in group.members])
      idle = len(owned) - sum(owned)
      extra = held[k][at] * idle // len(owned)
      parts.append(f"the optimizer of {names[k]} is given the whole array "
                   f"and holds {extra:,} bytes of state for the {idle} "
                   "layer(s) it does not train")
    if parts:
      lines.append(
          f"{plan.leaf_paths[j]} {plan.leaf_shapes[j]} is stacked, its "
          f"layers split ({_runs(layer_groups, names)}): "
          + "; ".join(parts) + ".")
  return lines


def _routed(fn: str, rule_set: RuleSet, *, default: Any, strict: bool,
            txs: Sequence[Any], names: Sequence[str], kind: str,
            shown: Callable[[int], Any],
            pack: Callable[[tuple[Any, ...], _core.Plan], Any],
            unpack: Callable[[Any], tuple[Any, ...]],
            stacks: Stacks = None,
            ) -> optax.GradientTransformationExtraArgs:
  """A transformation that routes each leaf to ``txs[group]``, its rule's
  value (-1: frozen), on the shared skeleton.

  ``shown(group)`` is the value ``describe`` shows for a leaf of ``group``;
  ``pack`` and ``unpack`` make the state from the inner states and back.

  Each inner transformation sees its group's leaves only, but the rule sets
  in it are written for the whole model (``lw.layer_decay(0.8, params)``):
  it is called within :func:`~layerwise._resolve.whole_model`, so that they
  are checked against every leaf of the model, hidden ones included, and
  within :func:`~layerwise._resolve.stacks_of`, so that those built with
  the default ``stacks`` see the partition's layer leaves.

  With stacks, the rules route layer leaves: a stacked leaf whose layers
  fall in several groups is given whole to each group that owns some of
  them, its gradient zeroed on the other layers, and its update is, layer
  by layer, that of the layer's group (exactly zero on frozen layers).
  """
  wholes: dict[_core.Plan, Whole] = {}  # by plan: made once per structure

  def whole_of(plan: _core.Plan) -> Whole:
    if plan not in wholes:
      if len(wholes) >= 32:
        wholes.pop(next(iter(wholes)))
      wholes[plan] = Whole(plan.paths, plan.specs(), plan.layers)
    return wholes[plan]

  def init(res: Resolution, params: list[Any]) -> Any:
    groups = tuple(res.values)
    plan = _core.Plan.of(kind, res, values=[shown(g) for g in groups],
                         groups=groups, group_names=names)
    routing = _routing(plan)
    states = []
    whole = Whole(res.paths, res.specs, res.layers)
    for k, tx in enumerate(txs):
      group = routing.groups[k]
      try:
        with whole_model(lambda: whole), stacks_of(group.stacks):
          states.append(tx.init(group.tree(params, res.treedef)))
      except _diagnostics.RuleError as e:
        # A rule set inside sees the group's leaves only: say so.
        split = [plan.leaf_paths[j]
                 for j, owned in zip(group.members, group.masks)
                 if owned is not None]
        raise _diagnostics.RuleError(
            f"{e}\n\n(This rule set belongs to the optimizer of {names[k]}, "
            f"which holds {len(plan.members(k))} of the model's "
            f"{len(plan.paths)} parameter(s). It is checked against the whole "
            "model: its rules may name the other parameters, but each "
            "selector must match a parameter of the model, and each of the "
            "group's parameters needs a rule."
            + (f" It is given the whole array of the stacked parameter(s) "
               f"{_diagnostics.few(split)}, some of whose layers it does "
               "not train: those layers need a rule too (a default or a "
               "catch-all gives them one)." if split else "")
            + ")", unmatched=e.unmatched, unused=e.unused,
            shadowed=e.shadowed) from None
    return pack(tuple(states), plan)

  def update(step: _core.Step, state: Any) -> tuple[list[Any], Any]:
    plan = step.plan
    assert plan.groups is not None
    routing = _routing(plan)
    out: list[Any] = [None] * len(step.updates)
    pieces: dict[int, list[tuple[np.ndarray, Any]]] = {}
    absent = set(step.absent)
    new_states = []
    for k, (tx, inner) in enumerate(zip(txs, unpack(state))):
      group = routing.groups[k]
      if absent:
        gone = [j for j in group.members if j in absent]
        if gone and len(gone) == len(group.members):
          # No gradients for the group (alternating updates): it skips its
          # step, so its state (step count, moments) stays as it is.
          new_states.append(inner)
          continue
        if gone:
          raise _partly_absent(fn, names[k], plan, gone, len(group.members))
      # Rule sets resolved at update (a label function of optax.partition)
      # are checked against the whole model too.
      with whole_model(lambda: whole_of(plan)), stacks_of(group.stacks):
        new_updates, new_state = tx.update(
            group.tree(group.masked(plan, step.updates), step.treedef),
            inner, group.tree(step.params, step.treedef), **step.extra)
      new_leaves = jax.tree_util.tree_leaves(new_updates)
      if len(new_leaves) != len(group.members):
        raise ValueError(
            f"{fn}: the transformation of group {names[k]} returned "
            f"{len(new_leaves)} updates for {len(group.members)} parameters; "
            "a transformation must keep the structure of the updates it is "
            "given.")
      for j, owned, u in zip(group.members, group.masks, new_leaves):
        if owned is None:
          out[j] = u
        else:
          pieces.setdefault(j, []).append((_layer_mask(plan, j, owned), u))
      new_states.append(new_state)
    for j in routing.frozen:
      # frozen: exactly zero, whatever the gradient (NaN included), and
      # for no gradient (None, as lw.grad gives), so that
      # optax.apply_updates takes the updates
      out[j] = _zero_of(step, j)
    for j, parts in pieces.items():
      # a stack split by layer: each layer's update is its group's, and
      # exactly zero on frozen layers
      u = _zero_like(parts[0][1])  # of the update's dtype, as unsplit
      for mask, part in parts:
        u = _where_owned(mask, part, u)
      out[j] = u
    return out, pack(tuple(new_states), plan)

  return _core.ruled(fn, rule_set, default=default, strict=strict,
                     init=init, update=update, skips=True, stacks=stacks)


def _partly_absent(fn: str, name: str, plan: _core.Plan, gone: Sequence[int],
                   size: int) -> ValueError:
  """The error for updates that lack some, not all, of a group's leaves."""
  return ValueError(
      f"{fn}: the updates hold None (or optax.MaskedNode()) for {len(gone)} "
      f"of the {size} parameters of the optimizer of {name} "
      f"({_diagnostics.few([plan.leaf_paths[j] for j in gone])}). A group "
      "steps as a whole or not at all: give all of them gradients (zeros "
      "where there are none), or None for all of them to skip its "
      "step (its optimizer state then stays as it is).")


# ---------------------------------------------------------------- partition


def partition(
    rules: Rules[Transformation],
    *,
    default: Transformation = MISSING,
    strict: bool = True,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  """Sends each parameter group to its own optimizer; ``None`` freezes.

  Like ``optax.partition``, but the groups are a rule set: ``{selector:
  transformation or None}``, first match wins, with the rule language's
  errors for typos, unmatched and shadowed rules. Rules that give the same
  transformation object share one group (and one state). Leaves whose rule
  is ``None`` are frozen: a zero update and no optimizer state.

  Each transformation sees only its group's leaves, in nested dicts keyed
  by their path segments (so a rule set inside sees the same paths), so its
  state, and any norm or statistic it computes (``clip_by_global_norm``,
  say), covers its group alone. Unlike ``optax.partition``, the tree holds
  no ``optax.MaskedNode()`` for the other groups' leaves, so the state's
  size, and the cost of passing it to a jitted step, do not grow with the
  number of groups. A rule set inside a group's transformation is resolved
  on the group's leaves but checked against the whole model: it may name
  the other groups' leaves (``lw.layer_decay(0.8, params)`` serves every
  group), and a selector that matches no leaf of the model is still an
  error. The groups are found once, from the paths, shapes and dtypes;
  nothing is matched inside ``jit``. Extra arguments of ``update`` (such as
  ``value`` for ``optax.contrib`` optimizers) are passed to every group.

  A group whose gradients are all ``None`` (or ``optax.MaskedNode()``), as
  in a GAN that steps the discriminator and the generator in turn, skips
  its step: its transformation is not called, its state (step count
  included) stays as it is, and its updates come back as given. This is
  decided from the tree's structure, when ``update`` is traced. ``None``
  for only some of a group's leaves is an error. Frozen leaves get a zero
  update with or without a gradient, as in :func:`freeze`.

  **Stacked (scanned) layers.** With ``stacks``, the rules route layer
  leaves (``layers/3/attn/kernel``), so the layers of one stacked
  parameter may fall in different groups (layers 0..k-1 frozen, say). A
  stacked parameter is one array, and an optax optimizer cannot hold state
  for a slice of it without copying the slice at every step, so each group
  that trains some of its layers is given the whole array: its gradient is
  zeroed on the layers the group does not own (a global-norm clip or any
  statistic inside the group sees its own layers only, as on the unrolled
  model), and the group's update is kept on its own layers only, by a
  select on a static layer mask; frozen layers get an update of exactly
  zero, NaN gradients included. What it costs is state: the group's
  optimizer holds state (Adam's two moments, say) for the layers of the
  array it does not train, and ``lw.describe(tx, params)`` prints a
  ``note:`` line with those bytes for each such parameter. A stack that
  one group holds whole, or that is frozen whole, costs nothing more: a
  frozen stack holds no state at all. A ruled transformation inside a
  group (``lw.scale_by_rules`` ...) built with the default ``stacks``
  sees the partition's stacks (the same ``layers/3/...`` paths; one given
  ``stacks=`` of its own keeps them), and must give a rule to every layer
  of a stacked parameter the group holds, those it does not train
  included (a catch-all does). An inner optimizer whose statistics run
  over a whole leaf (a LARS or LAMB trust ratio) mixes the layers of a
  stacked leaf, as it does on a stacked model without layerwise; the
  elementwise ones (sgd, momentum, adam, adamw, lion, ...) and the
  clippers of :func:`layerwise.clip_by_rules` do not.

  Args:
    rules: ``{selector: transformation or None}``; see
      :func:`layerwise.resolve`.
    default: the transformation (or ``None``: frozen) of leaves no rule
      matches. Without it, unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter takes
      its own rule (``"layers/[0-3]/**"``), and groups may split a stack
      by layer (see above).

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

    Alternating steps: with no gradients for the generator, only the
    discriminator's Adam steps (and counts the step):

    >>> grads = {"generator": None, "discriminator": {"w": jnp.ones(2)},
    ...          "features": None}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["generator"], [int(s[0].count) for s in state.inner_states]
    (None, [1, 2])

    A Muon-style split, matrices to one optimizer and the rest to another:

    >>> tx = lw.partition({lw.ndim_at_least(2): optax.sgd(0.1, momentum=0.9),
    ...                    "**": optax.adam(1e-3)})
  """
  fn = "lw.partition"
  given = RuleSet(rules, what="optimizer")
  txs: list[Any] = []
  names: list[str] = []
  index: dict[int, int] = {}

  def group_of(value: Any, text: str) -> int:
    if value is None:
      return -1
    tx = _validate.as_transformation(value)
    if tx is None:
      raise TypeError(
          f"{fn}: {text} has value {value!r} ({type(value).__name__}); each "
          "value must be an optax transformation (optax.adam(1e-3), "
          "optax.chain(...)) or None to freeze the leaves."
          + (" Call the factory: optax.adam(1e-3), not optax.adam."
             if callable(value) else ""))
    if id(value) not in index:
      index[id(value)] = len(txs)
      txs.append(tx)
      names.append(text.removeprefix("rule "))
    return index[id(value)]

  rule_set = given.map_values(lambda v, text: group_of(v, f"rule {text}"))
  if default is not MISSING:
    default = group_of(default, "default")
  return _routed(
      fn, rule_set, default=default, strict=strict, txs=txs, names=names,
      kind="group", shown=lambda g: FROZEN if g < 0 else names[g],
      pack=lambda states, plan: PartitionState(states, plan),
      unpack=lambda state: state.inner_states, stacks=stacks)


# ------------------------------------------------------ freeze / stop_gradient


def _frozen_rules(fn: str, frozen: Any) -> tuple[RuleSet, Any]:
  """``frozen`` as a rule set of bools, and its default."""
  return flag_rules(fn, frozen, what="frozen flag",
                    meaning="True (frozen) or False (trained)")


@functools.lru_cache(maxsize=32)
def _stop_gradient_rules(frozen: Any) -> tuple[RuleSet, Any]:
  return _frozen_rules("lw.stop_gradient", frozen)


def freeze(
    inner: optax.GradientTransformation,
    frozen: Flags,
    *,
    strict: bool = True,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that the ``frozen`` leaves do not train, for free.

  Frozen leaves get an update of exactly zero (whatever their gradient,
  NaN included), hold **no optimizer state** (``inner`` never sees them:
  the tree it gets holds the trainable leaves only), and are left out of
  every norm: wrap the whole chain, clipping included, so that
  ``optax.clip_by_global_norm`` inside it measures the trainable leaves
  only; a norm computed after ``freeze`` sees zeros. To also skip their
  backward computation, apply :func:`stop_gradient` in the loss function.
  ``optax.apply_if_finite`` goes inside too,
  ``freeze(optax.apply_if_finite(inner, k), frozen)``: a wrapper around
  ``freeze`` sees every gradient, so it would count the frozen leaves' NaN
  gradients as non-finite steps, and stop protecting after ``k`` of them.

  A frozen leaf's update is a zero also when its gradient is ``None`` (or
  ``optax.MaskedNode()``), as :func:`grad` gives it: shaped like its param
  (a ``None`` subtree filled with the params' structure; without params,
  a ``None`` leaf gets zeros of its shape at init and a ``None`` subtree
  stays ``None``), so ``optax.apply_updates`` takes the updates. A
  trainable leaf's ``None`` stays ``None``; when every trainable leaf's
  gradient is, ``inner`` skips its step (its state stays as it is).

  Rule sets inside ``inner`` are written for the whole model: they are
  resolved on the trainable leaves but checked against every leaf, so
  ``lw.scale_by_rules(lw.layer_decay(0.8, params))`` works inside with any
  block frozen, at the whole model's depths (build it on the whole params,
  not on the trainable subtree, whose block count differs).

  To unfreeze a group later without recompiling, or to warm it up, use a
  multiplier of 0 in :func:`layerwise.scale_by_rules` instead: the inner
  optimizer then keeps state for the group (see the docs on gradual
  unfreezing).

  With ``stacks``, ``frozen`` selects layer leaves, so
  ``lw.freeze(opt, "layers/[0-3]/**", stacks={"layers": 0})`` freezes the
  first four layers of a scanned model; ``inner`` is then given the whole
  array of a stack frozen in part, with zero gradients on its frozen
  layers, and holds state for them too (:func:`partition` says how, and
  ``lw.describe`` prints the bytes). A stack frozen whole holds none.

  Args:
    inner: the optimizer of the trainable leaves.
    frozen: a selector (glob, regex, callable) of the leaves to freeze, or a
      rule set ``{selector: bool}`` (``True``: frozen), which must cover
      every leaf.
    strict: as in :func:`layerwise.resolve`: a selector that matches no leaf
      is an error (a typo must not train what should be frozen).
    stacks: the stacked (scanned) subtrees, as in :func:`partition`: each
      layer of a stacked parameter is frozen or not by its own rule.

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

    The first two of four stacked layers frozen:

    >>> params = {"layers": {"w": jnp.ones((4, 2))}}
    >>> tx = lw.freeze(optax.sgd(0.1), "layers/[0-1]/**", stacks={"layers": 0})
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["layers"]["w"][:, 0]
    Array([ 0. ,  0. , -0.1, -0.1], dtype=float32)
  """
  fn = "lw.freeze"
  tx = _validate.as_transformation(inner)
  if tx is None:
    raise TypeError(
        f"{fn} wraps an optax transformation, got {type(inner).__name__}; "
        "call lw.freeze(optax.adam(...), frozen).")
  flags, default = _frozen_rules(fn, frozen)
  # freeze(inner, frozen) is partition({frozen: None, "**": inner}), with
  # the flags as the values describe shows.
  rule_set = flags.map_values(lambda frozen, text: -1 if frozen else 0)
  if default is not MISSING:
    default = -1 if default else 0
  return _routed(
      fn, rule_set, default=default, strict=strict, txs=[tx],
      names=["the trainable leaves"], kind="frozen", shown=lambda g: g < 0,
      pack=lambda states, plan: FreezeState(states[0], plan),
      unpack=lambda state: (state.inner_state,), stacks=stacks)


def stop_gradient(params: PyTree, frozen: Flags, *,
                  strict: bool = True, stacks: Stacks = None) -> PyTree:
  """``params`` with ``jax.lax.stop_gradient`` on the frozen leaves.

  Call it on the params inside the loss function: the frozen leaves then
  get a zero gradient, and XLA drops the backward computation that only
  they needed (their weight gradients, and the backward pass below the
  lowest trainable layer), so frozen layers cost a forward pass only.
  Use the same ``frozen`` as in :func:`freeze`. Values are unchanged.

  With ``stacks``, a stacked leaf whose layers are all frozen is stopped as
  a whole (its backward computation dropped, as above); one frozen in part
  becomes ``jnp.where(frozen_layers, lax.stop_gradient(x), x)``, a select
  on a static layer mask: its frozen layers get a gradient of exactly
  zero, but the backward computation of the stack is not saved (a scanned
  layer computes its weight gradient for all its layers, and the select
  drops the frozen ones), only their gradient is zero.

  Args:
    params: the parameters (any pytree; NNX states and linen variables
      included).
    frozen: a selector, or a rule set ``{selector: bool}``, as in
      :func:`freeze`.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, as in :func:`freeze`.

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

    Two of three stacked layers frozen:

    >>> stacked = {"layers": jnp.ones((3, 2))}
    >>> jax.grad(lambda p: lw.stop_gradient(p, "layers/[0-1]",
    ...                                     stacks={"layers": 0})["layers"].sum())(stacked)
    {'layers': Array([[0., 0.],
           [0., 0.],
           [1., 1.]], dtype=float32)}
  """
  # Called in the loss, often eagerly at every step: reuse the rule set (and
  # its per-structure match cache) for the same ``frozen``.
  try:
    hash(frozen)
  except TypeError:  # a dict: build the rule set for this call
    rule_set, default = _frozen_rules("lw.stop_gradient", frozen)
  else:
    rule_set, default = _stop_gradient_rules(frozen)
  fn = "lw.stop_gradient"
  res = rule_set.resolve(params, default=default, strict=strict,
                         stacks=_paths.normalize_stacks(fn, stacks), fn=fn)
  leaves = res.treedef.flatten_up_to(params)
  return res.treedef.unflatten(
      [_stopped(res, j, x, f) for j, (x, f) in enumerate(
          zip(leaves, res.leaf_values()))])


def _stopped(res: Resolution, j: int, x: Any, flag: Any) -> Any:
  """Real leaf ``j`` (``x``) with no gradient on its frozen layers:
  ``flag`` is its frozen flag, or its layers' flags (a stacked leaf)."""
  if not isinstance(flag, tuple):
    return jax.lax.stop_gradient(x) if flag else x
  if all(flag):
    return jax.lax.stop_gradient(x)
  if not any(flag):
    return x
  assert res.layers is not None
  axis = res.layers.axes[j]
  assert axis is not None
  shape = [1] * len(res.layers.leaf_shapes[j])
  shape[axis] = -1
  return jnp.where(np.reshape(np.asarray(flag, bool), shape),
                   jax.lax.stop_gradient(x), x)


# ------------------------------------------------------ grad / value_and_grad


def value_and_grad(fn: Callable[..., Any], frozen: Flags, *,
                   argnums: int = 0, has_aux: bool = False,
                   strict: bool = True,
                   stacks: Stacks = None) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``fn`` with respect to the trainable leaves only.

  The params (argument ``argnums`` of ``fn``) are split into their
  trainable and their ``frozen`` leaves; ``fn`` is differentiated with
  respect to the trainable ones alone, the frozen ones being constants of
  the differentiation. The gradient tree has the params' structure with
  ``None`` in place of every frozen leaf: no gradient, zero or otherwise,
  is made for them (the ``eqx.partition`` of Equinox, ``nnx.DiffState`` of
  NNX, for any pytree), and the frozen backward computation is dropped as
  with :func:`stop_gradient`. :func:`freeze` and :func:`partition` give
  the frozen leaves a zero update from it, so ``optax.apply_updates``
  takes their updates; :func:`layerwise.clip_by_rules`,
  :func:`layerwise.track_norms`, :func:`layerwise.scale_by_rules`,
  :func:`layerwise.add_decayed_weights` and :func:`layerwise.map_updates`
  pass a ``None`` through, left out of every norm. Use the same ``frozen``
  as in :func:`freeze`: the leaves are matched once per tree structure,
  when the function is traced, with the rule language's errors for typos.

  With ``stacks``, a stacked leaf all of whose layers are frozen gets
  ``None``; one frozen in part is differentiated, with a gradient of
  exactly zero on its frozen layers (as :func:`stop_gradient` gives it).

  Args:
    fn: the function to differentiate, ``fn(*args, **kwargs)``, returning a
      scalar (or ``(scalar, aux)`` with ``has_aux``).
    frozen: a selector, or a rule set ``{selector: bool}``, as in
      :func:`freeze`.
    argnums: the position of the params among ``fn``'s positional
      arguments (one argument; the others are not differentiated).
    has_aux: as in ``jax.value_and_grad``.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, as in :func:`freeze`.

  Returns:
    A function of ``fn``'s arguments that returns ``(value, grads)`` (or
    ``((value, aux), grads)`` with ``has_aux``).

  Raises:
    TypeError: for an ``fn`` that is not callable, an ``argnums`` that is
      not an int, or a call with no argument at ``argnums``.
    :class:`layerwise.RuleError`: when called, for a selector that matches
      nothing (with the closest paths).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"backbone": jnp.array(2.0), "head": jnp.array(3.0)}
    >>> def loss(p, x):
    ...   return p["backbone"] * p["head"] * x
    >>> value, grads = lw.value_and_grad(loss, "backbone")(params, 1.0)
    >>> value, grads
    (Array(6., dtype=float32, weak_type=True), {'backbone': None, 'head': Array(2., dtype=float32, weak_type=True)})

    The natural training step takes the gradients as they are:

    >>> tx = lw.freeze(optax.sgd(0.1), "backbone")
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)
    {'backbone': Array(2., dtype=float32), 'head': Array(2.8, dtype=float32)}
  """
  return _differentiated("lw.value_and_grad", fn, frozen, argnums=argnums,
                         has_aux=has_aux, strict=strict, value=True,
                         stacks=stacks)


def grad(fn: Callable[..., Any], frozen: Flags, *, argnums: int = 0,
         has_aux: bool = False, strict: bool = True,
         stacks: Stacks = None) -> Callable[..., Any]:
  """``jax.grad`` of ``fn`` with respect to the trainable leaves only.

  :func:`value_and_grad` without the value: the gradient tree has the
  params' structure with ``None`` in place of every ``frozen`` leaf.

  Args:
    fn: the function to differentiate, returning a scalar (or ``(scalar,
      aux)`` with ``has_aux``).
    frozen: a selector, or a rule set ``{selector: bool}``, as in
      :func:`freeze`.
    argnums: the position of the params among ``fn``'s positional
      arguments.
    has_aux: as in ``jax.grad``.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, as in :func:`freeze`.

  Returns:
    A function of ``fn``'s arguments that returns the gradients (or
    ``(grads, aux)`` with ``has_aux``).

  Raises:
    TypeError: as :func:`value_and_grad`.
    :class:`layerwise.RuleError`: as :func:`value_and_grad`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
    >>> loss = lambda p: jnp.sum(p["backbone"]["w"]) * jnp.sum(p["head"]["w"])
    >>> jax.jit(lw.grad(loss, "backbone/**"))(params)
    {'backbone': {'w': None}, 'head': {'w': Array([3., 3.], dtype=float32)}}

    With stacks, a stack frozen in part gets zeros on its frozen layers:

    >>> stacked = {"emb": jnp.ones(2), "layers": jnp.ones((3, 2))}
    >>> loss = lambda p: jnp.sum(p["emb"]) * jnp.sum(p["layers"])
    >>> lw.grad(loss, "layers/[0-1]", stacks={"layers": 0})(stacked)["layers"]
    Array([[0., 0.],
           [0., 0.],
           [2., 2.]], dtype=float32)
    >>> lw.grad(loss, "layers/*", stacks={"layers": 0})(stacked)["layers"] is None
    True
  """
  return _differentiated("lw.grad", fn, frozen, argnums=argnums,
                         has_aux=has_aux, strict=strict, value=False,
                         stacks=stacks)


def _differentiated(name: str, fn: Callable[..., Any], frozen: Flags, *,
                    argnums: int, has_aux: bool, strict: bool,
                    value: bool, stacks: Stacks = None) -> Callable[..., Any]:
  """:func:`value_and_grad` (``value``) or :func:`grad`, named ``name``."""
  if not callable(fn):
    raise TypeError(
        f"{name}: fn must be the function to differentiate, fn(params, "
        f"...), got {type(fn).__name__}; write {name}(loss, frozen)(params, "
        "batch).")
  if isinstance(argnums, bool) or not isinstance(argnums, int):
    raise TypeError(
        f"{name}: argnums must be one int, the position of the params among "
        f"fn's arguments, got {argnums!r}; differentiate one tree of params "
        "(put several in one tuple or dict).")
  rule_set, default = _frozen_rules(name, frozen)
  key = _paths.normalize_stacks(name, stacks)

  @functools.wraps(fn)
  def differentiated(*args: Any, **kwargs: Any) -> Any:
    if not -len(args) <= argnums < len(args):
      raise TypeError(
          f"{name}: the params are argument argnums={argnums} of fn, but it "
          f"was called with {len(args)} positional argument(s); pass the "
          "params positionally, or set argnums to their position.")
    at = argnums % len(args)
    params = args[at]
    res = rule_set.resolve(params, default=default, strict=strict,
                           stacks=key, fn=name)
    leaves = res.treedef.flatten_up_to(params)
    # A leaf is a constant when every layer of it is frozen; a stacked leaf
    # frozen in part is differentiated, its frozen layers stopped.
    flags = res.leaf_values()
    constant = [all(f) if isinstance(f, tuple) else bool(f) for f in flags]
    trainable = [x for x, c in zip(leaves, constant) if not c]

    def of_trainable(trained: list[Any]) -> Any:
      it = iter(trained)
      whole = res.treedef.unflatten(
          [x if c else _stopped(res, j, next(it), f)
           for j, (x, c, f) in enumerate(zip(leaves, constant, flags))])
      return fn(*args[:at], whole, *args[at + 1:], **kwargs)

    out, grads = jax.value_and_grad(of_trainable, has_aux=has_aux)(trainable)
    it = iter(grads)
    tree = res.treedef.unflatten([None if c else next(it)
                                  for c in constant])
    if value:
      return out, tree
    return (tree, out[1]) if has_aux else tree

  return differentiated
