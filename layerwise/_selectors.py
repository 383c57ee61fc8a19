"""Selectors: which parameters a rule is for, by path, shape and dtype.

A selector is

* a glob string over the '/'-joined parameter path: ``*`` matches within one
  segment, ``**`` any number of whole segments (none included), ``?`` and
  ``[...]`` as in :mod:`fnmatch`, ``{0..11}`` any decimal number from 0 to
  11; a leading ``'/'`` is ignored;
* a compiled regular expression (``re.compile(...)``), matched in full;
* a callable ``(path, leaf) -> bool``, called with a ``jax.ShapeDtypeStruct``
  as ``leaf`` (selectors see shapes and dtypes, never values), such as
  :func:`ndim_at_most` or combinations made by :func:`any_of`,
  :func:`all_of` and :func:`not_` (or ``|``, ``&`` and ``~`` on them).

Every form compiles to one ``match(path, spec) -> bool``
(:func:`compile_selector`), which is all that resolution uses.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import numpy as np

from layerwise import _diagnostics, _validate

__all__ = ["Selector", "SelectorLike", "all_of", "any_of", "ndim_at_least",
           "ndim_at_most", "not_"]

#: Anything that selects parameters: a glob, a compiled regex, or a callable
#: ``(path, leaf) -> bool`` (a :class:`Selector` included).
SelectorLike = Union[str, "re.Pattern[str]", Callable[[str, Any], bool]]


def _range_regex(lo: int, hi: int, width: int) -> str:
  """A regex for the decimal numbers ``lo`` to ``hi``, written without
  leading zeros, or padded with zeros to ``width`` digits (``width`` 0: no
  padding).

  The range is cut at every change of digit count and of digit prefix into
  pieces of the form ``prefix[x-y][0-9]{k}`` (0..11 is ``[0-9]|1[0-1]``), so
  the regex grows with the number of digits, not with the range.
  """
  stops = {hi}
  nines = 1
  while lo <= (stop := int(str(lo)[:-nines] + "9" * nines)) < hi:
    stops.add(stop)
    nines += 1
  zeros = 1
  while lo < (stop := (hi + 1) - (hi + 1) % 10**zeros - 1) <= hi:
    stops.add(stop)
    zeros += 1
  pieces, start = [], lo
  for stop in sorted(stops):
    piece, any_digit = "", 0
    for a, b in zip(str(start), str(stop)):
      if a == b:
        piece += a
      elif a == "0" and b == "9":
        any_digit += 1
      else:
        piece += f"[{a}-{b}]"
    piece += "[0-9]" * any_digit
    pieces.append("0" * (width - len(str(stop))) + piece)
    start = stop + 1
  return "(?:" + "|".join(pieces) + ")"


_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_DIGITS_RANGE = re.compile(r"(\d+)-(\d+)")


def _numeric_range(seg: str, i: int, pattern: str) -> tuple[str, int]:
  """The regex of the range ``{lo..hi}`` that starts at ``seg[i]``, and the
  index of its closing ``}``."""
  j = seg.find("}", i)
  if j < 0:
    raise ValueError(
        f"Glob selector {pattern!r} has an unclosed '{{'. Close the numeric "
        "range, as in 'layers_{0..11}', or write '[{]' for a literal '{'.")
  body = seg[i + 1:j]
  m = _RANGE.fullmatch(body)
  if m is None:
    raise ValueError(
        f"Glob selector {pattern!r}: '{{{body}}}' is not a numeric range. A "
        "range is {first..last} with two decimal integers, as in "
        "'layers_{0..11}'; for alternatives write one rule each, "
        "lw.any_of(...) or a regex; write '[{]' for a literal '{'.")
  first, last = m.groups()
  lo, hi = int(first), int(last)
  if lo > hi:
    raise ValueError(
        f"Glob selector {pattern!r}: the range '{{{body}}}' is empty, its "
        f"first number is larger than its last. Write '{{{last}..{first}}}'.")
  padded = any(len(x) > 1 and x[0] == "0" for x in (first, last))
  width = max(len(first), len(last)) if padded else 0
  return _range_regex(lo, hi, width), j


def _check_class(body: str, pattern: str) -> None:
  """Refuses a character class that reads as a range of numbers: digits, a
  dash and digits, with more than one digit on a side (``[0-11]`` is the
  characters 0 and 1, not the numbers 0 to 11)."""
  negated = body[:1] in ("!", "^")
  m = _DIGITS_RANGE.fullmatch(body[1:] if negated else body)
  if m is None or (len(m.group(1)) == 1 and len(m.group(2)) == 1):
    return
  first, last = m.groups()
  chars = set(first[:-1]) | set(last[1:]) | {
      chr(k) for k in range(ord(first[-1]), ord(last[0]) + 1)}
  shown = ", ".join(repr(c) for c in sorted(chars))
  if negated:
    what = f"one character other than {shown},"
    fix = ""
  else:
    what = f"one character, {shown}," if chars else "no character"
    fix = (f" For the numbers {int(first)} to {int(last)}, write "
           + repr(pattern.replace(f"[{body}]", f"{{{first}..{last}}}", 1))
           + ".")
  raise ValueError(
      f"Glob selector {pattern!r} has the character class '[{body}]', "
      f"which matches {what} not a number of several digits.{fix} For a "
      "class of digits, write single-digit ranges, such as '[0-9]'.")


def _segment_regex(seg: str, pattern: str) -> str:
  """Regex for one glob segment (no '/' inside)."""
  out, i, n = [], 0, len(seg)
  while i < n:
    c = seg[i]
    if c == "*":
      out.append("[^/]*")
    elif c == "?":
      out.append("[^/]")
    elif c == "{":
      regex, i = _numeric_range(seg, i, pattern)
      out.append(regex)
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
      _check_class(body, pattern)
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
    >>> [bool(glob_to_regex("layers_{0..11}").fullmatch(f"/layers_{i}"))
    ...  for i in ("0", "11", "12", "01")]
    [True, True, False, False]
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
      f"Selector {_diagnostics.text_of(selector)} returned "
      f"{type(result).__name__} for parameter {path!r}; a callable selector must return a Python bool "
      "computed from the path, shape and dtype (it is never given values).")


_WILDCARDS = frozenset("*?[{")


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A selector compiled to ``match(path, spec) -> bool``.

  What resolution may know without calling ``match``, to find each leaf's
  first rule without trying every rule on it (``_resolve``): ``paths``, the
  exact set of paths the selector matches, when it is one (a glob without
  wildcards, :func:`of_paths`; ``None`` otherwise); ``everything``, whether
  it matches every leaf (``"**"``); ``prefix``, for a glob, its leading
  segments without wildcards, which every path it matches starts with.
  """
  source: Any
  text: str
  match: Callable[[str, Any], bool]
  needs_spec: bool
  paths: frozenset[str] | None = None
  everything: bool = False
  prefix: tuple[str, ...] = ()

  @property
  def is_text(self) -> bool:
    """Whether the selector is a glob or regex (comparable to paths)."""
    return isinstance(self.source, (str, re.Pattern))

  @property
  def catch_all(self) -> bool:
    """Whether the selector is a pure catch-all, which selects every leaf
    by its form alone: the glob ``"**"``, the regex ``re.compile(".*")``,
    or a selector of every leaf made by the library (``of_paths(None)``).
    A callable of the user's (``lambda path, leaf: True``) cannot be told
    apart from any other and is not one."""
    if self.everything:
      return True
    return (isinstance(self.source, re.Pattern)
            and self.source.pattern == ".*")

  @property
  def pattern(self) -> str:
    """Glob or regex source, for similarity suggestions."""
    src = self.source
    return src if isinstance(src, str) else getattr(src, "pattern", self.text)


_SPECIAL = frozenset(".^$*+?{}[]\\|()")


def _regex_prefix(regex: re.Pattern[str]) -> tuple[str, ...]:
  """The whole path segments every path ``regex`` fully matches starts with:
  the literal text before its first special character, when nothing but
  literals precede it (no alternation, no flags), cut at its last '/'."""
  pattern = regex.pattern
  if not isinstance(pattern, str) or "|" in pattern or regex.flags & (
      re.IGNORECASE | re.VERBOSE):
    return ()
  end = 0
  while end < len(pattern) and pattern[end] not in _SPECIAL:
    end += 1
  if end < len(pattern) and pattern[end] in "*+?{":
    end -= 1  # the last literal is repeated (or optional)
  literal = pattern[:end]
  if "/" not in literal:
    return ()
  return tuple(literal[:literal.rindex("/")].split("/"))


def compile_selector(selector: SelectorLike) -> Compiled:
  """Compiles any selector form; raises ``TypeError`` for anything else."""
  if isinstance(selector, Compiled):
    return selector
  if isinstance(selector, str):
    regex = glob_to_regex(selector)
    segments = (selector[1:] if selector.startswith("/") else selector
                ).split("/")
    literal = [seg for seg in segments if _WILDCARDS.isdisjoint(seg)]
    prefix = []
    for seg in segments:
      if not _WILDCARDS.isdisjoint(seg):
        break
      prefix.append(seg)
    return Compiled(
        selector, repr(selector),
        lambda path, spec: regex.fullmatch("/" + path if path else "")
        is not None, False,
        paths=(frozenset(["/".join(segments)])
               if len(literal) == len(segments) else None),
        everything=segments == ["**"], prefix=tuple(prefix))
  if isinstance(selector, re.Pattern):
    return Compiled(
        selector, _diagnostics.text_of(selector),
        lambda path, spec: selector.fullmatch(path) is not None, False,
        prefix=_regex_prefix(selector))
  if callable(selector):
    if not isinstance(selector, Selector):  # a Selector's was checked
      _validate.check_arity(selector, 2, lambda: (
          f"Selector {_diagnostics.text_of(selector)} cannot be called as "
          "selector(path, leaf); a callable selector takes the path (a str) "
          "and the leaf (a jax.ShapeDtypeStruct) and returns a bool, such "
          "as lambda path, leaf: leaf.ndim == 1."))
    return Compiled(
        selector, _diagnostics.text_of(selector),
        lambda path, spec: _check_bool(selector(path, spec), selector, path),
        True, paths=getattr(selector, "paths", None),
        everything=getattr(selector, "everything", False))
  raise TypeError(
      f"{selector!r} ({type(selector).__name__}) is not a selector. A "
      "selector is a glob string ('encoder/**'), a compiled regex "
      "(re.compile(r'.*/bias')) or a callable (path, leaf) -> bool.")


# How a selector's text binds, to parenthesize it inside another's: an
# operand of ``|`` or ``&`` (or of ``~``) is parenthesized when it is itself a
# combination of another operator, so that texts read as the expression
# that builds them: ``ndim_at_least(2) & ~('**/bias' | '**/scale')``.
_ATOM = ""


class Selector:
  """A callable selector ``(path, leaf) -> bool`` with a readable name.

  Selectors made by :func:`ndim_at_most`, :func:`any_of`, ... are
  ``Selector``\\ s; they combine with ``|`` (any of), ``&`` (all of) and ``~``
  (not), also with glob strings and regexes on the other side. ``leaf`` is a
  ``jax.ShapeDtypeStruct`` (or anything with ``shape``, ``ndim`` and
  ``dtype``).

  A combination is named by the expression that builds it, with ``|``,
  ``&`` and ``~`` (``ndim_at_least(2) & ~('**/bias' | '**/scale')``), in
  :func:`layerwise.describe`'s table and in error messages. To give any
  selector a shorter name, wrap it: ``lw.Selector(selector, "matrices")``
  (a ``Selector`` is itself a function ``(path, leaf) -> bool``), as
  :data:`layerwise.NO_DECAY` is named ``lw.NO_DECAY``.

  Args:
    fn: the predicate ``(path: str, leaf) -> bool``.
    text: how the selector is shown in tables and error messages.

  Examples:
    >>> import jax
    >>> import layerwise as lw
    >>> is_vector = lw.Selector(lambda path, leaf: leaf.ndim == 1, "vector")
    >>> sel = is_vector & ~lw.any_of("head/**", "**/scale")
    >>> sel
    vector & ~('head/**' | '**/scale')
    >>> lw.Selector(sel, "vectors but the head's and scales")
    vectors but the head's and scales
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
    _validate.check_arity(fn, 2, lambda: (
        f"Selector {text!r}: its function cannot be called as fn(path, "
        "leaf); a selector's function takes the path (a str) and the leaf "
        "(a jax.ShapeDtypeStruct) and returns a bool."))
    self._fn = fn
    self.text = text
    self._op = _ATOM  # "|" or "&" for the texts of any_of and all_of
    # Set by of_paths: what resolution may know without calling fn.
    self.paths: frozenset[str] | None = None
    self.everything = False

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


def trusted(fn: Callable[[str, Any], bool], text: str) -> Selector:
  """A :class:`Selector` of the library's own, whose function needs no
  signature check (reading a signature costs 40 us, and rule sets built from
  a 50,000-leaf model make thousands of selectors)."""
  selector = Selector.__new__(Selector)
  selector._fn = fn  # pylint: disable=protected-access
  selector.text = text
  selector._op = _ATOM  # pylint: disable=protected-access
  selector.paths = None
  selector.everything = False
  return selector


def _operand(c: Compiled, op: str) -> str:
  inner = getattr(c.source, "_op", _ATOM)
  return f"({c.text})" if inner not in (_ATOM, op) else c.text


def _combine(name: str, op: str, selectors: Sequence[SelectorLike],
             reduce: Callable[[Any], bool]) -> Selector:
  if not selectors:
    raise ValueError(f"{name}() needs at least one selector.")
  compiled = [compile_selector(s) for s in selectors]
  if len(compiled) == 1:  # any_of(x) is x, and reads so
    op = getattr(compiled[0].source, "_op", _ATOM)
    text = compiled[0].text
  else:
    text = f" {op} ".join(_operand(c, op) for c in compiled)
  selector = trusted(
      lambda path, leaf: reduce(c.match(path, leaf) for c in compiled), text)
  selector._op = op  # pylint: disable=protected-access
  return selector


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
  return _combine("any_of", "|", selectors, any)


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
  return _combine("all_of", "&", selectors, all)


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
  text = c.text if getattr(c.source, "_op", _ATOM) == _ATOM else f"({c.text})"
  return trusted(lambda path, leaf: not c.match(path, leaf), f"~{text}")


def of_paths(paths: Iterable[str] | None, text: str) -> Selector:
  """A selector of the leaves whose path is one of ``paths`` (of every leaf
  for ``None``), named ``text``: the selectors of rule sets computed from a
  model (:func:`layerwise.layer_decay`, :func:`layerwise.mup_scales`)."""
  if paths is None:
    selector = trusted(lambda path, leaf: True, text)
    selector.everything = True
    return selector
  members = frozenset(paths)
  selector = trusted(lambda path, leaf: path in members, text)
  selector.paths = members
  return selector


def _check_ndim(name: str, k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"lw.{name}(k) needs a non-negative int k, got {k!r}.")
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
  return trusted(lambda path, leaf: len(leaf.shape) <= k,
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
  return trusted(lambda path, leaf: len(leaf.shape) >= k,
                  f"ndim_at_least({k})")
