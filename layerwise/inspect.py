"""Read-outs of rules: which rule each parameter got, as a table and as data."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax

from layerwise import _rules

__all__ = ["Description", "describe"]


def format_value(value: Any, width: int = 40) -> str:
  """A rule value as shown in a table cell."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (float, np.floating)):
    v = float(value)
    return f"{v:.1f}" if v.is_integer() and abs(v) < 1e6 else f"{v:.4g}"
  if isinstance(value, (int, np.integer, str)):
    return str(value)
  name = getattr(value, "__qualname__", None) or getattr(value, "__name__",
                                                         None)
  text = name if name else repr(value)
  return text if len(text) <= width else text[:width - 3] + "..."


def _human(n: int) -> str:
  return f"{n:,}"


@dataclasses.dataclass(frozen=True)
class Description:
  """What :func:`describe` found: one row per parameter, and totals.

  Printing it (or ``str()``) gives the table; the same information is
  available as data for logging or tests.

  Attributes:
    columns: the row keys, in table order.
    rows: one ``dict`` per parameter, in flattening order, with keys
      ``path`` (str), ``shape`` (tuple), ``dtype`` (str), ``size`` (int),
      ``rule`` (the selector that applied, as text, or ``"(default)"``) and
      ``value`` (the rule's value itself).
  """
  columns: tuple[str, ...]
  rows: tuple[dict[str, Any], ...]

  def totals(self) -> list[dict[str, Any]]:
    """Parameters per value: ``[{"value", "leaves", "size", "fraction"}]``.

    Values are grouped by how they print, in order of first appearance.
    """
    groups: dict[str, dict[str, Any]] = {}
    total = sum(r["size"] for r in self.rows)
    for r in self.rows:
      key = format_value(r["value"])
      g = groups.setdefault(key, {"value": r["value"], "leaves": 0, "size": 0})
      g["leaves"] += 1
      g["size"] += r["size"]
    for g in groups.values():
      g["fraction"] = g["size"] / total if total else 0.0
    return list(groups.values())

  def table(self) -> str:
    """The table as text."""
    cells = [list(self.columns)]
    for r in self.rows:
      cells.append([
          r["path"], str(r["shape"]), r["dtype"], _human(r["size"]),
          r["rule"], format_value(r["value"])
      ])
    right = {self.columns.index("size")}
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]

    def line(row: Sequence[str]) -> str:
      return "  ".join(
          (c.rjust(w) if j in right else c.ljust(w))
          for j, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]

    totals = self.totals()
    vw = max([len("value")] + [len(format_value(g["value"])) for g in totals])
    total_size = sum(r["size"] for r in self.rows)
    sw = max(len("params"), len(_human(total_size)))
    out.append("")
    out.append(f"{'value'.ljust(vw)}  {'leaves':>6}  {'params'.rjust(sw)}  "
               f"{'share':>6}")
    for g in totals:
      out.append(f"{format_value(g['value']).ljust(vw)}  {g['leaves']:>6}  "
                 f"{_human(g['size']).rjust(sw)}  {g['fraction']:>6.1%}")
    out.append(f"{'total'.ljust(vw)}  {len(self.rows):>6}  "
               f"{_human(total_size).rjust(sw)}  {1.0 if self.rows else 0.0:>6.1%}")
    return "\n".join(out)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return self.table()


def describe(obj: Any, params: Any, *, default: Any = _rules.MISSING,
             strict: bool = True) -> Description:
  """Tells which rule applies to each parameter, as a table and as data.

  One row per parameter leaf: its path, shape, dtype, size, and the rule
  (selector) and value that applied; totals per value at the bottom. Only
  shapes and dtypes are read, so ``params`` may be abstract
  (``jax.eval_shape(model.init, ...)``).

  Args:
    obj: a rule set (``{selector: value}`` or a list of pairs).
    params: the parameters the rules are for.
    default: as in :func:`layerwise.resolve`.
    strict: as in :func:`layerwise.resolve`; the same errors are raised.

  Returns:
    A :class:`Description`; print it for the table, or read ``.rows`` and
    ``.totals()``.

  Raises:
    TypeError: if ``obj`` is not a rule set.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"embed": jnp.ones((10, 4)),
    ...           "layers": [{"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}] * 2}
    >>> d = lw.describe({"embed": 0.1, "layers/*/b": 0.0, "**": 1.0}, params)
    >>> print(d)
    path        shape    dtype    size  rule          value
    ----------  -------  -------  ----  ------------  -----
    embed       (10, 4)  float32    40  'embed'       0.1
    layers/0/b  (4,)     float32     4  'layers/*/b'  0.0
    layers/0/w  (4, 4)   float32    16  '**'          1.0
    layers/1/b  (4,)     float32     4  'layers/*/b'  0.0
    layers/1/w  (4, 4)   float32    16  '**'          1.0
    <BLANKLINE>
    value  leaves  params   share
    0.1         1      40   50.0%
    0.0         2       8   10.0%
    1.0         2      32   40.0%
    total       5      80  100.0%
    >>> d.rows[0]
    {'path': 'embed', 'shape': (10, 4), 'dtype': 'float32', 'size': 40,
    'rule': "'embed'", 'value': 0.1}
  """
  if isinstance(obj, optax.GradientTransformation):
    raise TypeError(
        "describe() takes a rule set; this optax transformation holds no "
        "layerwise rules to read. Pass the rule set you built it from.")
  if (not isinstance(obj, (Mapping, Sequence, _rules.RuleSet))
      or isinstance(obj, (str, bytes)) or hasattr(obj, "_fields")):
    raise TypeError(
        f"describe() takes a rule set ({{selector: value}} or a list of "
        f"(selector, value) pairs), got {type(obj).__name__}.")
  res = _rules.RuleSet(obj).resolve(params, default=default, strict=strict)
  rows = tuple({
      "path": path,
      "shape": tuple(spec.shape),
      "dtype": str(spec.dtype),
      "size": math.prod(spec.shape),
      "rule": res.rule_text(i),
      "value": value,
  } for i, (path, spec, value) in enumerate(
      zip(res.paths, res.specs, res.values)))
  return Description(("path", "shape", "dtype", "size", "rule", "value"),
                     rows)
