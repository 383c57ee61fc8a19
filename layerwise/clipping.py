"""Per-leaf and per-group gradient clipping.

``clip_by_rules`` takes a rule set whose values are *clippers*, small
objects made by the ``clip_*`` functions below, and clips the leaves each
rule matches its own way: one layer by value, another by the norm of each
leaf, a group by its joint norm, the rest adaptively. As everywhere in the
rule language, the first matching rule wins, so each leaf has one clipper
per ``clip_by_rules``; stages (a per-leaf clip, then a global one) are
several ``clip_by_rules`` in an ``optax.chain``.

A *group* is what one clipper measures and scales at once: each leaf on its
own for the per-leaf clippers (:func:`clip_value`, :func:`clip_norm`,
:func:`clip_adaptive`), all the leaves one rule matched for the group
clippers (:func:`clip_group_norm`, :func:`clip_quantile`,
:func:`clip_zscore`). Every group's norm before clipping, the scale it got,
its threshold and its statistics (AutoClip's history, ZClip's moving
averages) are arrays in the state: :func:`layerwise.norms` reads them for a
metrics logger, and they are saved with the optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _core, _norms, _validate
from layerwise._resolve import MISSING, Resolution, Rules, RuleSet
from layerwise._selectors import SelectorLike
from layerwise._types import ArrayLike, PyTree, Stacks

__all__ = [
    "ClipByRulesState",
    "clip_adaptive",
    "clip_by_rules",
    "clip_group_norm",
    "clip_norm",
    "clip_quantile",
    "clip_value",
    "clip_zscore",
    "set_threshold",
]

_F32 = _norms.F32

# ---------------------------------------------------------------- helpers


def _scaled(leaves: Sequence[jax.Array],
            factor: jax.Array) -> list[jax.Array]:
  return [x * factor.astype(x.dtype) for x in leaves]


def _ratio(after: jax.Array, before: jax.Array) -> jax.Array:
  """``after / before``, 1 where ``before`` is 0."""
  return jnp.where(before > 0, after / jnp.where(before > 0, before, 1.0),
                   1.0)


def _threshold(fn: str, name: str, value: Any) -> float:
  """A threshold: a finite number > 0."""
  return _validate.bounded(
      fn, name, value, low=0.0, low_open=True,
      zero_advice=" (a threshold of 0 would zero every update; to freeze "
      "leaves, use lw.freeze)")


def _check_ord(fn: str, ord: Any) -> float:
  if isinstance(ord, str) and ord.lower() == "inf":
    ord = math.inf
  if isinstance(ord, bool) or ord not in (1, 2, math.inf):
    raise ValueError(f"{fn}: ord must be 1, 2 or inf (math.inf or 'inf'), "
                     f"got {ord!r}.")
  return float(ord)


def _fmt(value: float) -> str:
  return "inf" if value == math.inf else repr(value)


# ---------------------------------------------------------------- clippers


class Clipper:
  """A clipping rule: what :func:`clip_by_rules` does to one group.

  Made by :func:`clip_value`, :func:`clip_norm`, :func:`clip_group_norm`,
  :func:`clip_adaptive`, :func:`clip_quantile` and :func:`clip_zscore`.
  ``per_leaf`` clippers treat each leaf as a group of its own; the others
  treat all leaves of a rule as one group.
  """
  per_leaf: ClassVar[bool] = True
  needs_params: ClassVar[bool] = False
  has_stats: ClassVar[bool] = False
  # Says "a clipper goes in lw.clip_by_rules" where a rule set of numbers
  # is given one (layerwise._validate.rate).
  is_clipper: ClassVar[bool] = True

  # What the clipper's one live hyperparameter is, for messages.
  limit_name: ClassVar[str] = "threshold"

  def check_leaf(self, path: str, spec: Any) -> None:
    """Raises if the clipper cannot handle a leaf of this shape or dtype."""

  def limit(self) -> float:
    """The clipper's live hyperparameter as given: the threshold ``c``, the
    ratio of :func:`clip_adaptive`, the quantile of :func:`clip_quantile`,
    the z-score of :func:`clip_zscore`. The state holds it (one entry per
    group of ``ClipByRulesState.thresholds``) and :func:`set_threshold`
    changes it."""
    raise NotImplementedError

  def check_limit(self, fn: str, value: Any) -> float:
    """``value`` as a new :meth:`limit`, checked as the clipper's factory
    checks it."""
    return _threshold(fn, f"the new {self.limit_name}", value)

  def stats_key(self) -> str | None:
    """The key of the group's statistics in the state (``None``: it keeps
    none). Groups whose clippers have equal keys share one set of arrays,
    stacked, so it names only what the arrays' shapes depend on (never the
    live hyperparameter, which a sweep changes). It names arrays in
    checkpoints: it is part of the state's format, never derived from
    ``repr``, and changing it breaks restoring states saved before."""
    return None

  def init(self) -> dict[str, jax.Array]:
    """The group's statistics (a history, averages), as state."""
    return {}

  def clip(self, leaves: list[jax.Array], params: list[jax.Array] | None,
           stats: dict[str, jax.Array], limit: jax.Array
           ) -> tuple[list[jax.Array], jax.Array, jax.Array,
                      dict[str, jax.Array]]:
    """Returns the clipped leaves, the norm before, the scale applied and
    the new statistics; ``limit`` is the live :meth:`limit` (float32)."""
    raise NotImplementedError

  # The group clippers (``per_leaf`` False) scale their group by one factor
  # that depends on its norm alone: with stacked layers, clip_by_rules
  # computes the norms of all groups at once (per layer, then summed by
  # group) and asks each clipper for its factor.
  def norm_ord(self) -> float:
    """The norm a group clipper measures its group by: 1, 2 or inf."""
    return 2.0

  def scale(self, norm: jax.Array, stats: dict[str, jax.Array],
            limit: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A group clipper's factor for a group whose :meth:`norm_ord` norm is
    ``norm``, and the new statistics."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _ClipValue(Clipper):
  c: float

  def limit(self):
    return self.c

  def clip(self, leaves, params, stats, limit):
    (u,) = leaves
    c = limit.astype(u.dtype)
    # Non-finite entries pass through: clipping an inf to c would hide it.
    out = jnp.where(jnp.isfinite(u), jnp.clip(u, -c, c), u)
    # The scale is the factor of the largest entry, c / max|u| capped at 1:
    # one more reduction of u (the norm of the clipped update would need it
    # written out first, which costs XLA:CPU a pass over memory).
    largest = jnp.max(jnp.abs(u.astype(_F32)), initial=0.0)
    return [out], _norms.l2([u]), _norm_factor(largest, limit), stats

  def check_leaf(self, path, spec):
    if jnp.issubdtype(spec.dtype, jnp.complexfloating):
      raise TypeError(
          f"lw.clip_by_rules: parameter {path!r} has dtype {spec.dtype}; "
          "clip_value clips each entry to [-c, c], and complex numbers have "
          "no order. Clip it by its norm (lw.clip_norm), which scales its "
          "magnitude.")

  def __repr__(self):
    return f"clip_value({_fmt(self.c)})"


def _norm_factor(norm: jax.Array, c: jax.Array) -> jax.Array:
  # c / max(norm, c): exactly 1 below the threshold, never 0/0; a NaN norm
  # gives NaN and an infinite one 0, so non-finite updates stay non-finite.
  return c / jnp.maximum(norm, c)


@dataclasses.dataclass(frozen=True)
class _ClipNorm(Clipper):
  c: float
  ord: float = 2.0

  def limit(self):
    return self.c

  def norm_ord(self):
    return self.ord

  def scale(self, norm, stats, limit):
    return _norm_factor(norm, limit), stats

  def clip(self, leaves, params, stats, limit):
    norm = _norms.norm(leaves, self.ord)
    factor, stats = self.scale(norm, stats, limit)
    return _scaled(leaves, factor), norm, factor, stats

  def __repr__(self):
    name = "clip_norm" if self.per_leaf else "clip_group_norm"
    ord_text = "" if self.ord == 2 else f", ord={_fmt(self.ord)}"
    return f"{name}({_fmt(self.c)}{ord_text})"


@dataclasses.dataclass(frozen=True, repr=False)
class _ClipGroupNorm(_ClipNorm):
  per_leaf: ClassVar[bool] = False


def _unit_axes(shape: tuple[int, ...],
               axis: int | tuple[int, ...] | None) -> tuple[int, ...] | None:
  """The axes a unit-wise norm sums over (``None``: the whole leaf), as in
  ``optax.adaptive_grad_clip``; raises for shapes it has no rule for."""
  if axis is not None:
    return (axis,) if isinstance(axis, int) else tuple(axis)
  if sum(d != 1 for d in shape) <= 1:  # scalars, vectors (squeezed)
    return None
  if len(shape) in (2, 3):  # (in, out) dense, multi-head dense
    return (0,)
  if len(shape) == 4:  # HWIO convolutions
    return (0, 1, 2)
  if len(shape) == 5:  # DHWIO convolutions
    return (0, 1, 2, 3)
  raise ValueError(f"shape {shape} has no default unit")


@dataclasses.dataclass(frozen=True)
class _ClipAdaptive(Clipper):
  clipping: float
  eps: float = 1e-3
  axis: int | tuple[int, ...] | None = None
  needs_params: ClassVar[bool] = True

  def check_leaf(self, path, spec):
    try:
      axes = _unit_axes(tuple(spec.shape), self.axis)
    except ValueError:
      raise ValueError(
          f"lw.clip_adaptive: parameter {path!r} has shape "
          f"{tuple(spec.shape)}; unit-wise norms are defined for 0 to 5 "
          "dimensions (dense, multi-head dense, conv kernels). Pass "
          "axis=... to name the axes a unit's norm sums over.") from None
    if axes is not None and any(not -len(spec.shape) <= a < len(spec.shape)
                                for a in axes):
      raise ValueError(
          f"lw.clip_adaptive: axis={self.axis} is out of range for "
          f"parameter {path!r} of shape {tuple(spec.shape)}.")

  limit_name: ClassVar[str] = "clipping ratio"

  def limit(self):
    return self.clipping

  def clip(self, leaves, params, stats, limit):
    (u,), (p,) = leaves, params
    axes = _unit_axes(tuple(u.shape), self.axis)

    def unit_norm(x):
      return jnp.sqrt(jnp.sum(jnp.square(_norms.magnitude(x)), axis=axes,
                              keepdims=True))

    g_norm, p_norm = unit_norm(u), unit_norm(p)
    max_norm = limit * jnp.maximum(p_norm, self.eps)
    # As optax.adaptive_grad_clip: the 1e-6 only guards a division that the
    # comparison already excludes.
    keep = g_norm < max_norm
    # Unit norms that both overflow float32 (entries beyond ~1e19) have no
    # known ratio, and inf / inf is NaN: such a unit is clipped to zero, as
    # an infinite norm is by every other clipper.
    overflow = jnp.isinf(g_norm) & jnp.isinf(max_norm)
    factor = jnp.where(overflow, 0.0,
                       max_norm / jnp.maximum(g_norm, 1e-6))
    out = jnp.where(keep, u, u * factor.astype(u.dtype))
    # The leaf's norms before and after, from the units' norms: no further
    # pass over the update.
    norm = jnp.sqrt(jnp.sum(jnp.square(g_norm)))
    clipped_norm = jnp.where(overflow, 0.0, jnp.where(
        g_norm >= 1e-6, max_norm, g_norm * factor))
    after = jnp.sqrt(jnp.sum(jnp.square(jnp.where(keep, g_norm,
                                                  clipped_norm))))
    return [out], norm, _ratio(after, norm), stats

  def __repr__(self):
    extra = "" if self.eps == 1e-3 else f", eps={self.eps:g}"
    extra += "" if self.axis is None else f", axis={self.axis}"
    return f"clip_adaptive({self.clipping:g}{extra})"


def _quantile(history: jax.Array, n: jax.Array, q: float) -> jax.Array:
  """``numpy.quantile(history[:n], q)`` (linear method); ``inf`` (no
  clipping) while ``n`` is 0."""
  window = history.shape[0]
  empty = n == 0
  s = jnp.sort(jnp.where(jnp.arange(window) < n, history, jnp.inf))
  n = jnp.maximum(n, 1)
  virtual = q * (n - 1).astype(_F32)
  lo = jnp.floor(virtual).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  t = virtual - lo.astype(_F32)
  a, b = s[lo], s[hi]
  diff = b - a
  # numpy's _lerp: interpolate from the nearer end.
  # With n == 0 the ends are inf and inf - inf is NaN: no threshold yet.
  return jnp.where(empty, jnp.inf,
                   jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t))


@dataclasses.dataclass(frozen=True)
class _ClipQuantile(Clipper):
  q: float
  window: int
  per_leaf: ClassVar[bool] = False
  has_stats: ClassVar[bool] = True

  def init(self):
    return {"history": jnp.zeros([self.window], _F32),
            "next": jnp.zeros([], jnp.int32),
            "filled": jnp.zeros([], jnp.int32),
            "threshold": jnp.asarray(jnp.inf, _F32)}

  limit_name: ClassVar[str] = "quantile"

  def limit(self):
    return self.q

  def check_limit(self, fn, value):
    return _validate.bounded(fn, "the new quantile", value, low=0.0,
                             high=1.0)

  def clip(self, leaves, params, stats, limit):
    norm = _norms.l2(leaves)
    factor, new = self.scale(norm, stats, limit)
    return _scaled(leaves, factor), norm, factor, new

  def scale(self, norm, stats, limit):
    finite = jnp.isfinite(norm)
    # A non-finite norm is not recorded: it would poison the threshold for
    # `window` steps. Its updates pass on unscaled (NaN) or zeroed (inf).
    history = jnp.where(finite, stats["history"].at[stats["next"]].set(norm),
                        stats["history"])
    step = finite.astype(jnp.int32)
    filled = jnp.minimum(stats["filled"] + step, self.window)
    threshold = _quantile(history, filled, limit)
    clip = norm > threshold
    factor = jnp.where(clip, threshold / jnp.where(clip, norm, 1.0), 1.0)
    new = {"history": history,
           "next": (stats["next"] + step) % self.window,
           "filled": filled,
           "threshold": threshold}
    return factor, new

  def stats_key(self):
    # Part of the state's format (tests/test_state_format.py).
    return f"clip_quantile(window={self.window})"

  def __repr__(self):
    return f"clip_quantile({self.q:g}, window={self.window})"


_ZCLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class _ClipZScore(Clipper):
  z: float
  alpha: float
  warmup: int
  per_leaf: ClassVar[bool] = False
  has_stats: ClassVar[bool] = True

  def init(self):
    return {"warmup_norms": jnp.zeros([self.warmup], _F32),
            "count": jnp.zeros([], jnp.int32),
            "mean": jnp.zeros([], _F32),
            "var": jnp.zeros([], _F32),
            "threshold": jnp.asarray(jnp.inf, _F32)}

  limit_name: ClassVar[str] = "z-score"

  def limit(self):
    return self.z

  def clip(self, leaves, params, stats, limit):
    norm = _norms.l2(leaves)
    factor, new = self.scale(norm, stats, limit)
    return _scaled(leaves, factor), norm, factor, new

  def scale(self, norm, stats, limit):
    z = limit
    finite = jnp.isfinite(norm)
    count, mean, var = stats["count"], stats["mean"], stats["var"]
    warming = count < self.warmup
    # Warm-up: collect the norm; after the last one, start the averages
    # from the mean and population variance of what was collected.
    record = warming & finite
    buf = jnp.where(record, stats["warmup_norms"].at[
        jnp.minimum(count, self.warmup - 1)].set(norm), stats["warmup_norms"])
    new_count = count + record.astype(jnp.int32)
    started = record & (new_count == self.warmup)
    mean0 = jnp.mean(buf)
    var0 = jnp.mean(jnp.square(buf - mean0))
    # Afterwards: clip a norm whose z-score exceeds z, then update the
    # averages with the clipped norm (the mean first).
    std = jnp.sqrt(var)
    zscore = (norm - mean) / (std + _ZCLIP_EPS)
    spike = ~warming & (zscore > z)
    safe_z = jnp.where(spike, zscore, 1.0)
    clipped = jnp.where(spike, mean + z**2 * std / safe_z, norm)
    factor = jnp.where(spike, clipped / jnp.where(spike, norm, 1.0), 1.0)
    new_mean = self.alpha * mean + (1 - self.alpha) * clipped
    new_var = (self.alpha * var
               + (1 - self.alpha) * jnp.square(clipped - new_mean))
    follow = ~warming & finite
    new = {"warmup_norms": buf,
           "count": new_count,
           "mean": jnp.where(started, mean0,
                             jnp.where(follow, new_mean, mean)),
           "var": jnp.where(started, var0, jnp.where(follow, new_var, var)),
           # The norm above which this step clipped (inf in the warm-up).
           "threshold": jnp.where(warming, jnp.inf,
                                  mean + z * (std + _ZCLIP_EPS))}
    return factor, new

  def stats_key(self):
    # Part of the state's format (tests/test_state_format.py).
    return f"clip_zscore(alpha={self.alpha:g}, warmup={self.warmup})"

  def __repr__(self):
    return (f"clip_zscore(z={self.z:g}, alpha={self.alpha:g}, "
            f"warmup={self.warmup})")


def clip_value(threshold: float) -> Clipper:
  """Clips each entry to ``[-threshold, threshold]``.

  ``u -> clip(u, -c, c)`` elementwise, as TensorFlow's ``clip_by_value``
  and ``optax.clip``. Non-finite entries are left as they are (clipping an
  ``inf`` to ``c`` would hide it). Each leaf is its own group: its recorded
  norm is its L2 norm before clipping, its scale the factor its largest
  entry got, ``min(1, c / max|u|)``.

  Args:
    threshold: ``c``, a finite number > 0.

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_value(1.0)})
    >>> grads = {"w": jnp.array([-3.0, 0.5, 2.0])}
    >>> tx.update(grads, tx.init(grads))[0]["w"]
    Array([-1. ,  0.5,  1. ], dtype=float32)
  """
  return _ClipValue(_threshold("lw.clip_value", "threshold", threshold))


def clip_norm(threshold: float, ord: int | float | str = 2) -> Clipper:
  """Clips each leaf by its own norm.

  ``u -> u * c / max(||u||_ord, c)``: a leaf whose norm exceeds ``c`` is
  scaled to norm ``c``, the others are unchanged. For ``ord=2`` this is
  Keras's ``clipnorm`` and ``tf.clip_by_norm``; ``ord=1`` uses the sum of
  absolute values, ``ord=inf`` the largest absolute value. Norms are
  computed in float32 whatever the update dtype.

  Args:
    threshold: ``c``, a finite number > 0.
    ord: 1, 2 (default) or ``inf`` (``math.inf`` or ``"inf"``).

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)})
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["a"], updates["b"]   # norm 5 -> 1; norm 0.5 stays
    (Array([0.6, 0.8], dtype=float32), Array([0.3, 0.4], dtype=float32))
  """
  return _ClipNorm(_threshold("lw.clip_norm", "threshold", threshold),
                   _check_ord("lw.clip_norm", ord))


def clip_group_norm(threshold: float, ord: int | float | str = 2) -> Clipper:
  """Clips all leaves of a rule jointly by their combined norm.

  ``u_i -> u_i * c / max(N, c)`` with ``N`` the ``ord`` norm of all the
  rule's leaves together (``sqrt(sum_i ||u_i||^2)`` for ``ord=2``). Over all
  parameters (``{"**": clip_group_norm(c)}``) it is
  ``optax.clip_by_global_norm(c)`` and PyTorch's ``clip_grad_norm_`` (which
  adds 1e-6 to the norm). Each rule is one group; to clip several selectors
  jointly, combine them into one rule with :func:`layerwise.any_of`.

  Args:
    threshold: ``c``, a finite number > 0.
    ord: 1, 2 (default) or ``inf``.

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})
    >>> grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["a"], updates["b"]   # joint norm 5 -> 1
    (Array([0.6, 0. ], dtype=float32), Array([0. , 0.8], dtype=float32))
    >>> lw.norms(state)
    {'clip/**/norm': Array(5., dtype=float32), 'clip/**/scale': Array(0.2, dtype=float32)}
  """
  return _ClipGroupNorm(_threshold("lw.clip_group_norm", "threshold",
                                   threshold),
                        _check_ord("lw.clip_group_norm", ord))


def clip_adaptive(clipping: float, eps: float = 1e-3, *,
                  axis: int | tuple[int, ...] | None = None) -> Clipper:
  """Unit-wise adaptive gradient clipping (AGC).

  Each unit (an output neuron: a column of a dense kernel, an output channel
  of a conv kernel; a whole vector or scalar) of the update is clipped to
  ``clipping * max(||unit of param||, eps)``:
  ``g -> g * max_norm / ||g||`` where ``||g|| > max_norm``. This is
  ``optax.adaptive_grad_clip(clipping, eps)`` on the leaves the rule covers,
  with the same units (dimensions 0 to 5; ``axis`` names others). Brock et
  al. leave the classifier head unclipped::

    lw.clip_by_rules({"head/**": None, "**": lw.clip_adaptive(0.01)})

  Each leaf is its own group: its recorded norm is its L2 norm before
  clipping, its scale ``||clipped|| / ||g||``. ``update`` needs ``params``.

  Args:
    clipping: the largest allowed ratio of a unit's update norm to its
      parameter norm, a finite number > 0.
    eps: the smallest parameter norm used (so zero-initialized parameters
      can move), a finite number >= 0.
    axis: the axes a unit's norm sums over, for shapes without a default.

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]])}   # columns: 5, 1
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 0.01]])}   # columns: 1, 0.01
    >>> tx = lw.clip_by_rules({"**": lw.clip_adaptive(0.1)})
    >>> tx.update(grads, tx.init(params), params)[0]["w"]   # 1 -> 0.1 * 5
    Array([[0.5 , 0.  ],
           [0.  , 0.01]], dtype=float32)

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
  """
  if axis is not None and not (
      isinstance(axis, int) or (isinstance(axis, tuple) and all(
          isinstance(a, int) for a in axis))):
    raise TypeError(f"lw.clip_adaptive: axis must be an int or a tuple of "
                    f"ints, got {axis!r}.")
  return _ClipAdaptive(
      _threshold("lw.clip_adaptive", "clipping", clipping),
      _validate.bounded("lw.clip_adaptive", "eps", eps), axis)


def clip_quantile(q: float, window: int) -> Clipper:
  """AutoClip: clips a group to a quantile of its recent gradient norms.

  At each step the group's L2 norm ``g_t`` joins a history of the last
  ``window`` norms (a ring buffer in the state); the threshold is the
  ``q``-quantile of that history, current norm included (linear
  interpolation, as ``numpy.quantile``), and the group is scaled to it:
  ``u -> u * thr / g_t`` where ``g_t > thr``. With ``q=1`` nothing is ever
  clipped; AutoClip's paper uses ``q`` around 0.1 over the whole history.
  A non-finite norm is not recorded, so it does not raise the threshold
  for later steps.

  Args:
    q: the quantile, in [0, 1].
    window: the number of recent norms kept, an int >= 1.

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_quantile(0.5, window=3)})
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in [1.0, 3.0, 2.0, 9.0]:   # thresholds: 1, 2, 2, 3
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    ...   print(float(u["w"][0]))
    1.0
    2.0
    2.0
    3.0

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  q = _validate.bounded("lw.clip_quantile", "q", q, low=0.0, high=1.0,
                        advice="A quantile, not a percentile: 0.9, not 90.")
  return _ClipQuantile(q, _validate.integer("lw.clip_quantile", "window",
                                            window, 1))


def clip_zscore(z: float = 2.5, alpha: float = 0.97,
                warmup: int = 25) -> Clipper:
  """ZClip: clips a group's norm when it is an outlier of its recent norms.

  For the first ``warmup`` steps the group's L2 norms are collected and not
  clipped; then the mean and (population) variance of those norms start two
  exponential moving averages. At each later step, with ``std =
  sqrt(var)``, a norm ``g`` whose z-score ``zs = (g - mean) / (std + 1e-6)``
  exceeds ``z`` is scaled down to ``mean + z**2 * std / zs`` (adaptive
  scaling: the bigger the outlier, the harder the clip); then the averages
  follow the clipped norm ``g_c``, the mean first::

    mean = alpha * mean + (1 - alpha) * g_c
    var = alpha * var + (1 - alpha) * (g_c - mean) ** 2

  A non-finite norm is not recorded and leaves the averages as they were.

  Args:
    z: the z-score threshold, > 0.
    alpha: the smoothing factor of the averages, in (0, 1).
    warmup: the number of norms collected before clipping starts, >= 1.

  Returns:
    A clipper for :func:`clip_by_rules`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_zscore(z=2.0, warmup=4)})
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in [1.0, 2.0, 1.0, 2.0, 30.0]:
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> float(u["w"][0])   # mean 1.5, std 0.5: z-score 57 -> 1.5 + 4 * 0.5 / 57
    1.53508...

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  z = _threshold("lw.clip_zscore", "z", z)
  alpha = _validate.bounded("lw.clip_zscore", "alpha", alpha, low=0.0,
                            high=1.0, low_open=True, high_open=True)
  return _ClipZScore(z, alpha, _validate.integer("lw.clip_zscore", "warmup",
                                                 warmup, 1))


# ----------------------------------------------------------- clip_by_rules


class ClipByRulesState(NamedTuple):
  """State of :func:`clip_by_rules`.

  The per-group values are float32 vectors with one entry per group, in
  the order of :meth:`group_names` (one array each rather than one scalar
  per group: hundreds of scalar buffers cost a GPU step milliseconds).

  Attributes:
    norms: each group's norm before clipping at the last update (0 before
      the first update).
    scales: the factor each group's update was scaled by (for
      :func:`clip_value`, the factor of the largest entry; for
      :func:`clip_adaptive`, ``||clipped|| / ||update||``).
    thresholds: each group's live hyperparameter (:meth:`Clipper.limit`):
      the threshold of :func:`clip_value`, :func:`clip_norm` and
      :func:`clip_group_norm`, the ratio of :func:`clip_adaptive`, the
      quantile of :func:`clip_quantile`, the z-score of :func:`clip_zscore`.
      :func:`set_threshold` changes them between steps.
    stats: the statistics of :func:`clip_quantile` and :func:`clip_zscore`
      (history, moving averages, and the threshold of the last update),
      ``{key: {name: array}}`` stacked over the groups whose clippers share
      the key (:meth:`Clipper.stats_key`), in group order.
    rules: static metadata: each leaf's path, rule, clipper and group.
  """
  norms: jax.Array
  scales: jax.Array
  thresholds: jax.Array
  stats: dict[str, dict[str, jax.Array]]
  rules: _core.Plan

  def live(self) -> dict[str, _core.Live]:
    """The thresholds, one entry per group (the state protocol)."""
    return {"threshold": _core.Live("group", self.thresholds)}

  def replace_live(self, name: str, vector: Any) -> "ClipByRulesState":
    assert name == "threshold", name
    return self._replace(thresholds=vector)

  def group_names(self) -> list[str]:
    """The groups, in the order of the vectors."""
    return list(self.rules.group_names)

  def measured(self) -> dict[str, jax.Array]:
    """Each group's norm and scale at the last update (the state
    protocol)."""
    return {"norm": self.norms, "scale": self.scales}

  def metrics(self) -> list[tuple[str, jax.Array]]:
    """``(key, value)`` pairs for :func:`layerwise.norms`."""
    names = self.rules.group_names
    return [item for g, n, s in zip(names, _core.entries(self.norms, len(names)),
                                    _core.entries(self.scales, len(names)))
            for item in ((f"clip/{g}/norm", n), (f"clip/{g}/scale", s))]


def _stack_stats(per_group: Iterable[tuple[str | None, dict[str, jax.Array]]]
                 ) -> dict[str, dict[str, jax.Array]]:
  """``{key: {field: array}}`` from each group's ``(key, stats)``, stacked
  over the groups that share a key, in group order (``None``: no stats)."""
  fields: dict[str, dict[str, list[jax.Array]]] = {}
  for key, stats in per_group:
    if key is None:
      continue
    for f, v in stats.items():
      fields.setdefault(key, {}).setdefault(f, []).append(v)
  return {k: {f: jnp.stack(v) for f, v in fs.items()}
          for k, fs in fields.items()}


def _check_clipper(fn: str, value: Any, where: str) -> Any:
  if value is not None and not isinstance(value, Clipper):
    raise TypeError(
        f"{fn}: {where} has value {value!r} ({type(value).__name__}); each "
        "value must be a clipper (lw.clip_value(0.1), lw.clip_norm(1.0), "
        "lw.clip_group_norm(1.0), lw.clip_adaptive(0.01), "
        "lw.clip_quantile(0.9, 100), lw.clip_zscore()) or None to leave the "
        "leaves unclipped.")
  return value


def _group_name(res: Resolution, rule: int, selector: Any) -> str:
  """A group's name: the glob of its rule, or how the selector prints."""
  if rule < 0:
    return "(default)"
  return selector.source if isinstance(selector.source, str) else (
      res.rule_texts[rule])


def _groups(res: Resolution, selectors: Sequence[Any]
            ) -> tuple[list[int], list[str]]:
  """Each leaf's group (-1: unclipped) and the groups' names, in leaf
  order: a leaf of its own for a per-leaf clipper, all the leaves of its
  rule for a group clipper."""
  index: dict[Any, int] = {}
  names: list[str] = []
  taken: set[str] = set()
  groups = []
  for i, (clipper, r) in enumerate(zip(res.values, res.rule_index)):
    if clipper is None:
      groups.append(-1)
      continue
    key = i if clipper.per_leaf else ("rule", r)
    if key not in index:
      name = res.paths[i] if clipper.per_leaf else _group_name(
          res, r, selectors[r] if r >= 0 else None)
      base, k = name, 2
      while name in taken:  # two selectors that print alike
        name, k = f"{base}#{k}", k + 1
      taken.add(name)
      index[key] = len(names)
      names.append(name)
    groups.append(index[key])
  return groups, names


def _stats_layout(clippers: Sequence[Clipper]
                  ) -> tuple[tuple[str | None, int], ...]:
  """Per group, the key of its statistics in the state and its row there
  (``(None, 0)``: it keeps none). Clippers with one key keep statistics of
  one shape: their groups are stacked, a row each."""
  rows: dict[str, int] = {}
  layout: list[tuple[str | None, int]] = []
  for clipper in clippers:
    key = clipper.stats_key()
    if key is None:
      layout.append((None, 0))
      continue
    rows[key] = rows.get(key, -1) + 1
    layout.append((key, rows[key]))
  return tuple(layout)


# ------------------------------------------------------- stacked layers
#
# With stacks, the plan's leaves (and so its groups) are layer leaves while
# the step's updates are the real leaves: a stacked leaf holds L layers on
# its layer axis. Every per-layer quantity is computed for the whole array
# at once (a reduction over its other axes) and every per-layer factor is
# applied as one vector broadcast along the layer axis, so the step never
# slices a stacked leaf into its layers.


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
  return tuple(d for d in range(ndim) if d != axis)


def _reduced(plan: _core.Plan, j: int, u: jax.Array, ord: float) -> jax.Array:
  """What the ``ord`` norm of real leaf ``j``'s update is made of, per layer
  (a scalar for an unstacked leaf): its sum of squares (ord 2), of
  magnitudes (1) or its largest magnitude (inf). Summed (largest taken)
  over the layer leaves of a group, it gives the group's norm through
  :func:`_finished`."""
  m = _norms.magnitude(u)
  if ord == 2:
    return _core.layer_sums(plan, j, jnp.square(m))
  if ord == 1:
    return _core.layer_sums(plan, j, jnp.abs(m))
  a = plan.axis(j)
  return jnp.max(jnp.abs(m), axis=None if a is None else _other_axes(m.ndim, a),
                 initial=0.0)


def _finished(reduced: jax.Array, ord: float) -> jax.Array:
  return jnp.sqrt(reduced) if ord == 2 else reduced


def _adaptive_layers(clipper: "_ClipAdaptive", u: jax.Array, p: jax.Array,
                     axis: int, limit: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:meth:`_ClipAdaptive.clip` of every layer of a stacked leaf at once:
  the units are those of one layer's shape (the layer axis is never summed
  over), ``limit`` the layers' ratios (one entry per layer). Returns the
  clipped leaf and each layer's norm and scale."""
  layer_shape = tuple(u.shape[:axis]) + tuple(u.shape[axis + 1:])
  unit = _unit_axes(layer_shape, clipper.axis)
  if unit is None:
    axes = _other_axes(u.ndim, axis)
  else:  # a layer's axes, as axes of the stacked leaf
    axes = tuple(sorted({d + (d >= axis) for d in
                         (x % len(layer_shape) for x in unit)}))

  def unit_norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(_norms.magnitude(x)), axis=axes,
                            keepdims=True))

  g_norm, p_norm = unit_norm(u), unit_norm(p)
  max_norm = _core.along(limit, axis, u.ndim) * jnp.maximum(p_norm,
                                                            clipper.eps)
  # As _ClipAdaptive.clip, per layer.
  keep = g_norm < max_norm
  overflow = jnp.isinf(g_norm) & jnp.isinf(max_norm)
  factor = jnp.where(overflow, 0.0, max_norm / jnp.maximum(g_norm, 1e-6))
  out = jnp.where(keep, u, u * factor.astype(u.dtype))
  rest = _other_axes(u.ndim, axis)
  norm = jnp.sqrt(jnp.sum(jnp.square(g_norm), axis=rest))
  clipped_norm = jnp.where(overflow, 0.0, jnp.where(
      g_norm >= 1e-6, max_norm, g_norm * factor))
  after = jnp.sqrt(jnp.sum(jnp.square(jnp.where(keep, g_norm, clipped_norm)),
                           axis=rest))
  return out, norm, _ratio(after, norm)


def _kind(clipper: Clipper) -> Any:
  """How a clipper changes a layer of a stacked leaf: by a factor
  (``"scale"``: the group clippers and clip_norm), entry by entry
  (``"value"``) or unit by unit (clip_adaptive, one kind per eps and axis,
  which its computation depends on)."""
  if isinstance(clipper, _ClipValue):
    return "value"
  if isinstance(clipper, _ClipAdaptive):
    return ("adaptive", clipper.eps, clipper.axis)
  return "scale"


def _update_stacked(step: _core.Step, state: "ClipByRulesState"
                    ) -> tuple[list[Any], "ClipByRulesState"]:
  """``clip_by_rules``'s update for a plan of layer leaves (some leaves
  stacked): the groups are over layer leaves, the updates real leaves.

  A per-leaf clipper clips each layer of a stacked leaf on its own (its
  norm is a vector of one entry per layer, its factor a vector along the
  layer axis). A group clipper's norm is that of its layer leaves jointly:
  each real leaf's per-layer sums are computed once, laid out as one entry
  per layer leaf and summed by group (a segment sum over the plan's static
  groups); each group's factor goes back to its layer leaves by a gather,
  and to each stacked leaf as one vector along its layer axis.
  """
  plan = step.plan
  n = len(plan.layout)
  out = list(step.updates)
  if n == 0:
    return out, state
  assert plan.groups is not None
  groups = plan.groups
  n_layer_leaves = len(plan.paths)
  owners = plan.owners()
  absent = set(step.absent)
  clippers: list[Clipper] = [plan.values[plan.members(g)[0]]
                             for g in range(n)]
  # A group with no gradient (all its leaves absent) keeps what it had.
  live = [any(owners[k] not in absent for k in plan.members(g))
          for g in range(n)]
  thresholds = _core.unboxed(state.thresholds)
  # Each layer leaf's live limit (its group's), read per real leaf.
  limits = _core.leaf_factors(
      thresholds[np.asarray([max(g, 0) for g in groups], np.int32)], plan)

  def in_group_clipper(k: int, ord: float | None = None) -> bool:
    g = groups[k]
    return g >= 0 and not clippers[g].per_leaf and (
        ord is None or clippers[g].norm_ord() == ord)

  # The group clippers' norms: per layer of each real leaf, summed by group,
  # for all groups at once (one vector per ord).
  group_norm = jnp.zeros([n], _F32)
  measured = np.zeros(n, bool)  # the group clippers' groups with gradients
  for ord in sorted({c.norm_ord() for g, c in enumerate(clippers)
                     if not c.per_leaf and live[g]}):
    summed, _ = _core.group_totals(
        plan, step.updates,
        # Called now, within this iteration: the closures' ord is this one.
        lambda k: groups[k] if in_group_clipper(k, ord) else -1,
        lambda j, u: _reduced(plan, j, u, ord),
        jax.ops.segment_max if ord == math.inf else jax.ops.segment_sum)
    assert summed is not None  # a live group of this ord has a gradient
    picked = np.asarray([live[g] and not c.per_leaf and c.norm_ord() == ord
                         for g, c in enumerate(clippers)])
    measured |= picked
    group_norm = jnp.where(picked, _finished(summed, ord), group_norm)

  # Their factors: clip_group_norm's for all its groups at once; those of
  # the clippers with statistics for all the groups of one statistics key
  # at once (their arrays are stacked by group, and their clippers differ
  # in the live limit only: Clipper.stats_key), by vmap, so that 48 layers
  # clipped by 48 rules compile one computation, not 48.
  by_norm = measured & np.asarray([isinstance(c, _ClipNorm)
                                   for c in clippers])
  group_scale = jnp.where(by_norm, _norm_factor(group_norm, thresholds), 1.0)
  each: list[Any] = []  # the others' factors, as vectors
  scale_index = np.arange(n)
  stats_out: dict[str, dict[str, jax.Array]] = {}
  rows_of: dict[str, list[int]] = {}
  for g, (key, _) in enumerate(plan.layout):
    if key is not None:
      rows_of.setdefault(key, []).append(g)
  for key, rows in rows_of.items():
    old = state.stats[key]
    if not measured[rows].any():
      stats_out[key] = old
      continue
    at = np.asarray(rows, np.int32)
    factor, new = jax.vmap(clippers[rows[0]].scale)(
        group_norm[at], old, thresholds[at])
    if not measured[rows].all():  # groups without gradients keep theirs
      keep = measured[rows]
      new = {f: jnp.where(np.reshape(keep, (-1,) + (1,) * (v.ndim - 1)),
                          v, old[f]) for f, v in new.items()}
    stats_out[key] = new
    scale_index[rows] = n + sum(len(e) for e in each) + np.arange(len(rows))
    each.append(factor)
  for g, clipper in enumerate(clippers):  # others, without statistics
    if measured[g] and not by_norm[g] and plan.layout[g][0] is None:
      factor, _ = clipper.scale(group_norm[g], {}, thresholds[g])
      scale_index[g] = n + sum(len(e) for e in each)
      each.append(jnp.reshape(factor, (1,)))
  if each:
    group_scale = jnp.concatenate([group_scale] + each)[scale_index]
  # Each group factor, back on its layer leaves (1 elsewhere).
  spread = None
  if measured.any():
    spread = _core.leaf_factors(jnp.concatenate(
        [group_scale, jnp.ones([1], _F32)])[np.asarray(
            [groups[k] if in_group_clipper(k) else n
             for k in range(n_layer_leaves)], np.int32)], plan)

  # Each real leaf: the per-leaf clippers of its layers, and the factors
  # of its group clippers.
  leaf_norms: list[Any] = []
  leaf_scales: list[Any] = []
  for j, u in enumerate(step.updates):
    span = plan.span(j)
    a = plan.axis(j)
    zeros = jnp.zeros([] if a is None else [len(span)], _F32)
    values = [plan.values[k] for k in span]
    if u is None or all(v is None for v in values):
      leaf_norms.append(zeros)
      leaf_scales.append(zeros + 1)
      continue
    p = step.params[j] if step.params is not None else None
    if a is None:
      (clipper,) = values
      if clipper.per_leaf:
        (out[j],), norm, scale, _ = clipper.clip(
            [u], None if p is None else [p], {}, limits[j])
        leaf_norms.append(norm)
        leaf_scales.append(scale)
      else:
        assert spread is not None
        out[j] = u * spread[j].astype(u.dtype)
        leaf_norms.append(zeros)
        leaf_scales.append(zeros + 1)
      continue
    limit = jnp.reshape(limits[j], (-1,))
    norm, scale = zeros, zeros + 1
    kinds: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
      if v is not None:
        kinds.setdefault(_kind(v), []).append(i)
    result = u
    for kind, layers in kinds.items():
      mask = np.zeros(len(span), bool)
      mask[layers] = True
      if kind == "scale":
        factor = (jnp.reshape(spread[j], (-1,)) if spread is not None
                  else jnp.ones([len(span)], _F32))
        own: dict[float, list[int]] = {}  # the clip_norm layers, by ord
        for i in layers:
          if values[i].per_leaf:
            own.setdefault(values[i].norm_ord(), []).append(i)
        for ord, where in own.items():
          picked = np.zeros(len(span), bool)
          picked[where] = True
          own_norm = _finished(_reduced(plan, j, u, ord), ord)
          own_factor = _norm_factor(own_norm, limit)
          factor = jnp.where(picked, own_factor, factor)
          norm = jnp.where(picked, own_norm, norm)
          scale = jnp.where(picked, own_factor, scale)
        clipped = u * _core.along(factor, a, u.ndim).astype(u.dtype)
      elif kind == "value":
        c = _core.along(jnp.where(mask, limit, jnp.inf), a,
                        u.ndim).astype(u.dtype)
        clipped = jnp.where(jnp.isfinite(u), jnp.clip(u, -c, c), u)
        m = _norms.magnitude(u)
        largest = jnp.max(jnp.abs(m), axis=_other_axes(u.ndim, a),
                          initial=0.0)
        norm = jnp.where(mask, jnp.sqrt(_core.layer_sums(plan, j,
                                                         jnp.square(m))), norm)
        scale = jnp.where(mask, _norm_factor(largest, limit), scale)
      else:
        assert p is not None  # needs_params says so
        clipped, own_norm, own_scale = _adaptive_layers(
            values[layers[0]], u, p, a, limit)
        norm = jnp.where(mask, own_norm, norm)
        scale = jnp.where(mask, own_scale, scale)
      result = clipped if mask.all() else jnp.where(
          _core.along(mask, a, u.ndim), clipped, result)
    out[j] = result
    leaf_norms.append(norm)
    leaf_scales.append(scale)

  # The state's vectors, one entry per group: a per-leaf group's from its
  # layer leaf's entry, a group clipper's from its group's, a group without
  # gradients its old one.
  index = np.asarray(
      [(plan.members(g)[0] if clippers[g].per_leaf else n_layer_leaves + g)
       if live[g] else n_layer_leaves + n + g for g in range(n)], np.int32)

  def gathered(per_layer_leaf: list[Any], per_group: jax.Array,
               old: Any) -> jax.Array:
    return jnp.concatenate([
        _core.per_layer_leaf(per_layer_leaf).astype(_F32),
        per_group, _core.unboxed(old)])[index]

  return out, state._replace(
      norms=gathered(leaf_norms, group_norm, state.norms),
      scales=gathered(leaf_scales, group_scale, state.scales),
      stats=stats_out)


def clip_by_rules(
    rules: Rules[Clipper | None],
    *,
    default: Clipper | None = MISSING,
    strict: bool = True,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips each parameter group its own way.

  ``rules`` maps selectors to clippers (:func:`clip_value`,
  :func:`clip_norm`, :func:`clip_group_norm`, :func:`clip_adaptive`,
  :func:`clip_quantile`, :func:`clip_zscore`) or to ``None`` (leave the
  leaves as they are). The first matching rule wins, so each leaf gets one
  clipper; a group clipper clips all leaves *its rule* matched jointly.
  To clip a leaf twice (each layer by its own norm, then everything by the
  global norm), chain two of them: stages run in chain order, each with
  its own rules, and :func:`layerwise.describe` shows them as the columns
  ``clip`` and ``clip2``::

    optax.chain(lw.clip_by_rules({"**": lw.clip_norm(1.0)}),
                lw.clip_by_rules({"**": lw.clip_group_norm(5.0)}),
                optax.adamw(1e-3))

  Each group's norm before clipping and the scale it applied are kept in
  the state for logging (:func:`layerwise.norms`). Norms are computed in
  float32; the updates keep their dtype. Finite updates never become NaN
  (zero norms and zero parameters included). A NaN or ``inf`` in an update
  is never clipped into a finite value that would hide it: it stays
  non-finite (the group clippers that keep statistics also leave it out of
  them). Wrap the optimizer in ``optax.apply_if_finite`` to skip such
  steps, or chain ``optax.zero_nans()`` before this to drop NaNs.

  Args:
    rules: ``{selector: clipper or None}``; see :func:`layerwise.resolve`.
    default: the clipper (or ``None``) of leaves no rule matches. Without
      it, unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter is a
      leaf of its own (``"layers/3/attn/kernel"``), so a per-leaf clipper
      clips each layer's slice on its own (the units of
      :func:`clip_adaptive` are a layer's, never across layers) and a group
      clipper over ``"layers/3/**"`` clips that layer's slices by their
      joint norm, as on the unrolled model. The norms, thresholds and
      statistics stay one entry per group (per layer for a per-leaf
      clipper).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``params`` when a rule uses :func:`clip_adaptive`.

  Raises:
    TypeError: for a rule value that is not a clipper or ``None``;
      :class:`layerwise.RuleError` at ``init`` for rules that do not fit
      the params; ``TypeError`` for an integer leaf with a clipper.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"embed": jnp.zeros(3), "layer": {"w": jnp.zeros(2)},
    ...           "head": {"w": jnp.zeros(2)}}
    >>> tx = lw.clip_by_rules({"embed": lw.clip_value(0.1),
    ...                        "head/**": None,
    ...                        "**": lw.clip_group_norm(1.0)})
    >>> grads = {"embed": jnp.array([1.0, -0.05, 0.2]),
    ...          "layer": {"w": jnp.array([3.0, 4.0])},
    ...          "head": {"w": jnp.array([3.0, 4.0])}}
    >>> updates, state = tx.update(grads, tx.init(params))
    >>> updates["embed"], updates["layer"]["w"], updates["head"]["w"]
    (Array([ 0.1 , -0.05,  0.1 ], dtype=float32), Array([0.6, 0.8], dtype=float32), Array([3., 4.], dtype=float32))
    >>> print(lw.describe(tx, params))
    path     shape  dtype    size  clip                  state_bytes
    -------  -----  -------  ----  --------------------  -----------
    embed    (3,)   float32     3  clip_value(0.1)                 0
    head/w   (2,)   float32     2  -                               0
    layer/w  (2,)   float32     2  clip_group_norm(1.0)            0
    <BLANKLINE>
    clip                  leaves  params   share  state bytes
    clip_value(0.1)            1       3   42.9%            0
    -                          1       2   28.6%            0
    clip_group_norm(1.0)       1       2   28.6%            0
    total                      3       7  100.0%           24
    (total state bytes include 24 not held by one parameter, such as step counts)

    (Norms, scales and thresholds are one float32 vector each, over
    the groups, so their bytes belong to no single parameter.)

    ``-`` marks leaves left unclipped. The norms and scales of the last
    update, for a logger:

    >>> {k: float(v) for k, v in lw.norms(state).items()}
    {'clip/embed/norm': 1.021..., 'clip/embed/scale': 0.1..., 'clip/**/norm': 5.0, 'clip/**/scale': 0.2...}

    A scanned model's layers stacked on axis 0: each layer is clipped by
    its own norm, as the unrolled model's ``layers/0/w`` and ``layers/1/w``:

    >>> stacked = {"layers": {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}}
    >>> tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)}, stacks={"layers": 0})
    >>> updates, state = tx.update(stacked, tx.init(stacked))
    >>> updates["layers"]["w"]
    Array([[0.6, 0.8],
           [0.3, 0.4]], dtype=float32)
    >>> {k: round(float(v), 3) for k, v in lw.norms(state).items()}
    {'clip/layers/0/w/norm': 5.0, 'clip/layers/0/w/scale': 0.2, 'clip/layers/1/w/norm': 0.5, 'clip/layers/1/w/scale': 1.0}
  """
  fn = "lw.clip_by_rules"
  given = RuleSet(rules, what="clipper").map_values(
      lambda v, text: _check_clipper(fn, v, f"rule {text}"))
  if default is not MISSING:
    _check_clipper(fn, default, "default")

  def init(res: Resolution, params: list[Any]) -> ClipByRulesState:
    del params
    _validate.check_dtypes(
        fn, res.paths, res.specs, res.values,
        [res.rule_text(i) for i in range(len(res.paths))], what="rule",
        neutral=None, verb="be clipped or measured")
    for path, spec, clipper in zip(res.paths, res.specs, res.values):
      if clipper is not None:
        clipper.check_leaf(path, spec)
    groups, names = _groups(res, given.selectors)
    clippers = [res.values[groups.index(g)] for g in range(len(names))]
    plan = _core.Plan.of("clip", res, groups=groups, group_names=names,
                         layout=_stats_layout(clippers))
    n = len(names)
    return ClipByRulesState(
        norms=jnp.zeros([n], _F32),
        scales=jnp.ones([n], _F32),
        thresholds=jnp.asarray([c.limit() for c in clippers], _F32),
        stats=_stack_stats((key, clipper.init()) for (key, _), clipper
                           in zip(plan.layout, clippers)),
        rules=plan)

  def needs_params(plan: _core.Plan) -> str | None:
    for g, name in enumerate(plan.group_names):
      clipper = plan.values[plan.members(g)[0]]
      if clipper.needs_params:
        return f"{clipper!r} (group {name!r})"
    return None

  def update(step: _core.Step, state: ClipByRulesState
             ) -> tuple[list[Any], ClipByRulesState]:
    plan = step.plan
    if plan.layers is not None:
      return _update_stacked(step, state)
    out = list(step.updates)
    norms, scales, new_stats = [], [], []
    limits = _core.factors(state.thresholds, len(plan.layout))
    absent = set(step.absent)
    for g, (key, row) in enumerate(plan.layout):
      clipper = plan.values[plan.members(g)[0]]
      # Leaves without gradients (None, as lw.grad gives frozen leaves) are
      # left out of their group; a group with none skips its clipping: its
      # norm, scale and statistics stay as they were.
      members = [i for i in plan.members(g) if i not in absent]
      if not members:
        norms.append(_core.unboxed(state.norms)[g])
        scales.append(_core.unboxed(state.scales)[g])
        new_stats.append((key, {} if key is None else
                          {f: v[row] for f, v in state.stats[key].items()}))
        continue
      group_params = None
      if clipper.needs_params:
        assert step.params is not None  # needs_params says so
        group_params = [step.params[i] for i in members]
      group_stats = ({} if key is None else
                     {f: v[row] for f, v in state.stats[key].items()})
      clipped, norm, scale, group_stats = clipper.clip(
          [step.updates[i] for i in members], group_params, group_stats,
          limits[g])
      norms.append(norm)
      scales.append(scale)
      new_stats.append((key, group_stats))
      for i, u in zip(members, clipped):
        out[i] = u
    n = len(plan.layout)
    return out, state._replace(norms=_core.stack(norms, n),
                               scales=_core.stack(scales, n),
                               stats=_stack_stats(new_stats))

  return _core.ruled(fn, given, default=default, strict=strict, init=init,
                     update=update, needs_params=needs_params, skips=True,
                     stacks=stacks,
                     placeholder=lambda p: ClipByRulesState(
                         norms=_core.NOT_PARAMS, scales=_core.NOT_PARAMS,
                         thresholds=_core.NOT_PARAMS, stats=_core.NOT_PARAMS,
                         rules=p))


def set_threshold(opt_state: PyTree, selector: SelectorLike,
                  value: ArrayLike) -> PyTree:
  """Returns ``opt_state`` with a new threshold for the clip groups ``selector`` picks.

  The sibling of :func:`layerwise.set_scale` for :func:`clip_by_rules`: each
  group with a leaf that ``selector`` matches, in every ``clip_by_rules``
  state inside ``opt_state``, gets ``value`` as its live hyperparameter (a
  group clipper's group is all the leaves of its rule, so one matching leaf
  sets the whole group). That is the threshold ``c`` of :func:`clip_value`,
  :func:`clip_norm` and :func:`clip_group_norm`, the ratio of
  :func:`clip_adaptive`, the quantile of :func:`clip_quantile` and the
  z-score of :func:`clip_zscore`, checked as their factories check it. The
  new state has the same structure, shapes and dtypes, so a jitted step
  takes it without recompiling.

  Args:
    opt_state: an optimizer state.
    selector: any selector, matched against the paths of the params the
      state was initialised with (with stacked layers, their layer paths:
      ``"layers/[0-3]/**"`` sets layers 0 to 3 of the stack).
    value: the new value (a number, or a real scalar array).

  Returns:
    The new state.

  Raises:
    ValueError: if the state holds no ``clip_by_rules`` state, the selector
      matches no clipped parameter, or ``value`` is out of a picked
      clipper's range.
    TypeError: for a value that is not a number or a real scalar array.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)})
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> state = lw.set_threshold(tx.init(grads), "w", 2.5)
    >>> tx.update(grads, state)[0]["w"]   # norm 5 -> 2.5
    Array([1.5, 2. ], dtype=float32)

    With stacked layers, each layer's groups are set on their own:

    >>> stacked = {"layers": {"w": jnp.array([[3.0, 4.0], [3.0, 4.0]])}}
    >>> tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)}, stacks={"layers": 0})
    >>> state = lw.set_threshold(tx.init(stacked), "layers/1/**", 2.5)
    >>> tx.update(stacked, state)[0]["layers"]["w"]
    Array([[0.6, 0.8],
           [1.5, 2. ]], dtype=float32)
  """
  fn = "lw.set_threshold"
  value = _validate.live_value(fn, value)
  if not isinstance(value, jax.core.Tracer):
    concrete = value
    for node in _core.find_states(opt_state):
      if not isinstance(node, ClipByRulesState):
        continue
      plan = node.rules
      for i in plan.select(selector):
        if plan.groups is not None and plan.groups[i] >= 0:
          plan.values[i].check_limit(fn, concrete)
  return _core.set_live(fn, opt_state, "threshold", selector, value,
                        what="thresholds", transformation="lw.clip_by_rules")
