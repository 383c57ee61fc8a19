"""Property-based tests over random pytrees and random rule sets.

Trees are nested dicts, lists, tuples and NamedTuples with ``None`` leaves,
empty subtrees, scalars and zero-size arrays (float32; bfloat16 and int32
too where only rules are resolved); rule sets are drawn from the trees' real
paths (exact paths, globs, regexes, callables, combinations). Each property
is checked against an independent reference written from the documented
semantics (paths, glob/regex/callable matching, first match wins) or against
the bare optax optimizer. Examples are derandomized: CI runs the same ones.
"""

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwise as lw
from conftest import reference_glob
from layerwise import _resolve, _selectors


def cfg(n):
  """Deterministic settings (CI runs the same examples every time)."""
  return settings(max_examples=n, deadline=None, derandomize=True,
                  database=None, print_blob=False,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.data_too_large])


# ------------------------------------------------------------------ trees


class Dense(NamedTuple):
  kernel: Any
  bias: Any


class Block(NamedTuple):
  attn: Any
  mlp: Any
  norm: Any


@dataclasses.dataclass(frozen=True)
class Leaf:
  """A placeholder for an array leaf of a skeleton (a pytree leaf itself)."""
  shape: tuple
  dtype: str = "float32"


KEYS = ("a", "b", "c", "d", "e", "kernel", "bias", "layers_0")
SHAPES = ((), (0,), (2, 0), (1,), (3,), (2, 3), (1, 2, 2))
DTYPES = ("bfloat16", "int32", "float32")

# A leaf is None, an empty container (empty subtrees) or an array; scalars
# and zero-size arrays included.
EMPTY = {"none": None, "dict": {}, "list": [], "tuple": ()}
leaves = st.sampled_from(("none",) + tuple(EMPTY) + SHAPES + SHAPES).map(
    lambda s: Leaf(s) if isinstance(s, tuple) else EMPTY[s])


CONTAINERS = ("dict", "list", "tuple", "Dense", "Block")


@st.composite
def trees_of(draw, leaf_strategy, max_leaves=8, max_depth=3, root=None):
  """Nested dicts, lists, tuples and NamedTuples of ``leaf_strategy``, at
  most ``max_depth`` deep and with about ``max_leaves`` leaves."""
  budget = [max_leaves]

  def node(depth, kind=None):
    if kind is None:
      kind = "leaf"
      if depth < max_depth and budget[0] > 1:
        kind = draw(st.sampled_from(("leaf", "leaf") + CONTAINERS))
    if kind == "leaf":
      budget[0] -= 1
      return draw(leaf_strategy)
    if kind == "Dense":
      return Dense(node(depth + 1), node(depth + 1))
    if kind == "Block":
      return Block(node(depth + 1), node(depth + 1), node(depth + 1))
    n = draw(st.sampled_from((1, 2, 3)))
    if kind == "dict":
      keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=n,
                           unique=True))
      return {k: node(depth + 1) for k in keys}
    children = [node(depth + 1) for _ in range(n)]
    return children if kind == "list" else tuple(children)

  if root is None:  # one in eleven is a bare leaf (an array named '', None)
    root = draw(st.sampled_from(CONTAINERS * 2 + ("leaf",)))
  return node(0, root)


skeletons = trees_of(leaves)
# Trees without a single array: None, empty containers, nested.
empty_skeletons = trees_of(st.sampled_from(tuple(EMPTY.values())))


def materialize(skeleton, seed):
  """The skeleton with random arrays (seeded) at its leaves."""
  rng = np.random.default_rng(seed)

  def array(x):
    if x.dtype == "int32":
      return jnp.asarray(rng.integers(-5, 5, x.shape, dtype=np.int32))
    return jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32),
                       x.dtype)

  return jax.tree_util.tree_map(array, skeleton)


def releaf(skeleton, new_leaves):
  """The skeleton with other leaves (in flattening order)."""
  it = iter(new_leaves)
  return jax.tree_util.tree_map(lambda _: next(it), skeleton)


def ref_leaves(tree, prefix=()):
  """``[(path, Leaf)]`` in flattening order, written from the documented
  naming (dict keys sorted, indices, NamedTuple fields), without jax."""
  if tree is None:
    return []
  if isinstance(tree, Leaf):
    return [("/".join(prefix), tree)]
  if isinstance(tree, dict):
    items = [(k, tree[k]) for k in sorted(tree)]
  elif hasattr(tree, "_fields"):
    items = list(zip(tree._fields, tree))
  else:
    assert isinstance(tree, (list, tuple)), tree
    items = [(str(i), x) for i, x in enumerate(tree)]
  return [pl for k, x in items for pl in ref_leaves(x, prefix + (k,))]


def specs_of(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def flat_up_to(like, tree):
  """``tree``'s entries at the leaf positions of ``like`` (None allowed)."""
  return jax.tree_util.tree_structure(like).flatten_up_to(tree)


# ------------------------------------------------------------ rule sets


@dataclasses.dataclass(frozen=True)
class Case:
  """A selector, the text errors show for it, and a reference predicate
  ``ref(path, Leaf) -> bool`` written independently of the library."""
  selector: Any
  text: str
  ref: Any


def glob_case(pattern):
  return Case(pattern, repr(pattern), lambda p, x: reference_glob(pattern, p))


def regex_case(source, ref):
  return Case(re.compile(source), f"re.compile({source!r})", ref)


def named(fn, name):
  fn.__qualname__ = fn.__name__ = name
  return fn


def callable_case(kind, arg):
  """A plain callable selector; it also checks what the library passes."""
  if kind == "shape_is":
    def fn(path, leaf):
      assert isinstance(path, str)
      assert isinstance(leaf, jax.ShapeDtypeStruct), leaf
      return tuple(leaf.shape) == arg
    return Case(named(fn, f"shape_is{arg}"), f"shape_is{arg}",
                lambda p, x: x.shape == arg)
  if kind == "dtype_is":
    fn = named(lambda path, leaf: leaf.dtype == jnp.dtype(arg),
               f"dtype_is_{arg}")
    return Case(fn, f"dtype_is_{arg}", lambda p, x: x.dtype == arg)
  if kind == "empty":
    fn = named(lambda path, leaf: leaf.size == 0, "is_empty")
    return Case(fn, "is_empty", lambda p, x: math.prod(x.shape) == 0)
  assert kind == "depth_at_least"
  fn = named(lambda path, leaf: path.count("/") >= arg,
             f"depth_at_least_{arg}")
  return Case(fn, f"depth_at_least_{arg}",
              lambda p, x: len(p.split("/")) - 1 >= arg)


@st.composite
def glob_from(draw, path):
  """A glob generalising ``path`` (which it may or may not match)."""
  if not path:
    segs = [draw(st.sampled_from(("**", "*", "a/**", "**/kernel")))]
  else:
    segs = []
    for seg in path.split("/"):
      kind = draw(st.sampled_from(
          ("keep", "keep", "star", "head*", "*tail", "?", "[]", "**",
           "other")))
      k = draw(st.integers(0, len(seg)))
      if kind == "keep":
        segs.append(seg)
      elif kind == "star":
        segs.append("*")
      elif kind == "head*":
        segs.append(seg[:k] + "*")
      elif kind == "*tail":
        segs.append("*" + seg[k:])
      elif kind == "?":
        k = min(k, len(seg) - 1)
        segs.append(seg[:k] + "?" + seg[k + 1:])
      elif kind == "[]":
        segs.append(f"[{seg[0]}x]{seg[1:]}")
      elif kind == "**":
        segs.append("**")
      else:
        segs.append(draw(st.sampled_from(KEYS + ("0", "1"))))
    extra = draw(st.sampled_from(("", "", "prefix", "suffix", "cut",
                                  "child")))
    if extra == "prefix":
      segs = ["**"] + segs
    elif extra == "suffix":
      segs = segs + ["**"]
    elif extra == "cut":  # an ancestor, '<prefix>/**'
      segs = segs[:draw(st.integers(1, len(segs)))] + ["**"]
    elif extra == "child":  # '<prefix>/*': one segment more, not two
      segs = segs[:draw(st.integers(0, len(segs) - 1))] + ["*"]
  pattern = "/".join(segs)
  return ("/" + pattern) if draw(st.booleans()) and draw(st.booleans()) else (
      pattern)


@st.composite
def case_from(draw, leaf_list, depth=0):
  """One selector for a tree whose leaves are ``[(path, shape)]``."""
  kinds = ["glob", "glob", "glob", "exact", "regex", "ndim", "callable",
           "callable"]
  if depth == 0:
    kinds += ["combine"]
  kind = draw(st.sampled_from(kinds))
  path, leaf = draw(st.sampled_from(leaf_list)) if leaf_list else (
      "", Leaf(()))
  if kind == "exact" and path:
    return glob_case(path)
  if kind in ("glob", "exact"):
    return glob_case(draw(glob_from(path)))
  if kind == "regex":
    k = draw(st.integers(0, len(path)))
    form = draw(st.sampled_from(("exact", "prefix", "suffix", "any")))
    if form == "exact":
      return regex_case(re.escape(path), lambda p, x: p == path)
    if form == "prefix":
      return regex_case(re.escape(path[:k]) + ".*",
                        lambda p, x: p.startswith(path[:k]))
    if form == "suffix":
      return regex_case(".*" + re.escape(path[k:]),
                        lambda p, x: p.endswith(path[k:]))
    return regex_case(".+", lambda p, x: bool(p))
  if kind == "ndim":
    k = draw(st.integers(0, 3))
    if draw(st.booleans()):
      return Case(lw.ndim_at_least(k), f"ndim_at_least({k})",
                  lambda p, x: len(x.shape) >= k)
    return Case(lw.ndim_at_most(k), f"ndim_at_most({k})",
                lambda p, x: len(x.shape) <= k)
  if kind == "callable":
    which = draw(st.sampled_from(("shape_is", "dtype_is", "empty",
                                  "depth_at_least")))
    arg = {"shape_is": st.just(leaf.shape),
           "dtype_is": st.sampled_from((leaf.dtype,) + DTYPES)}.get(
               which, st.integers(0, 2))
    return callable_case(which, draw(arg))
  a = draw(case_from(leaf_list, depth + 1))
  op = draw(st.sampled_from(("not", "any", "all", "|", "&", "~")))
  if op in ("not", "~"):
    sel = lw.not_(a.selector) if op == "not" else ~lw.any_of(a.selector)
    return Case(sel, sel.text, lambda p, x: not a.ref(p, x))
  b = draw(case_from(leaf_list, depth + 1))
  if op in ("any", "all"):
    sel = (lw.any_of if op == "any" else lw.all_of)(a.selector, b.selector)
  else:
    left = lw.any_of(a.selector)  # a Selector, so that | and & apply
    sel = (left | b.selector) if op == "|" else (left & b.selector)
  if op in ("any", "|"):
    return Case(sel, sel.text, lambda p, x: a.ref(p, x) or b.ref(p, x))
  return Case(sel, sel.text, lambda p, x: a.ref(p, x) and b.ref(p, x))


CATCH_ALL = glob_case("**")


@st.composite
def rule_cases(draw, skeleton, catch_all=None, max_rules=5):
  """Random selectors for ``skeleton``, a catch-all last if ``catch_all``
  (None: drawn)."""
  leaf_list = ref_leaves(skeleton)
  # After a tree, Hypothesis draws the first option much more often than
  # the others (over half the time): make it a typical one.
  n = draw(st.sampled_from((3,) + tuple(range(max_rules + 1))))
  cases = draw(st.lists(case_from(leaf_list), min_size=n, max_size=n))
  if catch_all is None:
    catch_all = draw(st.sampled_from((True, False)))
  return cases + [CATCH_ALL] if catch_all else cases


def distinct_values(n):
  return st.lists(st.floats(0.0, 4.0, width=32), min_size=n, max_size=n,
                  unique=True)


def reference(cases, leaf_list):
  """Per leaf the index of the first matching rule (None: no rule), and
  per rule the leaves it matches."""
  matches = [[i for i, (p, x) in enumerate(leaf_list) if c.ref(p, x)]
             for c in cases]
  winner = [next((r for r, m in enumerate(matches) if i in m), None)
            for i in range(len(leaf_list))]
  return winner, matches


# ---------------------------------------------------------- comparisons


def assert_same_structure(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def assert_bitwise(a, b):
  """Same structure, shapes, dtypes and bits."""
  assert_same_structure(a, b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), (x, y)


def assert_ulp(a, b, maxulp=1):
  """Same structure, shapes and dtypes; values within ``maxulp`` (separately
  compiled graphs may fuse differently)."""
  assert_same_structure(a, b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    if jnp.issubdtype(x.dtype, jnp.floating) and x.size:
      np.testing.assert_array_max_ulp(x, y, maxulp=maxulp)
    else:
      np.testing.assert_array_equal(x, y)


def run(tx, params, grads, jit=False):
  """The updates of ``len(grads)`` steps, and the last state (eager by
  default: a compile per example costs ten times the steps)."""
  state = tx.init(params)
  step = jax.jit(tx.update) if jit else tx.update
  out = []
  for g in grads:
    u, state = step(g, state, params)
    out.append(u)
  return out, state


OPTIMIZERS = {
    "adam": lambda: optax.adam(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "sgd": lambda: optax.sgd(0.1),
}


@st.composite
def training(draw, skeleton_strategy=skeletons, steps=3):
  """A skeleton, its params and ``steps`` gradients (other values)."""
  skeleton = draw(skeleton_strategy)
  seed = draw(st.integers(0, 2**16))
  params = materialize(skeleton, seed)
  grads = [materialize(skeleton, seed + 1 + k) for k in range(steps)]
  return skeleton, params, grads


# ------------------------------------------------------------ 8. paths


@cfg(150)
@given(skeletons, st.integers(0, 100))
def test_paths_are_the_documented_names_and_unique(skeleton, seed):
  tree = materialize(skeleton, seed)
  paths = lw.paths(tree)
  assert_same_structure(paths, jax.tree_util.tree_map(lambda x: "", tree))
  names = jax.tree_util.tree_leaves(paths)
  assert names == [p for p, _ in ref_leaves(skeleton)]
  assert len(set(names)) == len(names)
  assert [x.shape for x in jax.tree_util.tree_leaves(tree)] == [
      x.shape for _, x in ref_leaves(skeleton)]
  # The same names for ShapeDtypeStructs and for other values.
  assert lw.paths(specs_of(tree)) == paths
  assert lw.paths(materialize(skeleton, seed + 1)) == paths


# -------------------------------------------------- 1. total, deterministic


@cfg(100)
@given(st.data())
def test_resolution_is_total_and_deterministic(data):
  skeleton = data.draw(skeletons)
  cases = data.draw(rule_cases(skeleton, catch_all=True))
  values = data.draw(distinct_values(len(cases)))
  tree = materialize(skeleton, 0)
  rules = [(c.selector, v) for c, v in zip(cases, values)]
  out = lw.resolve(rules, tree, strict=False)
  # Total: every leaf has a rule's value; None leaves and empty subtrees
  # stay where they are.
  assert_same_structure(out, tree)
  got = jax.tree_util.tree_leaves(out)
  assert len(got) == len(ref_leaves(skeleton))
  assert all(v in values for v in got)
  # Deterministic: again, on a rebuilt rule set (a dict where the selectors
  # are distinct, a RuleSet), on other values, on ShapeDtypeStructs.
  assert lw.resolve(rules, tree, strict=False) == out
  assert lw.resolve(list(rules), materialize(skeleton, 1), strict=False) == out
  assert lw.resolve(_resolve.RuleSet(_resolve.RuleSet(rules)), specs_of(tree),
                    strict=False) == out
  if len({s for s, _ in rules}) == len(rules):
    assert lw.resolve(dict(rules), tree, strict=False) == out
  # strict=False never raises, with or without a catch-all.
  no_catch_all = rules[:-1]
  partial = lw.resolve(no_catch_all, tree, strict=False)
  assert len(flat_up_to(tree, partial)) == len(got)


# ---------------------------------------------------- 2. first match wins


@cfg(200)
@given(st.data())
def test_first_match_wins(data):
  skeleton = data.draw(skeletons)
  cases = data.draw(rule_cases(skeleton))
  values = data.draw(distinct_values(len(cases) + 1))
  default = data.draw(st.sampled_from((_resolve.MISSING, values[-1])))
  tree = materialize(skeleton, 0)
  leaf_list = ref_leaves(skeleton)
  rule_set = _resolve.RuleSet([(c.selector, v) for c, v in zip(cases, values)])

  def check(tree, leaf_list):
    winner, matches = reference(cases, leaf_list)
    fallback = None if default is _resolve.MISSING else default
    expected = [fallback if r is None else values[r] for r in winner]
    res = rule_set.resolve(tree, default=default, strict=False)
    assert flat_up_to(tree, res.tree()) == expected
    assert list(res.rule_index) == [-1 if r is None else r for r in winner]
    assert list(res.paths) == [p for p, _ in leaf_list]
    # strict=True raises exactly for the documented mistakes, naming them.
    unmatched = ([p for (p, _), r in zip(leaf_list, winner) if r is None]
                 if default is _resolve.MISSING else [])
    unused = [c.text for c, m in zip(cases, matches) if not m]
    # A final pure catch-all ('**', re.compile('.*')) after no other may
    # take nothing: it is defensive, not dead.
    pure = [c.selector in ("**", "/**") or (
        isinstance(c.selector, re.Pattern) and c.selector.pattern == ".*")
            for c in cases]
    shadowed = [c.text for r, (c, m) in enumerate(zip(cases, matches))
                if m and all(winner[i] != r for i in m)
                and not (r == len(cases) - 1 and pure[r] and not any(pure[:r]))]
    if unmatched or unused or shadowed:
      with pytest.raises(lw.RuleError) as info:
        rule_set.resolve(tree, default=default)
      e = info.value
      assert (list(e.unmatched), list(e.unused), list(e.shadowed)) == (
          unmatched, unused, shadowed)
    else:
      assert rule_set.resolve(tree, default=default).tree() == res.tree()

  check(tree, leaf_list)
  # The same rule set on the same structure with other shapes and dtypes:
  # callables see them (the cache is per structure, shapes and dtypes), then
  # the first tree again.
  for shapes in ("same", "other"):
    other = releaf(skeleton, [data.draw(st.builds(
        Leaf, st.just(x.shape) if shapes == "same" else st.sampled_from(
            SHAPES), st.sampled_from(DTYPES))) for _, x in leaf_list])
    check(materialize(other, 1), ref_leaves(other))
  check(specs_of(tree), leaf_list)


# ------------------------------------------------- 3. scale_by_rules ones


@cfg(30)
@given(training(), st.data())
def test_scale_by_rules_with_ones_is_the_identity(train, data):
  skeleton, params, grads = train
  cases = data.draw(rule_cases(skeleton))
  rules = [(c.selector, 1.0) for c in cases]
  tx = lw.scale_by_rules(rules, default=1.0, strict=False)
  updates, state = run(tx, params, grads, jit=True)
  for u, g in zip(updates, grads):
    assert_bitwise(u, g)
  assert int(state.count) == len(grads)


# ------------------------------------------------------ 4. partition


@cfg(20)
@given(training(), st.sampled_from(sorted(OPTIMIZERS)), st.data())
def test_partition_of_one_group_is_the_bare_optimizer(train, name, data):
  skeleton, params, grads = train
  opt = OPTIMIZERS[name]()
  expected, bare_state = run(opt, params, grads)
  # One rule for everything.
  has_leaves = bool(jax.tree_util.tree_leaves(params))
  updates, state = run(lw.partition({"**": opt}, strict=has_leaves), params,
                       grads)
  assert_ulp(updates, expected)
  assert len(state.inner_states) == 1
  assert_ulp(state.inner_states[0], bare_state)
  # Many rules, one optimizer object: one shared group.
  cases = data.draw(rule_cases(skeleton, catch_all=True))
  tx = lw.partition([(c.selector, opt) for c in cases], strict=False)
  updates, state = run(tx, params, grads)
  assert_ulp(updates, expected)
  assert len(state.inner_states) == 1
  assert_ulp(state.inner_states[0], bare_state)


@cfg(15)
@given(training(), st.sampled_from(sorted(OPTIMIZERS)), st.data())
def test_partition_into_equal_optimizers_is_optax_partition(
    train, name, data):
  # Groups of equal copies, each with its own state masked to its group:
  # optax.partition with the reference's labels, and (these optimizers are
  # elementwise) the bare optimizer up to rounding (not to the ulp: with
  # optax 0.2.8, adam on a leaf alone and among others differs by 2 ulp).
  skeleton, params, grads = train
  cases = data.draw(rule_cases(skeleton, catch_all=True))
  winner, _ = reference(cases, ref_leaves(skeleton))
  label_tree = jax.tree_util.tree_structure(params).unflatten(
      [f"g{r}" for r in winner])
  expected, _ = run(optax.partition(
      {f"g{r}": OPTIMIZERS[name]() for r in range(len(cases))}, label_tree),
      params, grads)
  tx = lw.partition([(c.selector, OPTIMIZERS[name]()) for c in cases],
                    strict=False)
  updates, state = run(tx, params, grads)
  assert_ulp(updates, expected)
  assert len(state.inner_states) == len(cases)
  bare, _ = run(OPTIMIZERS[name](), params, grads)
  for x, y in zip(jax.tree_util.tree_leaves(updates),
                  jax.tree_util.tree_leaves(bare)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------- 5. freeze


@cfg(20)
@given(training(), st.sampled_from(sorted(OPTIMIZERS)),
       st.sampled_from(("all False", "no match", "never", "random False")),
       st.data())
def test_freeze_of_nothing_is_the_bare_optimizer(train, name, how, data):
  skeleton, params, grads = train
  opt = OPTIMIZERS[name]()
  has_leaves = bool(jax.tree_util.tree_leaves(params))
  if how == "all False":
    tx = lw.freeze(opt, {"**": False}, strict=has_leaves)
  elif how == "no match":
    tx = lw.freeze(opt, "zz/**", strict=False)
  elif how == "never":
    tx = lw.freeze(opt, named(lambda p, leaf: False, "never"), strict=False)
  else:
    cases = data.draw(rule_cases(skeleton, catch_all=True))
    tx = lw.freeze(opt, [(c.selector, False) for c in cases], strict=False)
  expected, bare_state = run(opt, params, grads)
  updates, state = run(tx, params, grads)
  assert_ulp(updates, expected)
  assert_ulp(state.inner_state, bare_state)


# --------------------------------------------------- 6. reparameterize


@cfg(20)
@given(training(), st.sampled_from(sorted(OPTIMIZERS)), st.data())
def test_reparameterize_with_ones_is_the_bare_optimizer(train, name, data):
  skeleton, params, grads = train
  opt = OPTIMIZERS[name]()
  expected, bare_state = run(opt, params, grads)
  has_leaves = bool(jax.tree_util.tree_leaves(params))
  tx = lw.reparameterize(opt, {"**": 1.0}, strict=has_leaves)
  updates, state = run(tx, params, grads)
  assert_ulp(updates, expected)
  assert_ulp(state.inner_state, bare_state)
  cases = data.draw(rule_cases(skeleton))
  tx = lw.reparameterize(opt, [(c.selector, 1.0) for c in cases],
                         default=1.0, strict=False)
  updates, _ = run(tx, params, grads)
  assert_ulp(updates, expected)


# ----------------------------------------------------------- 7. labels


@cfg(40)
@given(skeletons, st.data())
def test_labels_are_the_same_from_params_updates_tracers_and_specs(
    skeleton, data):
  cases = data.draw(rule_cases(skeleton, catch_all=True))
  rules = [(c.selector, f"group_{i}") for i, c in enumerate(cases)]
  label_fn = lw.labels(rules, strict=False)
  params, updates = materialize(skeleton, 0), materialize(skeleton, 1)
  expected = label_fn(params)
  winner, _ = reference(cases, ref_leaves(skeleton))
  assert jax.tree_util.tree_leaves(expected) == [f"group_{r}" for r in winner]
  assert_same_structure(expected, params)
  assert label_fn(updates) == expected
  assert label_fn(specs_of(updates)) == expected
  assert lw.labels(rules, strict=False)(updates) == expected  # a fresh one
  traced = []

  def f(tree):
    traced.append(label_fn(tree))
    return tree

  jax.jit(f)(updates)
  jax.eval_shape(lambda tree: f(tree), specs_of(params))  # not jit's cache
  assert traced == [expected, expected]


# -------------------------------------------- 8. every update keeps structure


CLIPPERS = (None, lw.clip_value(0.5), lw.clip_norm(1.0), lw.clip_group_norm(1.0),
            lw.clip_adaptive(0.1), lw.clip_quantile(0.9, 4), lw.clip_zscore())


def _negate(u, p, path):
  return -u


@cfg(15)
@given(training(steps=2), st.data())
def test_every_transformation_keeps_the_structure(train, data):
  skeleton, params, grads = train
  leaf_list = ref_leaves(skeleton)
  draw = data.draw

  def rules_of(values):
    cases = draw(rule_cases(skeleton, catch_all=False))
    picked = [draw(st.sampled_from(values)) for _ in cases]
    winner, _ = reference(cases, leaf_list)
    return [(c.selector, v) for c, v in zip(cases, picked)], [
        None if r is None else picked[r] for r in winner]

  scale_rules, scale_ref = rules_of((0.0, 0.5, 1.0, 3.0))
  freeze_rules, freeze_ref = rules_of((True, False))
  where = draw(case_from(leaf_list))
  where_ref = [where.ref(p, x) for p, x in leaf_list]
  sgd = optax.sgd(0.1)
  txs = {
      "scale": lw.scale_by_rules(scale_rules, default=1.0, strict=False),
      "decay": lw.add_decayed_weights(rules_of((0.0, 0.1))[0], default=0.0,
                                      strict=False),
      "clip": lw.clip_by_rules(rules_of(CLIPPERS)[0], default=CLIPPERS[3],
                               strict=False),
      "track": lw.track_norms(rules_of(("{parent}", "{path}", "g", None))[0],
                              default="all", strict=False),
      "map": lw.map_updates(_negate, where.selector, strict=False),
      "partition": lw.partition(
          rules_of((sgd, optax.adam(0.1), None))[0], default=sgd,
          strict=False),
      "freeze": lw.freeze(optax.adam(0.1), freeze_rules + [("**", False)],
                          strict=False),
      "reparameterize": lw.reparameterize(
          optax.adam(0.1), rules_of((0.5, 1.0, 2.0))[0], default=1.0,
          strict=False),
  }
  states = {k: tx.init(params) for k, tx in txs.items()}

  @jax.jit
  def step(g, states):
    out = {k: tx.update(g, states[k], params) for k, tx in txs.items()}
    return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in
                                                 out.items()}

  for g in grads:
    updates, states = step(g, states)
    g_leaves = jax.tree_util.tree_leaves(g)
    for k, u in updates.items():
      assert_same_structure(u, params)
      u_leaves = jax.tree_util.tree_leaves(u)
      assert [(x.shape, x.dtype) for x in u_leaves] == [
          (x.shape, x.dtype) for x in g_leaves], k
      assert all(np.isfinite(x).all() for x in u_leaves), k
    # Exact values where the reference is one line (a multiplier of 0 is
    # an exact +0, never 0 * x: -0 for a negative x, NaN for a NaN).
    expect = [np.zeros_like(x) if m == 0 else
              x * np.float32(1.0 if m is None else m)
              for x, m in zip(g_leaves, scale_ref)]
    assert_bitwise(jax.tree_util.tree_leaves(updates["scale"]), expect)
    assert_bitwise(jax.tree_util.tree_leaves(updates["track"]), g_leaves)
    expect = [-x if w else x for x, w in zip(g_leaves, where_ref)]
    assert_bitwise(jax.tree_util.tree_leaves(updates["map"]), expect)
    for x, frozen in zip(jax.tree_util.tree_leaves(updates["freeze"]),
                         freeze_ref):
      if frozen:
        assert_bitwise(x, np.zeros_like(x))


# ------------------------------------------------------ trees with no leaves


@cfg(40)
@given(empty_skeletons, st.data())
def test_trees_without_leaves(skeleton, data):
  # No leaves: nothing to name, nothing to match. Resolution gives back the
  # empty structure; a strict rule set with rules finds them all unused
  # (the documented "a selector that matches no leaf is an error").
  tree = skeleton
  assert jax.tree_util.tree_leaves(lw.paths(tree)) == []
  assert_same_structure(lw.paths(tree), tree)
  cases = data.draw(rule_cases(skeleton))
  rules = [(c.selector, 1.0) for c in cases]
  assert_same_structure(lw.resolve(rules, tree, strict=False), tree)
  assert_same_structure(lw.resolve(rules, tree, default=2.0, strict=False),
                        tree)
  assert_same_structure(lw.resolve({}, tree), tree)
  if rules:
    with pytest.raises(lw.RuleError) as info:
      lw.resolve(rules, tree)
    assert list(info.value.unused) == [c.text for c in cases]
  assert lw.labels(rules, strict=False)(tree) == lw.resolve({}, tree)
  txs = [lw.scale_by_rules(rules, strict=False),
         lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}, strict=False),
         lw.track_norms({"**": "{path}"}, strict=False),
         lw.map_updates(_negate, strict=False),
         lw.reparameterize(optax.adam(0.1), {"**": 2.0}, strict=False),
         lw.partition({"**": optax.adam(0.1)}, strict=False),
         lw.freeze(optax.adam(0.1), "**", strict=False)]
  if tree is not None:  # a None tree of params reads as "no params"
    txs.append(lw.add_decayed_weights({"**": 0.1}, strict=False))
  for tx in txs:
    updates, state = run(tx, tree, [tree, tree])
    assert_same_structure(updates[-1], tree)
    assert all(x.size <= 1 for x in jax.tree_util.tree_leaves(state))
