"""Free-form maps of updates by path: any per-parameter operation in one line.

``map_updates(fn, where)`` applies ``fn(update, param, path)`` to the leaves a
selector picks, as a transformation that composes with ``optax.chain``:
noise, masks, sign, a custom clip, a different rule per path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from layerwise import _core, _diagnostics, _validate
from layerwise._resolve import RuleSet
from layerwise._selectors import SelectorLike
from layerwise._types import Stacks

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


def _mapped(fn: Callable[..., Any], u: jax.Array, p: jax.Array | None,
            path: str) -> jax.Array:
  """``fn(u, p, path)`` checked to keep ``u``'s shape, in ``u``'s dtype."""
  new = _map_one(fn, u, p, path)
  if new.shape != jnp.shape(u):
    raise ValueError(
        f"lw.map_updates: fn returned shape {new.shape} for parameter "
        f"{path!r} of shape {jnp.shape(u)}; it must keep the update's shape.")
  return new.astype(jnp.result_type(u))


def _const_key(c: Any) -> Any:
  """A constant of a traced ``fn``, as compared between layers: small ones
  by value; a tracer, or a large array ``fn`` closes over (the same object
  for every layer), by identity (one made anew per call only costs a call
  of its own, never a wrong result)."""
  if isinstance(c, jax.core.Tracer) or np.size(c) > 4096:
    return ("object", id(c))
  a = np.asarray(c)
  return (a.dtype.str, a.shape, a.tobytes())


def _signatures(fn: Callable[..., Any], u: jax.ShapeDtypeStruct,
                p: jax.ShapeDtypeStruct | None,
                paths: Sequence[str]) -> tuple[list[Any], Any]:
  """What ``fn`` computes for one layer at each of ``paths`` (its jaxpr,
  and its constants), so that layers whose function is the same, whatever
  their path, are mapped by one call.

  ``fn`` is traced once for all the paths (one jaxpr, an output per path),
  and each output's part of it is printed as a jaxpr of its own, which
  names its variables afresh: equal texts are equal computations. Also
  returns that jaxpr, which the caller keeps while it compares: a
  constant's identity is unique only while it lives.
  """
  if p is None:
    closed = jax.make_jaxpr(
        lambda x: [_mapped(fn, x, None, path) for path in paths])(u)
  else:
    closed = jax.make_jaxpr(
        lambda x, y: [_mapped(fn, x, y, path) for path in paths])(u, p)
  jaxpr = closed.jaxpr
  consts = dict(zip(jaxpr.constvars, closed.consts))
  producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
  # The whole trace's, without its outputs' names (a part has one output).
  info: Any = getattr(jaxpr, "debug_info", None)
  if hasattr(info, "_replace"):
    # One unnamed result: every part prints alike (jax 0.4 checks that a
    # jaxpr's result paths are as many as its outputs).
    info = info._replace(result_paths=("",))
  keys = []
  for out in jaxpr.outvars:
    needed: set[int] = set()
    stack = [out]
    while stack:
      v = stack.pop()
      i = None if isinstance(v, jax_core.Literal) else producer.get(v)
      if i is None or i in needed:
        continue
      needed.add(i)
      stack.extend(jaxpr.eqns[i].invars)
    eqns = [jaxpr.eqns[i] for i in sorted(needed)]
    used = {v for e in eqns for v in e.invars
            if not isinstance(v, jax_core.Literal)}
    if not isinstance(out, jax_core.Literal):
      used.add(out)
    constvars = [v for v in jaxpr.constvars if v in used]
    text = str(jax_core.Jaxpr(constvars, jaxpr.invars, [out], eqns,
                              debug_info=info))
    keys.append((text, tuple(_const_key(consts[v]) for v in constvars)))
  return keys, closed


def _map_layers(fn: Callable[..., Any], u: jax.Array, p: jax.Array | None,
                axis: int, paths: Sequence[str],
                selected: Sequence[bool]) -> jax.Array:
  """``fn`` applied to each selected layer of a stacked update ``u`` (its
  layer axis ``axis``), with that layer's path, as the unrolled model's
  leaves would be: one ``jax.vmap`` over the layer axis per distinct
  function (layers whose ``fn`` computes the same thing, whatever their
  path, share one), then a select on the layer axis where the layers
  differ (or are not selected). The stacked array is never split."""
  dtype = jnp.result_type(u)
  shape = jnp.shape(u)
  layer_shape = shape[:axis] + shape[axis + 1:]
  u_spec = jax.ShapeDtypeStruct(layer_shape, dtype)
  p_spec = (None if p is None else
            jax.ShapeDtypeStruct(layer_shape, jnp.result_type(p)))
  groups: dict[Any, list[int]] = {}
  chosen = [i for i, s in enumerate(selected) if s]
  if len(chosen) == 1:
    groups[0] = chosen
  else:
    keys, traced = _signatures(fn, u_spec, p_spec,
                               [paths[i] for i in chosen])
    for i, key in zip(chosen, keys):
      groups.setdefault(key, []).append(i)
    del traced  # held until the keys are compared
  out = u
  for layers in groups.values():
    path = paths[layers[0]]
    if p is None:
      new = jax.vmap(lambda x, path=path: _mapped(fn, x, None, path),
                     in_axes=axis, out_axes=axis)(u)
    else:
      new = jax.vmap(lambda x, y, path=path: _mapped(fn, x, y, path),
                     in_axes=axis, out_axes=axis)(u, p)
    if len(layers) == len(paths):
      return new
    mask = np.zeros(len(paths), bool)
    mask[layers] = True
    out = jnp.where(_core.along(jnp.asarray(mask), axis, len(shape)), new, out)
  return out


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
    stacks: Stacks = None,
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
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis). ``where`` then selects layers
      (``"layers/[0-3]/**"``), and ``fn`` is given one layer's update and
      param (the slices, without the layer axis) and its layer path
      (``"layers/3/attn/kernel"``), as on the unrolled model. It is mapped
      over the layer axis with ``jax.vmap``: one call for the layers on
      which ``fn`` computes the same thing, whatever their path, and a
      select along the layer axis between the calls where it differs (an
      ``fn`` that branches on the path) or where ``where`` leaves a layer
      out. (To tell them apart, ``fn`` is traced for each layer, in one
      trace per stacked parameter, when the update is traced.)

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

    On a stacked (scanned) model, ``fn`` sees one layer's slice and path:

    >>> stacked = {"layers": {"w": jnp.ones((3, 2))}}
    >>> tx = lw.map_updates(lambda u, p, path: u / jnp.sum(u), "layers/[1-2]/**",
    ...                     stacks={"layers": 0})
    >>> tx.update(stacked, tx.init(stacked))[0]["layers"]["w"]
    Array([[1. , 1. ],
           [0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
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
    plan = step.plan
    out = []
    for j, u in enumerate(step.updates):
      layers = plan.span(j)
      selected = [plan.values[k] is not None for k in layers]
      if u is not None and any(selected):  # None: no gradient
        p = None if step.params is None else step.params[j]
        axis = plan.axis(j)
        if axis is None:
          u = _mapped(fn, u, p, plan.paths[layers.start])
        else:
          u = _map_layers(fn, u, p, axis, [plan.paths[k] for k in layers],
                          selected)
      out.append(u)
    return out, state

  return _core.ruled(name, rule_set, default=False, strict=strict, init=init,
                     update=update, skips=True,
                     stacks=stacks,
                     placeholder=lambda p: MapUpdatesState(rules=p))
