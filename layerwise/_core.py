"""The one skeleton every ruled transformation is written on, and the state protocol.

A *ruled transformation* resolves a rule set against the params at ``init``
and keeps what it found, a :class:`Plan`, as static metadata in its state. At
every ``update`` the skeleton (:func:`ruled`) checks the updates against the
plan, once per tree structure, flattens the params like the updates, raises
the one "needs the params" error when they are missing, and hands the
transformation a :class:`Step`: the plan, the update leaves and the param
leaves, in the plan's order. A transformation only says what it does to the
leaves; nothing is matched under ``jit``.

Every layerwise state is a ``NamedTuple`` with a ``rules`` field holding its
plan, and answers one protocol, which :func:`layerwise.describe`,
:func:`layerwise.norms` and :func:`layerwise.set_scale` use instead of any
state's field names:

* ``live() -> {name: Live}``: the hyperparameters it holds as arrays, each a
  float32 vector with one entry per leaf or per group of the plan
  (``"scale"`` for the multipliers of :func:`layerwise.scale_by_rules`);
* ``replace_live(name, vector)``: the state with a new vector;
* ``measured() -> {name: vector}``: what the last update measured, one entry
  per group (the norms and scales of :func:`layerwise.clip_by_rules`);
* ``metrics() -> [(key, scalar)]``: the same, named for a metrics logger.
* ``notes() -> [str]``: what :func:`layerwise.describe` prints below its
  table about the state's cost (the extra state of a stack split between
  optimizer groups).

A state implements the methods it has values for; :func:`live_of`,
:func:`measured_of`, :func:`metrics_of` and :func:`notes_of` read any
state, giving nothing for a method it does not define.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from layerwise import _diagnostics, _hosts, _paths, _validate
from layerwise._resolve import Resolution, RuleSet, current_whole
from layerwise._selectors import SelectorLike, compile_selector
from layerwise._types import Stacks

__all__: list[str] = []

# ---------------------------------------------------------------- the plan


class Plan:
  """What a layerwise state knows about its rules: static pytree metadata.

  A plan is a pytree node with no children: it travels inside optimizer
  states (through ``jit``, ``jax.eval_shape``, checkpoints of the arrays)
  without being an array, so :func:`layerwise.describe` and
  :func:`layerwise.set_scale` can read which rule each leaf got from the
  state alone. It is never changed after it is made; jit compares it on
  every call, so its hash is computed once.

  Attributes:
    kind: what the rules set (``"scale"``, ``"clip"``, ...); the column name
      in ``describe``.
    paths: each leaf's path, in flattening order.
    shapes: each leaf's shape.
    dtypes: each leaf's dtype name.
    rule_texts: the selector each leaf matched, as shown to users
      (``"(default)"`` for the default).
    values: the value each leaf got, as given in the rules.
    groups: each leaf's group, an index into ``group_names`` (-1: in none),
      for transformations that act on groups of leaves (clipping, norms,
      optimizer groups); ``None`` for those that act leaf by leaf.
    group_names: the groups' names, in the order of the state's vectors.
    layout: the transformation's own static layout (for clipping, where
      each group's statistics are kept), hashable.
    layers: how the real leaves are seen as layer leaves when some are
      stacked (:class:`~layerwise._paths.Layers`), ``None`` otherwise.
      With stacks, ``paths``, ``shapes``, ``dtypes``, ``rule_texts``,
      ``values`` and ``groups`` are per *layer leaf* (the rule language's
      view, what ``describe`` and ``set_scale`` see), while a step's
      updates and params are the real leaves (``leaf_paths``,
      ``leaf_shapes``); :meth:`span` gives a real leaf's layer leaves.
  """

  __slots__ = ("kind", "paths", "shapes", "dtypes", "rule_texts", "values",
               "groups", "group_names", "layout", "layers", "leaf_paths",
               "leaf_shapes", "_hash", "_members", "_treedefs", "_holes")

  kind: str
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  rule_texts: tuple[str, ...]
  values: tuple[Any, ...]
  groups: tuple[int, ...] | None
  group_names: tuple[str, ...]
  layout: Any
  layers: _paths.Layers | None
  leaf_paths: tuple[str, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]

  def __init__(self, kind: str, paths: Sequence[str],
               shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
               rule_texts: Sequence[str], values: Sequence[Any],
               groups: Sequence[int] | None = None,
               group_names: Sequence[str] = (), layout: Any = (),
               layers: _paths.Layers | None = None):
    # Everything is computed here, once: a plan is never written to after.
    self.kind = kind
    self.paths = tuple(paths)
    self.shapes = tuple(tuple(s) for s in shapes)
    self.dtypes = tuple(dtypes)
    self.rule_texts = tuple(rule_texts)
    self.values = tuple(values)
    self.groups = None if groups is None else tuple(groups)
    self.group_names = tuple(group_names)
    self.layout = layout
    self.layers = layers
    if layers is None:
      self.leaf_paths, self.leaf_shapes = self.paths, self.shapes
    else:
      self.leaf_paths, self.leaf_shapes = layers.leaf_paths, layers.leaf_shapes
    members: list[list[int]] = [[] for _ in self.group_names]
    for i, g in enumerate(self.groups or ()):
      if g >= 0:
        members[g].append(i)
    self._members = tuple(tuple(m) for m in members)
    # Values need not be hashable (hash what is); equality compares all.
    self._hash = hash((kind, self.paths, self.shapes, self.dtypes,
                       self.rule_texts, self.groups, self.group_names, layout,
                       layers))
    # The update structures already checked against the paths: a cache of
    # check_tree, not part of the plan's identity.
    self._treedefs: set[Any] = set()
    # The same for update trees with None for some leaves (check_holes).
    self._holes: dict[Any, Holes] = {}

  @classmethod
  def of(cls, kind: str, res: Resolution, *, values: Sequence[Any] | None = None,
         groups: Sequence[int] | None = None, group_names: Sequence[str] = (),
         layout: Any = ()) -> "Plan":
    """The plan of a resolution; ``values`` replaces the rules' values."""
    names: dict[Any, str] = {}  # str(dtype) costs 4 us: once per dtype
    return cls(kind, res.paths, [s.shape for s in res.specs],
               [names.get(s.dtype) or names.setdefault(s.dtype, str(s.dtype))
                for s in res.specs],
               [res.rule_text(i) for i in range(len(res.paths))],
               res.values if values is None else values, groups, group_names,
               layout, res.layers)

  def _key(self) -> tuple[Any, ...]:
    key = (self.kind, self.paths, self.shapes, self.dtypes, self.rule_texts,
           self.values, self.groups, self.group_names, self.layout)
    # A plan without stacks pickles as before stacks existed.
    return key if self.layers is None else key + (self.layers,)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    if self is other:
      return True
    if not isinstance(other, Plan):
      return NotImplemented
    return self._hash == other._hash and self._key() == other._key()

  def __reduce__(self) -> tuple[Any, ...]:
    return (Plan, self._key())

  def __repr__(self) -> str:
    return f"Plan({self.kind!r}, {len(self.paths)} leaves)"

  # Reading ---------------------------------------------------------------

  def specs(self) -> list[jax.ShapeDtypeStruct]:
    """Each leaf's shape and dtype."""
    return [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes,
                                                       self.dtypes)]

  def span(self, j: int) -> range:
    """The layer leaves of real leaf ``j`` (just ``j`` without stacks)."""
    return range(j, j + 1) if self.layers is None else self.layers.span(j)

  def axis(self, j: int) -> int | None:
    """Real leaf ``j``'s layer axis, ``None`` if it is in no stack."""
    return None if self.layers is None else self.layers.axes[j]

  def owners(self) -> tuple[int, ...]:
    """For each layer leaf, the real leaf it is part of."""
    return (tuple(range(len(self.paths))) if self.layers is None
            else self.layers.owners())

  def members(self, group: int) -> tuple[int, ...]:
    """The indices of the leaves in ``group``, in leaf order."""
    return self._members[group]

  def select(self, selector: SelectorLike) -> list[int]:
    """The indices of the leaves ``selector`` matches."""
    c = compile_selector(selector)
    return [i for i, (p, s) in enumerate(zip(self.paths, self.specs()))
            if c.match(p, s)]

  # Checking trees against the plan ---------------------------------------

  def check_tree(self, fn: str, tree: Any) -> tuple[list[Any], Any]:
    """``tree``'s leaves and treedef, after checking that its paths and
    shapes are those at init (paths are built once per treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return self._checked(fn, tree, leaves, treedef)

  def _checked(self, fn: str, tree: Any, leaves: list[Any],
               treedef: Any) -> tuple[list[Any], Any]:
    if treedef not in self._treedefs:
      paths = tuple(_paths.flatten_with_paths(tree)[0])
      if paths != self.leaf_paths:
        holes = _find_holes(self.leaf_paths, tree)
        if holes is not None:
          raise unskipped_error(fn, [self.leaf_paths[i]
                                     for i in holes.absent])
        raise _diagnostics.structure_error(fn, self.leaf_paths, paths,
                                           self.leaf_shapes)
      self._treedefs.add(treedef)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    if shapes != self.leaf_shapes:
      raise _diagnostics.structure_error(fn, self.leaf_paths, self.leaf_paths,
                                         self.leaf_shapes, shapes)
    return leaves, treedef

  def check_holes(self, fn: str, tree: Any) -> tuple[list[Any], Any, "Holes"]:
    """:meth:`check_tree` for a transformation that skips what is absent:
    ``tree`` may hold ``None`` (or ``optax.MaskedNode()``) in place of any
    of the leaves at init, or of a whole subtree of them.

    Returns:
      The leaves in the plan's order (``None`` where absent), the treedef
      of ``tree`` as given (whose ``unflatten`` takes the present leaves)
      and the :class:`Holes` found, all decided from the structure alone.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    holes = self._holes.get(treedef)
    if holes is None:
      if treedef not in self._treedefs:
        holes = _find_holes(self.leaf_paths, tree)
      if holes is None:  # no holes: every leaf, or a structure error
        return self._checked(fn, tree, leaves, treedef) + (NO_HOLES,)
      self._holes[treedef] = holes
    full: list[Any] = [None] * len(self.leaf_paths)
    for i, leaf in zip(holes.present, leaves):
      full[i] = leaf
    shapes = tuple(tuple(np.shape(full[i])) for i in holes.present)
    if shapes != tuple(self.leaf_shapes[i] for i in holes.present):
      now = list(self.leaf_shapes)
      for i in holes.present:
        now[i] = tuple(np.shape(full[i]))
      raise _diagnostics.structure_error(fn, self.leaf_paths, self.leaf_paths,
                                         self.leaf_shapes, now)
    return full, treedef, holes


jax.tree_util.register_pytree_node(Plan, lambda p: ((), p), lambda aux, _: aux)


def is_hole(node: Any) -> bool:
  """Whether ``node`` stands for absent leaves: ``None`` or an
  ``optax.MaskedNode()``."""
  return node is None or isinstance(node, optax.MaskedNode)


class _Hole:
  """A leaf that marks where ``tree`` had a hole, ``node`` (see
  :func:`_find_holes`)."""
  __slots__ = ("node",)

  def __init__(self, node: Any):
    self.node = node


class Holes(NamedTuple):
  """Where an update tree has ``None`` (or ``optax.MaskedNode()``) instead
  of leaves the params had at init: static, found from its structure.

  Attributes:
    present: the indices (in the plan's order) of the leaves it has.
    absent: the indices of those it lacks.
    treedef: its structure with each hole as one leaf, for flattening the
      params like it (a hole's leaf is the params' subtree there).
    slots: for each leaf of ``treedef``, the plan index it is, or -1 for a
      hole.
    covers: for each leaf of ``treedef``, the plan indices of the leaves
      it stands for (one for a leaf, those under its path for a hole).
    nodes: for each leaf of ``treedef``, the hole as given (``None`` or
      ``optax.MaskedNode()``; ``None`` for a leaf too).
    exact: for each leaf of ``treedef``, whether it is a hole in place of
      exactly one leaf at init (at that leaf's path), which the leaf itself
      can fill.
  """
  present: tuple[int, ...]
  absent: tuple[int, ...]
  treedef: Any
  slots: tuple[int, ...]
  covers: tuple[tuple[int, ...], ...] = ()
  nodes: tuple[Any, ...] = ()
  exact: tuple[bool, ...] = ()

  def rebuilt(self, out: Sequence[Any], under: Sequence[Any] | None) -> Any:
    """The update tree of ``out`` (one entry per leaf of the plan): each
    present leaf where it was, and each hole filled with ``out``'s values
    for its leaves when all of them are given (not ``None``) and the
    hole's structure is known (that of the params' subtree there,
    ``under``, or a hole in place of exactly one leaf); otherwise the hole
    as given."""
    slots = []
    for k, i in enumerate(self.slots):
      if i >= 0:
        slots.append(out[i])
        continue
      values = [out[j] for j in self.covers[k]]
      hole = self.nodes[k]
      if values and all(v is not None for v in values):
        if under is not None:
          structure: Any = jax.tree_util.tree_structure(under[k])
          if structure.num_leaves == len(values):
            hole = structure.unflatten(values)
        elif self.exact[k]:
          hole = values[0]
      slots.append(hole)
    return self.treedef.unflatten(slots)


#: An update tree with every leaf of the plan.
NO_HOLES = Holes((), (), None, ())


def unskipped_error(fn: str, absent: Sequence[str]) -> ValueError:
  """The error for updates with ``None`` for leaves, given to a
  transformation that does not skip them."""
  return ValueError(
      f"{fn}: the updates hold None (or optax.MaskedNode()) for "
      f"{len(absent)} parameter(s) ({_diagnostics.few(absent)}), and {fn} "
      "does not take parameters without gradients: lw.partition, "
      "lw.freeze, lw.scale_by_rules, lw.add_decayed_weights, "
      "lw.clip_by_rules, lw.track_norms and lw.map_updates do (the "
      "gradients of lw.grad, alternating updates). Put "
      f"{fn} inside the optimizer of each group (lw.partition({{...: "
      f"optax.chain({fn}(...), ...)}})) or inside lw.freeze, or give every "
      "parameter a gradient.")


def _find_holes(at_init: tuple[str, ...], tree: Any) -> Holes | None:
  """The holes of ``tree`` against the paths ``at_init``, or ``None`` when
  it differs from them otherwise (a leaf more, renamed, ...).

  Each hole, named by its path, covers the leaves at init under that path:
  a run of consecutive leaves, since a subtree flattens in one piece.
  """
  marked = jax.tree_util.tree_map(lambda x: _Hole(x) if is_hole(x) else x,
                                  tree, is_leaf=is_hole)
  paths, leaves, treedef = _paths.flatten_with_paths(marked)
  present: list[int] = []
  absent: list[int] = []
  slots: list[int] = []
  covers: list[tuple[int, ...]] = []
  nodes: list[Any] = []
  exact: list[bool] = []
  i = 0
  for path, leaf in zip(paths, leaves):
    if isinstance(leaf, _Hole):
      start = i
      while i < len(at_init) and _paths.is_under(at_init[i], path):
        absent.append(i)
        i += 1
      slots.append(-1)
      covers.append(tuple(range(start, i)))
      nodes.append(leaf.node)
      exact.append(i == start + 1 and at_init[start] == path)
    elif i < len(at_init) and at_init[i] == path:
      present.append(i)
      slots.append(i)
      covers.append((i,))
      nodes.append(None)
      exact.append(False)
      i += 1
    else:
      return None
  if i != len(at_init) or not absent:
    return None
  return Holes(tuple(present), tuple(absent), treedef, tuple(slots),
               tuple(covers), tuple(nodes), tuple(exact))


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
    raise _diagnostics.other_tree_error(fn, ours, theirs, what,
                                        str(e)) from None


def like_params(fn: str, name: str, tree: Any, res: Resolution,
                hint: str) -> list[Any]:
  """The leaves of ``tree``, a tree of arrays a user gives in the shape of
  the params (``toward=`` of :func:`layerwise.add_decayed_weights`), for
  the leaves of ``res`` in its order, ``None`` where ``tree`` has ``None``
  (or ``optax.MaskedNode()``) for the leaf or a subtree above it.

  Leaves are matched by path. Inside :func:`layerwise.partition` and
  :func:`layerwise.freeze`, whose inner transformations are given their
  group's leaves only, ``tree`` is of the whole model, as their rule sets
  are written for it. Its paths must be the model's, but for its ``None``
  subtrees, and each array must have its parameter's shape and dtype;
  ``hint`` says what to pass instead.
  """
  whole = current_whole()
  # The real leaves (a stacked leaf is one array here, as in the params).
  if res.layers is None:
    mine: tuple[str, ...] = res.paths
    my_specs: Sequence[Any] = res.specs
  else:
    mine = res.layers.leaf_paths
    my_specs = [jax.ShapeDtypeStruct(shape, res.specs[k].dtype)
                for shape, k in zip(res.layers.leaf_shapes,
                                    res.layers.starts)]
  paths, specs = ((whole.leaf_paths, whole.leaf_specs) if whole is not None
                  else (mine, my_specs))
  model = ("the whole model (inside lw.partition and lw.freeze, it is of the "
           "whole model they are given, as their rule sets are)"
           if whole is not None else "the params given to init")
  given, leaves, _ = _paths.flatten_with_paths(tree)
  if (whole is not None and res.layers is not None
      and tuple(given) != tuple(paths) and set(mine) <= set(given)):
    # The whole model's paths are of layer leaves; the tree's are real
    # leaves: check those this transformation reads.
    paths, specs = mine, my_specs
    keep = set(mine)
    given, leaves = ([p for p in given if p in keep],
                     [x for p, x in zip(given, leaves) if p in keep])
  if tuple(given) != tuple(paths) and _find_holes(paths, tree) is None:
    known, there = set(paths), set(given)
    new = [p for p in given if p not in known]
    lacking = [p for p in paths if p not in there]
    details = "; ".join(
        [f"only in {name}: {_diagnostics.few(new)}"] * bool(new)
        + [f"missing from {name}: {_diagnostics.few(lacking)}"] * bool(lacking)
    ) or "the same paths in another order (another container type?)"
    raise ValueError(
        f"{fn}: {name} does not have the structure of {model} ({details}). "
        f"{hint}")
  spec_of = dict(zip(paths, specs))
  for path, leaf in zip(given, leaves):
    spec = spec_of[path]
    if tuple(np.shape(leaf)) != tuple(spec.shape):
      raise ValueError(
          f"{fn}: {name} {path!r} has shape {tuple(np.shape(leaf))}, the "
          f"parameter {tuple(spec.shape)}. {hint}")
    if np.dtype(leaf.dtype) != np.dtype(spec.dtype):
      raise TypeError(
          f"{fn}: {name} {path!r} has dtype {np.dtype(leaf.dtype)}, the "
          f"parameter {np.dtype(spec.dtype)}. Cast it to the parameter's "
          f"dtype ({name}.astype(param.dtype)).")
  by_path = dict(zip(given, leaves))
  return [by_path.get(p) for p in mine]


# ------------------------------------------------------------ the skeleton


class Step(NamedTuple):
  """What a ruled transformation's ``update`` is given, in the plan's order.

  Attributes:
    plan: the state's plan.
    updates: the update leaves.
    params: the param leaves, or ``None`` if ``update`` got no params.
    treedef: the updates' structure.
    extra: the extra keyword arguments of ``update`` (``optax.chain`` passes
      them to every transformation).
    absent: the indices of the leaves the updates lack (``None`` or
      ``optax.MaskedNode()`` in their place; their entries in ``updates``
      are ``None``, those in ``params`` the params' leaves there), for a
      transformation made with ``skips=True``; empty otherwise.
  """
  plan: Plan
  updates: list[Any]
  params: list[Any] | None
  treedef: Any
  extra: dict[str, Any]
  absent: tuple[int, ...] = ()


def ruled(
    fn: str,
    rule_set: RuleSet,
    *,
    default: Any,
    strict: bool,
    init: Callable[[Resolution, list[Any]], Any],
    update: Callable[[Step, Any], tuple[list[Any], Any]],
    needs_params: Callable[[Plan], str | None] | None = None,
    skips: bool = False,
    stacks: Stacks = None,
    placeholder: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A ruled transformation: resolve at init, check and hand over at update.

  Args:
    fn: the public name, as errors show it (``"lw.scale_by_rules"``).
    rule_set: the (checked) rule set.
    default: the value of leaves no rule matches (``MISSING``: an error).
    strict: as in :func:`layerwise.resolve`.
    init: ``(resolution, param leaves) -> state``; the state's ``rules``
      field holds the plan made from the resolution.
    update: ``(step, state) -> (update leaves, new state)``.
    needs_params: ``plan -> what needs the params`` (a text for the error)
      or ``None`` when nothing does; ``update`` without params raises then.
    skips: whether the updates may hold ``None`` (or
      ``optax.MaskedNode()``) in place of leaves, or of whole subtrees,
      that the params had at init (:attr:`Step.absent`); they stay where
      they are in the updates returned, unless ``update`` gives values for
      all the leaves of one (a frozen leaf's zero), which then fill it
      (:meth:`Holes.rebuilt`). Without it, such updates are a structure
      error.
    stacks: the stacked subtrees, as the public ``stacks=`` argument
      (:func:`layerwise.paths`); the resolution and the plan are then of
      layer leaves, the step's leaves still the real ones.
    placeholder: ``placeholder -> state``: the state's layout for
      ``optax.tree_map_params``, which calls ``init`` with an object that
      stands for the params (see :func:`placeholder_state`).

  Returns:
    The ``optax.GradientTransformationExtraArgs``.
  """
  stacks_key = _paths.normalize_stacks(fn, stacks)

  def init_fn(params: Any) -> Any:
    if is_params_placeholder(params):
      return placeholder_state(fn, placeholder, params)
    res = rule_set.resolve(params, default=default, strict=strict,
                           stacks=stacks_key, fn=fn)
    return init(res, res.treedef.flatten_up_to(params))

  def update_fn(updates: Any, state: Any, params: Any = None,
                **extra_args: Any) -> tuple[Any, Any]:
    plan = plan_of(fn, state)
    if not skips:
      leaves, treedef = plan.check_tree(fn, updates)
      holes = NO_HOLES
    else:
      leaves, treedef, holes = plan.check_holes(fn, updates)
    given: list[Any] | None = None  # the params, flattened like the holes
    if params is None:
      param_leaves = None
    elif not holes.absent:
      param_leaves = flatten_like(fn, treedef, params)
    else:  # the params have leaves where the updates have holes
      given = flatten_like(fn, holes.treedef, params)
      param_leaves = [None] * len(plan.leaf_paths)
      for k, p in enumerate(given):
        leaves_there = jax.tree_util.tree_leaves(p)
        if len(leaves_there) == len(holes.covers[k]):
          for i, leaf in zip(holes.covers[k], leaves_there):
            param_leaves[i] = leaf
    if param_leaves is None and needs_params is not None:
      who = needs_params(plan)
      if who is not None:
        raise _validate.missing_params(fn, who)
    out, new_state = update(Step(plan, leaves, param_leaves, treedef,
                                 extra_args, holes.absent), state)
    if holes.absent:
      return holes.rebuilt(out, given), new_state
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def is_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the object ``optax.tree_map_params`` calls
  ``init`` with in place of the params."""
  kind = type(params)
  return (kind.__name__ == "_ParamsPlaceholder"
          and kind.__module__.startswith("optax"))


class _NotParams:
  """A leaf of a placeholder state where the state holds no params (a
  count, a vector of hyperparameters or statistics)."""
  __slots__ = ()

  def __repr__(self) -> str:
    return "NOT_PARAMS"


#: What a placeholder state holds where the real state holds no params.
NOT_PARAMS: Any = _NotParams()


def placeholder_state(fn: str, layout: Callable[[Any], Any] | None,
                      params: Any) -> Any:
  """The state ``init`` gives ``optax.tree_map_params``'s placeholder.

  ``optax.tree_map_params`` calls ``init`` with a placeholder for the
  params, and maps its function over the parts of the real state where the
  result holds the placeholder (copies of the params, such as moments), its
  ``transform_non_params`` over the rest. Rules cannot be matched against
  a placeholder: ``layout(placeholder)`` says where the state holds params
  without resolving them. Its ``rules`` field holds the placeholder itself,
  so that the map keeps the real state's plan (a pytree without leaves);
  the vectors and counts hold :data:`NOT_PARAMS`; wrapped transformations'
  states are their ``init`` of the placeholder.
  """
  if layout is None:
    raise TypeError(
        f"{fn}: this transformation cannot be initialised with "
        "optax.tree_map_params's placeholder; map over "
        "jax.eval_shape(tx.init, params) instead (lw.state_shardings(tx, "
        "params) gives the state's shardings).")
  return layout(params)


#: How to turn a checkpoint restored without a target into a state.
RESTORE_HINT = ("A checkpoint restored without a target is plain lists and "
                "dicts: restore against jax.eval_shape(tx.init, params), or "
                "turn what was restored into a state with "
                "lw.restore_state(tx.init(params), restored).")


def plan_of(fn: str, state: Any) -> Plan:
  """The plan of a layerwise state, or an error that says what the state is
  instead."""
  plan = getattr(state, "rules", None)
  if isinstance(plan, Plan):
    return plan
  raise TypeError(
      f"{fn}: the state passed to update is a {type(state).__name__}, not "
      "the state this transformation's init returned (it has no layerwise "
      "rules). Pass the state from init, or from the previous update. "
      + RESTORE_HINT)


_PLAIN = (dict, list, tuple)


def is_plain(tree: Any) -> bool:
  """Whether ``tree`` is arrays in plain dicts, lists and tuples only (no
  optax state: every optax state is a ``NamedTuple``), as a checkpoint
  restored without a target gives them back."""
  def leaf(node: Any) -> bool:
    return type(node) not in _PLAIN and node is not None
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=leaf)
  return bool(leaves) and all(
      isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves)


def check_not_plain(fn: str, opt_state: Any) -> None:
  """Raises the "not a layerwise state" error for an ``opt_state`` that
  holds no layerwise state because it is plain dicts and lists of arrays
  (:func:`is_plain`); for any other state, does nothing."""
  if is_plain(opt_state) and not find_states(opt_state):
    raise TypeError(
        f"{fn}: opt_state is a {type(opt_state).__name__} of plain dicts, "
        "lists and arrays, not an optimizer state (optax states are "
        "NamedTuples): it holds no layerwise state, whose rules checkpoints "
        "do not save, so there is nothing to read or set. " + RESTORE_HINT)


# ---------------------------------------------------------- the protocol


class Live(NamedTuple):
  """A hyperparameter a state holds as an array.

  Attributes:
    per: ``"leaf"`` (one entry per path of the plan) or ``"group"`` (one per
      group name).
    vector: the float32 vector (possibly in a Flax box, in the state of an
      ``nnx.Optimizer``).
  """
  per: str
  vector: Any


class RuledState(Protocol):
  """What every layerwise state answers (see the module's docstring)."""
  rules: Plan


def is_ruled(node: Any) -> bool:
  """Whether ``node`` is a layerwise state (a NamedTuple with a plan)."""
  return isinstance(getattr(node, "rules", None), Plan) and hasattr(
      node, "_fields")


def find_states(tree: Any) -> list[Any]:
  """Every layerwise state in ``tree``, in order.

  This finds them in any optax state (chains, ``MultiSteps``,
  ``inject_hyperparams``, ``partition``, masked states...), also inside one
  another (a ``scale_by_rules`` state inside an ``lw.partition`` state),
  outer first.
  """
  found = []

  def visit(node: Any) -> bool:
    # Found states are not leaves: the traversal goes on into them, to the
    # states of the transformations they wrap (partition, freeze).
    if is_ruled(node):
      found.append(node)
    return False

  jax.tree_util.tree_flatten(tree, is_leaf=visit)
  return found


def live_of(state: Any) -> dict[str, Live]:
  """The hyperparameters ``state`` holds as arrays (none if it holds none)."""
  live = getattr(state, "live", None)
  return dict(live()) if callable(live) else {}


def measured_of(state: Any) -> dict[str, Any]:
  """What the last update measured, per group (nothing if it measures
  nothing)."""
  measured = getattr(state, "measured", None)
  return dict(measured()) if callable(measured) else {}


def metrics_of(state: Any) -> list[tuple[str, Any]]:
  """``(key, scalar)`` pairs of ``state`` for a metrics logger."""
  metrics = getattr(state, "metrics", None)
  return list(metrics()) if callable(metrics) else []


def notes_of(state: Any) -> list[str]:
  """What ``state`` says about its cost that its rows do not show (a
  stacked leaf split between optimizer groups, say), as lines for
  :func:`layerwise.describe`; nothing if it says nothing."""
  notes = getattr(state, "notes", None)
  return list(notes()) if callable(notes) else []


def entries(vector: Any, n: int) -> list[Any]:
  """The ``n`` entries of a state vector as scalars (for metrics); a vector
  split across the processes of a ``jax.distributed`` run is replicated
  first (:func:`layerwise._hosts.readable`), so every process can read
  them."""
  return list(_hosts.readable(unboxed(vector))) if n else []


def _dynamic_entry(vector: jax.Array, index: jax.Array) -> jax.Array:
  try:  # jax >= 0.5: no code for negative indices, which never occur
    return lax.dynamic_slice(vector, (index,), (1,),
                             allow_negative_indices=False)[0]
  except TypeError:
    return lax.dynamic_slice(vector, (index,), (1,))[0]


_CHUNK = 128


def factors(vector: Any, n: int) -> list[Any]:
  """The ``n`` entries of a state vector of hyperparameters, as scalars that
  the leaves' kernels take as arguments.

  XLA compiles one kernel per distinct fused computation. Read as
  ``vector[i]``, each entry is a slice at a constant offset that XLA fuses
  into leaf ``i``'s update, so no two leaves share a kernel, and XLA:CPU
  compiled a step with 777 leaves 2.6-3x slower than plain adamw (which
  compiles 33 kernels for its 2,334 fusions). Here each entry is read at a
  runtime index instead, an output of a conditional whose branches return
  the indices (XLA can neither fold nor fuse them), so the leaves of one
  shape share a kernel again: 34 kernels, about 1.1x plain adamw's compile
  time at 777 leaves (benchmarks/groups.py; 1.6x at 5,000 small leaves,
  where static offsets cost 4x). Only on the CPU: a GPU's conditional waits
  for its predicate on the host, which would end asynchronous dispatch,
  so other backends read ``vector[i]``.
  """
  vector = unboxed(vector)
  if n == 0:
    return []
  if not isinstance(vector, jax.core.Tracer):  # eager: values at hand
    return list(_hosts.readable(vector))
  def runtime_index(v: jax.Array) -> tuple[jax.Array, ...]:
    out: list[jax.Array] = []
    # One conditional per 128 entries: XLA's passes take superlinear time
    # over one conditional of hundreds of outputs (777: 1.23x plain adamw's
    # compile time, against 1.09x in chunks).
    for start in range(0, n, _CHUNK):
      indices = tuple(np.int32(i) for i in range(start, min(n, start + _CHUNK)))
      # Both branches are the same; the predicate only has to be unknown.
      idx = lax.cond(v[0] == v[0], lambda c=indices: c, lambda c=indices: c)
      out.extend(_dynamic_entry(v, i) for i in idx)
    return tuple(out)

  def static_index(v: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(v[i] for i in range(n))

  return list(lax.platform_dependent(vector, cpu=runtime_index,
                                     default=static_index))


def _runtime_indices(v: jax.Array, values: Sequence[int]) -> list[Any]:
  """``values`` as int32 scalars XLA can neither fold nor fuse (outputs of
  conditionals; see :func:`factors`), on the CPU."""
  out: list[Any] = []
  for start in range(0, len(values), _CHUNK):
    chunk = tuple(np.int32(i) for i in values[start:start + _CHUNK])
    out.extend(lax.cond(v[0] == v[0], lambda c=chunk: c, lambda c=chunk: c))
  return out


def along(x: Any, axis: int, ndim: int) -> Any:
  """A vector of one entry per layer, shaped to broadcast along ``axis`` of
  an array of ``ndim`` dimensions."""
  shape = [1] * ndim
  shape[axis] = -1
  return jnp.reshape(x, shape)


def leaf_factors(vector: Any, plan: Plan) -> list[Any]:
  """:func:`factors` for the real leaves of a plan: a leaf's entry of a
  per-layer-leaf vector, or, for a stacked leaf, its layers' entries as a
  vector shaped to broadcast along its layer axis (one slice of the vector,
  read at a runtime offset on the CPU, so the leaves of one shape share a
  kernel as unstacked ones do)."""
  if plan.layers is None:
    return factors(vector, len(plan.paths))
  vector = unboxed(vector)
  layers = plan.layers
  n = len(layers.axes)
  if n == 0:
    return []
  if not isinstance(vector, jax.core.Tracer):
    v = _hosts.host_array(vector)
    return [jnp.asarray(v[layers.starts[j]]) if a is None else
            along(jnp.asarray(v[layers.span(j).start:layers.span(j).stop]),
                  a, len(layers.leaf_shapes[j]))
            for j, a in enumerate(layers.axes)]

  def read(v: jax.Array, starts: Sequence[Any]) -> tuple[jax.Array, ...]:
    out = []
    for j, a in enumerate(layers.axes):
      if a is None:
        out.append(_dynamic_entry(v, starts[j]))
      else:
        length = len(layers.span(j))
        try:
          piece = lax.dynamic_slice(v, (starts[j],), (length,),
                                    allow_negative_indices=False)
        except TypeError:
          piece = lax.dynamic_slice(v, (starts[j],), (length,))
        out.append(along(piece, a, len(layers.leaf_shapes[j])))
    return tuple(out)

  def runtime_index(v: jax.Array) -> tuple[jax.Array, ...]:
    return read(v, _runtime_indices(v, layers.starts[:-1]))

  def static_index(v: jax.Array) -> tuple[jax.Array, ...]:
    return read(v, layers.starts[:-1])

  return list(lax.platform_dependent(vector, cpu=runtime_index,
                                     default=static_index))


def spread(plan: Plan, j: int, values: Sequence[Any]) -> Any:
  """The values of real leaf ``j``'s layer leaves (one per layer, in layer
  order) as one value for the leaf: the value itself for an unstacked leaf
  or when every layer has the same Python value, else the layers' values
  stacked and shaped to broadcast along its layer axis."""
  a = plan.axis(j)
  if a is None:
    (value,) = values
    return value
  first = values[0]
  if all(v is first for v in values) or (
      all(isinstance(v, (int, float)) for v in values)
      and len(set(values)) == 1):
    return first
  return along(jnp.stack([jnp.asarray(v) for v in values]), a,
               len(plan.leaf_shapes[j]))


def layer_sums(plan: Plan, j: int, x: Any) -> Any:
  """``sum(x)`` of real leaf ``j``'s array per layer: a scalar for an
  unstacked leaf, a vector of one entry per layer (in layer order) for a
  stacked one."""
  a = plan.axis(j)
  if a is None:
    return jnp.sum(x)
  return jnp.sum(x, axis=tuple(d for d in range(jnp.ndim(x)) if d != a))


def per_layer_leaf(per_leaf: Sequence[Any]) -> jax.Array:
  """Values computed per real leaf (a scalar, or one entry per layer for
  a stacked leaf, as :func:`layer_sums` gives) as one vector of one entry
  per layer leaf, in the plan's order."""
  return jnp.concatenate([jnp.reshape(x, (-1,)) for x in per_leaf])


def group_totals(plan: Plan, updates: Sequence[Any],
                 group_of: Callable[[int], int],
                 piece: Callable[[int, Any], Any],
                 combine: Callable[..., jax.Array] = jax.ops.segment_sum
                 ) -> tuple[jax.Array | None, np.ndarray]:
  """Each group's total of what its layer leaves measure, for all groups
  at once: ``piece(j, update)`` is computed once per real leaf that has an
  update and a layer leaf in a group (per layer for a stacked leaf, as
  :func:`layer_sums` gives), laid out one entry per layer leaf and combined
  by group (``group_of(k)``: layer leaf ``k``'s group, ``-1`` for none) in
  one segment sum (or ``combine``, e.g. ``jax.ops.segment_max``).

  Returns:
    The totals, one per group name (``None`` when no leaf was measured),
    and which groups had a layer leaf measured (static).
  """
  n = len(plan.group_names)
  pieces, ids = [], []
  for j, u in enumerate(updates):
    of = [group_of(k) for k in plan.span(j)]
    if u is None or all(g < 0 for g in of):
      continue
    pieces.append(piece(j, u))
    ids += [g if g >= 0 else n for g in of]
  measured = np.zeros(n, bool)
  measured[[g for g in ids if g < n]] = True
  if not pieces:
    return None, measured
  totals = combine(per_layer_leaf(pieces), np.asarray(ids, np.int32),
                   num_segments=n + 1)
  return totals[:n], measured


def stack(scalars: Sequence[Any], n: int) -> jax.Array:
  """``n`` scalars as a float32 vector (an empty one for none)."""
  return (jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars]) if n
          else jnp.zeros([0], jnp.float32))


# --------------------------------------------------- vectors in Flax boxes


def unboxed(vector: Any) -> Any:
  """A state vector, out of the Flax box it may be in (the Variables of an
  ``nnx.Optimizer``'s state before flax 0.11)."""
  (leaf,) = jax.tree_util.tree_leaves(vector)
  return getattr(leaf, "value") if isinstance(leaf, _paths.box_types()) else leaf


def reboxed(old: Any, new: Any) -> Any:
  """``new`` in the box ``old`` is in, if any."""
  if isinstance(old, _paths.box_types()):
    return getattr(old, "replace")(value=new)
  return new


def set_entries(vector: Any, indices: Sequence[int], value: Any) -> Any:
  """``vector`` with ``value`` at ``indices``, kept in its box.

  The new vector is computed from the old one, so that a committed state
  (restored, sharded) stays committed where it was, and a jitted step takes
  it without compiling again.
  """
  old = unboxed(vector)
  mask = np.zeros(old.shape, bool)
  mask[list(indices)] = True
  return reboxed(vector, jnp.where(mask, jnp.asarray(value, old.dtype), old))


def no_state_error(fn: str, what: str, transformation: str) -> ValueError:
  """The error for a state that holds none of the layerwise states ``fn``
  changes."""
  return ValueError(
      f"{fn}: this optimizer state holds no {transformation} state; chain "
      f"{transformation}(...) into the optimizer to set {what}.")


def coverage(paths: Sequence[str]) -> str:
  """What ``paths`` cover, short: ``"3 parameters: 'encoder/**' (2), 'head/w'"``
  (the paths under each top-level name, counted)."""
  under: dict[str, list[str]] = {}
  for p in dict.fromkeys(paths):
    under.setdefault(p.split("/", 1)[0], []).append(p)
  parts = [repr(ps[0]) if len(ps) == 1 else f"'{top}/**' ({len(ps)})"
           for top, ps in under.items()]
  n = sum(len(ps) for ps in under.values())
  return (f"{n} parameter{'s' * (n != 1)}: "
          + _diagnostics.few(parts, quote=False))


def unmatched_error(fn: str, selector: SelectorLike, paths: Sequence[str],
                    transformation: str = "layerwise",
                    states: int = 1) -> ValueError:
  """The error for a selector that matches no leaf of the ``states``
  ``transformation`` states found, which cover ``paths``."""
  c = compile_selector(selector)
  return ValueError(
      f"{fn}: selector {c.text} matches no parameter"
      + _diagnostics.no_match_hint(c.text, c.pattern, paths)
      + f". The {states} {transformation} state{'s' * (states != 1)} found "
      f"cover{'s' * (states == 1)} {coverage(paths)}. Fix the selector: it is "
      "matched against the paths of the params the state was initialised "
      "with (lw.paths(params) lists them). If it names parameters of the "
      f"model, no {transformation} sees them: one inside a partition "
      "(lw.partition, lw.freeze, optax.partition) sees its group's "
      f"parameters only; chain a {transformation} that covers them.")


def uncovered_error(fn: str, selector: SelectorLike, holding: Sequence[Any],
                    known: Sequence[tuple[Any, list[int]]],
                    transformation: str) -> ValueError:
  """The error for a selector that matches parameters of the model (those
  other layerwise states know, ``known``: ``(state, indices)``) but none
  that the ``holding`` states cover."""
  c = compile_selector(selector)
  matched = list(dict.fromkeys(state.rules.paths[i] for state, indices in known
                               for i in indices))
  given = "; the ".join(
      f"{type(state).__name__} found gives them {state.rules.kind} "
      + _diagnostics.few(list(dict.fromkeys(str(state.rules.values[i])
                                            for i in indices)), quote=False)
      for state, indices in known)
  n = len(holding)
  covered = [p for state in holding for p in state.rules.paths]
  return ValueError(
      f"{fn}: selector {c.text} matches {len(matched)} parameter(s) of the "
      f"model ({_diagnostics.few(matched)}), but none that a "
      f"{transformation} covers: the {n} {transformation} "
      f"state{'s' * (n != 1)} found cover{'s' * (n == 1)} "
      f"{coverage(covered)}, while the {given}. A {transformation} inside "
      "lw.partition or lw.freeze sees its group's parameters only: add a "
      "rule for them to a "
      f"{transformation} in the optimizer of their group, or chain "
      f"{transformation} outside the partition, where it covers every "
      "parameter (lw.describe(tx, params) shows each parameter's rules).")


def set_live(fn: str, opt_state: Any, name: str, selector: SelectorLike,
             value: Any, *, what: str, transformation: str) -> Any:
  """``opt_state`` with the live value ``name`` set to ``value`` for the
  leaves ``selector`` picks, in every layerwise state that holds it.

  For a value kept per group, the groups of the picked leaves are set. The
  new state has the old one's structure, shapes and dtypes, so a jitted step
  takes it without compiling again.
  """
  def holds(node: Any) -> bool:
    return is_ruled(node) and name in live_of(node)

  states = [s for s in find_states(opt_state) if holds(s)]
  if not states:
    check_not_plain(fn, opt_state)
    raise no_state_error(fn, what, transformation)
  picked = {}
  outside = 0  # leaves matched but in no group of a per-group value
  for s in states:
    indices = s.rules.select(selector)
    if live_of(s)[name].per == "group":
      groups = s.rules.groups or ()
      outside += sum(groups[i] < 0 for i in indices)
      indices = sorted({groups[i] for i in indices if groups[i] >= 0})
    picked[id(s)] = indices
  if not any(picked.values()):
    if outside:
      raise ValueError(
          f"{fn}: selector {compile_selector(selector).text} matches "
          f"{outside} parameter(s), but {transformation} leaves them alone "
          f"(their rule is None), so they have no {what[:-1]}. Select "
          f"parameters that it covers (lw.describe(tx, params) shows each "
          "one's rule).")
    known = [(s, s.rules.select(selector)) for s in find_states(opt_state)
             if not holds(s)]
    known = [(s, indices) for s, indices in known if indices]
    if known:
      raise uncovered_error(fn, selector, states, known, transformation)
    raise unmatched_error(fn, selector, [p for s in states
                                         for p in s.rules.paths],
                          transformation, len(states))

  def replace(node: Any) -> Any:
    if not holds(node) or not picked.get(id(node)):
      return node
    vector = live_of(node)[name].vector
    return node.replace_live(name, set_entries(vector, picked[id(node)],
                                               value))

  return jax.tree_util.tree_map(replace, opt_state, is_leaf=holds)
