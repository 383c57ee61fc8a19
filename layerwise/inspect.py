"""Read-outs of rules: which rule each parameter got, as a table and as data."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from layerwise import _core, _paths, _validate, checks
from layerwise._resolve import (MISSING, Rules, RuleSet, layer_paths_and_specs,
                                paths_and_specs)
from layerwise._types import PyTree, Stacks

__all__ = ["Description", "describe", "hyperparams", "norms"]


def _function_name(fn: Any) -> str | None:
  """A function's name as a table shows it: its own name, or, for the
  closure a schedule factory returns (a function ``schedule`` defined in
  ``polynomial_schedule``, as optax writes them, or one of optax's
  lambdas), the factory's."""
  qualname = getattr(fn, "__qualname__", None)
  if not isinstance(qualname, str):
    return None
  parts = qualname.split(".<locals>.")
  if len(parts) > 1 and (parts[-1] == "schedule" or (
      parts[-1] == "<lambda>"
      and str(getattr(fn, "__module__", "")).startswith("optax"))):
    return parts[-2]
  return parts[-1]


def _at_step_0(fn: Any) -> float | None:
  """``fn(0)`` as a float, if ``fn`` is a schedule that gives a real scalar
  there (``None`` for anything else: a function of other arguments, say)."""
  try:
    value = np.asarray(fn(0))
  except Exception:  # pylint: disable=broad-except  # not a schedule
    return None
  if value.shape != () or not np.issubdtype(value.dtype, np.number) or (
      np.iscomplexobj(value)):
    return None
  return float(value)


def _schedule_text(fn: Any, factor: float = 1.0) -> str:
  """``polynomial_schedule (0.5 at step 0)``: what a schedule is, and the
  value it gives (times ``factor``) at the first step."""
  name = _function_name(fn) or repr(fn)
  if factor != 1.0:
    name = f"{factor:g} x {name}"
  value = _at_step_0(fn)
  return name if value is None else (
      f"{name} ({format_value(factor * value)} at step 0)")


def format_value(value: Any, width: int = 50) -> str:
  """A rule value as shown in a table cell; a schedule (any function) by
  its name and its value at step 0."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (float, np.floating)):
    v = float(value)
    return f"{v:.1f}" if v.is_integer() and abs(v) < 1e6 else f"{v:.4g}"
  if isinstance(value, (int, np.integer, str)):
    return str(value)
  if callable(value) and not isinstance(value, type):
    text = _schedule_text(value)
  else:
    text = repr(value)
  return text if len(text) <= width else text[:width - 3] + "..."


def natural_key(path: str) -> tuple[tuple[Any, ...], ...]:
  """A sort key that orders paths as people count: ``layers_2`` before
  ``layers_10``, segment by segment.

  Examples:
    >>> sorted(["layers_10/w", "layers_2/w", "embed"], key=natural_key)
    ['embed', 'layers_2/w', 'layers_10/w']
  """
  return tuple(map(_segment_key, path.split("/")))


_DIGITS = re.compile(r"(\d+)")


@functools.lru_cache(maxsize=65536)
def _segment_key(segment: str) -> tuple[Any, ...]:
  # text, number, text, ...: the types alternate alike in every key.
  runs = _DIGITS.split(segment)
  return tuple(int(r) if k % 2 else r for k, r in enumerate(runs))


def _human(n: int) -> str:
  return f"{n:,}"


_NUMERIC = ("size", "state_bytes")


class _Formatter:
  """``fn(value, *args)``, computed once per distinct hashable value (a
  table of 50,000 rows has a handful of distinct values per column)."""

  def __init__(self) -> None:
    self._seen: dict[Any, str] = {}

  def __call__(self, fn: Any, value: Any, *args: Any) -> str:
    try:
      key = (type(value), value, args)
      hit = self._seen.get(key)
    except TypeError:  # unhashable: formatted each time
      return fn(*args, value) if args else fn(value)
    if hit is None:
      hit = self._seen[key] = fn(*args, value) if args else fn(value)
    return hit


def _cell(column: str, value: Any) -> str:
  if column == "shape":
    return str(value)
  if column in _NUMERIC:
    return _human(value)
  if column in ("path", "dtype", "rule") or column.endswith("_rule"):
    return str(value)
  if value is None and column != "value":
    return "-"  # a transformation's rules do not cover this parameter
  return format_value(value)


@dataclasses.dataclass(frozen=True)
class Description:
  """What :func:`describe` found: one row per parameter, and totals.

  Printing it (or ``str()``) gives the table; the same information is
  available as data for logging or tests.

  Attributes:
    columns: the row keys shown in the table, in order.
    rows: one ``dict`` per parameter, in flattening order (the table sorts
      them by path, naturally); with stacks, one per layer leaf
      (``layers/3/kernel``, each with its share of the stacked leaf's state
      bytes). Every row has
      ``path`` (str), ``shape`` (tuple), ``dtype`` (str) and ``size`` (int);
      for a rule set, ``rule`` (the selector that applied, as text, or
      ``"(default)"``) and ``value`` (the rule's value itself); for an
      optax transformation, one value column per layerwise rule set in it
      (``scale``, ...) with its selector under ``<column>_rule``, and
      ``state_bytes``, the optimizer-state bytes the parameter holds.
    group_by: the column whose values the totals are grouped by: ``value``
      for a rule set; for a transformation, its first layerwise column
      (``scale``, say), or ``dtype`` if it has none. Any column can total
      the table instead, and so can a rule column's selectors
      (``"scale_rule"``): ``dataclasses.replace(d, group_by="weight_decay")``
      (a column that is not there is an error).
    shared_state_bytes: optimizer-state bytes not attributable to one
      parameter (step counts, ...); ``None`` for a rule set.
    warnings: for a transformation, each trap :func:`layerwise.check` finds
      in it (what trains wrongly and the fix), printed below the table.
    notes: for a transformation, what its states say about their cost
      that the rows do not show, printed below the table as ``note:``
      lines: for each stacked leaf whose layers are split between the
      groups of :func:`layerwise.partition` or :func:`layerwise.freeze`,
      the bytes of state the groups hold for its layers they do not train.

  Examples:
    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    >>> d = lw.describe({"w": 0.5, "**": 1.0}, params)
    >>> print(dataclasses.replace(d, group_by="dtype"))
    path  shape   dtype    size  rule  value
    ----  ------  -------  ----  ----  -----
    b     (2,)    float32     2  '**'  1.0
    w     (2, 2)  float32     4  'w'   0.5
    <BLANKLINE>
    dtype    leaves  params   share
    float32       2       6  100.0%
    total         2       6  100.0%
  """
  columns: tuple[str, ...]
  rows: tuple[dict[str, Any], ...]
  group_by: str = "value"
  shared_state_bytes: int | None = None
  warnings: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()

  def __post_init__(self) -> None:
    # The columns, and what every row holds besides (each rule column's
    # selector, ``scale_rule``); not the ``_given`` of changed rows only.
    keys = list(self.columns) + [k for k in (self.rows[0] if self.rows else ())
                                 if k not in self.columns
                                 and not k.endswith("_given")]
    if self.group_by not in keys:
      raise ValueError(
          f"lw.describe: group_by={self.group_by!r} is not a column of this "
          f"description; choose one of {', '.join(map(repr, keys))} "
          "(dataclasses.replace(description, group_by=column)).")

  def totals(self) -> list[dict[str, Any]]:
    """Parameters per value of ``group_by``: ``[{"value", "leaves", "size",
    "fraction"}]`` (and ``"state_bytes"`` for a transformation).

    Values are grouped by how they print, in order of first appearance in
    ``rows``.
    """
    return self._totals(self.rows)

  def _totals(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    total = sum(r["size"] for r in rows)
    shown = _Formatter()
    for r in rows:
      value = r.get(self.group_by)
      g = groups.setdefault(shown(format_value, value),
                            {"value": value, "leaves": 0, "size": 0})
      g["leaves"] += 1
      g["size"] += r["size"]
      if "state_bytes" in r:
        g["state_bytes"] = g.get("state_bytes", 0) + r["state_bytes"]
    for g in groups.values():
      g["fraction"] = g["size"] / total if total else 0.0
    return list(groups.values())

  def table(self) -> str:
    """The table as text: the rows sorted by path, naturally (``layers_2``
    before ``layers_10``; ``rows`` keep the flattening order), then the
    totals, in order of first appearance in the table."""
    rows = sorted(self.rows, key=lambda r: natural_key(r["path"]))
    cells = [list(self.columns)]
    shown = _Formatter()
    given = [c + "_given" for c in self.columns]
    cells += [[shown(_cell, r[c], c)
               + (f" (rule: {format_value(r[g])})" if r.get(g) is not None
                  else "") for c, g in zip(self.columns, given)]
              for r in rows]
    right = {j for j, c in enumerate(self.columns) if c in _NUMERIC}
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]

    def line(row: Sequence[str], right: set[int] = right) -> str:
      return "  ".join(
          (c.rjust(w) if j in right else c.ljust(w))
          for j, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]

    with_bytes = self.shared_state_bytes is not None
    head = [self.group_by, "leaves", "params", "share"]
    totals = self._totals(rows)
    foot = [[_cell(self.group_by, g["value"]), str(g["leaves"]), _human(g["size"]),
             f"{g['fraction']:.1%}"] for g in totals]
    size = sum(r["size"] for r in self.rows)
    foot.append(["total", str(len(self.rows)), _human(size),
                 f"{1.0 if self.rows else 0.0:.1%}"])
    if with_bytes:
      head.append("state bytes")
      for row, g in zip(foot, totals):
        row.append(_human(g.get("state_bytes", 0)))
      foot[-1].append(_human(sum(r["state_bytes"] for r in self.rows)
                             + self.shared_state_bytes))
    widths = [max(len(row[j]) for row in [head] + foot)
              for j in range(len(head))]
    widths[1] = max(widths[1], 6)
    out.append("")
    out += [line(row, right=set(range(1, len(head)))) for row in [head] + foot]
    if self.shared_state_bytes is not None:
      out.append(f"(total state bytes include "
                 f"{_human(self.shared_state_bytes)} not held by one "
                 "parameter, such as step counts)")
    out += [f"note: {n}" for n in self.notes]
    out += [f"warning: {w}" for w in self.warnings]
    return "\n".join(out)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return self.table()


def _state_bytes(state: Any, param_paths: Sequence[str]) -> tuple[list[int], int]:
  """Optimizer-state bytes per parameter (by path suffix), and the rest."""
  index = {p: i for i, p in enumerate(param_paths)}
  per_param = [0] * len(param_paths)
  shared = 0
  state_paths, leaves, _ = _paths.flatten_with_paths(state)
  for path, leaf in zip(state_paths, leaves):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    segs = path.split("/")
    owner = next((index[s] for s in ("/".join(segs[k:])
                                     for k in range(len(segs)))
                  if s in index), None)
    if owner is None:
      shared += nbytes
    else:
      per_param[owner] += nbytes
  return per_param, shared


def _describe_transformation(tx: Any, params: Any,
                             opt_state: Any = None) -> Description:
  state = jax.eval_shape(tx.init, params)
  if opt_state is not None:
    # nnx.Optimizer keeps its state in Variables: compare what they hold.
    opt_state, state = _paths.unbox(opt_state), _paths.unbox(state)
    if _core.find_states(state):
      _core.check_not_plain("lw.describe", opt_state)
    given: Any = jax.tree_util.tree_structure(opt_state)
    if given != jax.tree_util.tree_structure(state):
      raise ValueError(
          "lw.describe: opt_state does not have the structure of "
          "tx.init(params); pass the state of this transformation, "
          "initialised with these params.")
    state = opt_state
  found = _core.find_states(state)
  statics = [s.rules for s in found]
  path_strs, specs, _ = paths_and_specs(params)
  per_param, shared = _state_bytes(state, path_strs)
  rows = [{"path": p, "shape": tuple(s.shape), "dtype": str(s.dtype),
           "size": math.prod(s.shape)} for p, s in zip(path_strs, specs)]
  real = list(path_strs)  # each row's real leaf
  rows, real, per_param = _layer_rows(statics, params, rows, real, per_param)
  columns = ["path", "shape", "dtype", "size"]
  # One column per kind of rule; a second rule set of the same kind gets a
  # column of its own only if it covers a parameter the first one covers
  # (the groups of lw.partition each have their own scale_by_rules, say).
  covered: dict[str, set[str]] = {}
  for node, info in zip(found, statics):
    k, name = 1, info.kind
    while name in covered and not covered[name].isdisjoint(info.paths):
      k += 1
      name = f"{info.kind}{k}"
    if name not in covered:
      covered[name] = set()
      columns.append(name)
      for row in rows:
        row[name], row[name + "_rule"] = None, "(not covered)"
    covered[name].update(info.paths)
    by_path = dict(zip(info.paths, zip(info.values, info.rule_texts)))
    for row, leaf in zip(rows, real):
      # a plan without stacks among stacked rows: by the row's real leaf
      hit = by_path.get(row["path"]) or by_path.get(leaf)
      if hit is not None:
        row[name], row[name + "_rule"] = hit
    if opt_state is not None:
      _add_live_values(node, info, name, rows, columns)
      _add_measured_columns(node, info, name, rows, columns)
  for row, nbytes in zip(rows, per_param):
    row["state_bytes"] = nbytes
  columns.append("state_bytes")
  return Description(tuple(columns), tuple(rows),
                     group_by=columns[4] if statics else "dtype",
                     shared_state_bytes=shared,
                     warnings=tuple(t.message
                                    for t in checks.traps(tx, params)),
                     notes=tuple(n for node in found
                                 for n in _core.notes_of(node)))


def _layer_rows(statics: Sequence[_core.Plan], params: Any,
                rows: list[dict[str, Any]], real: list[str],
                per_param: list[int]
                ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
  """The rows of the layer leaves when the states' plans see stacks (a row
  per layer of a stacked leaf, its state bytes an equal share of the
  leaf's), else the rows as they are."""
  roots: dict[str, int] = {}
  for plan in statics:
    for root, axis, _ in (plan.layers.roots if plan.layers is not None
                          else ()):
      roots.setdefault(root, axis)
  if not roots:
    return rows, real, per_param
  lpaths, lspecs, _, layers = layer_paths_and_specs(
      "lw.describe", params, ("declared", tuple(roots.items())))
  if layers is None:
    return rows, real, per_param
  out, leaf_of, nbytes = [], [], []
  for j, path in enumerate(layers.leaf_paths):
    span = layers.span(j)
    share, extra = divmod(per_param[j], len(span))
    for n, k in enumerate(span):
      spec = lspecs[k]
      out.append({"path": lpaths[k], "shape": tuple(spec.shape),
                  "dtype": str(spec.dtype), "size": math.prod(spec.shape)})
      leaf_of.append(path)
      nbytes.append(share + (n < extra))
  return out, leaf_of, nbytes


class _ScaledSchedule:
  """A live factor times a rule's schedule, as a table shows it."""

  def __init__(self, factor: float, schedule: Any):
    self.factor, self.schedule = factor, schedule

  def __repr__(self) -> str:
    return _schedule_text(self.schedule, self.factor)


def _concrete(vector: Any) -> np.ndarray | None:
  """A state vector's values, or ``None`` for an abstract state."""
  vector = _core.unboxed(vector)
  if isinstance(vector, jax.ShapeDtypeStruct):
    return None
  return np.asarray(jax.device_get(vector))


def _add_live_values(node: Any, info: _core.Plan, name: str,
                     rows: Sequence[dict[str, Any]],
                     columns: list[str]) -> None:
  """The hyperparameters the state holds now (the state protocol's
  ``live``), where they differ from the rules (after a ``set_*``, or a
  restore): a per-leaf value replaces the rule's in ``<name>`` and a
  per-group one (a clip threshold) gets a column ``<name>_<live>``; the
  rule's value is kept in ``<column>_given``."""
  index = {p: i for i, p in enumerate(info.paths)}
  for live_name, live in _core.live_of(node).items():
    values = _concrete(live.vector)
    if values is None:
      continue
    column = name if live.per == "leaf" else f"{name}_{live_name}"
    changes: dict[int, Any] = {}
    for r, row in enumerate(rows):
      i = index.get(row["path"])
      if i is None:
        continue
      given = info.values[i]
      if live.per == "group":
        group = info.groups[i] if info.groups is not None else -1
        if group < 0:
          continue
        now, given = float(values[group]), given.limit()
      else:
        now = float(values[i])
      if _validate.is_schedule(given) and not hasattr(given, "limit"):
        if now != 1.0:
          changes[r] = (_ScaledSchedule(now, given), None)
      elif isinstance(given, (int, float)) and np.float32(given) != now:
        changes[r] = (now, given)
    if not changes:
      continue
    if column not in columns:
      columns.append(column)
      for row in rows:
        i = index.get(row["path"], -1)
        in_group = i >= 0 and info.groups is not None and info.groups[i] >= 0
        row[column] = info.values[i].limit() if in_group else None
    for r, (now, given) in changes.items():
      rows[r][column] = now
      if given is not None:
        rows[r][column + "_given"] = given


def _add_measured_columns(node: Any, info: _core.Plan, name: str,
                          rows: Sequence[dict[str, Any]],
                          columns: list[str]) -> None:
  """The latest ``<name>_<field>`` of each leaf's group, for everything the
  state measures per group (``clip_norm``, ``clip_scale``, ``track_norm``);
  none from an abstract state (``jax.eval_shape``), which holds no values."""
  measured = _core.measured_of(node)
  if not measured or info.groups is None:
    return
  group_of = dict(zip(info.paths, info.groups))
  for field, vector in measured.items():
    vector = _core.unboxed(vector)
    if isinstance(vector, jax.ShapeDtypeStruct):
      return
    column = f"{name}_{field}"
    if column not in columns:
      columns.append(column)
      for row in rows:
        row[column] = None
    values = np.asarray(vector)
    for row in rows:
      group = group_of.get(row["path"], -1)
      if group >= 0:
        row[column] = float(values[group])


def norms(opt_state: PyTree) -> dict[str, jax.Array]:
  """The norms and scales of every clipping and tracking state, as a dict.

  Reads the states of :func:`layerwise.clip_by_rules` (keys
  ``"clip/<group>/norm"`` and ``"clip/<group>/scale"``, where a group is a
  leaf's path for per-leaf clippers and the rule's selector for group
  clippers; with stacked layers, a per-leaf clipper's groups are the
  layers, ``"clip/layers/3/attn/kernel/norm"``) and
  :func:`layerwise.track_norms` (``"<prefix>/<name>"``) anywhere in
  ``opt_state`` (chains, ``MultiSteps``, ``partition``...), in
  order. A key that a later state would repeat gets a number after its
  first part (``"clip2/**/norm"``). The values are float32 scalars from the
  last update; it works inside ``jit``, so a train step can return it as
  metrics. Outside ``jit``, ``jax.device_get(lw.norms(state))`` fetches
  them all at once.

  Args:
    opt_state: an optimizer state.

  Returns:
    A flat ``{key: scalar}`` dict, empty if the state tracks no norms.

  Raises:
    TypeError: for plain dicts and lists of arrays (a checkpoint restored
      without a target), which hold no layerwise state to read: turn them
      into a state with :func:`layerwise.restore_state` first.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> tx = optax.chain(
    ...     lw.clip_by_rules({"head": lw.clip_norm(1.0), "**": None}),
    ...     optax.sgd(0.1))
    >>> grads = {"head": jnp.array([6.0, 8.0]), "body": jnp.zeros(2)}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> lw.norms(state)
    {'clip/head/norm': Array(10., dtype=float32), 'clip/head/scale': Array(0.1, dtype=float32)}
  """
  _core.check_not_plain("lw.norms", opt_state)
  return _keyed(_core.metrics_of(node)
                for node in _core.find_states(opt_state))


def _keyed(per_state: Iterable[list[tuple[str, Any]]]) -> dict[str, Any]:
  """One flat dict of the ``(key, value)`` pairs of each state, in order; a
  state whose keys an earlier one holds gets a number after its keys'
  first part (``clip2/...``)."""
  out: dict[str, Any] = {}
  for items in per_state:
    if not items:
      continue
    keys = [k for k, _ in items]
    k = 2
    while any(key in out for key in keys):
      keys = [f"{key.partition('/')[0]}{k}/{key.partition('/')[2]}"
              for key, _ in items]
      k += 1
    out.update(zip(keys, (v for _, v in items)))
  return out


def _live_items(node: Any) -> list[tuple[str, Any]]:
  """``(key, scalar)`` for each entry of each live vector of a state (the
  state protocol's ``live``)."""
  plan: _core.Plan = node.rules
  items = []
  for name, live in _core.live_of(node).items():
    owners = plan.paths if live.per == "leaf" else plan.group_names
    suffix = "" if name == plan.kind else f"/{name}"
    items += [(f"{plan.kind}/{owner}{suffix}", value) for owner, value in
              zip(owners, _core.entries(live.vector, len(owners)))]
  return items


def hyperparams(opt_state: PyTree) -> dict[str, jax.Array]:
  """The hyperparameters the state holds now, as a dict: the live values.

  Reads every layerwise state that holds hyperparameters as arrays,
  anywhere in ``opt_state`` (chains, ``MultiSteps``, ``partition``...), in
  order: the multipliers of :func:`layerwise.scale_by_rules`
  (``"scale/<path>"``), the weight decays of
  :func:`layerwise.add_decayed_weights` (``"weight_decay/<path>"``) and the
  thresholds of :func:`layerwise.clip_by_rules`
  (``"clip/<group>/threshold"``, beside the ``norm`` and ``scale`` of
  :func:`layerwise.norms`). These are the values that
  :func:`layerwise.set_scale`, :func:`layerwise.set_weight_decay` and
  :func:`layerwise.set_threshold` set and a checkpoint restores, whatever
  the rules in code say now; for a leaf whose rule is a schedule, the factor
  that multiplies it (1.0 unless set). Keys are numbered as in
  :func:`layerwise.norms` where a later state would repeat them
  (``"scale2/head/w"``). The values are float32 scalars; it works inside
  ``jit``, so a train step can return them as metrics (``{**lw.norms(s),
  **lw.hyperparams(s)}``).

  Args:
    opt_state: an optimizer state.

  Returns:
    A flat ``{key: scalar}`` dict, empty if the state holds no layerwise
    hyperparameters.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"embed": jnp.ones(2), "head": jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  lw.scale_by_rules({"embed": 0.3, "**": 1.0}))
    >>> state = lw.set_scale(tx.init(params), "embed", 0.1)
    >>> lw.hyperparams(state)
    {'scale/embed': Array(0.1, dtype=float32), 'scale/head': Array(1., dtype=float32)}
  """
  _core.check_not_plain("lw.hyperparams", opt_state)
  return _keyed(_live_items(node) for node in _core.find_states(opt_state))


def describe(obj: Rules[Any] | optax.GradientTransformation, params: PyTree,
             *, opt_state: PyTree | None = None, default: Any = MISSING,
             strict: bool = True, stacks: Stacks = None) -> Description:
  """Tells which rule applies to each parameter, as a table and as data.

  One row per parameter leaf: its path, shape, dtype, size, and the rule
  (selector) and value that applied; totals per value at the bottom. Only
  shapes and dtypes are read, so ``params`` may be abstract
  (``jax.eval_shape(model.init, ...)``).

  ``obj`` may also be an optax transformation (a chain, say) containing
  layerwise transformations: their rules are read from
  ``jax.eval_shape(obj.init, params)``, so no optimizer state is allocated.
  Each layerwise transformation adds a column (``scale`` for
  :func:`layerwise.scale_by_rules`), and ``state_bytes`` tells the
  optimizer-state bytes each parameter holds (state leaves are attributed to
  the parameter whose path they end with).

  Given ``opt_state`` (the state of the transformation, as returned by its
  last ``update``), the table shows the hyperparameters the state holds
  now, as :func:`layerwise.set_scale`, :func:`layerwise.set_weight_decay`,
  :func:`layerwise.set_threshold` or a checkpoint left them: a multiplier
  or weight decay that differs from its rule reads ``0.1 (rule: 0.3)``
  (``rows`` keep the rule's value under ``<column>_given``), and each
  clipped parameter's group threshold is in ``clip_threshold``. It also
  shows each parameter's latest clipping and tracked norms: ``clip_norm``
  and ``clip_scale`` for :func:`layerwise.clip_by_rules` (the values of the
  parameter's group), ``track_norm`` for :func:`layerwise.track_norms`.
  :func:`layerwise.hyperparams` reads the same live values as data, inside
  ``jit`` too.

  The table sorts paths naturally (``layers_2`` before ``layers_10``;
  ``rows`` keep the flattening order), shows a schedule by what it is and
  its value at step 0 (``polynomial_schedule (0.5 at step 0)``), and totals
  by the first value column (another: ``dataclasses.replace(d,
  group_by=column)``).

  For a transformation, each trap of placement that :func:`layerwise.check`
  finds (a multiplier before Adam, a global norm before ``lw.freeze``, ...)
  is printed below the table as a ``warning:`` line with its fix, and kept
  in ``warnings``.

  Args:
    obj: a rule set (``{selector: value}`` or a list of pairs), or an optax
      transformation.
    params: the parameters the rules are for.
    opt_state: for a transformation, its state, to show the values it
      holds and the latest norms.
    default: as in :func:`layerwise.resolve` (rule sets only).
    strict: as in :func:`layerwise.resolve` (rule sets only); the same
      errors are raised.
    stacks: the stacked (scanned) subtrees, as in :func:`layerwise.paths`
      (rule sets only): a row per layer leaf. For a transformation, the
      rows are those of the layer leaves its states' rules see (a
      stacked leaf's state bytes shared equally by its layers).

  Returns:
    A :class:`Description`; print it for the table, or read ``.rows`` and
    ``.totals()``.

  Raises:
    TypeError: if ``obj`` is neither a rule set nor a transformation, or
      ``opt_state`` is given with a rule set.
    ValueError: if ``opt_state`` is not a state of ``obj`` for ``params``.

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

    A chain: each parameter's multiplier and the bytes of Adam's state:

    >>> import optax
    >>> tx = optax.chain(optax.adam(1e-3),
    ...                  lw.scale_by_rules({"embed": 0.1, "**": 1.0}))
    >>> print(lw.describe(tx, params))
    path        shape    dtype    size  scale  state_bytes
    ----------  -------  -------  ----  -----  -----------
    embed       (10, 4)  float32    40  0.1            320
    layers/0/b  (4,)     float32     4  1.0             32
    layers/0/w  (4, 4)   float32    16  1.0            128
    layers/1/b  (4,)     float32     4  1.0             32
    layers/1/w  (4, 4)   float32    16  1.0            128
    <BLANKLINE>
    scale  leaves  params   share  state bytes
    0.1         1      40   50.0%          320
    1.0         4      40   50.0%          320
    total       5      80  100.0%          668
    (total state bytes include 28 not held by one parameter, such as step counts)
  """
  if isinstance(obj, optax.GradientTransformation) or (
      callable(getattr(obj, "init", None))
      and callable(getattr(obj, "update", None))):  # optax.MultiSteps, ...
    return _describe_transformation(obj, params, opt_state)
  if (not isinstance(obj, (Mapping, Sequence, RuleSet))
      or isinstance(obj, (str, bytes)) or hasattr(obj, "_fields")):
    raise TypeError(
        f"lw.describe() takes a rule set ({{selector: value}} or a list of "
        f"(selector, value) pairs) or an optax transformation, got "
        f"{type(obj).__name__}.")
  if opt_state is not None:
    raise TypeError("lw.describe: opt_state is for a transformation, not for "
                    "a rule set.")
  res = RuleSet(obj).resolve(params, default=default, strict=strict,
                             stacks=_paths.normalize_stacks("lw.describe",
                                                            stacks),
                             fn="lw.describe")
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
