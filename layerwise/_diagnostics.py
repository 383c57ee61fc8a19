"""What layerwise says when a rule set does not fit a tree, and how it says it.

A rule set is checked against the tree it is resolved on: a leaf that no rule
matches, a selector that matches no leaf (a typo) and a rule that matches
leaves but never wins one (shadowed by earlier rules) are errors. Each error
lists the offending paths or rules, the closest selectors or paths, and what
to write instead. The helpers that every module's messages share (how a
selector or a value is named, how a long list is cut) live here too, so that
all messages read alike.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RuleError"]

# How many offending paths an error message lists before it says "and N more".
MAX_LISTED = 10


class RuleError(ValueError):
  """A rule set does not fit a tree: unmatched leaves, unused or shadowed rules.

  Attributes:
    unmatched: paths of the leaves that no rule matches.
    unused: texts of the selectors that match no leaf.
    shadowed: texts of the rules that match leaves but never win one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> try:
    ...   lw.resolve({"haed/**": 0.1, "**": 1.0}, {"head": {"w": jnp.ones(2)}})
    ... except lw.RuleError as e:
    ...   print(e.unused)
    ("'haed/**'",)
  """

  def __init__(self, message: str, unmatched: Sequence[str] = (),
               unused: Sequence[str] = (), shadowed: Sequence[str] = ()):
    super().__init__(message)
    self.unmatched = tuple(unmatched)
    self.unused = tuple(unused)
    self.shadowed = tuple(shadowed)


# A public name of the package: tracebacks and reprs say lw.RuleError's home.
RuleError.__module__ = "layerwise"

# ------------------------------------------------------------ naming things


def text_of(obj: Any) -> str:
  """How a selector, a schedule or a function is named in messages."""
  if isinstance(obj, str):
    return repr(obj)
  if isinstance(obj, re.Pattern):
    return f"re.compile({obj.pattern!r})"
  text = getattr(obj, "text", None)
  if isinstance(text, str):  # a Selector or a compiled selector
    return text
  name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
  return name if name else repr(obj)


def quote_all(items: Sequence[str]) -> str:
  """``'a', 'b'``: items quoted and joined."""
  return ", ".join(repr(s) for s in items)


def few(items: Sequence[str], n: int = 5, quote: bool = True) -> str:
  """The first ``n`` items, and how many more there are."""
  shown = ", ".join(repr(x) if quote else x for x in items[:n])
  return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def listed(lines: Sequence[str]) -> list[str]:
  """Indented lines for an error message, at most ``MAX_LISTED`` of them."""
  shown = [f"  {line}" for line in lines[:MAX_LISTED]]
  if len(lines) > MAX_LISTED:
    shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
  return shown


# ------------------------------------------------------------- suggestions


def close(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """The candidates most like ``word``, for "closest: ..." suggestions."""
  return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n,
                                   cutoff=0.5)


def path_candidates(paths: Sequence[str]) -> list[str]:
  """Real paths, and globs for their ancestors and leaf names: what a
  mistyped selector was probably meant to be."""
  out = []
  for p in paths:
    segs = p.split("/")
    out.append(p)
    out.extend("/".join(segs[:i]) + "/**" for i in range(1, len(segs)))
    out.append("**/" + segs[-1])
  return out


def closest_selectors(path: str, patterns: Sequence[str],
                      n: int = 2) -> list[str]:
  """Selector patterns most like ``path`` or one of its ancestor globs."""
  candidates = path_candidates([path])
  scored = []
  for pat in dict.fromkeys(patterns):
    score = max(difflib.SequenceMatcher(None, pat, c).ratio()
                for c in candidates)
    if score >= 0.6:
      scored.append((-score, pat))
  return [pat for _, pat in sorted(scored)[:n]]


def no_match_hint(selector_text: str, pattern: str,
                  paths: Sequence[str]) -> str:
  """`` (closest: 'a', 'b')`` for a selector that matches nothing, or ''."""
  near = close(pattern, path_candidates(paths))
  return f" (closest: {quote_all(near)})" if near else ""


def past_last_layer(pattern: str,
                    stacks: Sequence[tuple[str, int, int]]) -> str:
  """``; stack 'layers' has 12 layers (0..11)`` for a glob that names a
  layer index past the end of a stack (``layers/12/**``), or ''."""
  segs = pattern.strip("/").split("/")
  for root, _, length in stacks:
    parts = root.split("/") if root else []
    for i, seg in enumerate(segs):
      if not seg.isdigit() or int(seg) < length or i < len(parts):
        continue
      before = segs[i - len(parts):i]
      if (all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, before))
          and (i == len(parts) or "**" in segs[:i - len(parts)])):
        return (f"; stack {root!r} has {length} layer"
                f"{'' if length == 1 else 's'} (0..{length - 1})")
  return ""


def rules_hint(rules: Any, what: str) -> str:
  """What to write instead of ``rules``, which is not a rule set."""
  if isinstance(rules, (str, re.Pattern)) or callable(rules):
    return (f" Give the selector its {what}: {{{text_of(rules)}: <{what}>}}"
            " (and a catch-all '**' rule for the rest).")
  if isinstance(rules, (set, frozenset)):
    return (f" A set has neither {what}s nor an order: write a dict "
            f"{{selector: {what}, ...}}, first match first.")
  if isinstance(rules, (int, float, np.number)) and not isinstance(rules,
                                                                  bool):
    return f" For one {what} everywhere, write {{'**': {rules!r}}}."
  return ""


# ------------------------------------------------------- rule-set checks


def _defensive(selectors: Sequence[Any], r: int) -> bool:
  """Whether rule ``r`` is a defensive final catch-all, which may take no
  leaf: the last rule, a pure catch-all (``"**"``, ``re.compile(".*")``),
  after no other catch-all (a second catch-all is dead code)."""
  return (r == len(selectors) - 1 and selectors[r].catch_all
          and not any(c.catch_all for c in selectors[:r]))


def check_match(selectors: Sequence[Any], paths: Sequence[str],
                winner: Sequence[int], losing: Mapping[int, Sequence[int]],
                *, has_default: bool, what: str,
                unmatched: Sequence[str] | None = None,
                stacks: Sequence[tuple[str, int, int]] = ()) -> None:
  """Raises :class:`RuleError` for unmatched leaves (without a default),
  unused selectors and shadowed rules, all sections at once. A final
  catch-all that every leaf's earlier rule leaves nothing to is not
  shadowed: ending a rule set with ``"**"`` is defensive, not a typo.

  ``selectors`` are compiled selectors (``text``, ``pattern``, ``source``,
  ``is_text``); ``winner[i]`` is the rule leaf ``i`` took (-1: none) and
  ``losing[r]``, for each rule ``r`` that took no leaf, the leaves it
  matches. ``unmatched``, when given, are the leaves that need a rule and
  have none, instead of every leaf of ``paths`` that has none (a rule set
  resolved on part of a model is checked against all of it, but only the
  part needs rules). ``stacks``, the stacks as ``(path, axis, length)``,
  let an unused glob that indexes past a stack's last layer say so.
  """
  sections: list[str] = []
  if unmatched is None:
    unmatched = ([] if has_default else
                 [p for p, r in zip(paths, winner) if r < 0])
  unmatched = list(unmatched)
  unused = sorted(r for r, leaves in losing.items() if not leaves)
  shadowed = sorted(r for r, leaves in losing.items()
                    if leaves and not _defensive(selectors, r))
  matches = losing

  if unmatched:
    patterns = [c.pattern for c in selectors if c.is_text]
    lines = []
    for p in unmatched[:MAX_LISTED]:
      near = closest_selectors(p, patterns)
      lines.append(f"{p!r}" + (f"  (closest selector: {quote_all(near)})"
                                if near else ""))
    sections.append(
        f"{len(unmatched)} parameter(s) match no rule:\n"
        + "\n".join(listed(lines + unmatched[MAX_LISTED:]))
        + "\nAdd rules for them, end the rule set with a catch-all '**', "
        f"or pass default=<{what}>.")

  if unused:
    candidates = path_candidates(paths)
    lines = []
    for r in unused:
      c = selectors[r]
      near = []
      if isinstance(c.source, str):
        near = close(c.pattern, candidates)
      elif isinstance(c.source, re.Pattern):
        near = close(c.pattern, paths)
      lines.append(f"rule {r}: {c.text}" + (
          f"  (closest: {quote_all(near)})" if near else "")
                   + (past_last_layer(c.pattern, stacks)
                      if isinstance(c.source, str) else ""))
    advice = ("\nFix the pattern (lw.paths(params) lists the real "
              "paths), remove the rule, or pass strict=False if the rule "
              "set is shared across models.")
    if not paths:
      advice = ("\nThe tree has no array leaves at all: pass the params (a "
                "pytree of arrays, such as variables['params'] or "
                "nnx.state(model, nnx.Param)), not None or an empty tree.")
    elif any(isinstance(selectors[r].source, re.Pattern) for r in unused):
      advice = ("\nA regex selector must match the whole path (as "
                "re.fullmatch does): write r'.*bias' or r'encoder/.*', "
                "not r'bias' or r'encoder'." + advice)
    sections.append(
        f"{len(unused)} selector(s) match no parameter (a typo?):\n"
        + "\n".join(listed(lines)) + advice)

  if shadowed:
    lines = []
    for r in shadowed:
      takers = sorted({winner[i] for i in matches[r]})
      lines.append(
          f"rule {r}: {selectors[r].text} never applies: all "
          f"{len(matches[r])} parameter(s) it matches are taken by "
          + ", ".join(f"rule {t} ({selectors[t].text})" for t in takers))
    sections.append(
        f"{len(shadowed)} rule(s) are shadowed by earlier rules:\n"
        + "\n".join(listed(lines))
        + "\nThe first matching rule wins: put more specific rules first, "
        "or remove the dead rule.")

  if sections:
    raise RuleError(
        "\n\n".join(sections),
        unmatched=unmatched,
        unused=[selectors[r].text for r in unused],
        shadowed=[selectors[r].text for r in shadowed])


# ------------------------------------------------ trees of another structure


def structure_error(fn: str, at_init: Sequence[str], paths: Sequence[str],
                    shapes_at_init: Sequence[tuple[int, ...]],
                    shapes: Sequence[tuple[int, ...]] | None = None
                    ) -> ValueError:
  """The error for updates that are not shaped like the params at init:
  it names the paths that are new, missing or reshaped."""
  paths, at_init = tuple(paths), tuple(at_init)
  before, now = set(at_init), set(paths)
  new = [p for p in paths if p not in before]
  missing = [p for p in at_init if p not in now]
  details = []
  if new:
    details.append(f"not in the params at init: {few(new)}")
  if missing:
    details.append(f"missing from the updates: {few(missing)}")
  if not details and paths != at_init:
    details.append("the same paths in another order (another container "
                   "type?)")
  if not details and shapes is not None:
    changed = [f"{p!r} has shape {s} now, {s0} at init"
               for p, s, s0 in zip(paths, shapes, shapes_at_init) if s != s0]
    details.append(few(changed, quote=False))
  return ValueError(
      f"{fn}: the updates do not have the structure of the params given "
      f"to init ({len(paths)} leaves now, {len(at_init)} at init; "
      + "; ".join(details) + "). Pass updates shaped like the params "
      "given to init, or call init again with the new params (a model "
      "whose parameters changed needs a new optimizer state).")


def other_tree_error(fn: str, ours: Sequence[str], theirs: Sequence[str],
                     what: str, cause: str) -> ValueError:
  """The error for params (``what``) of another structure than the
  updates: it names the paths only in one of them."""
  new = [p for p in theirs if p not in set(ours)]
  missing = [p for p in ours if p not in set(theirs)]
  details = "; ".join(
      [f"only in the {what}: {few(new)}"] * bool(new)
      + [f"only in the updates: {few(missing)}"] * bool(missing)) or cause
  return ValueError(
      f"{fn}: the {what} passed to update do not have the structure of "
      f"the updates ({details}). Pass the {what} the updates are for, "
      "the same tree as at init.")
