"""Resolution: which rule each leaf of a tree takes, and the public read-outs.

A rule set is an ordered mapping ``{selector: value}`` (a dict, or a list of
``(selector, value)`` pairs); see :mod:`layerwise._selectors` for the
selectors. Each leaf takes the value of the first rule that matches it.
Matching runs in Python on the tree's structure (paths, shapes and dtypes,
never values), once per structure (it is cached), so under ``jax.jit`` it runs
at trace time only.

A rule set is checked when it is resolved against a tree: a leaf no rule
matches, a selector that matches no leaf (a typo) and a rule that matches
leaves but never wins them (shadowed by earlier rules) are errors that name
the paths and the closest selectors or paths (:mod:`layerwise._diagnostics`).

A rule set inside :func:`layerwise.partition` or :func:`layerwise.freeze` is
resolved on its group's leaves only, but written for the whole model (as
``lw.layer_decay(0.8, params)`` is). While the outer transformation calls
its inner ones it sets the whole model (:func:`whole_model`), and the checks
read it: a rule may name leaves of the model that the group does not hold,
a selector is a typo only when it matches no leaf of the whole model, and a
rule is shadowed only when it wins no leaf of it; each leaf of the group
still needs a rule. With stacks, the whole model is of layer leaves, and a
rule set built with the default ``stacks`` resolves the group's leaves with
the partition's stacks (:func:`stacks_of`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np

from layerwise import _diagnostics, _paths
from layerwise._selectors import Compiled, SelectorLike, compile_selector
from layerwise._types import PyTree, Stacks

__all__ = ["Rules", "labels", "resolve"]

V = TypeVar("V")

#: A rule set: an ordered mapping ``{selector: value}`` or a sequence of
#: ``(selector, value)`` pairs; the first rule that matches a leaf wins.
Rules = Union[Mapping[Any, V], Sequence[tuple[Any, V]], "RuleSet"]


#: Flags by rule: a selector (what it matches gets ``True``, the rest
#: ``False``), or a rule set ``{selector: bool}`` that covers every leaf.
Flags = Union[SelectorLike, Mapping[Any, bool], Sequence[tuple[Any, bool]]]


class _Missing:

  def __repr__(self) -> str:
    return "<no default>"


#: The ``default`` of a rule set that has none: unmatched leaves are errors.
MISSING: Any = _Missing()

_CACHE_SIZE = 32


def leaf_spec(leaf: Any, path: str) -> jax.ShapeDtypeStruct:
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


def structure_key(leaves: Sequence[Any], treedef: Any) -> Any:
  """What resolution depends on: the structure, and each leaf's shape and
  dtype (``None`` when a leaf has neither, or the structure is unhashable)."""
  try:
    key = (treedef, tuple((tuple(x.shape), x.dtype) for x in leaves))
    hash(key)
  except (AttributeError, TypeError):  # non-array leaf, unhashable treedef
    return None
  return key


# Specs by structure and shapes: every rule set and transformation resolved
# against one tree reuses them (a ShapeDtypeStruct costs 4 us to make).
_SPECS: dict[Any, tuple[tuple[str, ...], tuple[jax.ShapeDtypeStruct, ...]]] = {}


_NO_KEY = object()


def paths_and_specs(tree: Any, key: Any = _NO_KEY
                    ) -> tuple[list[str], list[jax.ShapeDtypeStruct], Any]:
  """Each leaf's path and shape/dtype (never its values), and the treedef;
  ``key`` is the tree's :func:`structure_key`, when the caller has it."""
  path_strs, leaves, treedef = _paths.flatten_with_paths(tree)
  if key is _NO_KEY:
    key = structure_key(leaves, treedef)
  if key is not None and key in _SPECS:
    return path_strs, list(_SPECS[key][1]), treedef
  specs = [leaf_spec(x, p) for x, p in zip(leaves, path_strs)]
  if key is not None:
    if len(_SPECS) >= _CACHE_SIZE:
      _SPECS.pop(next(iter(_SPECS)))
    _SPECS[key] = (tuple(path_strs), tuple(specs))
  return path_strs, specs, treedef


#: The default ``stacks``: stacks found from Flax's ``"layers"`` axis metadata.
DETECT = _paths.normalize_stacks("lw", None)

# Layer views by structure, shapes and stacks.
_LAYERS: dict[Any, tuple[tuple[str, ...], tuple[jax.ShapeDtypeStruct, ...],
                         _paths.Layers | None]] = {}


def layer_paths_and_specs(fn: str, tree: Any, stacks: tuple[Any, ...] = DETECT,
                          key: Any = _NO_KEY
                          ) -> tuple[list[str], list[jax.ShapeDtypeStruct],
                                     Any, _paths.Layers | None]:
  """:func:`paths_and_specs` of the layer leaves (a stacked leaf is one per
  layer), the treedef, and the :class:`~layerwise._paths.Layers` (``None``
  when nothing is stacked)."""
  path_strs, specs, treedef = paths_and_specs(tree, key)
  if stacks[0] == "declared" and not stacks[1]:
    return path_strs, specs, treedef, None
  lkey = None if key is _NO_KEY or key is None else (key, stacks)
  hit = None if lkey is None else _LAYERS.get(lkey)
  if hit is None:
    lp, ls, layers = _paths.layer_view(fn, tree, path_strs, specs, stacks)
    hit = (tuple(lp), tuple(ls), layers)
    if lkey is not None:
      if len(_LAYERS) >= _CACHE_SIZE:
        _LAYERS.pop(next(iter(_LAYERS)))
      _LAYERS[lkey] = hit
  return list(hit[0]), list(hit[1]), treedef, hit[2]


class Whole:
  """The leaves of the whole model (paths and shapes/dtypes) that a rule set
  resolved on part of it is checked against (see :func:`whole_model`).

  Compared by value, with its hash computed once: a check already made
  against the same model is not made again.
  """

  __slots__ = ("paths", "specs", "layers", "_hash")

  def __init__(self, paths: Sequence[str],
               specs: Sequence[jax.ShapeDtypeStruct],
               layers: _paths.Layers | None = None):
    self.paths = tuple(paths)
    self.specs = tuple(specs)
    # With stacks, ``paths`` and ``specs`` are the layer leaves' (what
    # rules are checked against); ``layers`` keeps the real leaves.
    self.layers = layers
    self._hash = hash(self.paths)

  @property
  def leaf_paths(self) -> tuple[str, ...]:
    """The real leaves' paths (a stacked leaf once, not once per layer)."""
    return self.paths if self.layers is None else self.layers.leaf_paths

  @property
  def leaf_specs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The real leaves' shapes and dtypes."""
    if self.layers is None:
      return self.specs
    return tuple(jax.ShapeDtypeStruct(shape, self.specs[start].dtype)
                 for shape, start in zip(self.layers.leaf_shapes,
                                         self.layers.starts))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    if self is other:
      return True
    return (isinstance(other, Whole) and self._hash == other._hash
            and self.paths == other.paths and self.specs == other.specs
            and self.layers == other.layers)


_WHOLE: contextvars.ContextVar[Whole | None] = contextvars.ContextVar(
    "layerwise_whole_model", default=None)


def current_whole() -> Whole | None:
  """The whole model of the outermost :func:`whole_model` block now open, or
  ``None`` outside any (a transformation's ``init`` called by no
  :func:`layerwise.partition` or :func:`layerwise.freeze`)."""
  return _WHOLE.get()


@contextlib.contextmanager
def whole_model(whole: Callable[[], Whole]) -> Iterator[None]:
  """Within this block, strict resolution checks rule sets against the
  whole model ``whole()`` rather than only the tree they are resolved on.

  :func:`layerwise.partition` and :func:`layerwise.freeze` call their inner
  transformations in it: each sees a tree of its group's leaves, but a rule
  set in it was written for the whole model. The outermost block wins (a
  ``freeze`` inside a ``partition`` checks against the model the partition
  was given), and ``whole`` is only called when this block is the outermost.
  """
  if _WHOLE.get() is not None:
    yield
    return
  token = _WHOLE.set(whole())
  try:
    yield
  finally:
    _WHOLE.reset(token)


_STACKS: contextvars.ContextVar[tuple[Any, ...] | None] = (
    contextvars.ContextVar("layerwise_inherited_stacks", default=None))


@contextlib.contextmanager
def stacks_of(key: tuple[Any, ...]) -> Iterator[None]:
  """Within this block, a rule set resolved with the default stacks
  (:data:`DETECT`, what ``stacks=None`` gives) resolves with ``key``
  instead (a :func:`~layerwise._paths.normalize_stacks` key).

  :func:`layerwise.partition` and :func:`layerwise.freeze` call their inner
  transformations in it, with the stacks they found in the whole model (as
  declared stacks: a group's tree is plain dicts, which hold none of the
  model's axis metadata), so a ruled transformation inside a group sees
  the same layer leaves as the partition (``layers/3/attn/kernel``). One
  given other ``stacks=`` than the default (``None``, or ``"layers"``,
  which is the same key) keeps its own. The innermost block wins (a
  partition inside a group narrows the stacks to its own groups).
  """
  token = _STACKS.set(key)
  try:
    yield
  finally:
    _STACKS.reset(token)


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
  """Which rule each leaf of one tree structure takes (cached)."""
  treedef: Any
  paths: tuple[str, ...]
  specs: tuple[jax.ShapeDtypeStruct, ...]
  winner: tuple[int, ...]          # first matching rule per leaf, -1 if none
  layers: _paths.Layers | None = None  # layer leaves of stacks, if any


class _Index:
  """A rule set arranged so that each leaf's first rule is found without
  trying every rule on it (matching stays exact: the same first match).

  * exact path sets (globs without wildcards, :func:`~layerwise._selectors.of_paths`)
    are one dict lookup per leaf;
  * other globs sit in a trie of their literal leading segments, so a leaf
    tries only the globs whose prefix its path starts with;
  * a catch-all (``"**"``) needs no test;
  * the rest (regexes, callables, globs that start with a wildcard) are
    tried on every leaf, in order, until the best rule so far.
  """

  def __init__(self, selectors: Sequence[Compiled]):
    self.exact: dict[str, int] = {}
    self.everything = len(selectors)
    self.trie: dict[Any, Any] = {}  # segment -> node; None -> its rules
    always: list[int] = []
    for r, c in enumerate(selectors):
      if c.everything:
        self.everything = min(self.everything, r)
      elif c.paths is not None:
        for path in c.paths:
          self.exact.setdefault(path, r)
      elif c.prefix:
        node = self.trie
        for seg in c.prefix:
          node = node.setdefault(seg, {})
        node.setdefault(None, []).append(r)
      else:
        always.append(r)
    self.always = always
    self.selectors = selectors

  def winner(self, path: str, spec: Any) -> int:
    """The first rule that matches the leaf, -1 for none."""
    best = self.exact.get(path, self.everything)
    if self.everything < best:
      best = self.everything
    if not self.always and not self.trie:  # lookups only
      return best if best < len(self.selectors) else -1
    candidates = [r for r in self.always if r < best]
    node: dict[Any, Any] | None = self.trie
    for seg in path.split("/") if self.trie else ():
      node = node.get(seg) if node is not None else None
      if node is None:
        break
      candidates.extend(r for r in node.get(None, ()) if r < best)
    for r in sorted(candidates):
      if self.selectors[r].match(path, spec):
        return r
    return best if best < len(self.selectors) else -1


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
    layers: how the tree's leaves are seen as layer leaves, when some are
      stacked (:class:`~layerwise._paths.Layers`); then ``paths``,
      ``specs``, ``rule_index`` and ``values`` are those of the layer
      leaves (a stacked leaf of L layers has L entries), and ``treedef``
      is the tree's. ``None`` when nothing is stacked.
  """
  treedef: Any
  paths: tuple[str, ...]
  specs: tuple[jax.ShapeDtypeStruct, ...]
  rule_index: tuple[int, ...]
  values: tuple[Any, ...]
  rule_texts: tuple[str, ...]
  layers: _paths.Layers | None = None

  def tree(self) -> Any:
    """The values as a tree with the resolved tree's structure (a stacked
    leaf holds the tuple of its layers' values)."""
    return jax.tree_util.tree_unflatten(self.treedef, self.leaf_values())

  def leaf_values(self) -> list[Any]:
    """The value of each real leaf: its layers' values as a tuple, for a
    stacked leaf."""
    if self.layers is None:
      return list(self.values)
    return [self.values[r.start] if a is None
            else tuple(self.values[k] for k in r)
            for a, r in ((a, self.layers.span(j))
                         for j, a in enumerate(self.layers.axes))]

  def rule_text(self, i: int) -> str:
    """How leaf ``i``'s rule is shown."""
    r = self.rule_index[i]
    return self.rule_texts[r] if r >= 0 else "(default)"



class RuleSet:
  """A compiled rule set: its selectors, values, and a cache of matches.

  Transformations compile their rules once, at construction; resolving the
  same tree structure again (as ``update`` does at every trace) is a lookup.

  Args:
    rules: a mapping or a sequence of ``(selector, value)`` pairs, or a
      ``RuleSet``.
    what: what the values are, for error messages (``"value"``, ``"label"``).
  """

  selectors: tuple[Compiled, ...]
  values: tuple[Any, ...]

  def __init__(self, rules: Rules, *, what: str = "value"):
    items: list[tuple[Any, Any]]
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
          + _diagnostics.rules_hint(rules, what))
    self.selectors = tuple(compile_selector(s) for s, _ in items)
    self.values = tuple(v for _, v in items)
    self.what = what
    self._index = _Index(self.selectors)
    self._cache: dict[Any, Match] = {}
    self._checked: set[tuple[Match, bool, Whole | None]] = set()

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

  def match(self, tree: Any, stacks: tuple[Any, ...] = DETECT,
            fn: str = "lw.resolve") -> Match:
    """Matches every selector against every (layer) leaf; cached per
    structure and ``stacks`` (a :func:`~layerwise._paths.normalize_stacks`
    key).

    A cache hit costs one ``tree_flatten`` and a dict lookup: paths are only
    built, and selectors only run, for a structure not seen before. With the
    default ``stacks`` inside a partition's group, the partition's stacks
    are used (:func:`stacks_of`).
    """
    if stacks == DETECT:
      inherited = _STACKS.get()
      if inherited is not None:
        stacks = inherited
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    key = structure_key(leaves, treedef)
    if key is not None:
      key = (key, stacks)
    hit = None if key is None else self._cache.get(key)
    if hit is not None:
      return hit
    path_strs, specs, treedef, layers = layer_paths_and_specs(
        fn, tree, stacks, None if key is None else key[0])
    winner = tuple(self._index.winner(p, s) for p, s in zip(path_strs, specs))
    result = Match(treedef, tuple(path_strs), tuple(specs), winner, layers)
    if key is not None:
      if len(self._cache) >= _CACHE_SIZE:
        evicted = self._cache.pop(next(iter(self._cache)))
        self._checked = {c for c in self._checked if c[0] is not evicted}
      self._cache[key] = result
    return result

  def resolve(self, tree: Any, *, default: Any = MISSING,
              strict: bool = True, stacks: tuple[Any, ...] = DETECT,
              fn: str = "lw.resolve") -> Resolution:
    """Resolves the rules against ``tree``; see :func:`resolve`."""
    m = self.match(tree, stacks, fn)
    if strict:
      # The checks depend only on the match, on whether there is a default
      # and on the whole model, if any; a structure that passed them once
      # passes them again.
      whole = _WHOLE.get()
      check_key = (m, default is MISSING, whole)
      if check_key not in self._checked:
        self._check(m, default, whole)
        self._checked.add(check_key)
    fallback = None if default is MISSING else default
    values = tuple(self.values[r] if r >= 0 else fallback for r in m.winner)
    return Resolution(m.treedef, m.paths, m.specs, m.winner, values,
                      tuple(c.text for c in self.selectors), m.layers)

  # Errors --------------------------------------------------------------

  def _check(self, m: Match, default: Any, whole: Whole | None) -> None:
    paths, specs, winner = m.paths, m.specs, m.winner
    unmatched = None
    if whole is not None and whole.paths != paths:
      # Part of a model: a rule is used if it wins a leaf of the tree or
      # of the rest of the model; only the tree's own leaves need a rule.
      unmatched = ([] if default is not MISSING else
                   [p for p, r in zip(paths, winner) if r < 0])
      here = set(paths)
      rest = [(p, s) for p, s in zip(whole.paths, whole.specs)
              if p not in here]
      paths = paths + tuple(p for p, _ in rest)
      specs = specs + tuple(s for _, s in rest)
      winner = winner + tuple(self._index.winner(p, s) for p, s in rest)
    # Only a rule that wins no leaf can be unused or shadowed: only those
    # are tried on every leaf.
    won = set(winner)
    losing = {r: tuple(i for i, (p, s) in enumerate(zip(paths, specs))
                       if c.match(p, s))
              for r, c in enumerate(self.selectors) if r not in won}
    _diagnostics.check_match(self.selectors, paths, winner, losing,
                             has_default=default is not MISSING,
                             what=self.what, unmatched=unmatched,
                             stacks=m.layers.roots if m.layers else ())


# ------------------------------------------------------------ public API


def resolve(rules: Rules[V], tree: PyTree, *, default: V = MISSING,
            strict: bool = True, stacks: Stacks = None) -> PyTree:
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
    strict: if True (the default), raise :class:`layerwise.RuleError` when a leaf
      matches no rule (and there is no ``default``), when a selector
      matches no leaf, or when a rule is shadowed by earlier ones. If False,
      none of these is an error and unmatched leaves get ``default`` or
      ``None``.
    stacks: the stacked subtrees (see :func:`layerwise.paths`): rules are
      matched against each layer leaf (``layers/3/attn/kernel``).

  Returns:
    A pytree with the structure of ``tree``; a stacked leaf holds the tuple
    of its layers' values.

  Raises:
    layerwise.RuleError: (a ``ValueError``) as described under ``strict``; the message
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
    layerwise.RuleError: 1 selector(s) match no parameter (a typo?):
      rule 0: 'layer/**'  (closest: 'layers/**', ...)
    ...

    Per-layer values for two layers stacked in one array:

    >>> lw.resolve({"layers/0/**": 0.5, "**": 1.0},
    ...            {"layers": {"w": jnp.ones((2, 4, 4))}}, stacks={"layers": 0})
    {'layers': {'w': (0.5, 1.0)}}
  """
  fn = "lw.resolve"
  return RuleSet(rules).resolve(
      tree, default=default, strict=strict,
      stacks=_paths.normalize_stacks(fn, stacks), fn=fn).tree()


def labels(rules: Rules[Hashable], *, default: Hashable = MISSING,
           strict: bool = True,
           stacks: Stacks = None) -> Callable[[PyTree], PyTree]:
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
    stacks: the stacked subtrees (see :func:`layerwise.paths`). A stacked
      leaf is one array, so its layers must share a label (``optax.partition``
      gives a leaf one optimizer); :func:`layerwise.partition` and
      :func:`layerwise.freeze` take layers of one stack in different groups.

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
          f"lw.labels: label {v!r} of rule {c.text} is not usable as an "
          "optax.partition label: labels must be hashable and not None (use "
          "strings).")
  if default is not MISSING and (not isinstance(default, Hashable)
                                 or default is None):
    raise TypeError(f"lw.labels: default label {default!r} must be hashable, "
                    "not None.")

  key = _paths.normalize_stacks("lw.labels", stacks)

  def label_fn(tree: Any) -> Any:
    res = rule_set.resolve(tree, default=default, strict=strict, stacks=key,
                           fn="lw.labels")
    out = res.leaf_values()
    if res.layers is not None:
      for j, v in enumerate(out):
        if isinstance(v, tuple) and res.layers.axes[j] is not None:
          if len(set(v)) > 1:
            path = res.layers.leaf_paths[j]
            raise ValueError(
                f"lw.labels: the layers of the stacked parameter {path!r} "
                f"have different labels ({_diagnostics.few(sorted(map(str, set(v))))}), "
                "but optax.partition gives one array one optimizer. Give "
                "every layer of a stack the same label, or use "
                "lw.partition(..., stacks=...) (or lw.freeze), which route "
                "the layers of one stack to different optimizers.")
          out[j] = v[0]
    return jax.tree_util.tree_unflatten(res.treedef, out)

  return label_fn


def flag_rules(fn: str, flags: Flags, *, what: str,
               meaning: str) -> tuple[RuleSet, Any]:
  """A selector, or a rule set ``{selector: bool}``, as a rule set of bools
  and the default to resolve it with.

  A selector sets the flag of what it matches (the rest gets ``False``); a
  rule set must cover every leaf, as any rule set. ``meaning`` says what
  ``True`` and ``False`` mean, for the error on a value that is not a bool.
  """
  if not (isinstance(flags, Mapping) or (
      isinstance(flags, Sequence) and not isinstance(flags, (str, bytes)))):
    return RuleSet([(flags, True)], what=what), False
  rule_set = RuleSet(flags, what=what)
  for c, v in zip(rule_set.selectors, rule_set.values):
    if not isinstance(v, bool):
      raise TypeError(
          f"{fn}: rule {c.text} has value {v!r}; a rule set of {what}s maps "
          f"selectors to {meaning}.")
  return rule_set, MISSING
