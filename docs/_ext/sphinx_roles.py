"""Griffe extension: renders the docstrings' reStructuredText bits as Markdown.

layerwise's docstrings are Google style, checked by doctest, and written with
a few reStructuredText habits (as optax's): ``double backticks``, roles such
as :func:`describe` or :class:`~layerwise.Selector`, and literal blocks
introduced by ``::``. mkdocstrings renders docstrings as Markdown, so this
extension rewrites, before rendering:

* a role naming an object that ``docs/api.md`` documents (``::: layerwise.X``)
  into a cross-reference to its entry, any other role into inline code (so a
  name without an entry never becomes a broken link, which ``--strict``
  would reject);
* ``text::`` followed by an indented block into ``text:`` and a fenced
  Python block;
* a hyperlink ```Title <https://...>`_`` into ``[Title](https://...)``;
* ``\\ `` after inline code (reST's "no space here") into nothing;

and gives a module attribute documented by ``#:`` comments above it (as
Sphinx reads them, e.g. ``NO_DECAY``) those comments as its docstring.

The docstrings themselves stay as they are: ``help()`` and doctest read them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_API = Path(__file__).resolve().parent.parent / "api.md"
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
_DOCUMENTED = re.compile(r"^:::\s+(\S+)", re.MULTILINE)
_LINK = re.compile(r"(?<!`)`([^`<]+?)\s*<(https?://[^>\s]+)>`_", re.DOTALL)


def _documented() -> set[str]:
  return set(_DOCUMENTED.findall(_API.read_text(encoding="utf-8")))


def _role(match: re.Match[str], documented: set[str]) -> str:
  tilde, target = match.groups()
  name = target.rsplit(".", 1)[-1]
  shown = name if tilde else target
  # ``layerwise.partition`` is both a module and, re-exported, a function.
  for candidate in (f"{target}.{name}", target, f"layerwise.{name}"):
    if candidate in documented:
      return f"[`{shown}`][{candidate}]"
  return f"`{shown}`"


def _literal_blocks(text: str) -> str:
  """``para::`` + blank line + indented block -> ``para:`` + fenced block."""
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if (line.rstrip().endswith("::") and i + 2 < len(lines)
        and not lines[i + 1].strip() and lines[i + 2].strip()):
      indent = len(line) - len(line.lstrip())
      block_indent = len(lines[i + 2]) - len(lines[i + 2].lstrip())
      if block_indent > indent:
        out += [line.rstrip()[:-1], "", " " * indent + "```python"]
        i += 2
        while i < len(lines) and (not lines[i].strip() or (
            len(lines[i]) - len(lines[i].lstrip()) >= block_indent)):
          out.append(" " * indent + lines[i][block_indent:])
          i += 1
        while not out[-1].strip():
          out.pop()
        out += [" " * indent + "```", ""]
        continue
    out.append(line)
    i += 1
  return "\n".join(out)


def _comment_docstring(obj: griffe.Object) -> str | None:
  """The ``#:`` comment lines right above an attribute, without ``#:``."""
  if obj.filepath is None or not obj.lineno or isinstance(obj.filepath, list):
    return None
  lines = Path(obj.filepath).read_text(encoding="utf-8").splitlines()
  comment: list[str] = []
  i = obj.lineno - 2
  while i >= 0 and lines[i].lstrip().startswith("#:"):
    comment.insert(0, lines[i].lstrip()[2:].removeprefix(" "))
    i -= 1
  return "\n".join(comment) or None


class SphinxRoles(griffe.Extension):
  """Rewrites each docstring once, when its object is created."""

  def __init__(self) -> None:
    super().__init__()
    self._names = _documented()

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is None and obj.is_attribute:
      text = _comment_docstring(obj)
      if text is not None:
        obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj,
                                         parser="google")
    docstring = obj.docstring
    if docstring is None:
      return
    text = _ROLE.sub(lambda m: _role(m, self._names), docstring.value)
    text = _LINK.sub(lambda m: f"[{' '.join(m[1].split())}]({m[2]})", text)
    text = _literal_blocks(text).replace("`\\ ", "`")
    docstring.value = text
