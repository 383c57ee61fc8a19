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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from layerwise import _diagnostics
from layerwise._types import PyTree, Stacks

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


def paths(tree: PyTree, *, stacks: Stacks = None) -> PyTree:
  """Returns a tree like ``tree`` whose leaves are the leaves' path strings.

  The path of a leaf is its ``jax.tree_util`` key path joined with ``'/'``:
  dictionary keys and attribute names as written, sequence indices as numbers.
  Flax's metadata boxes are transparent (an ``nnx.State`` from
  ``nnx.state(model, nnx.Param)`` is named like the linen dict of the same
  model) and a linen variables dict holding only ``{"params": ...}`` is named
  as its content. ``None`` and ``optax.MaskedNode`` are empty subtrees: they
  stay where they are and get no path.

  These are the strings that rule selectors are matched against.

  A *stacked* leaf (a scanned model's ``layers/attn/kernel`` of shape
  ``(L, D, D)``) is seen as L layer leaves, named with the layer index
  after the stack's path (``layers/3/attn/kernel``), each of the shape
  without the layer axis; its entry here is the tuple of their paths.

  Args:
    tree: any pytree of parameters (or of updates, or of
      ``jax.ShapeDtypeStruct``).
    stacks: which subtrees are stacked, and on which axis: a mapping
      ``{stack_path: layer_axis}`` (``{"encoder/layers": 0}``; MaxText's
      layer axis is 1), or the name of the axis in the model's Flax
      metadata that marks it (linen ``nn.Partitioned`` names, NNX
      ``sharding_names``); ``None``, the default, looks for ``"layers"``
      there, and ``{}`` stacks nothing. Every rule-driven function of
      layerwise takes the same argument.

  Returns:
    A pytree with the structure of ``tree`` (flattened through metadata
    boxes) whose leaves are strings (tuples of strings for stacked leaves).

  Raises:
    ValueError, TypeError: for a ``stacks`` that names no subtree, has an
      axis out of range, or whose leaves hold different numbers of layers.

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

    Three layers stacked on axis 0:

    >>> lw.paths({"layers": {"w": jnp.ones((3, 4, 4))}},
    ...          stacks={"layers": 0})
    {'layers': {'w': ('layers/0/w', 'layers/1/w', 'layers/2/w')}}
  """
  path_strs, leaves, treedef = flatten_with_paths(tree)
  key = normalize_stacks("lw.paths", stacks)
  if key == ("declared", ()):
    return jax.tree_util.tree_unflatten(treedef, path_strs)
  specs = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.float32))
           for x in leaves]
  layer_paths, _, layers = layer_view("lw.paths", tree, path_strs, specs, key)
  if layers is None:
    return jax.tree_util.tree_unflatten(treedef, path_strs)
  return jax.tree_util.tree_unflatten(treedef, [
      p if a is None else tuple(layer_paths[k] for k in layers.span(j))
      for j, (p, a) in enumerate(zip(path_strs, layers.axes))])


# ------------------------------------------------------------------ stacks
#
# A stacked (scanned) parameter holds L layers in one array with a layer
# axis. The rule language sees it as L *layer leaves*, named with the layer
# index as a segment after the stack's path, each with the shape without the
# layer axis (DESIGN.md, idea 8). Everything here is static: it is decided
# from paths, shapes and Flax's axis metadata, never from values.

#: The metadata axis name that marks a stacked layer axis, by default.
LAYER_AXIS_NAME = "layers"

class Layers(NamedTuple):
  """How the leaves of one tree are seen as layer leaves (static, hashable).

  Attributes:
    leaf_paths: each real leaf's path, in flattening order.
    leaf_shapes: each real leaf's shape.
    axes: each real leaf's layer axis, ``None`` for a leaf in no stack.
    starts: for each real leaf, the index of its first layer leaf; one more
      entry at the end (the number of layer leaves), so that leaf ``j`` has
      the layer leaves ``starts[j]:starts[j + 1]``.
    roots: each stack as ``(path, axis, length)``, in the order declared
      (or found).
  """
  leaf_paths: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  axes: tuple[int | None, ...]
  starts: tuple[int, ...]
  roots: tuple[tuple[str, int, int], ...]

  def span(self, j: int) -> range:
    """The layer leaves of real leaf ``j``."""
    return range(self.starts[j], self.starts[j + 1])

  def owners(self) -> tuple[int, ...]:
    """For each layer leaf, the real leaf it is part of."""
    return tuple(j for j in range(len(self.axes)) for _ in self.span(j))


def normalize_stacks(fn: str, stacks: Stacks) -> tuple[Any, ...]:
  """``stacks`` as a hashable key: ``("detect", name)`` for a metadata axis
  name (``None`` is the default name, ``"layers"``), ``("declared", ((path,
  axis), ...))`` for a mapping (``{}``: no stacks, no detection)."""
  if stacks is None:
    return ("detect", LAYER_AXIS_NAME)
  if isinstance(stacks, str):
    if not stacks:
      raise ValueError(
          f"{fn}: stacks='' names no metadata axis. Give the axis name that "
          "marks the layer axis in the model's metadata (stacks='layers'), "
          "a mapping {stack_path: layer_axis}, or stacks={} for none.")
    return ("detect", stacks)
  if not isinstance(stacks, Mapping):
    raise TypeError(
        f"{fn}: stacks must be a mapping {{stack_path: layer_axis}} (e.g. "
        "{'encoder/layers': 0}), the metadata axis name that marks the layer "
        f"axis (a str), or None; got {type(stacks).__name__}: {stacks!r}.")
  items = []
  for path, axis in stacks.items():
    if not isinstance(path, str):
      raise TypeError(
          f"{fn}: a stack is named by its subtree's path, a str "
          f"('encoder/layers'), not {type(path).__name__} {path!r}.")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
      raise TypeError(
          f"{fn}: the layer axis of stack {path!r} must be an int (0 for "
          f"(L, ...) leaves, 1 for (d, L, ...)), got "
          f"{type(axis).__name__} {axis!r}.")
    items.append((path.strip(_SEP), int(axis)))
  for a, _ in items:
    for b, _ in items:
      if a != b and (a == "" or b.startswith(a + _SEP)):
        raise ValueError(
            f"{fn}: stack {b!r} is inside stack {a!r}; a stacked subtree "
            "cannot hold another. Declare one of them.")
  return ("declared", tuple(items))


def is_under(path: str, root: str) -> bool:
  """Whether ``path`` is ``root`` or a path under it (all are under ``""``)."""
  return root == "" or path == root or path.startswith(root + _SEP)


def layer_path(root: str, index: int, path: str) -> str:
  """The path of layer ``index`` of the leaf at ``path`` in stack ``root``."""
  rest = path[len(root):].lstrip(_SEP) if root else path
  head = f"{root}{_SEP}{index}" if root else str(index)
  return f"{head}{_SEP}{rest}" if rest else head


def _axis_names(node: Any) -> tuple[Any, ...] | None:
  """The axis names a Flax box gives its array (linen ``Partitioned.names``,
  an NNX Variable's sharding names), or ``None``."""
  names = getattr(node, "names", None)
  if isinstance(names, tuple):
    return names
  get = getattr(node, "get_metadata", None)
  meta = get() if callable(get) else getattr(node, "__dict__", {})
  if not isinstance(meta, Mapping):
    return None
  for key in ("sharding_names", "out_sharding", "sharding"):
    value = meta.get(key)
    if isinstance(value, tuple):
      return value
  return None


def _marks(tree: Any, paths: Sequence[str]) -> dict[str, tuple[Any, ...]]:
  """The axis names Flax's metadata gives each leaf that has some:
  ``{path: names}``."""
  boxes = box_types()
  if not boxes:
    return {}
  marks: dict[str, tuple[Any, ...]] = {}
  outer = jax.tree_util.tree_flatten(
      tree, is_leaf=lambda x: isinstance(x, boxes))[0]
  i = 0
  for node in outer:
    n = len(jax.tree_util.tree_leaves(node)) if isinstance(node, boxes) else 1
    if isinstance(node, boxes) and n == 1:
      names = _axis_names(node)
      if names is not None:
        marks[paths[i]] = names
    i += n
  return marks


def _detected(tree: Any, name: str, paths: Sequence[str]) -> dict[str, int]:
  """The leaves whose Flax metadata names ``name`` as one of their axes:
  ``{path: axis}``."""
  return {p: names.index(name)
          for p, names in _marks(tree, paths).items() if name in names}


def _parent(path: str) -> str | None:
  return None if path == "" else (path.rsplit(_SEP, 1)[0]
                                  if _SEP in path else "")


def _found_stacks(fn: str, name: str, found: dict[str, int],
                  paths: Sequence[str],
                  shapes: Sequence[tuple[int, ...]],
                  unstacked: frozenset[str] = frozenset()
                  ) -> list[tuple[str, int]]:
  """Stacks from the leaves Flax's metadata marks (``found``): the deepest
  subtree holding every marked leaf of one (axis, length), widened to its
  ancestors while they add leaves that have that length on that axis (the
  scanned module's unmarked biases, say) and none that the metadata
  declares unstacked (``unstacked``: leaves whose axis names leave out
  ``name``; an embedding of shape ``(L, D)`` is not a layer of the stack
  beside it)."""
  shape_of = dict(zip(paths, shapes))
  kinds: dict[tuple[int, int], list[str]] = {}
  for p, axis in found.items():
    kinds.setdefault((axis, shape_of[p][axis]), []).append(p)
  out = []
  for (axis, length), marked in kinds.items():
    segs = [p.split(_SEP) for p in marked]
    common = []
    for parts in zip(*segs):
      if len(set(parts)) != 1:
        break
      common.append(parts[0])
    root = _SEP.join(common)

    def fits(p: str, axis: int = axis, length: int = length) -> bool:
      s = shape_of[p]
      return len(s) > axis and s[axis] == length

    inside = [p for p in paths if is_under(p, root)]
    if not all(fits(p) for p in inside):
      odd = [p for p in inside if not fits(p)]
      raise ValueError(
          f"{fn}: the model's metadata marks {len(marked)} parameter(s) as "
          f"stacked on a {name!r} axis of length {length} "
          f"({_diagnostics.few(marked)}), but the subtree holding them, "
          f"{root or '(the whole tree)'!r}, also has {_diagnostics.few(odd)}, "
          f"without that axis: layerwise cannot tell which subtree is the "
          f"stack. Declare it: stacks={{'<stack path>': {axis}}}.")
    while True:
      up = _parent(root)
      if up is None:
        break
      wider = [p for p in paths if is_under(p, up)]
      if (len(wider) == len(inside) or not all(fits(p) for p in wider)
          or any(p in unstacked for p in wider)):
        break
      root, inside = up, wider
    out.append((root, axis))
  return out


def layer_view(fn: str, tree: Any, paths: Sequence[str],
               specs: Sequence[Any], stacks: tuple[Any, ...]
               ) -> tuple[list[str], list[Any], Layers | None]:
  """The layer leaves of a tree: their paths and shape/dtype specs, and the
  :class:`Layers` that maps them to the real leaves (``None``, and the
  leaves' own paths and specs, when nothing is stacked).

  ``stacks`` is a :func:`normalize_stacks` key; ``tree`` is only read for
  Flax's axis metadata (``("detect", name)``).
  """
  kind, arg = stacks
  shapes = [tuple(s.shape) for s in specs]
  if kind == "detect":
    marks = _marks(tree, paths)
    found = {p: names.index(arg) for p, names in marks.items()
             if arg in names}
    if not found:
      return list(paths), list(specs), None
    declared = _found_stacks(
        fn, arg, found, paths, shapes,
        frozenset(p for p in marks if p not in found))
  else:
    declared = list(arg)
    if not declared:
      return list(paths), list(specs), None
  axes: list[int | None] = [None] * len(paths)
  owner: dict[int, str] = {}  # each stacked leaf's stack
  roots = []
  for root, axis in declared:
    members = [j for j, p in enumerate(paths) if is_under(p, root)]
    if not members:
      near = _diagnostics.close(root, [a[:-3] for a in
                                       _diagnostics.path_candidates(paths)
                                       if a.endswith("/**")] + list(paths))
      raise ValueError(
          f"{fn}: stack {root!r} names no subtree of the params"
          + (f" (closest: {_diagnostics.few(near)})" if near else "")
          + ". A stack is the path of the subtree whose leaves hold the "
          "layers ('encoder/layers'; lw.paths(params, stacks={}) lists the "
          "paths).")
    lengths: dict[int, list[str]] = {}
    for j in members:
      shape = shapes[j]
      if not -len(shape) <= axis < len(shape) or not shape:
        raise ValueError(
            f"{fn}: stack {root!r} has layer axis {axis}, but its leaf "
            f"{paths[j]!r} has shape {shape} ({len(shape)} axes): every leaf "
            "of a stack holds its layers on the layer axis. Give the axis "
            "the layers are on, or a stack path that leaves this leaf out.")
      a = axis % len(shape)
      axes[j] = a
      owner[j] = root
      lengths.setdefault(shape[a], []).append(paths[j])
    if len(lengths) > 1:
      parts = "; ".join(f"{n}: {_diagnostics.few(ps, 3)}"
                        for n, ps in sorted(lengths.items()))
      raise ValueError(
          f"{fn}: the leaves of stack {root!r} have different lengths on "
          f"layer axis {axis} ({parts}): a stack's leaves all hold the same "
          "number of layers. Check the axis (MaxText's is 1), or declare "
          "the stack's subtrees separately.")
    roots.append((root, axis, next(iter(lengths))))
  layer_paths: list[str] = []
  layer_specs: list[Any] = []
  starts = []
  for j, (p, spec) in enumerate(zip(paths, specs)):
    starts.append(len(layer_paths))
    layer_axis = axes[j]
    if layer_axis is None:
      layer_paths.append(p)
      layer_specs.append(spec)
      continue
    shape = shapes[j][:layer_axis] + shapes[j][layer_axis + 1:]
    one = jax.ShapeDtypeStruct(shape, spec.dtype)
    for index in range(shapes[j][layer_axis]):
      layer_paths.append(layer_path(owner[j], index, p))
      layer_specs.append(one)
  starts.append(len(layer_paths))
  return layer_paths, layer_specs, Layers(
      tuple(paths), tuple(shapes), tuple(axes), tuple(starts), tuple(roots))
