"""Reuse pretrained weights by name: copy chosen leaves from one tree to another.

Transfer learning starts from a new model whose lower layers should hold a
pretrained network's weights while its head stays freshly initialised.
``transplant`` does that copy with the rule language: a selector (or a rule
set of bools) chooses the target leaves to fill, the source leaf of the same
path (or of a renamed path) provides each value, and every shape and dtype is
checked before anything is copied. Its report says what was copied, what was
left new and which source leaves went unused, so a silent mismatch (a
renamed layer, a head of another size) cannot pass unnoticed.

Stacked (scanned) layers are leaves of their own (``layers/3/attn/kernel``,
see :func:`layerwise.paths`): ``stacks=`` and ``source_stacks=`` say which
subtrees of the target and of the source are stacked, so an unrolled
checkpoint goes into a stacked model (and back), and chosen layers of one
stack into another, with the same checks and report.

It is the JAX counterpart of loading part of a PyTorch ``state_dict``
(``load_state_dict(strict=False)`` with a filtered dict), with the checks
done by name before the first step rather than discovered in training.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerwise import _diagnostics, _paths
from layerwise._resolve import (Flags, flag_rules, layer_paths_and_specs,
                                paths_and_specs)
from layerwise._types import PyTree, Stacks

__all__ = ["TransplantReport", "transplant"]


@dataclasses.dataclass(frozen=True)
class TransplantReport:
  """What :func:`transplant` did, leaf by leaf (paths in flattening order).

  ``str(report)`` is a table with one row per module (a leaf's path without
  its last segment) and a summary line. With stacks, each layer of a
  stacked leaf is a leaf of the report, under its layer path
  (``layers/3/attn/kernel``, module ``layers/3/attn``).

  Attributes:
    sizes: for each kind (``"copied"``, ``"new"``, ``"skipped"``), the
      number of values of each of its paths: target paths for ``copied``
      and ``new``, source paths for ``skipped``.
    copied: target paths whose value now comes from ``source``.
    new: target paths left as they were (not selected, or, with
      ``strict=False``, selected but absent from ``source``).
    skipped: source paths that were copied nowhere.
  """
  sizes: dict[str, dict[str, int]]

  @property
  def copied(self) -> tuple[str, ...]:
    return tuple(self.sizes["copied"])

  @property
  def new(self) -> tuple[str, ...]:
    return tuple(self.sizes["new"])

  @property
  def skipped(self) -> tuple[str, ...]:
    return tuple(self.sizes["skipped"])

  def count(self, kind: str) -> int:
    """The number of values (not leaves) that are ``kind`` (``"copied"``,
    ``"new"`` or ``"skipped"``)."""
    return sum(self.sizes[kind].values())

  def __str__(self) -> str:
    rows: dict[tuple[str, str], list[int]] = {}
    for kind in ("copied", "new", "skipped"):
      for path, size in self.sizes[kind].items():
        module = path.rsplit("/", 1)[0] if "/" in path else "(top)"
        row = rows.setdefault((module, kind), [0, 0])
        row[0] += 1
        row[1] += size
    header = ("module", "status", "leaves", "values")
    body = [(m, k, str(n), f"{v:,}") for (m, k), (n, v) in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = [fmt(header)] + [fmt(r) for r in body]
    lines.append(
        f"copied {len(self.copied)} leaves ({self.count('copied'):,} values), "
        f"left {len(self.new)} new ({self.count('new'):,}), skipped "
        f"{len(self.skipped)} of the source ({self.count('skipped'):,})")
    return "\n".join(lines)


def _size(spec: jax.ShapeDtypeStruct) -> int:
  return int(np.prod(spec.shape, dtype=np.int64))


def _copy(value: Any, like: Any, dtype: Any) -> Any:
  """A fresh array holding ``value`` with ``dtype``, placed like ``like``."""
  out = jnp.array(value, dtype=dtype, copy=True)
  return _placed(out, like)


def _placed(out: jax.Array, like: Any) -> jax.Array:
  """``out`` with ``like``'s sharding when ``like`` is a ``jax.Array``."""
  if isinstance(like, jax.Array):
    out = jax.device_put(out, like.sharding)
  return out


def _layer(x: Any, axis: int, index: int) -> Any:
  """Layer ``index`` of the stacked array ``x`` (numpy stays numpy)."""
  return x[(slice(None),) * axis + (index,)]


class _View:
  """A tree's leaves as the rule language sees them: one per layer of a
  stacked leaf (:func:`layerwise.paths`), each read from the real leaves."""

  def __init__(self, tree: Any, paths: list[str], specs: list[Any],
               treedef: Any, layers: _paths.Layers | None):
    self.paths, self.specs, self.treedef = paths, specs, treedef
    self.leaves = treedef.flatten_up_to(tree)
    self.layers = layers
    self.owner = (list(range(len(paths))) if layers is None
                  else list(layers.owners()))

  @classmethod
  def of_source(cls, fn: str, tree: Any, stacks: tuple[Any, ...]) -> "_View":
    try:
      paths, specs, treedef, layers = layer_paths_and_specs(fn, tree, stacks)
    except ValueError as e:
      # The layer view's errors speak of "the params"; say which tree.
      raise ValueError(str(e).replace(
          f"{fn}: ", f"{fn}: in the source (source_stacks=): ", 1)) from None
    return cls(tree, paths, specs, treedef, layers)

  def axis(self, j: int) -> int | None:
    return None if self.layers is None else self.layers.axes[j]

  def span(self, j: int) -> range:
    return range(j, j + 1) if self.layers is None else self.layers.span(j)

  def block(self, ks: list[int], axis: int) -> Any:
    """Layer leaves ``ks`` as one slice of one stacked leaf on ``axis``, if
    they are consecutive layers of one (else ``None``)."""
    j = self.owner[ks[0]] if ks[0] >= 0 else -1
    if j < 0 or self.axis(j) != axis:
      return None
    first = ks[0] - self.span(j).start
    if ks != list(range(ks[0], ks[0] + len(ks))) or ks[-1] >= self.span(j).stop:
      return None
    x = self.leaves[j]
    if first == 0 and len(ks) == np.shape(x)[axis]:
      return x
    return x[(slice(None),) * axis + (slice(first, first + len(ks)),)]

  def value(self, k: int) -> Any:
    """The value of layer leaf ``k``: a real leaf, or one layer of one."""
    j = self.owner[k]
    axis = self.axis(j)
    if axis is None:
      return self.leaves[j]
    return _layer(self.leaves[j], axis, k - self.span(j).start)


def transplant(
    target: PyTree,
    source: PyTree,
    rules: Flags,
    *,
    rename: Callable[[str], str] | None = None,
    cast: bool = False,
    strict: bool = True,
    stacks: Stacks = None,
    source_stacks: Stacks = None,
) -> tuple[PyTree, TransplantReport]:
  r"""Copies the leaves of ``source`` into ``target`` where ``rules`` selects.

  Every target leaf that ``rules`` selects takes the value of the source leaf
  with the same path (or with ``rename(path)``); all others keep their
  value. All problems are reported at once, before anything is copied: a
  selector that matches no target leaf, a selected leaf that ``source``
  lacks (with the closest source paths), and a shape or dtype that differs.

  Stacked (scanned) layers are leaves of their own on both sides: with
  ``stacks`` (the target's) and ``source_stacks`` (the source's), layer 3
  of a stacked leaf is ``layers/3/attn/kernel``, of the shape without the
  layer axis, and it is selected, renamed, checked, copied and reported
  like any leaf. So one call copies an unrolled checkpoint (``layers_0``
  ... ``layers_11``, renamed to ``layers/0`` ...) into a stacked model and
  back, or chosen layers of one stack into another (``"layers/[0-5]/**"``
  of a 12-layer stack into a 6-layer one). A stacked target leaf of which
  only some layers are copied keeps its other layers.

  The copied values are fresh arrays (never buffers of ``source``, so the
  result may be donated to a jitted step) placed with the target leaf's
  sharding when the target leaf is a ``jax.Array``.

  Args:
    target: the new model's parameters (any pytree: a linen params dict, an
      ``nnx.State``, ...); its structure is kept. Its leaves may be abstract
      (``jax.ShapeDtypeStruct``) only where they are copied (for a stacked
      leaf, all its layers).
    source: the pretrained parameters (any pytree with array leaves, numpy
      arrays included, e.g. a restored checkpoint).
    rules: the target leaves to copy: a selector (a glob, a regex, a callable
      or a ``lw.Selector``), or a rule set ``{selector: bool}`` in which the
      first matching rule decides (``True``: copy) and which must cover every
      target leaf (end it with ``"**": False``).
    rename: maps a target path to the source path it is copied from (e.g.
      ``lambda p: p.replace("backbone/", "", 1)`` when the pretrained model
      is the new model's ``backbone``; ``lambda p: re.sub(r"^layers/(\d+)",
      r"layers_\1", p)`` from a stacked target to an unrolled linen
      source); the identity by default. It maps layer paths where there
      are stacks.
    cast: convert source values to the target dtype instead of raising on a
      dtype difference (e.g. float32 weights into a bfloat16 model).
    strict: with ``False``, selectors that match nothing are allowed, and a
      selected leaf that ``source`` lacks is left new (and listed in the
      report's ``new``) instead of being an error. Shapes and dtypes are
      always checked.
    stacks: the target's stacked subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis).
    source_stacks: the source's stacked subtrees, in the same form. By
      default, those its Flax metadata marks; if it has none (a restored
      checkpoint), the target's stacks wherever the source holds the same
      stacked leaves, with as many dimensions (a checkpoint of the same
      stacked model, of any number of layers). Give them where the source
      is stacked otherwise (another axis; an unrolled target).

  Returns:
    ``(new_target, report)``: a tree with ``target``'s structure, and a
    :class:`TransplantReport` of what was copied, left new and skipped
    (layer paths for stacked leaves).

  Raises:
    layerwise.RuleError: a selector matches no target leaf, or a rule set
      leaves a target leaf unmatched.
    ValueError: a selected leaf is missing from ``source``, or its shape (or,
      without ``cast``, its dtype) differs; an abstract stacked target leaf
      of which only some layers are copied; stacks that do not fit their
      tree (as in :func:`layerwise.paths`).
    TypeError: ``rules`` holds values that are not bools.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> pretrained = {"conv": {"kernel": jnp.ones((3, 3))},
    ...               "head": {"kernel": jnp.ones((3, 5))}}
    >>> fresh = {"conv": {"kernel": jnp.zeros((3, 3))},
    ...          "head": {"kernel": jnp.zeros((3, 2))}}
    >>> params, report = lw.transplant(fresh, pretrained, "conv/**")
    >>> params["conv"]["kernel"][0]
    Array([1., 1., 1.], dtype=float32)
    >>> params["head"]["kernel"][0]
    Array([0., 0.], dtype=float32)
    >>> print(report)
    module  status   leaves  values
    conv    copied        1       9
    head    new           1       6
    head    skipped       1      15
    copied 1 leaves (9 values), left 1 new (6), skipped 1 of the source (15)

    A head of another size cannot be copied, and says so:

    >>> lw.transplant(fresh, pretrained, "**")
    Traceback (most recent call last):
    ...
    ValueError: lw.transplant: 1 selected leaf has a different shape in the source:
      'head/kernel': target (3, 2), source (3, 5)
    ...

    An unrolled linen checkpoint (``layers_0``, ``layers_1``, ...) into a
    model whose layers are stacked on axis 0, and back:

    >>> import re
    >>> unrolled = {"layers_0": {"w": jnp.full(2, 1.0)},
    ...             "layers_1": {"w": jnp.full(2, 2.0)},
    ...             "layers_2": {"w": jnp.full(2, 3.0)}}
    >>> stacked = {"layers": {"w": jnp.zeros((3, 2))}}
    >>> to_unrolled = lambda p: re.sub(r"^layers/(\d+)", r"layers_\1", p)
    >>> params, report = lw.transplant(stacked, unrolled, "**",
    ...                                rename=to_unrolled,
    ...                                stacks={"layers": 0})
    >>> params["layers"]["w"]
    Array([[1., 1.],
           [2., 2.],
           [3., 3.]], dtype=float32)
    >>> report.copied
    ('layers/0/w', 'layers/1/w', 'layers/2/w')
    >>> back, _ = lw.transplant(
    ...     unrolled, params, "**",
    ...     rename=lambda p: re.sub(r"^layers_(\d+)", r"layers/\1", p),
    ...     source_stacks={"layers": 0})
    >>> back["layers_2"]["w"]
    Array([3., 3.], dtype=float32)

    The first two layers of that stack into a stack of two:

    >>> small = {"layers": {"w": jnp.zeros((2, 2))}}
    >>> out, report = lw.transplant(small, params, "layers/[0-1]/**",
    ...                             stacks={"layers": 0})
    >>> out["layers"]["w"][1], report.skipped
    (Array([2., 2.], dtype=float32), ('layers/2/w',))
  """
  fn = "lw.transplant"
  rule_set, default = flag_rules(fn, rules, what="copy flag",
                                 meaning="True (copy) or False (keep)")
  key = _paths.normalize_stacks(fn, stacks)
  source_key = _paths.normalize_stacks(fn, source_stacks)
  res = rule_set.resolve(target, default=default, strict=strict, stacks=key,
                         fn=fn)
  dst = _View(target, list(res.paths), list(res.specs), res.treedef,
              res.layers)
  src = _View.of_source(fn, source, source_key)
  if source_stacks is None and src.layers is None and res.layers is not None:
    # A source without stacks in its metadata (a restored checkpoint) that
    # holds the target's stacked leaves is stacked as the target is.
    inherited = _same_stacks(res.layers, source)
    if inherited:
      try:
        src = _View.of_source(fn, source, ("declared", inherited))
      except ValueError:
        pass  # not stacked alike after all: its paths are compared as they are
  src_paths, src_specs = src.paths, src.specs
  by_path = {p: i for i, p in enumerate(src_paths)}
  if rename is not None and not callable(rename):
    raise TypeError(f"{fn}: rename must be a function from a target path to "
                    f"a source path, got {rename!r}.")

  plan: dict[int, int] = {}      # target (layer) leaf -> source (layer) leaf
  missing: list[tuple[str, str]] = []
  shapes: list[str] = []
  dtypes: list[str] = []
  for i, (path, spec, take) in enumerate(zip(res.paths, res.specs,
                                             res.values)):
    if not take:
      continue
    src_path = rename(path) if rename is not None else path
    if not isinstance(src_path, str):
      raise TypeError(f"{fn}: rename({path!r}) returned {src_path!r}; it "
                      "must return a path string.")
    j = by_path.get(src_path)
    if j is None:
      missing.append((path, src_path))
      continue
    spec_j = src_specs[j]
    shown = path if src_path == path else f"{path} <- {src_path}"
    if tuple(spec_j.shape) != tuple(spec.shape):
      shapes.append(f"{shown!r}: target {tuple(spec.shape)}, source "
                    f"{tuple(spec_j.shape)}")
    elif spec_j.dtype != spec.dtype and not cast:
      dtypes.append(f"{shown!r}: target {spec.dtype}, source {spec_j.dtype}")
    else:
      plan[i] = j

  absent = []
  for path, src_path in missing if strict else ():
    near = _diagnostics.close(src_path, src_paths)
    shown = path if src_path == path else f"{path} <- {src_path}"
    absent.append(f"{shown!r}" + (
        f"  (closest in source: {', '.join(map(repr, near))})" if near else ""))
  # A stacked target leaf of which some layers are copied is rebuilt from
  # its own other layers: it needs values.
  partial = []
  layers = dst.layers
  for j, leaf in enumerate(dst.leaves if layers is not None else ()):
    span = dst.span(j)
    n = sum(k in plan for k in span)
    if (layers is not None and layers.axes[j] is not None
        and 0 < n < len(span) and isinstance(leaf, jax.ShapeDtypeStruct)):
      kept = [res.paths[k] for k in span if k not in plan]
      partial.append(f"{layers.leaf_paths[j]!r}: {n} of {len(span)} "
                     f"layers copied, {_diagnostics.few(kept, 3)} kept")
  problems = [
      (absent, "is", "not in the source",
       "Exclude them from the rules (e.g. {'head/**': False, ...}), map their "
       "paths with rename=, or pass strict=False to leave them new."
       + _layer_hint([q for _, q in missing], by_path)),
      (shapes, "has", "a different shape in the source",
       "Leave these layers new (exclude them from the rules), or build the "
       "target with the source's sizes."),
      (dtypes, "has", "a different dtype in the source",
       "Pass cast=True to convert the source values to the target dtypes."),
      (partial, "is", "abstract (a jax.ShapeDtypeStruct) but only partly "
       "copied",
       "Give the target's values (its initialised params) so that its other "
       "layers are kept, or copy every layer of these stacked leaves."),
  ]
  sections = [f"{_leaves(len(lines), verb)} {what}:\n"
              + "\n".join(_diagnostics.listed(lines)) + "\n" + advice
              for lines, verb, what, advice in problems if lines]
  if sections:
    raise ValueError(f"{fn}: " + "\n\n".join(sections))

  out = list(dst.leaves)
  for j, leaf in enumerate(dst.leaves):
    span = dst.span(j)
    if not any(k in plan for k in span):
      continue
    dtype = res.specs[span.start].dtype
    axis = dst.axis(j)
    if axis is None:
      out[j] = _copy(src.value(plan[span.start]), leaf, dtype)
      continue
    block = src.block([plan.get(k, -1) for k in span], axis)
    if block is not None:  # consecutive layers of one source leaf, same axis
      out[j] = _copy(block, leaf, dtype)
      continue
    # One layer at a time: copied from the source, or kept from the target.
    parts = [src.value(plan[k]) if k in plan
             else _layer(leaf, axis, k - span.start) for k in span]
    out[j] = _placed(jnp.stack([jnp.asarray(x, dtype) for x in parts],
                               axis=axis), leaf)
  used = set(plan.values())
  report = TransplantReport({
      "copied": {res.paths[i]: _size(res.specs[i]) for i in sorted(plan)},
      "new": {p: _size(s) for i, (p, s) in
              enumerate(zip(res.paths, res.specs)) if i not in plan},
      "skipped": {p: _size(s) for j, (p, s) in
                  enumerate(zip(src_paths, src_specs)) if j not in used},
  })
  return res.treedef.unflatten(out), report


def _same_stacks(layers: _paths.Layers, source: Any
                 ) -> tuple[tuple[str, int], ...]:
  """The target's stacks that ``source`` has too: every stacked leaf of the
  stack at the same path in the source, with as many dimensions (a stacked
  checkpoint of the same model; the number of layers may differ)."""
  paths, specs, _ = paths_and_specs(source)
  ndim = {p: len(s.shape) for p, s in zip(paths, specs)}
  out = []
  for root, axis, _ in layers.roots:
    members = [(p, len(shape)) for p, shape, a in
               zip(layers.leaf_paths, layers.leaf_shapes, layers.axes)
               if a is not None and (root == "" or p == root
                                     or p.startswith(root + "/"))]
    if members and all(ndim.get(p) == n for p, n in members):
      out.append((root, axis))
  return tuple(out)


# A layer index as a segment of its own (a stack's layer leaf, an NNX list:
# "layers/3/...") or glued to its module's name (linen: "layers_3/...").
_SPLIT = re.compile(r"^((?:[^/]+/)*?[^/]+)/(\d+)(?=/|$)")
_GLUED = re.compile(r"^((?:[^/]+/)*?[^/]+)_(\d+)(?=/|$)")


def _layer_hint(missing: list[str], source: dict[str, int]) -> str:
  """A ``rename=`` (or ``source_stacks=``) that would find the missing
  paths, when the source names the same layers the other way (``layers_3``
  for ``layers/3`` or back), or holds them stacked in one leaf."""
  for path in missing:
    for found, sep, other in ((_SPLIT, "/", "_"), (_GLUED, "_", "/")):
      m = found.match(path)
      if m is None:
        continue
      pattern = re.escape(m[1]) + re.escape(sep) + r"(\d+)"
      rename = (f"rename=lambda p: re.sub(r\"^{pattern}\", "
                f"r\"{m[1]}{other}\\1\", p)")
      if f"{m[1]}{other}{m[2]}{path[m.end():]}" in source:
        return (f" The source names its layers {m[1]}{other}<i>, not "
                f"{m[1]}{sep}<i>: {rename}.")
      whole = f"{m[1]}{path[m.end():]}"
      if whole in source:
        return (f" The source holds {whole!r}, one leaf: if its layers are "
                f"stacked in it, pass source_stacks={{{m[1]!r}: <layer "
                "axis>}" + (f" and {rename}." if sep == "_" else "."))
  return ""


def _leaves(n: int, verb: str) -> str:
  """'1 selected leaf has' / '3 selected leaves have' for error titles."""
  plural = {"is": "are", "has": "have"}[verb]
  return f"{n} selected leaf {verb}" if n == 1 else (
      f"{n} selected leaves {plural}")
