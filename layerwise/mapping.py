"""Free-form maps of updates by path: any per-parameter operation in one line.

``map_updates(fn, where)`` applies ``fn(update, param, path)`` to the leaves a
selector picks, as a transformation that composes with ``optax.chain``:
noise, masks, sign, a custom clip, a different rule per path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise import _core, _diagnostics, _validate
from layerwise._resolve import RuleSet
from layerwise._selectors import SelectorLike

__all__ = ["MapUpdatesState", "map_updates"]


def _map_one(fn: Callable[..., Any], u: jax.Array, p: jax.Array | None,
             path: str) -> jax.Array:
  """``fn(u, p, path)`` as an array, with errors that name ``path``."""
  try:
    new = fn(u, p, path)
  except (TypeError, AttributeError) as e:
    if p is not None:
      raise
    raise TypeError(
        f"lw.map_updates: fn failed for parameter {path!r} with param=None "
        f"({type(e).__name__}: {e}). update was called without params: "
        "call tx.update(updates, state, params) if fn reads the param, or "
        "handle param is None in fn.") from e
  try:
    if new is None:  # jax < 0.5 reads None as NaN
      raise TypeError
    return jnp.asarray(new)
  except (TypeError, ValueError):
    raise TypeError(
        f"lw.map_updates: fn returned {new!r} ({type(new).__name__}) for "
        f"parameter {path!r}; it must return the new update, an array "
        "shaped like the update.") from None


class MapUpdatesState(NamedTuple):
  """State of :func:`map_updates`: no arrays, only the static rules.

  Attributes:
    rules: static metadata: each leaf's path and the function applied to
      it (``None`` where none is).
  """
  rules: _core.Plan


def map_updates(
    fn: Callable[[jax.Array, jax.Array | None, str], jax.Array],
    where: SelectorLike = "**",
    *,
    strict: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Applies ``fn(update, param, path)`` to the updates ``where`` selects.

  Any per-parameter operation on gradients or updates in one line: noise,
  masks, sign, a custom clip, a different rule per path (``path`` is the
  leaf's '/'-joined path, a Python string, so ``fn`` may branch on it).
  ``param`` is the leaf's parameter, or ``None`` when ``update`` is called
  without params. The result must have the update's shape; it is cast to
  the update's dtype. Other leaves pass through.

  Args:
    fn: ``(update, param, path) -> new update``, traceable by JAX.
    where: a selector (glob, regex, callable) of the leaves to map.
    strict: if True, a selector that matches no leaf is an error.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: for an ``fn`` that cannot be called as ``fn(update, param,
      path)``; at the first ``update``, for an ``fn`` that fails with
      ``param=None`` (no params given) or returns something that is not an
      array, naming the path.
    ValueError: at the first ``update``, for an ``fn`` that changes a
      shape, or updates or params whose paths or shapes differ from the
      params at ``init``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.map_updates(lambda u, p, path: jnp.sign(u), "encoder/**")
    >>> grads = {"encoder": {"w": jnp.array([-2.0, 3.0])}, "head": jnp.array([-2.0])}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["encoder"]["w"], updates["head"]
    (Array([-1.,  1.], dtype=float32), Array([-2.], dtype=float32))
  """
  name = "lw.map_updates"
  if not callable(fn):
    raise TypeError(f"{name}: fn must be callable (update, param, path) -> "
                    f"update, got {type(fn).__name__}.")
  _validate.check_arity(fn, 3, lambda: (
      f"{name}: fn {_diagnostics.text_of(fn)} cannot be called as "
      "fn(update, param, path); it takes the three (param is None when "
      "update is called without params), e.g. lambda u, p, path: "
      "jnp.sign(u)."))
  rule_set = RuleSet([(where, True)], what="selection")

  def init(res: Any, params: list[Any]) -> MapUpdatesState:
    del params
    return MapUpdatesState(_core.Plan.of(
        "map", res, values=[fn if v else None for v in res.values]))

  def update(step: _core.Step, state: MapUpdatesState
             ) -> tuple[list[Any], MapUpdatesState]:
    out = []
    for i, (u, selected) in enumerate(zip(step.updates, step.plan.values)):
      if selected is not None and u is not None:  # None: no gradient
        p = None if step.params is None else step.params[i]
        path = step.plan.paths[i]
        new = _map_one(fn, u, p, path)
        if new.shape != jnp.shape(u):
          raise ValueError(
              f"{name}: fn returned shape {new.shape} for parameter {path!r} "
              f"of shape {jnp.shape(u)}; it must keep the update's shape.")
        u = new.astype(jnp.result_type(u))
      out.append(u)
    return out, state

  return _core.ruled(name, rule_set, default=False, strict=strict, init=init,
                     update=update, skips=True,
                     placeholder=lambda p: MapUpdatesState(rules=p))
