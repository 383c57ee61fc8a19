"""Norm tracking: the L2 norm of each named group of updates, for a logger.

``track_norms`` changes nothing: it keeps each group's norm in its state, where
:func:`layerwise.norms` reads it (inside ``jit`` too), so a train step can
return per-layer gradient or update norms as metrics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _core, _norms, _validate
from layerwise._resolve import MISSING, Resolution, Rules, RuleSet
from layerwise._types import Stacks

__all__ = ["TrackNormsState", "track_norms"]


class TrackNormsState(NamedTuple):
  """State of :func:`track_norms`.

  Attributes:
    norms: a float32 vector: each group's L2 norm at the last update (0
      before the first update), in the order of :meth:`group_names`.
    rules: static metadata: each leaf's path, rule and key.
  """
  norms: jax.Array
  rules: _core.Plan

  def group_names(self) -> list[str]:
    """The groups' keys, as :func:`layerwise.norms` reports them, in the
    order of ``norms``."""
    return list(self.rules.group_names)

  def measured(self) -> dict[str, jax.Array]:
    """Each group's norm at the last update (the state protocol)."""
    return {"norm": self.norms}

  def metrics(self) -> list[tuple[str, jax.Array]]:
    """``(key, value)`` pairs for :func:`layerwise.norms`."""
    names = self.rules.group_names
    return list(zip(names, _core.entries(self.norms, len(names))))


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else path


def _check_name(value: Any, where: str) -> Any:
  if value is None:
    return None
  if not isinstance(value, str):
    raise TypeError(
        f"lw.track_norms: {where} has value {value!r} "
        f"({type(value).__name__}); each value must be a group name (a "
        "string, which may contain {path} or {parent}) or None.")
  try:
    value.format(path="p", parent="p")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(
        f"lw.track_norms: {where} has name {value!r}, which names a field "
        f"other than {{path}} and {{parent}} ({e}); write literal braces "
        "as {{ and }}.") from None
  return value



def track_norms(
    rules: Rules[str | None],
    *,
    prefix: str = "grad_norm",
    default: str | None = MISSING,
    strict: bool = True,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  """Records the L2 norm of each named group of updates; changes nothing.

  ``rules`` maps selectors to group names; leaves whose names are equal
  form one group, whose joint L2 norm is kept in the state under
  ``"<prefix>/<name>"`` for :func:`layerwise.norms`. A name may contain
  ``{path}`` (the leaf's path: one group per leaf) or ``{parent}`` (the
  path without its last part: one group per module, its kernel and bias
  together). ``None`` leaves leaves out. Placed first in a chain it
  measures gradients; placed last, the updates the optimizer made (give it
  another ``prefix``).

  Args:
    rules: ``{selector: name or None}``; see :func:`layerwise.resolve`.
    prefix: the first part of every key.
    default: the name (or ``None``) of leaves no rule matches. Without it,
      unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter is a
      leaf of its own (``"layers/3/attn/kernel"``, whose ``{parent}`` is
      ``"layers/3/attn"``), so the names give one norm per layer, as on
      the unrolled model, computed for the whole stacked array at once.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that passes updates through.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"layers": [{"w": jnp.zeros(2), "b": jnp.zeros(1)}] * 2}
    >>> tx = optax.chain(lw.track_norms({"**": "{parent}"}), optax.sgd(0.1))
    >>> grads = {"layers": [{"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])},
    ...                     {"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}]}
    >>> _, state = tx.update(grads, tx.init(params))
    >>> lw.norms(state)
    {'grad_norm/layers/0': Array(5., dtype=float32), 'grad_norm/layers/1': Array(1., dtype=float32)}

    The same model with its layers stacked on axis 0, the same rules, gives
    the same norms:

    >>> stacked = {"layers": {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2, 1))}}
    >>> tx = lw.track_norms({"**": "{parent}"}, stacks={"layers": 0})
    >>> grads = {"layers": {"w": jnp.array([[3.0, 0.0], [1.0, 0.0]]),
    ...                     "b": jnp.array([[4.0], [0.0]])}}
    >>> _, state = tx.update(grads, tx.init(stacked))
    >>> lw.norms(state)
    {'grad_norm/layers/0': Array(5., dtype=float32), 'grad_norm/layers/1': Array(1., dtype=float32)}
  """
  fn = "lw.track_norms"
  if not isinstance(prefix, str):
    raise TypeError(f"{fn}: prefix must be a string, got {prefix!r}.")
  given = RuleSet(rules, what="group name").map_values(
      lambda v, text: _check_name(v, f"rule {text}"))
  if default is not MISSING:
    _check_name(default, "default")

  def init(res: Resolution, params: list[Any]) -> TrackNormsState:
    del params
    keys = [None if v is None else
            f"{prefix}/{v.format(path=p, parent=_parent(p))}"
            for v, p in zip(res.values, res.paths)]
    _validate.check_dtypes(
        fn, res.paths, res.specs, keys,
        [res.rule_text(i) for i in range(len(res.paths))], what="rule",
        neutral=None, verb="be clipped or measured")
    names = list(dict.fromkeys(k for k in keys if k is not None))
    index = {k: g for g, k in enumerate(names)}
    return TrackNormsState(
        jnp.zeros([len(names)], _norms.F32),
        _core.Plan.of("track", res, values=keys,
                      groups=[-1 if k is None else index[k] for k in keys],
                      group_names=names))

  def update(step: _core.Step, state: TrackNormsState
             ) -> tuple[list[Any], TrackNormsState]:
    plan = step.plan
    if plan.layers is not None:
      return step.updates, TrackNormsState(_stacked_norms(step, state), plan)
    n = len(plan.group_names)
    absent = set(step.absent)
    norms = []
    for g in range(n):
      present = [step.updates[i] for i in plan.members(g) if i not in absent]
      # A group without gradients (None, as lw.grad gives frozen leaves)
      # keeps its last norm; an absent leaf is left out of its group's.
      norms.append(_norms.l2(present) if present else
                   _core.unboxed(state.norms)[g])
    return step.updates, TrackNormsState(_core.stack(norms, n), plan)

  return _core.ruled(fn, given, default=default, strict=strict, init=init,
                     update=update, skips=True,
                     stacks=stacks,
                     placeholder=lambda p: TrackNormsState(_core.NOT_PARAMS,
                                                           rules=p))


def _stacked_norms(step: _core.Step, state: TrackNormsState) -> jax.Array:
  """Each group's norm when the plan's leaves are layer leaves: each real
  leaf's sums of squares per layer (over its other axes, the whole stacked
  array at once), summed by group (:func:`layerwise._core.group_totals`)."""
  plan = step.plan
  groups = plan.groups
  assert groups is not None
  sums, measured = _core.group_totals(
      plan, step.updates, lambda k: groups[k],
      lambda j, u: _core.layer_sums(plan, j, jnp.square(_norms.magnitude(u))))
  old = _core.unboxed(state.norms)
  if sums is None:
    return old
  norms = jnp.sqrt(sums)
  # A group without gradients (None, as lw.grad gives frozen leaves) keeps
  # its last norm.
  return norms if measured.all() else jnp.where(measured, norms, old)
