"""The documentation site's claims that code can check.

* Every ```python block of ``docs/recipes.md`` and ``docs/stacked.md`` runs
  as it stands (each block defines its own small model).
* Every public name (``layerwise.__all__``) has an entry in the API reference,
  ``docs/api.md``, so a new public function cannot ship undocumented. That
  the entries resolve, and that every link between pages works, is checked
  by ``mkdocs build --strict`` in ``.ci/run``.
"""

import pathlib
import re
import textwrap

import pytest

import layerwise as lw

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page):
  """``(id, first line number, code)`` of each ```python block."""
  lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
  blocks, heading, i = [], page, 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
    if line.strip() == "```python":
      start = i + 1
      end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
      # Dedented: a block inside a list item is indented with it.
      blocks.append((f"{heading} (line {start})", start,
                     textwrap.dedent("\n".join(lines[start:end]) + "\n")))
      i = end
    i += 1
  return blocks


def _flax_before(version):
  import flax  # pylint: disable=import-outside-toplevel
  return tuple(int(x) for x in flax.__version__.split(".")[:2]) < version


RECIPES = python_blocks("recipes.md")
STACKED = python_blocks("stacked.md")


def test_recipes_has_blocks():
  assert len(RECIPES) >= 8
  assert len(STACKED) >= 6


@pytest.mark.parametrize(
    "page, code, line",
    [pytest.param(page, code, line, id=f"{page}:{name}")
     for page, blocks in (("recipes.md", RECIPES), ("stacked.md", STACKED))
     for name, line, code in blocks])
def test_recipe_runs(page, code, line, capsys):
  if "nnx.Optimizer(" in code and _flax_before((0, 11)):
    pytest.skip("the block uses nnx.Optimizer's API of flax >= 0.11")
  # A fresh namespace per block: each recipe must stand on its own.
  stem = page.replace(".", "_")
  namespace = {"__name__": f"{stem}_line_{line}"}
  exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)  # pylint: disable=exec-used
  capsys.readouterr()


def test_every_public_name_is_in_the_api_reference():
  text = (DOCS / "api.md").read_text(encoding="utf-8")
  # `::: layerwise.X` entries and their indented options; a module's overview
  # (`members: false`) documents no name. `layerwise.partition` names the
  # module, so its function is `::: layerwise.partition.partition`.
  entries = re.findall(r"^:::[ \t]+(\S+)[ \t]*\n((?:[ \t]+\S.*\n)*)", text,
                       re.MULTILINE)
  documented = {ident.rsplit(".", 1)[-1] for ident, options in entries
                if "members: false" not in options}
  missing = sorted(set(lw.__all__) - documented)
  assert not missing, (
      f"public names without an entry in docs/api.md: {missing}; add "
      "'::: layerwise.NAME' under the section of its module.")
