"""Optimizer states from checkpoints: restored arrays back into a state, by path.

A checkpoint holds a state's arrays, named by their paths (``0/norms``,
``1/0/mu/encoder/kernel``); the static rules are not saved. Restored against
a target (``jax.eval_shape(tx.init, params)``), orbax gives the state back
whole. Restored without one, it gives plain lists and dicts, which no
layerwise function can use; and a checkpoint saved by an older layerwise may
lack arrays that the state now holds. :func:`restore_state` puts restored
arrays into a state of the transformation, path by path, and says what does
not fit.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from layerwise import _core, _diagnostics, _paths
from layerwise._types import PyTree

__all__ = ["restore_state"]

# States saved by layerwise 0.1.0.dev0 named the statistics of clip_quantile
# and clip_zscore with their quantile and z-score, which now live in the
# state (ClipByRulesState.thresholds); today's keys name only what the
# arrays' shapes depend on.
_OLD_STATS_KEYS = ((re.compile(r"/clip_quantile\([^,/]+, (window=)"),
                    r"/clip_quantile(\1"),
                   (re.compile(r"/clip_zscore\(z=[^,/]+, (alpha=)"),
                    r"/clip_zscore(\1"))


def _today(path: str) -> str:
  for pattern, replacement in _OLD_STATS_KEYS:
    path = pattern.sub(replacement, path)
  return path


def restore_state(target: PyTree, restored: PyTree) -> PyTree:
  """Returns ``target`` with the arrays of ``restored``, matched by path.

  ``restored`` is what a checkpoint gave back: a whole state, or the plain
  lists and dicts that orbax returns without a restore target, possibly
  saved by an older layerwise. Each array of ``target`` takes the array of
  ``restored`` at the same path (:func:`layerwise.paths`). The hyperparameters
  layerwise keeps in the state (multipliers, weight decays, clip
  thresholds) that ``restored`` lacks, as a checkpoint saved by layerwise
  0.1.0.dev0 lacks the weight decays and thresholds, keep ``target``'s
  values, which are the rules'. Anything else that does not fit is an error
  that names it: an array of ``target`` that ``restored`` lacks, one that
  ``target`` has no place for, or one of another shape or dtype.

  Args:
    target: a state of the transformation the checkpoint was saved with,
      for the same params: ``tx.init(params)`` (to fill hyperparameters a
      checkpoint lacks), or ``jax.eval_shape(tx.init, params)``.
    restored: the restored arrays, in any pytree.

  Returns:
    A state with ``target``'s structure (its NamedTuples and static rules)
    and ``restored``'s arrays, which a jitted step, :func:`layerwise.norms`
    and :func:`layerwise.describe` take.

  Raises:
    ValueError: for arrays that are missing, have no place in ``target``,
      or differ in shape or dtype; for a hyperparameter that ``restored``
      lacks when ``target`` holds no values for it (an abstract target).

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> tx = lw.scale_by_rules({"w": 0.5, "b": 1.0})
    >>> raw = {"count": jnp.int32(3), "multipliers": jnp.array([0.5, 0.25])}
    >>> state = lw.restore_state(tx.init(params), raw)   # as orbax gives it
    >>> state.count, dict(zip(state.rules.paths, state.multipliers.tolist()))
    (Array(3, dtype=int32), {'b': 0.5, 'w': 0.25})
    >>> state = lw.restore_state(tx.init(params), {"count": jnp.int32(3)})
    >>> state.multipliers   # not saved: the rules' values
    Array([1. , 0.5], dtype=float32)
    >>> lw.restore_state(tx.init(params), {**raw, "mu": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    ValueError: lw.restore_state: the restored arrays do not fit the target: not in the target: 'mu'. ...
  """
  fn = "lw.restore_state"
  target_paths, target_leaves, treedef = _paths.flatten_with_paths(target)
  saved_paths, saved_leaves, _ = _paths.flatten_with_paths(restored)
  saved = {_today(p): x for p, x in zip(saved_paths, saved_leaves)}
  live = {id(_core.unboxed(v.vector)) for state in _core.find_states(target)
          for v in _core.live_of(state).values()}
  missing, abstract, wrong = [], [], []
  out = []
  for path, leaf in zip(target_paths, target_leaves):
    if path not in saved:
      if id(leaf) not in live:
        missing.append(path)
      elif isinstance(leaf, jax.ShapeDtypeStruct):
        abstract.append(path)
      out.append(leaf)
      continue
    value = saved[path]
    shape, dtype = np.shape(value), getattr(value, "dtype", None)
    if (tuple(shape) != tuple(leaf.shape)
        or (dtype is not None and np.dtype(dtype) != np.dtype(leaf.dtype))):
      wrong.append(f"{path!r}: {tuple(shape)} {dtype} restored, "
                   f"{tuple(leaf.shape)} {leaf.dtype} in the target")
    out.append(value)
  extra = sorted(set(saved) - set(target_paths))
  details = [f"missing: {_diagnostics.few(missing)}"] * bool(missing) + [
      f"not in the target: {_diagnostics.few(extra)}"] * bool(extra) + [
          f"of another shape or dtype: {_diagnostics.few(wrong, quote=False)}"
      ] * bool(wrong)
  if details:
    raise ValueError(
        f"{fn}: the restored arrays do not fit the target: "
        + "; ".join(details) + ". Build the target with the transformation "
        "(the same rule sets) and the params the checkpoint was saved with.")
  if abstract:
    raise ValueError(
        f"{fn}: the restored arrays lack the hyperparameters "
        f"{_diagnostics.few(abstract)} (a checkpoint of an older layerwise), "
        "and the target is abstract, so it has no values for them: pass "
        "tx.init(params) as the target.")
  return treedef.unflatten(out)
