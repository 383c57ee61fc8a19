"""The rule language: selectors, matching, resolution and its error messages.

A rule set is an ordered mapping ``{selector: value}`` (a dict, or a list of
``(selector, value)`` pairs). A selector is

* a glob string over the '/'-joined parameter path: ``*`` matches within one
  segment, ``**`` any number of whole segments (none included), ``?`` and
  ``[...]`` as in :mod:`fnmatch`; a leading ``'/'`` is ignored;
* a compiled regular expression (``re.compile(...)``), matched in full;
* a callable ``(path, leaf) -> bool``, called with a ``jax.ShapeDtypeStruct``
  as ``leaf`` (selectors see shapes and dtypes, never values), such as
  :func:`ndim_at_most` or combinations made by :func:`any_of`,
  :func:`all_of` and :func:`not_` (or ``|``, ``&`` and ``~`` on them).

Each leaf takes the value of the first rule that matches it. Matching runs in
Python on the tree's structure, once per structure (it is cached), so under
``jax.jit`` it runs at trace time only.

A rule set is checked when it is resolved against a tree: a leaf no rule
matches, a selector that matches no leaf (a typo) and a rule that matches
leaves but never wins them (shadowed by earlier rules) are errors that name
the paths and the closest selectors or paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _paths

__all__ = [
    "RuleError",
    "Selector",
    "all_of",
    "any_of",
    "labels",
    "ndim_at_least",
    "ndim_at_most",
    "not_",
    "resolve",
]

SelectorLike = Union[str, "re.Pattern[str]", Callable[[str, Any], bool]]
Rules = Union[Mapping[Any, Any], Sequence[tuple[Any, Any]], "RuleSet"]


class _Missing:

  def __repr__(self) -> str:
    return "<no default>"


MISSING: Any = _Missing()

# How many offending paths an error message lists before it says "and N more".
_MAX_LISTED = 10
_CACHE_SIZE = 32


# ----------------------------------------------------------------- selectors


def _segment_regex(seg: str, pattern: str) -> str:
  """Regex for one glob segment (no '/' inside)."""
  out, i, n = [], 0, len(seg)
  while i < n:
    c = seg[i]
    if c == "*":
      out.append("[^/]*")
    elif c == "?":
      out.append("[^/]")
    elif c == "[":
      j = i + 1
      if j < n and seg[j] in "!^":
        j += 1
      if j < n and seg[j] == "]":
        j += 1
      while j < n and seg[j] != "]":
        j += 1
      if j >= n:
        raise ValueError(
            f"Glob selector {pattern!r} has an unclosed '['. Close the "
            "character class, or write '[[]' for a literal '['.")
      body = seg[i + 1:j]
      if body[:1] in ("!", "^"):
        body = "^" + body[1:]
      body = body.replace("\\", "\\\\")
      out.append(f"(?!/)[{body}]")
      i = j
    else:
      out.append(re.escape(c))
    i += 1
  return "".join(out)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
  """Compiles a path glob to a regex matched against ``'/' + path``.

  Examples:
    >>> bool(glob_to_regex("a/**/k*").fullmatch("/a/k1"))
    True
    >>> bool(glob_to_regex("a/*").fullmatch("/a/b/c"))
    False
  """
  body = pattern[1:] if pattern.startswith("/") else pattern
  if not body:
    raise ValueError(
        f"Glob selector {pattern!r} is empty. Use '**' to select every "
        "parameter.")
  parts = []
  for seg in body.split("/"):
    if seg == "**":
      parts.append("(?:/[^/]+)*")
    elif not seg:
      raise ValueError(
          f"Glob selector {pattern!r} has an empty path segment ('//' or a "
          "trailing '/'). Remove it; '**' stands for any number of segments.")
    elif "**" in seg:
      raise ValueError(
          f"Glob selector {pattern!r}: '**' must be a whole path segment "
          f"(as in 'a/**/b'), but segment {seg!r} has more around it. Use "
          "'*' to match part of one segment.")
    else:
      parts.append("/" + _segment_regex(seg, pattern))
  return re.compile("".join(parts), re.DOTALL)


def _check_bool(result: Any, selector: Any, path: str) -> bool:
  if isinstance(result, (bool, np.bool_)):
    return bool(result)
  raise TypeError(
      f"Selector {_text_of(selector)} returned {type(result).__name__} for "
      f"parameter {path!r}; a callable selector must return a Python bool "
      "computed from the path, shape and dtype (it is never given values).")


def check_arity(fn: Any, n: int, message: Callable[[], str]) -> None:
  """Raises ``TypeError(message())`` if ``fn`` cannot take ``n`` positional
  arguments (when its signature can be read: builtins pass unchecked)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*([None] * n))
  except TypeError:
    raise TypeError(message()) from None


def _text_of(selector: Any) -> str:
  if isinstance(selector, str):
    return repr(selector)
  if isinstance(selector, re.Pattern):
    return f"re.compile({selector.pattern!r})"
  if isinstance(selector, Selector):
    return selector.text
  name = getattr(selector, "__qualname__", None) or getattr(
      selector, "__name__", None)
  return name if name else repr(selector)


@dataclasses.dataclass(frozen=True)
class _Compiled:
  """A selector compiled to ``match(path, spec) -> bool``."""
  source: Any
  text: str
  match: Callable[[str, Any], bool]
  needs_spec: bool

  @property
  def is_text(self) -> bool:
    """Whether the selector is a glob or regex (comparable to paths)."""
    return isinstance(self.source, (str, re.Pattern))

  @property
  def pattern(self) -> str:
    """Glob or regex source, for similarity suggestions."""
    src = self.source
    return src if isinstance(src, str) else getattr(src, "pattern", self.text)


def compile_selector(selector: SelectorLike) -> _Compiled:
  """Compiles any selector form; raises ``TypeError`` for anything else."""
  if isinstance(selector, _Compiled):
    return selector
  if isinstance(selector, str):
    regex = glob_to_regex(selector)
    return _Compiled(
        selector, repr(selector),
        lambda path, spec: regex.fullmatch("/" + path if path else "")
        is not None, False)
  if isinstance(selector, re.Pattern):
    return _Compiled(
        selector, _text_of(selector),
        lambda path, spec: selector.fullmatch(path) is not None, False)
  if callable(selector):
    check_arity(selector, 2, lambda: (
        f"Selector {_text_of(selector)} cannot be called as "
        "selector(path, leaf); a callable selector takes the path (a str) "
        "and the leaf (a jax.ShapeDtypeStruct) and returns a bool, such as "
        "lambda path, leaf: leaf.ndim == 1."))
    return _Compiled(
        selector, _text_of(selector),
        lambda path, spec: _check_bool(selector(path, spec), selector, path),
        True)
  raise TypeError(
      f"{selector!r} ({type(selector).__name__}) is not a selector. A "
      "selector is a glob string ('encoder/**'), a compiled regex "
      "(re.compile(r'.*/bias')) or a callable (path, leaf) -> bool.")


class Selector:
  """A callable selector ``(path, leaf) -> bool`` with a readable name.

  Selectors made by :func:`ndim_at_most`, :func:`any_of`, ... are
  ``Selector``\\ s; they combine with ``|`` (any of), ``&`` (all of) and ``~``
  (not), also with glob strings and regexes on the other side. ``leaf`` is a
  ``jax.ShapeDtypeStruct`` (or anything with ``shape``, ``ndim`` and
  ``dtype``).

  Args:
    fn: the predicate ``(path: str, leaf) -> bool``.
    text: how the selector is shown in tables and error messages.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> is_vector = lw.Selector(lambda path, leaf: leaf.ndim == 1, "vector")
    >>> sel = is_vector & ~lw.any_of("head/**")
    >>> sel
    all_of(vector, not_(any_of('head/**')))
    >>> sel("encoder/bias", jax.ShapeDtypeStruct((3,), "float32"))
    True
    >>> sel("head/bias", jax.ShapeDtypeStruct((3,), "float32"))
    False
  """

  def __init__(self, fn: Callable[[str, Any], bool], text: str):
    if not callable(fn) or not isinstance(text, str):
      raise TypeError(
          f"Selector(fn, text) takes a function (path, leaf) -> bool and the "
          f"text that names it, got {type(fn).__name__} and "
          f"{type(text).__name__}; e.g. lw.Selector(lambda path, leaf: "
          "leaf.ndim == 1, 'vectors').")
    check_arity(fn, 2, lambda: (
        f"Selector {text!r}: its function cannot be called as fn(path, "
        "leaf); a selector's function takes the path (a str) and the leaf "
        "(a jax.ShapeDtypeStruct) and returns a bool."))
    self._fn = fn
    self.text = text

  def __call__(self, path: str, leaf: Any) -> bool:
    return self._fn(path, leaf)

  def __repr__(self) -> str:
    return self.text

  def __or__(self, other: SelectorLike) -> "Selector":
    return any_of(self, other)

  def __ror__(self, other: SelectorLike) -> "Selector":
    return any_of(other, self)

  def __and__(self, other: SelectorLike) -> "Selector":
    return all_of(self, other)

  def __rand__(self, other: SelectorLike) -> "Selector":
    return all_of(other, self)

  def __invert__(self) -> "Selector":
    return not_(self)


def _combine(name: str, selectors: Sequence[SelectorLike],
             reduce: Callable[[Any], bool]) -> Selector:
  if not selectors:
    raise ValueError(f"{name}() needs at least one selector.")
  compiled = [compile_selector(s) for s in selectors]
  text = f"{name}({', '.join(c.text for c in compiled)})"
  return Selector(
      lambda path, leaf: reduce(c.match(path, leaf) for c in compiled), text)


def any_of(*selectors: SelectorLike) -> Selector:
  """Selects a leaf that any of ``selectors`` selects.

  Args:
    *selectors: globs, regexes or callables.

  Returns:
    A :class:`Selector`.

  Examples:
    >>> import re, jax
    >>> import layerwise as lw
    >>> sel = lw.any_of("**/bias", re.compile(r".*norm.*"))
    >>> leaf = jax.ShapeDtypeStruct((4,), "float32")
    >>> sel("encoder/ln_norm/scale", leaf), sel("encoder/kernel", leaf)
    (True, False)
  """
  return _combine("any_of", selectors, any)


def all_of(*selectors: SelectorLike) -> Selector:
  """Selects a leaf that every one of ``selectors`` selects.

  Args:
    *selectors: globs, regexes or callables.

  Returns:
    A :class:`Selector`.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> sel = lw.all_of("encoder/**", lw.ndim_at_least(2))
    >>> sel("encoder/kernel", jax.ShapeDtypeStruct((4, 4), "float32"))
    True
    >>> sel("encoder/bias", jax.ShapeDtypeStruct((4,), "float32"))
    False
  """
  return _combine("all_of", selectors, all)


def not_(selector: SelectorLike) -> Selector:
  """Selects a leaf that ``selector`` does not select.

  This replaces negative-lookahead regexes: "everything but the head" is
  ``lw.not_("head/**")``.

  Args:
    selector: a glob, regex or callable.

  Returns:
    A :class:`Selector`.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> sel = lw.not_("head/**")
    >>> leaf = jax.ShapeDtypeStruct((4,), "float32")
    >>> sel("encoder/bias", leaf), sel("head/bias", leaf)
    (True, False)
  """
  c = compile_selector(selector)
  return Selector(lambda path, leaf: not c.match(path, leaf),
                  f"not_({c.text})")


def _check_ndim(name: str, k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"{name}(k) needs a non-negative int k, got {k!r}.")
  return int(k)


def ndim_at_most(k: int) -> Selector:
  """Selects leaves with at most ``k`` dimensions.

  ``ndim_at_most(1)`` is the usual "biases, norm scales and other vectors"
  selector (scalars included).

  Args:
    k: the largest number of dimensions selected.

  Returns:
    A :class:`Selector`.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> sel = lw.ndim_at_most(1)
    >>> sel("dense/bias", jax.ShapeDtypeStruct((8,), "float32"))
    True
    >>> sel("dense/kernel", jax.ShapeDtypeStruct((8, 8), "float32"))
    False
  """
  k = _check_ndim("ndim_at_most", k)
  return Selector(lambda path, leaf: len(leaf.shape) <= k,
                  f"ndim_at_most({k})")


def ndim_at_least(k: int) -> Selector:
  """Selects leaves with at least ``k`` dimensions (matrices: ``k=2``).

  Args:
    k: the smallest number of dimensions selected.

  Returns:
    A :class:`Selector`.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> sel = lw.ndim_at_least(2)
    >>> sel("conv/kernel", jax.ShapeDtypeStruct((3, 3, 1, 8), "float32"))
    True
    >>> sel("conv/bias", jax.ShapeDtypeStruct((8,), "float32"))
    False
  """
  k = _check_ndim("ndim_at_least", k)
  return Selector(lambda path, leaf: len(leaf.shape) >= k,
                  f"ndim_at_least({k})")


# -------------------------------------------------------------- resolution


def _leaf_spec(leaf: Any, path: str) -> jax.ShapeDtypeStruct:
  """The shape and dtype of a leaf, without reading its values."""
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is not None and dtype is not None:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)
  try:
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))
  except TypeError as e:
    raise TypeError(
        f"Parameter {path!r} is a {type(leaf).__name__}, not an array. "
        "Rules apply to array leaves; keep other values out of the tree "
        "(or mark them static).") from e


def paths_and_specs(tree: Any) -> tuple[list[str], list[jax.ShapeDtypeStruct],
                                         Any]:
  """Each leaf's path and shape/dtype (never its values), and the treedef."""
  path_strs, leaves, treedef = _paths.flatten_with_paths(tree)
  return path_strs, [_leaf_spec(x, p) for x, p in zip(leaves, path_strs)], treedef


@dataclasses.dataclass(frozen=True, eq=False)
class _Match:
  """Which rules match which leaves of one tree structure (cached)."""
  treedef: Any
  paths: tuple[str, ...]
  specs: tuple[jax.ShapeDtypeStruct, ...]
  winner: tuple[int, ...]          # first matching rule per leaf, -1 if none
  matches: tuple[tuple[int, ...], ...]  # per rule: indices of leaves matched


@dataclasses.dataclass(frozen=True)
class Resolution:
  """The outcome of resolving a rule set against one tree structure.

  Attributes:
    treedef: the tree's structure.
    paths: each leaf's path, in flattening order.
    specs: each leaf's shape and dtype.
    rule_index: the index of the rule each leaf took, -1 for the default
      (or, with ``strict=False``, for no rule).
    values: the value each leaf took.
    rule_texts: every rule's selector as shown to users.
  """
  treedef: Any
  paths: tuple[str, ...]
  specs: tuple[jax.ShapeDtypeStruct, ...]
  rule_index: tuple[int, ...]
  values: tuple[Any, ...]
  rule_texts: tuple[str, ...]

  def tree(self) -> Any:
    """The values as a tree with the resolved tree's structure."""
    return jax.tree_util.tree_unflatten(self.treedef, list(self.values))

  def rule_text(self, i: int) -> str:
    """How leaf ``i``'s rule is shown."""
    r = self.rule_index[i]
    return self.rule_texts[r] if r >= 0 else "(default)"


class RuleError(ValueError):
  """A rule set does not fit a tree: unmatched leaves, unused or shadowed rules.

  Attributes:
    unmatched: paths of the leaves that no rule matches.
    unused: texts of the selectors that match no leaf.
    shadowed: texts of the rules that match leaves but never win one.
  """

  def __init__(self, message: str, unmatched: Sequence[str] = (),
               unused: Sequence[str] = (), shadowed: Sequence[str] = ()):
    super().__init__(message)
    self.unmatched = tuple(unmatched)
    self.unused = tuple(unused)
    self.shadowed = tuple(shadowed)


def listed(lines: Sequence[str]) -> list[str]:
  """Indented lines for an error message, at most ``_MAX_LISTED`` of them."""
  shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
  return shown


def close(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """The candidates most like ``word``, for "closest: ..." suggestions."""
  return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n,
                                   cutoff=0.5)


def _path_candidates(paths: Sequence[str]) -> list[str]:
  """Real paths, and globs for their ancestors and leaf names."""
  out = []
  for p in paths:
    segs = p.split("/")
    out.append(p)
    out.extend("/".join(segs[:i]) + "/**" for i in range(1, len(segs)))
    out.append("**/" + segs[-1])
  return out


def _closest_selectors(path: str, patterns: Sequence[str],
                       n: int = 2) -> list[str]:
  """Selector patterns most like ``path`` or one of its ancestor globs."""
  candidates = _path_candidates([path])
  scored = []
  for pat in dict.fromkeys(patterns):
    score = max(difflib.SequenceMatcher(None, pat, c).ratio()
                for c in candidates)
    if score >= 0.6:
      scored.append((-score, pat))
  return [pat for _, pat in sorted(scored)[:n]]


def _quote_all(items: Sequence[str]) -> str:
  return ", ".join(repr(s) for s in items)


def _rules_hint(rules: Any, what: str) -> str:
  """What to write instead of ``rules``, which is not a rule set."""
  if isinstance(rules, (str, re.Pattern)) or callable(rules):
    return (f" Give the selector its {what}: {{{_text_of(rules)}: <{what}>}}"
            " (and a catch-all '**' rule for the rest).")
  if isinstance(rules, (set, frozenset)):
    return (f" A set has neither {what}s nor an order: write a dict "
            f"{{selector: {what}, ...}}, first match first.")
  if isinstance(rules, (int, float, np.number)) and not isinstance(rules,
                                                                  bool):
    return f" For one {what} everywhere, write {{'**': {rules!r}}}."
  return ""


class RuleSet:
  """A compiled rule set: its selectors, values, and a cache of matches.

  Transformations compile their rules once, at construction; resolving the
  same tree structure again (as ``update`` does at every trace) is a lookup.

  Args:
    rules: a mapping or a sequence of ``(selector, value)`` pairs, or a
      ``RuleSet``.
    what: what the values are, for error messages (``"value"``, ``"label"``).
  """

  def __init__(self, rules: Rules, *, what: str = "value"):
    if isinstance(rules, RuleSet):
      items = list(zip(rules.selectors, rules.values))
    elif isinstance(rules, Mapping):
      items = list(rules.items())
    elif (isinstance(rules, Sequence)
          and not isinstance(rules, (str, bytes))
          and not hasattr(rules, "_fields")):  # NamedTuples are not rule sets
      items = []
      for i, item in enumerate(rules):
        if not (isinstance(item, tuple) and len(item) == 2):
          raise TypeError(
              f"Rule {i} is {item!r}; a rule set given as a sequence holds "
              f"(selector, {what}) pairs: write [(selector, {what}), ...] "
              f"or a dict {{selector: {what}}}.")
        items.append(item)
    else:
      raise TypeError(
          f"Rules must be a mapping {{selector: {what}}} or a list of "
          f"(selector, {what}) pairs, got {type(rules).__name__}: {rules!r}."
          + _rules_hint(rules, what))
    self.selectors = tuple(compile_selector(s) for s, _ in items)
    self.values = tuple(v for _, v in items)
    self.what = what
    self._cache: dict[Any, _Match] = {}
    self._checked: set[tuple[_Match, bool]] = set()

  def map_values(self, fn: Callable[[Any, str], Any]) -> "RuleSet":
    """The same selectors with values ``fn(value, selector_text)``: the
    place to check (and convert) a rule set's values, rule by rule."""
    return RuleSet([(c, fn(v, c.text))
                    for c, v in zip(self.selectors, self.values)],
                   what=self.what)

  def __len__(self) -> int:
    return len(self.selectors)

  def __repr__(self) -> str:
    body = ", ".join(f"{c.text}: {v!r}"
                     for c, v in zip(self.selectors, self.values))
    return f"RuleSet({{{body}}})"

  # Matching ------------------------------------------------------------

  def match(self, tree: Any) -> _Match:
    """Matches every selector against every leaf; cached per structure.

    A cache hit costs one ``tree_flatten`` and a dict lookup: paths are only
    built, and selectors only run, for a structure not seen before.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
      key = (treedef, tuple((tuple(x.shape), x.dtype) for x in leaves))
      hit = self._cache.get(key)
    except (AttributeError, TypeError):  # non-array leaf, unhashable treedef
      key, hit = None, None
    if hit is not None:
      return hit
    path_strs, specs, treedef = paths_and_specs(tree)
    specs = tuple(specs)
    matches = tuple(
        tuple(i for i, (p, s) in enumerate(zip(path_strs, specs))
              if c.match(p, s))
        for c in self.selectors)
    winner = [-1] * len(path_strs)
    for r in reversed(range(len(matches))):
      for i in matches[r]:
        winner[i] = r
    result = _Match(treedef, tuple(path_strs), specs, tuple(winner), matches)
    if key is not None:
      if len(self._cache) >= _CACHE_SIZE:
        evicted = self._cache.pop(next(iter(self._cache)))
        self._checked = {c for c in self._checked if c[0] is not evicted}
      self._cache[key] = result
    return result

  def resolve(self, tree: Any, *, default: Any = MISSING,
              strict: bool = True) -> Resolution:
    """Resolves the rules against ``tree``; see :func:`resolve`."""
    m = self.match(tree)
    if strict:
      # The checks depend only on the match and on whether there is a
      # default; a structure that passed them once passes them again.
      check_key = (m, default is MISSING)
      if check_key not in self._checked:
        self._check(m, default)
        self._checked.add(check_key)
    fallback = None if default is MISSING else default
    values = tuple(self.values[r] if r >= 0 else fallback for r in m.winner)
    return Resolution(m.treedef, m.paths, m.specs, m.winner, values,
                      tuple(c.text for c in self.selectors))

  # Errors --------------------------------------------------------------

  def _check(self, m: _Match, default: Any) -> None:
    sections: list[str] = []
    unmatched = ([p for p, r in zip(m.paths, m.winner) if r < 0]
                 if default is MISSING else [])
    unused = [r for r, leaves in enumerate(m.matches) if not leaves]
    shadowed = [r for r, leaves in enumerate(m.matches)
                if leaves and all(m.winner[i] != r for i in leaves)]

    if unmatched:
      patterns = [c.pattern for c in self.selectors if c.is_text]
      lines = []
      for p in unmatched[:_MAX_LISTED]:
        near = _closest_selectors(p, patterns)
        lines.append(f"{p!r}" + (f"  (closest selector: {_quote_all(near)})"
                                  if near else ""))
      sections.append(
          f"{len(unmatched)} parameter(s) match no rule:\n"
          + "\n".join(listed(lines + unmatched[_MAX_LISTED:]))
          + "\nAdd rules for them, end the rule set with a catch-all '**', "
          f"or pass default=<{self.what}>.")

    if unused:
      candidates = _path_candidates(m.paths)
      lines = []
      for r in unused:
        c = self.selectors[r]
        near = []
        if isinstance(c.source, str):
          near = close(c.pattern, candidates)
        elif isinstance(c.source, re.Pattern):
          near = close(c.pattern, m.paths)
        lines.append(f"rule {r}: {c.text}" + (
            f"  (closest: {_quote_all(near)})" if near else ""))
      advice = ("\nFix the pattern (lw.paths(params) lists the real "
                "paths), remove the rule, or pass strict=False if the rule "
                "set is shared across models.")
      if not m.paths:
        advice = ("\nThe tree has no array leaves at all: pass the params (a "
                  "pytree of arrays, such as variables['params'] or "
                  "nnx.state(model, nnx.Param)), not None or an empty tree.")
      elif any(isinstance(self.selectors[r].source, re.Pattern)
               for r in unused):
        advice = ("\nA regex selector must match the whole path (as "
                  "re.fullmatch does): write r'.*bias' or r'encoder/.*', "
                  "not r'bias' or r'encoder'." + advice)
      sections.append(
          f"{len(unused)} selector(s) match no parameter (a typo?):\n"
          + "\n".join(listed(lines)) + advice)

    if shadowed:
      lines = []
      for r in shadowed:
        takers = sorted({m.winner[i] for i in m.matches[r]})
        lines.append(
            f"rule {r}: {self.selectors[r].text} never applies: all "
            f"{len(m.matches[r])} parameter(s) it matches are taken by "
            + ", ".join(f"rule {t} ({self.selectors[t].text})"
                        for t in takers))
      sections.append(
          f"{len(shadowed)} rule(s) are shadowed by earlier rules:\n"
          + "\n".join(listed(lines))
          + "\nThe first matching rule wins: put more specific rules first, "
          "or remove the dead rule.")

    if sections:
      raise RuleError(
          "\n\n".join(sections),
          unmatched=unmatched,
          unused=[self.selectors[r].text for r in unused],
          shadowed=[self.selectors[r].text for r in shadowed])


# ------------------------------------------------------------ public API


def resolve(rules: Rules, tree: Any, *, default: Any = MISSING,
            strict: bool = True) -> Any:
  """Returns a tree like ``tree`` holding, at each leaf, its rule's value.

  Each leaf takes the value of the first rule whose selector matches its path
  (see :func:`layerwise.paths`). Only the tree's structure, shapes and dtypes
  are read, never its values, so ``tree`` may hold arrays, tracers or
  ``jax.ShapeDtypeStruct``\\ s.

  Args:
    rules: an ordered mapping ``{selector: value}`` or a list of
      ``(selector, value)`` pairs. Values may be anything; a value that is a
      pytree (a tuple, say) is placed as a subtree.
    tree: the parameters (or updates) to resolve against.
    default: the value of leaves that no rule matches. Without it, such
      leaves are an error.
    strict: if True (the default), raise :class:`RuleError` when a leaf
      matches no rule (and there is no ``default``), when a selector
      matches no leaf, or when a rule is shadowed by earlier ones. If False,
      none of these is an error and unmatched leaves get ``default`` or
      ``None``.

  Returns:
    A pytree with the structure of ``tree``.

  Raises:
    RuleError: (a ``ValueError``) as described under ``strict``; the message
      lists the offending paths and the closest selectors or paths.
    TypeError: for something that is not a rule set or a selector.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"embed": jnp.ones((10, 4)),
    ...           "layers": [{"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}] * 2}
    >>> lw.resolve({"embed": 0.1, "layers/*/b": 0.0, "**": 1.0}, params)
    {'embed': 0.1, 'layers': [{'b': 0.0, 'w': 1.0}, {'b': 0.0, 'w': 1.0}]}
    >>> lw.resolve({"layer/**": 0.5}, params, default=1.0)
    Traceback (most recent call last):
      ...
    layerwise._rules.RuleError: 1 selector(s) match no parameter (a typo?):
      rule 0: 'layer/**'  (closest: 'layers/**', ...)
    ...
  """
  return RuleSet(rules).resolve(tree, default=default, strict=strict).tree()


def labels(rules: Rules, *, default: Hashable = MISSING,
           strict: bool = True) -> Callable[[Any], Any]:
  """Returns a label function for ``optax.partition`` from a rule set.

  The rule values are the labels. The returned function maps a tree of
  params or updates (arrays or tracers, inside or outside ``jax.jit``) to a
  tree of labels; matching is done once per tree structure and cached, and
  it reads only paths, shapes and dtypes, so labels are the same for the
  params at ``init`` and the updates at every ``update``.

  Args:
    rules: an ordered mapping ``{selector: label}`` (or list of pairs).
      Labels must be hashable (strings, usually).
    default: the label of leaves that no rule matches.
    strict: as in :func:`resolve`.

  Returns:
    A function ``tree -> tree of labels``, usable as ``param_labels``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"backbone": {"w": jnp.ones((3, 3))}, "head": {"w": jnp.ones(3)}}
    >>> label_fn = lw.labels({"backbone/**": "frozen", "head/**": "train"})
    >>> label_fn(params)
    {'backbone': {'w': 'frozen'}, 'head': {'w': 'train'}}
    >>> tx = optax.partition(
    ...     {"frozen": optax.set_to_zero(), "train": optax.sgd(0.1)}, label_fn)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["head"]["w"], updates["backbone"]["w"].sum()
    (Array([-0.1, -0.1, -0.1], dtype=float32), Array(0., dtype=float32))
  """
  rule_set = RuleSet(rules, what="label")
  for c, v in zip(rule_set.selectors, rule_set.values):
    if not isinstance(v, Hashable) or v is None:
      raise TypeError(
          f"Label {v!r} of rule {c.text} is not usable as an optax.partition "
          "label: labels must be hashable and not None (use strings).")
  if default is not MISSING and (not isinstance(default, Hashable)
                                 or default is None):
    raise TypeError(f"default label {default!r} must be hashable, not None.")

  def label_fn(tree: Any) -> Any:
    return rule_set.resolve(tree, default=default, strict=strict).tree()

  return label_fn


# ------------------------------------------------- static metadata in states


@dataclasses.dataclass(frozen=True, eq=False)
class StaticRules:
  """What a layerwise state knows about its rules, as static pytree metadata.

  It is a pytree node with no children: it travels inside optimizer states
  (through ``jit``, ``jax.eval_shape``, checkpoints of the arrays) without
  being an array, so :func:`layerwise.describe` and :func:`layerwise.set_scale`
  can read which rule each leaf got from the state alone.

  Attributes:
    kind: what the rules set (``"scale"``, ...); the column name in
      ``describe``.
    paths: each leaf's path, in flattening order.
    shapes: each leaf's shape.
    dtypes: each leaf's dtype name.
    rule_texts: the selector each leaf matched, as shown to users.
    values: the value each leaf got, as given in the rules.
    groups: for states that keep statistics per group of leaves (clipping
      norms), each leaf's group name, the key of its statistics in the
      state (``None`` for a leaf in no group); ``None`` otherwise.
  """
  kind: str
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  rule_texts: tuple[str, ...]
  values: tuple[Any, ...]
  groups: tuple[str | None, ...] | None = None

  @classmethod
  def from_resolution(cls, kind: str, res: Resolution,
                      values: Sequence[Any] | None = None,
                      groups: Sequence[str | None] | None = None
                      ) -> "StaticRules":
    """The metadata of ``res``; ``values`` replaces the rules' values."""
    return cls(kind, res.paths, tuple(tuple(s.shape) for s in res.specs),
               tuple(str(s.dtype) for s in res.specs),
               tuple(res.rule_text(i) for i in range(len(res.paths))),
               res.values if values is None else tuple(values),
               None if groups is None else tuple(groups))

  def check_tree(self, fn: str, tree: Any) -> tuple[list[Any], Any]:
    """``tree``'s leaves and treedef, after checking that its paths and
    shapes are those at init (paths are built once per treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    known = self.__dict__.get("_treedefs")
    if known is None:
      known = set()
      object.__setattr__(self, "_treedefs", known)
    if treedef not in known:
      paths = tuple(_paths.flatten_with_paths(tree)[0])
      if paths != self.paths:
        raise self.structure_error(fn, paths)
      known.add(treedef)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    if shapes != self.shapes:
      raise self.structure_error(fn, self.paths, shapes)
    return leaves, treedef

  def structure_error(self, fn: str, paths: Sequence[str],
                      shapes: Sequence[tuple[int, ...]] | None = None
                      ) -> ValueError:
    """The error for updates that are not shaped like the params at init:
    it names the paths that are new, missing or reshaped."""
    paths = tuple(paths)
    at_init = set(self.paths)
    now = set(paths)
    new = [p for p in paths if p not in at_init]
    missing = [p for p in self.paths if p not in now]
    details = []
    if new:
      details.append(f"not in the params at init: {_few(new)}")
    if missing:
      details.append(f"missing from the updates: {_few(missing)}")
    if not details and paths != self.paths:
      details.append("the same paths in another order (another container "
                     "type?)")
    if not details and shapes is not None:
      changed = [f"{p!r} has shape {s} now, {s0} at init"
                 for p, s, s0 in zip(paths, shapes, self.shapes) if s != s0]
      details.append(_few(changed, quote=False))
    return ValueError(
        f"{fn}: the updates do not have the structure of the params given "
        f"to init ({len(paths)} leaves now, {len(self.paths)} at init; "
        + "; ".join(details) + "). Pass updates shaped like the params "
        "given to init, or call init again with the new params (a model "
        "whose parameters changed needs a new optimizer state).")

  def _key(self) -> tuple[Any, ...]:
    values = tuple(v if isinstance(v, (int, float, str, type(None)))
                   or callable(v) else id(v) for v in self.values)
    return (self.kind, self.paths, self.shapes, self.dtypes, self.rule_texts,
            values, self.groups)

  # jit compares the treedefs of its arguments (hence this metadata) on every
  # call: hash once, and compare by identity first.
  def __hash__(self) -> int:
    h = self.__dict__.get("_hash")
    if h is None:
      h = hash(self._key())
      object.__setattr__(self, "_hash", h)
    return h

  def __eq__(self, other: Any) -> bool:
    if self is other:
      return True
    if not isinstance(other, StaticRules):
      return NotImplemented
    return hash(self) == hash(other) and self._key() == other._key()

  def specs(self) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes,
                                                       self.dtypes)]

  def select(self, selector: SelectorLike) -> list[int]:
    """Indices of the leaves ``selector`` matches."""
    c = compile_selector(selector)
    return [i for i, (p, s) in enumerate(zip(self.paths, self.specs()))
            if c.match(p, s)]

  def __repr__(self) -> str:
    return f"StaticRules({self.kind!r}, {len(self.paths)} leaves)"


jax.tree_util.register_pytree_node(
    StaticRules, lambda s: ((), s), lambda aux, _: aux)


def _few(items: Sequence[str], n: int = 5, quote: bool = True) -> str:
  """The first ``n`` items, and how many more there are."""
  shown = ", ".join(repr(x) if quote else x for x in items[:n])
  return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def flatten_like(fn: str, treedef: Any, tree: Any,
                 what: str = "params") -> list[Any]:
  """``treedef.flatten_up_to(tree)``, with an error that says what to pass
  when ``tree`` (the params, usually) has another structure."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    theirs = _paths.flatten_with_paths(tree)[0] if tree is not None else []
    ours = _paths.flatten_with_paths(treedef.unflatten(
        [0] * treedef.num_leaves))[0]
    new = [p for p in theirs if p not in set(ours)]
    missing = [p for p in ours if p not in set(theirs)]
    details = "; ".join(
        [f"only in the {what}: {_few(new)}"] * bool(new)
        + [f"only in the updates: {_few(missing)}"] * bool(missing)) or str(e)
    raise ValueError(
        f"{fn}: the {what} passed to update do not have the structure of "
        f"the updates ({details}). Pass the {what} the updates are for, "
        "the same tree as at init.") from None


def number(fn: str, name: str, value: Any, *,
           schedule_hint: str = "") -> float:
  """``value`` as a float; a ``TypeError`` for what is not a number (with
  ``schedule_hint`` appended when it is a callable)."""
  if isinstance(value, bool) or not isinstance(value,
                                               (int, float, np.number)):
    hint = schedule_hint if callable(value) else ""
    raise TypeError(f"{fn}: {name} must be a number, got {value!r} "
                    f"({type(value).__name__}).{hint}")
  return float(value)


def positive(fn: str, name: str, value: Any, *, allow_zero: bool = False,
             zero_hint: str = "", schedule_hint: str = "") -> float:
  """``value`` as a float, checked finite and > 0 (>= 0 with
  ``allow_zero``); ``zero_hint`` is appended to the error for a 0."""
  value = number(fn, name, value, schedule_hint=schedule_hint)
  if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(
        f"{fn}: {name} must be finite and {bound}, got {value!r}"
        + (zero_hint if value == 0 else "") + ".")
  return value


def flag_rules(fn: str, flags: Any, *, what: str,
               meaning: str) -> tuple[RuleSet, Any]:
  """A selector, or a rule set ``{selector: bool}``, as a rule set of bools
  and the default to resolve it with.

  A selector sets the flag of what it matches (the rest gets ``False``); a
  rule set must cover every leaf, as any rule set. ``meaning`` says what
  ``True`` and ``False`` mean, for the error on a value that is not a bool.
  """
  is_rule_set = (isinstance(flags, Mapping) or (
      isinstance(flags, Sequence) and not isinstance(flags, (str, bytes))))
  if not is_rule_set:
    return RuleSet([(flags, True)], what=what), False
  rule_set = RuleSet(flags, what=what)
  for c, v in zip(rule_set.selectors, rule_set.values):
    if not isinstance(v, bool):
      raise TypeError(
          f"{fn}: rule {c.text} has value {v!r}; a rule set of {what}s maps "
          f"selectors to {meaning}.")
  return rule_set, MISSING


def as_transformation(value: Any) -> Any:
  """An optax transformation with extra-args support, made from a
  transformation or from an object with its ``init`` and ``update``
  (``optax.MultiSteps``); ``None`` for anything else."""
  if isinstance(value, optax.GradientTransformation):
    return optax.with_extra_args_support(value)
  if callable(getattr(value, "init", None)) and callable(
      getattr(value, "update", None)) and not isinstance(value, type):
    return optax.GradientTransformationExtraArgs(value.init, value.update)
  return None


def find_static(tree: Any) -> list[Any]:
  """Every node of ``tree`` that holds a :class:`StaticRules`, in order.

  Layerwise states are NamedTuples with a ``rules`` field; this finds them in
  any optax state (chains, ``MultiSteps``, ``inject_hyperparams``,
  ``partition``, masked states...), also inside one another (a
  ``scale_by_rules`` state inside an ``lw.partition`` state), outer first.
  """
  found = []

  def visit(node: Any) -> bool:
    # Found states are not leaves: the traversal goes on into them, to the
    # states of the transformations they wrap (partition, freeze).
    if isinstance(getattr(node, "rules", None), StaticRules) and hasattr(
        node, "_fields"):
      found.append(node)
    return False

  jax.tree_util.tree_flatten(tree, is_leaf=visit)
  return found
