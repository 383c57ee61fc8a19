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
import optax

from layerwise import _core, _norms, _validate
from layerwise._resolve import MISSING, Resolution, Rules, RuleSet
from layerwise._selectors import SelectorLike
from layerwise._types import ArrayLike, PyTree

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

  def clip(self, leaves, params, stats, limit):
    norm = _norms.norm(leaves, self.ord)
    factor = _norm_factor(norm, limit)
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
    return _scaled(leaves, factor), norm, factor, new

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
    z = limit
    norm = _norms.l2(leaves)
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
    return _scaled(leaves, factor), norm, factor, new

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


def clip_by_rules(
    rules: Rules[Clipper | None],
    *,
    default: Clipper | None = MISSING,
    strict: bool = True,
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
      state was initialised with.
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
