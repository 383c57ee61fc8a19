"""Parameter paths: every leaf of a pytree named by a '/'-joined string.

A path is built from the ``jax.tree_util`` key path of a leaf: dictionary keys
and attribute names as written, sequence indices as numbers. So a Flax linen
``params`` dict, a ``FrozenDict``, an NNX ``State``, a list of layers, a
NamedTuple or a registered dataclass all name their leaves alike
(``encoder/layers/3/attn/kernel``).

Two conventions make one rule set work across Flax's containers:

* metadata boxes (NNX ``Variable``\\ s inside an ``nnx.State``, linen
  ``nn.Partitioned`` from ``nn.with_partitioning``) are transparent: the
  ``value`` attribute they add to the key path is dropped;
* a linen variables dict whose only collection is ``params``
  (``{"params": {...}}``) is named as its content, so rules written for
  ``variables["params"]`` also fit ``variables``.

``None`` leaves and ``optax.MaskedNode`` are empty subtrees in JAX and are
therefore neither named nor matched.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax

from layerwise._types import PyTree

__all__ = ["paths", "flatten_with_paths"]

_SEP = "/"


_BOXES: tuple[type, ...] | None = None


def box_types() -> tuple[type, ...]:
  """Flax's metadata box types, once Flax is imported (never imports it)."""
  global _BOXES
  if _BOXES is not None:
    return _BOXES
  if "flax" not in sys.modules:
    return ()
  types: list[type] = []
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel

    types.append(nnx.Variable)
    # flax < 0.11 has a separate VariableState; newer releases keep a
    # deprecated alias that warns on attribute access, so look in the dict.
    if isinstance(vars(nnx).get("VariableState"), type):
      types.append(vars(nnx)["VariableState"])
  except ImportError:  # pragma: no cover - flax without nnx
    pass
  try:
    from flax.core import meta  # pylint: disable=import-outside-toplevel

    types.append(meta.AxisMetadata)
  except ImportError:  # pragma: no cover
    pass
  _BOXES = tuple(types)
  return _BOXES


def unbox(tree: Any) -> Any:
  """``tree`` with every Flax metadata box replaced by the value it holds.

  ``nnx.Optimizer`` keeps its optax state in ``Variable``\\ s (``OptArray``,
  ``OptVariable``), and a state initialised from an ``nnx.State`` holds its
  per-parameter leaves in ``Param`` boxes; unboxed, both are the plain optax
  state. A box that is a pytree node (flax >= 0.11, ``VariableState``, linen
  ``Partitioned``) holds its value as its one child; older ``nnx.Variable``\\ s
  are pytree leaves and hold it as ``value``.
  """
  boxes = box_types()
  if not boxes:
    return tree

  def content(node: Any) -> Any:
    if not isinstance(node, boxes):
      return node
    children = jax.tree_util.tree_flatten(node,
                                          is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0] is not node:
      return children[0]
    # A box that is a pytree leaf, or one that holds a tree.
    get_value = getattr(type(node), "get_value", None)
    return get_value(node) if get_value is not None else getattr(node, "value")

  return jax.tree_util.tree_map(content, tree,
                                is_leaf=lambda x: isinstance(x, boxes))


def _key_str(key: Any) -> str:
  """One key-path entry as a path segment."""
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    return str(key.key)
  if isinstance(key, tu.GetAttrKey):
    return key.name
  if isinstance(key, tu.SequenceKey):
    return str(key.idx)
  if isinstance(key, tu.FlattenedIndexKey):
    return str(key.key)
  return str(key)  # custom key types: their own str


def _is_sole_params(tree: Any) -> bool:
  return isinstance(tree, Mapping) and len(tree) == 1 and "params" in tree


def flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (paths, leaves, treedef).

  ``leaves`` and ``treedef`` are exactly those of ``jax.tree_util.tree_flatten``
  (metadata boxes are flattened through), so ``treedef.unflatten(paths)`` is a
  tree of path strings with the structure of ``tree``.

  Examples:
    >>> import jax.numpy as jnp
    >>> flatten_with_paths({"b": [jnp.ones(2), None], "a": jnp.zeros(())})[0]
    ['a', 'b/0']
  """
  boxes = box_types()
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  key: Any = (treedef, len(boxes))
  try:
    cached = _PATHS.get(key)
  except TypeError:  # an unhashable node in the structure
    key, cached = None, None
  if cached is not None:
    return list(cached), leaves, treedef
  path_strs = _path_strings(tree, boxes, len(leaves))
  if key is not None:
    if len(_PATHS) >= _PATHS_SIZE:
      _PATHS.pop(next(iter(_PATHS)))
    _PATHS[key] = tuple(path_strs)
  return path_strs, leaves, treedef


# Paths by structure: a structure's paths are built once (a 50,000-leaf tree
# takes 0.4 s), then every rule set, transformation and read-out reuses them.
_PATHS: dict[Any, tuple[str, ...]] = {}
_PATHS_SIZE = 64


def _path_strings(tree: Any, boxes: tuple[type, ...], n: int) -> list[str]:
  if boxes:
    outer = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, boxes))[0]
    keypaths = []
    for keypath, node in outer:
      if isinstance(node, boxes):
        for inner, _ in jax.tree_util.tree_flatten_with_path(node)[0]:
          # A box names its content through an attribute ('value'); drop it.
          keypaths.append(tuple(keypath) + tuple(inner[1:]))
      else:
        keypaths.append(tuple(keypath))
  else:
    keypaths = [tuple(kp) for kp, _ in
                jax.tree_util.tree_flatten_with_path(tree)[0]]
  if len(keypaths) != n:  # pragma: no cover - defensive
    raise AssertionError("layerwise: key paths and leaves disagree; "
                         "please report this with the tree's type.")
  skip = 1 if _is_sole_params(tree) else 0
  return [_SEP.join(_key_str(k) for k in kp[skip:]) for kp in keypaths]


def paths(tree: PyTree) -> PyTree:
  """Returns a tree like ``tree`` whose leaves are the leaves' path strings.

  The path of a leaf is its ``jax.tree_util`` key path joined with ``'/'``:
  dictionary keys and attribute names as written, sequence indices as numbers.
  Flax's metadata boxes are transparent (an ``nnx.State`` from
  ``nnx.state(model, nnx.Param)`` is named like the linen dict of the same
  model) and a linen variables dict holding only ``{"params": ...}`` is named
  as its content. ``None`` and ``optax.MaskedNode`` are empty subtrees: they
  stay where they are and get no path.

  These are the strings that rule selectors are matched against.

  Args:
    tree: any pytree of parameters (or of updates, or of
      ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree with the structure of ``tree`` (flattened through metadata
    boxes) whose leaves are strings.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"encoder": {"layers": [{"kernel": jnp.ones((2, 2))}] * 2},
    ...           "head": {"bias": jnp.zeros(2), "unused": None}}
    >>> lw.paths(params)
    {'encoder': {'layers': [{'kernel': 'encoder/layers/0/kernel'},
    {'kernel': 'encoder/layers/1/kernel'}]}, 'head': {'bias': 'head/bias',
    'unused': None}}
    >>> lw.paths({"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}})
    {'params': {'Dense_0': {'kernel': 'Dense_0/kernel'}}}
  """
  path_strs, _, treedef = flatten_with_paths(tree)
  return jax.tree_util.tree_unflatten(treedef, path_strs)
