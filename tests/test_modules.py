"""The package's layout: each module keeps its private names to itself.

A name that starts with ``_`` belongs to its module. A module may import a
private *module* (``from layerwise import _core``) and use its public names
(``_core.ruled``), but never another module's private name
(``_core._hidden``, ``from layerwise.clipping import _ClipNorm``): what two
modules share is public in one of them, so it has one home.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "layerwise"
MODULES = sorted(PACKAGE.glob("*.py"))


def private_uses(path):
  """``(line, what)`` for every use of another module's private name."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  modules = set()  # local names bound to layerwise modules
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "layerwise" or node.module.startswith("layerwise.")):
      for alias in node.names:
        if node.module == "layerwise":
          modules.add(alias.asname or alias.name)
        elif alias.name.startswith("_"):
          found.append((node.lineno, f"from {node.module} import {alias.name}"))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      found.append((node.lineno, f"{node.value.id}.{node.attr}"))
  return found


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_no_module_uses_another_modules_private_names(path):
  assert not private_uses(path), (
      f"{path.name} uses private names of other modules: "
      f"{private_uses(path)}; make the name public in its module (modules "
      "starting with _ are private to the package, their names are not).")


def test_the_check_finds_a_private_use(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from layerwise import _core\n"
                 "from layerwise.clipping import _ClipNorm\n"
                 "x = _core._hidden\n")
  assert [what for _, what in private_uses(bad)] == [
      "from layerwise.clipping import _ClipNorm", "_core._hidden"]
