"""Reuse pretrained weights by name: copy chosen leaves from one tree to another.

Transfer learning starts from a new model whose lower layers should hold a
pretrained network's weights while its head stays freshly initialised.
``transplant`` does that copy with the rule language: a selector (or a rule
set of bools) chooses the target leaves to fill, the source leaf of the same
path (or of a renamed path) provides each value, and every shape and dtype is
checked before anything is copied. Its report says what was copied, what was
left new and which source leaves went unused, so a silent mismatch (a
renamed layer, a head of another size) cannot pass unnoticed.

It is the JAX counterpart of loading part of a PyTorch ``state_dict``
(``load_state_dict(strict=False)`` with a filtered dict), with the checks
done by name before the first step rather than discovered in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerwise import _diagnostics
from layerwise._resolve import Flags, flag_rules, paths_and_specs
from layerwise._types import PyTree

__all__ = ["TransplantReport", "transplant"]


@dataclasses.dataclass(frozen=True)
class TransplantReport:
  """What :func:`transplant` did, leaf by leaf (paths in flattening order).

  ``str(report)`` is a table with one row per module (a leaf's path without
  its last segment) and a summary line.

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
  if isinstance(like, jax.Array):
    out = jax.device_put(out, like.sharding)
  return out


def transplant(
    target: PyTree,
    source: PyTree,
    rules: Flags,
    *,
    rename: Callable[[str], str] | None = None,
    cast: bool = False,
    strict: bool = True,
) -> tuple[PyTree, TransplantReport]:
  """Copies the leaves of ``source`` into ``target`` where ``rules`` selects.

  Every target leaf that ``rules`` selects takes the value of the source leaf
  with the same path (or with ``rename(path)``); all others keep their
  value. All problems are reported at once, before anything is copied: a
  selector that matches no target leaf, a selected leaf that ``source``
  lacks (with the closest source paths), and a shape or dtype that differs.

  The copied values are fresh arrays (never buffers of ``source``, so the
  result may be donated to a jitted step) placed with the target leaf's
  sharding when the target leaf is a ``jax.Array``.

  Args:
    target: the new model's parameters (any pytree: a linen params dict, an
      ``nnx.State``, ...); its structure is kept. Its leaves may be abstract
      (``jax.ShapeDtypeStruct``) only where they are copied.
    source: the pretrained parameters (any pytree with array leaves, numpy
      arrays included, e.g. a restored checkpoint).
    rules: the target leaves to copy: a selector (a glob, a regex, a callable
      or a ``lw.Selector``), or a rule set ``{selector: bool}`` in which the
      first matching rule decides (``True``: copy) and which must cover every
      target leaf (end it with ``"**": False``).
    rename: maps a target path to the source path it is copied from (e.g.
      ``lambda p: p.replace("backbone/", "", 1)`` when the pretrained model
      is the new model's ``backbone``); the identity by default.
    cast: convert source values to the target dtype instead of raising on a
      dtype difference (e.g. float32 weights into a bfloat16 model).
    strict: with ``False``, selectors that match nothing are allowed, and a
      selected leaf that ``source`` lacks is left new (and listed in the
      report's ``new``) instead of being an error. Shapes and dtypes are
      always checked.

  Returns:
    ``(new_target, report)``: a tree with ``target``'s structure, and a
    :class:`TransplantReport` of what was copied, left new and skipped.

  Raises:
    layerwise.RuleError: a selector matches no target leaf, or a rule set
      leaves a target leaf unmatched.
    ValueError: a selected leaf is missing from ``source``, or its shape (or,
      without ``cast``, its dtype) differs.
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
  """
  fn = "lw.transplant"
  rule_set, default = flag_rules(fn, rules, what="copy flag",
                                        meaning="True (copy) or False (keep)")
  res = rule_set.resolve(target, default=default, strict=strict)
  target_leaves = res.treedef.flatten_up_to(target)
  src_paths, src_specs, src_treedef = paths_and_specs(source)
  src_leaves = src_treedef.flatten_up_to(source)
  by_path = {p: i for i, p in enumerate(src_paths)}
  if rename is not None and not callable(rename):
    raise TypeError(f"{fn}: rename must be a function from a target path to "
                    f"a source path, got {rename!r}.")

  plan: dict[int, int] = {}      # target leaf -> source leaf
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
    src = src_specs[j]
    shown = path if src_path == path else f"{path} <- {src_path}"
    if tuple(src.shape) != tuple(spec.shape):
      shapes.append(f"{shown!r}: target {tuple(spec.shape)}, source "
                    f"{tuple(src.shape)}")
    elif src.dtype != spec.dtype and not cast:
      dtypes.append(f"{shown!r}: target {spec.dtype}, source {src.dtype}")
    else:
      plan[i] = j

  absent = []
  for path, src_path in missing if strict else ():
    near = _diagnostics.close(src_path, src_paths)
    shown = path if src_path == path else f"{path} <- {src_path}"
    absent.append(f"{shown!r}" + (
        f"  (closest in source: {', '.join(map(repr, near))})" if near else ""))
  problems = [
      (absent, "is", "not in the source",
       "Exclude them from the rules (e.g. {'head/**': False, ...}), map their "
       "paths with rename=, or pass strict=False to leave them new."),
      (shapes, "has", "a different shape in the source",
       "Leave these layers new (exclude them from the rules), or build the "
       "target with the source's sizes."),
      (dtypes, "has", "a different dtype in the source",
       "Pass cast=True to convert the source values to the target dtypes."),
  ]
  sections = [f"{_leaves(len(lines), verb)} {what}:\n"
              + "\n".join(_diagnostics.listed(lines)) + "\n" + advice
              for lines, verb, what, advice in problems if lines]
  if sections:
    raise ValueError(f"{fn}: " + "\n\n".join(sections))

  out = list(target_leaves)
  for i, j in plan.items():
    out[i] = _copy(src_leaves[j], target_leaves[i], res.specs[i].dtype)
  used = set(plan.values())
  report = TransplantReport({
      "copied": {res.paths[i]: _size(res.specs[i]) for i in plan},
      "new": {p: _size(s) for i, (p, s) in
              enumerate(zip(res.paths, res.specs)) if i not in plan},
      "skipped": {p: _size(s) for j, (p, s) in
                  enumerate(zip(src_paths, src_specs)) if j not in used},
  })
  return res.treedef.unflatten(out), report


def _leaves(n: int, verb: str) -> str:
  """'1 selected leaf has' / '3 selected leaves have' for error titles."""
  plural = {"is": "are", "has": "have"}[verb]
  return f"{n} selected leaf {verb}" if n == 1 else (
      f"{n} selected leaves {plural}")
