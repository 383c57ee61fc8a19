"""Tests for layerwise._rules: selectors, resolution, labels and errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import layerwise as lw
from conftest import reference_glob
from layerwise import _resolve, _selectors


def spec(*shape, dtype="float32"):
  return jax.ShapeDtypeStruct(shape, dtype)


def glob_matches(pattern, path):
  return _selectors.compile_selector(pattern).match(path, spec())


# A tree shaped like a small transformer, used throughout.
PARAMS = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "encoder": {
        f"layers_{i}": {
            "attn": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
            "norm": {"scale": jnp.ones(4)},
        } for i in range(3)
    },
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
}

# ------------------------------------------------------------------- globs


@pytest.mark.parametrize("pattern, path, expected", [
    ("a/*", "a/b", True),
    ("a/*", "a/b/c", False),          # '*' stays within one segment
    ("a*", "abc", True),
    ("a*", "a/b", False),
    ("layers_*/kernel", "layers_12/kernel", True),
    ("**", "a/b/c", True),
    ("**", "a", True),
    ("a/**", "a", True),              # '**' matches no segment too
    ("a/**", "a/b/c", True),
    ("a/**", "ab/c", False),
    ("**/c", "c", True),
    ("**/c", "a/b/c", True),
    ("**/c", "a/bc", False),
    ("a/**/c", "a/c", True),
    ("a/**/c", "a/x/y/c", True),
    ("a/**/c", "a/xc", False),
    ("a/**/b/**", "a/x/b/y/z", True),
    ("?", "a", True),
    ("?", "ab", False),
    ("layers_[0-2]/*", "layers_1/w", True),
    ("layers_[0-2]/*", "layers_3/w", False),
    ("layers_[!0-2]/*", "layers_3/w", True),
    ("/a/b", "a/b", True),            # a leading '/' is ignored
    ("a.b", "axb", False),            # regex metacharacters are literal
    ("a+b", "a+b", True),
    ("(x)", "(x)", True),
    ("a", "a/b", False),              # globs match the whole path
])
def test_glob_semantics(pattern, path, expected):
  assert glob_matches(pattern, path) is expected


@pytest.mark.parametrize("pattern, message", [
    ("", "is empty"),
    ("/", "is empty"),
    ("a//b", "empty path segment"),
    ("a/", "empty path segment"),
    ("a**", "'**' must be a whole path segment"),
    ("**b/c", "'**' must be a whole path segment"),
    ("layers_[0-2", "unclosed '['"),
])
def test_bad_globs(pattern, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _selectors.compile_selector(pattern)


segment = st.text(alphabet="abc_01", min_size=1, max_size=4)
glob_segment = st.one_of(
    segment, st.just("*"), st.just("**"), st.just("?"), st.just("[ab]"),
    st.builds(lambda s: s + "*", segment), st.builds(lambda s: "*" + s, segment),
    st.builds(lambda s: s + "?", segment), st.just("[!a]*"))


@settings(max_examples=300, deadline=None)
@given(st.lists(glob_segment, min_size=1, max_size=4),
       st.lists(segment, min_size=1, max_size=5))
def test_glob_agrees_with_fnmatch_reference(pattern_segs, path_segs):
  pattern, path = "/".join(pattern_segs), "/".join(path_segs)
  assert glob_matches(pattern, path) == reference_glob(pattern, path)


# ---------------------------------------------------------- numeric ranges


@pytest.mark.parametrize("pattern, path, expected", [
    ("layers_{0..11}", "layers_0", True),
    ("layers_{0..11}", "layers_7", True),
    ("layers_{0..11}", "layers_11", True),
    ("layers_{0..11}", "layers_12", False),
    ("layers_{0..11}", "layers_01", False),  # no leading zeros
    ("layers_{0..11}", "layers_", False),
    ("layers_{2..10}", "layers_1", False),
    ("layers_{2..10}", "layers_2", True),
    ("layers_{2..10}", "layers_10", True),
    ("{00..11}", "00", True),                # padded to the bounds' width
    ("{00..11}", "07", True),
    ("{00..11}", "11", True),
    ("{00..11}", "7", False),
    ("{00..11}", "12", False),
    ("{1..010}", "001", True),
    ("{1..010}", "010", True),
    ("{1..010}", "1", False),
    ("{7..7}", "7", True),
    ("w{0..3}_{0..1}", "w3_1", True),
    ("w{0..3}_{0..1}", "w4_0", False),
    ("w{0..3}x", "w12x", False),
    ("layers_{0..11}/**", "layers_11/attn/kernel", True),
    ("blocks/{0..2}/*", "blocks/2/w", True),
    ("blocks/{0..2}/*", "blocks/3/w", False),
    ("[{]0..1}", "{0..1}", True),            # a literal '{'
])
def test_numeric_range_semantics(pattern, path, expected):
  assert glob_matches(pattern, path) is expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.booleans())
def test_numeric_range_is_exactly_its_numbers(a, b, padded):
  lo, hi = min(a, b), max(a, b)
  width = len(str(hi)) + 1 if padded else 0
  first = str(lo).zfill(width) if padded else str(lo)
  sel = _selectors.compile_selector(f"n{{{first}..{hi}}}")
  # Every number up to past the range, written plainly and padded.
  for k in range(0, hi + 1200, 7 if hi > 500 else 1):
    for text in {str(k), str(k).zfill(width)}:
      expected = lo <= k <= hi and text == (str(k).zfill(width) if padded
                                           else str(k))
      assert sel.match("n" + text, spec()) is expected, (first, hi, text)


@pytest.mark.parametrize("pattern, message", [
    ("layers_[0-11]/**", "write 'layers_{0..11}/**'"),
    ("layers_[0-11]/**", "which matches one character, '0', '1', not a "
                         "number of several digits"),
    ("x[2-10]", "write 'x{2..10}'"),
    ("x[10-12]", "write 'x{10..12}'"),
    ("x[!0-11]", "one character other than '0', '1'"),
    ("a{5..2}", "is empty, its first number is larger than its last. "
                "Write '{2..5}'"),
    ("a{x..y}", "'{x..y}' is not a numeric range"),
    ("a{q,k,v}", "'{q,k,v}' is not a numeric range"),
    ("a{-1..3}", "'{-1..3}' is not a numeric range"),
    ("a{0..3", "has an unclosed '{'"),
    ("a{0..3/b}", "has an unclosed '{'"),
])
def test_bad_numeric_ranges(pattern, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _selectors.compile_selector(pattern)


@pytest.mark.parametrize("pattern", ["[0-9]", "[01]", "[0-35-9]", "[a-z0-9]",
                                     "[!0-2]", "x[1-2]y"])
def test_classes_of_single_digits_stay_classes(pattern):
  _selectors.compile_selector(pattern)


DEEP = {f"layers_{i}": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
        for i in range(24)}


def test_ranges_in_the_index_agree_with_trying_every_rule():
  # The index puts a glob in a trie by its literal leading segments; a
  # range is not literal, so these must be tried, in order, like any glob.
  rules = [("layers_1{0..3}/b", 0), ("layers_{0..3}/*", 1),
           ("layers_{20..23}/w", 2), ("**/layers_{4..9}/**", 3),
           (re.compile(r"layers_1\d/w"), 4), ("layers_{10..23}/**", 5),
           ("**", 6)]
  res = _resolve.RuleSet(rules).resolve(DEEP)
  compiled = [_selectors.compile_selector(s) for s, _ in rules]
  expected = [next(r for r, c in enumerate(compiled) if c.match(p, s))
              for p, s in zip(res.paths, res.specs)]
  assert list(res.rule_index) == expected
  out = lw.resolve(rules, DEEP)
  assert [out[f"layers_{i}"]["w"] for i in range(24)] == (
      [1] * 4 + [3] * 6 + [4] * 10 + [2] * 4)
  assert [out[f"layers_{i}"]["b"] for i in range(24)] == (
      [1] * 4 + [3] * 6 + [0] * 4 + [5] * 10)


def test_the_issue_bracket_range_is_refused_and_the_range_trains_12_layers():
  with pytest.raises(ValueError, match=re.escape("'layers_{0..11}/**'")):
    lw.scale_by_rules({"layers_[0-11]/**": 0.1, "**": 1.0})
  tx = optax.chain(optax.sgd(1.0),
                   lw.scale_by_rules({"layers_{0..11}/**": 0.1, "**": 1.0}))
  updates, _ = tx.update(DEEP, tx.init(DEEP))
  got = [float(updates[f"layers_{i}"]["b"][0]) for i in range(24)]
  np.testing.assert_allclose(got, [-0.1] * 12 + [-1.0] * 12, rtol=1e-6)


def test_ranges_work_wherever_a_glob_does():
  # freeze: exactly layers 0..11 get a zero update and hold no state.
  tx = lw.freeze(optax.adam(1.0), "layers_{0..11}/**")
  state = tx.init(DEEP)
  updates, _ = tx.update(DEEP, state)
  assert [float(updates[f"layers_{i}"]["w"].sum()) == 0.0
          for i in range(24)] == [True] * 12 + [False] * 12
  assert sorted(state.inner_state[0].mu) == sorted(
      f"layers_{i}" for i in range(12, 24))
  # set_scale picks the leaves of the range.
  state = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0})).init(DEEP)
  state = lw.set_scale(state, "layers_{20..23}/*", 0.5)
  scale = state[1]
  picked = [p for p, v in zip(scale.rules.paths, scale.multipliers.tolist())
            if v == 0.5]
  assert picked == sorted(f"layers_{i}/{k}" for i in range(20, 24)
                          for k in "bw")
  # labels, and describe names the rule as written.
  label_fn = lw.labels({"layers_{0..5}/**": "low", "**": "high"})
  assert [label_fn(DEEP)[f"layers_{i}"]["w"] for i in (0, 5, 6)] == [
      "low", "low", "high"]
  table = str(lw.describe({"layers_{0..5}/**": 0.5, "**": 1.0}, DEEP))
  assert "'layers_{0..5}/**'" in table
  # transplant copies the range only.
  zeros = jax.tree_util.tree_map(jnp.zeros_like, DEEP)
  copied, _ = lw.transplant(zeros, DEEP, "layers_{0..1}/**")
  assert [float(copied[f"layers_{i}"]["w"].sum()) for i in range(3)] == [
      4.0, 4.0, 0.0]


def test_a_range_that_matches_nothing_is_a_typo_with_the_closest_paths():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"layer_{0..3}/**": 0.1, "**": 1.0}, DEEP)
  assert info.value.unused == ("'layer_{0..3}/**'",)
  assert "(closest: 'layers_" in str(info.value)
  with pytest.raises(lw.RuleError) as info:  # a range past the last layer
    lw.resolve({"layers_{24..31}/**": 0.1, "**": 1.0}, DEEP)
  assert info.value.unused == ("'layers_{24..31}/**'",)
  with pytest.raises(lw.RuleError) as info:  # leaves outside every range
    lw.resolve({"layers_{0..11}/**": 0.1, "layers_{13..23}/**": 1.0}, DEEP)
  assert info.value.unmatched == ("layers_12/b", "layers_12/w")
  assert "(closest selector: " in str(info.value)


# ----------------------------------------------------- regexes and callables


def test_regex_is_a_full_match():
  assert not glob_matches(re.compile("enc"), "encoder/w")
  assert glob_matches(re.compile("enc.*"), "encoder/w")
  assert glob_matches(re.compile(r".*/(kernel|bias)"), "a/b/bias")


def test_callable_sees_shape_and_dtype_never_values():
  seen = []

  def selector(path, leaf):
    seen.append((path, type(leaf)))
    return leaf.ndim == 1

  out = lw.resolve({selector: "vector", "**": "matrix"},
                   {"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
  assert out == {"w": "matrix", "b": "vector"}
  assert seen == [("b", jax.ShapeDtypeStruct), ("w", jax.ShapeDtypeStruct)]


def test_callable_under_jit_sees_same_specs():
  rule_set = _resolve.RuleSet({lw.ndim_at_most(1): 0.0, "**": 1.0})
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}

  @jax.jit
  def f(p):
    values = rule_set.resolve(p).tree()
    return jax.tree_util.tree_map(lambda v, x: v * x, values, p)

  out = f(params)
  np.testing.assert_array_equal(out["b"], np.zeros(2))
  np.testing.assert_array_equal(out["w"], np.ones((2, 2)))


def test_callable_must_return_bool():
  with pytest.raises(TypeError, match=r"returned ArrayImpl for parameter 'w'"):
    lw.resolve({lambda p, leaf: jnp.array(True): 1.0}, {"w": jnp.ones(2)})


@pytest.mark.parametrize("selector", [3, 1.5, None, b"a/**"])
def test_non_selector_is_type_error(selector):
  with pytest.raises(TypeError, match="is not a selector"):
    lw.resolve({selector: 1.0}, {"w": jnp.ones(2)})


@pytest.mark.parametrize("rules, message", [
    ("**", "must be a mapping"),
    ({"**"}, "must be a mapping"),
    (3, "must be a mapping"),
    ([("**", 1.0), "head/**"], "Rule 1 is 'head/\\*\\*'"),
    ([("**", 1.0, 2.0)], "Rule 0"),
    (optax.identity(), "must be a mapping"),  # a NamedTuple, not pairs
])
def test_bad_rule_set_types(rules, message):
  with pytest.raises(TypeError, match=message):
    lw.resolve(rules, {"w": jnp.ones(2)})


# ------------------------------------------------------------- combinators


def test_ndim_predicates():
  assert lw.ndim_at_most(1)("s", spec())
  assert lw.ndim_at_most(1)("b", spec(3))
  assert not lw.ndim_at_most(1)("w", spec(3, 3))
  assert lw.ndim_at_least(2)("w", spec(3, 3))
  assert not lw.ndim_at_least(2)("b", spec(3))
  assert repr(lw.ndim_at_most(1)) == "ndim_at_most(1)"


@pytest.mark.parametrize("k", [-1, 1.5, "2", True])
def test_ndim_predicates_reject_bad_k(k):
  with pytest.raises(ValueError, match="non-negative int"):
    lw.ndim_at_most(k)


def test_combinators_truth_tables():
  a, b = "x/**", lw.ndim_at_most(1)
  cases = {("x/v", (3,)): (True, True), ("x/m", (3, 3)): (True, False),
           ("y/v", (3,)): (False, True), ("y/m", (3, 3)): (False, False)}
  for (path, shape), (in_a, in_b) in cases.items():
    leaf = spec(*shape)
    assert lw.any_of(a, b)(path, leaf) == (in_a or in_b)
    assert lw.all_of(a, b)(path, leaf) == (in_a and in_b)
    assert lw.not_(a)(path, leaf) == (not in_a)
    # Operators on Selectors give the same answers, with strings either side.
    assert (b | a)(path, leaf) == (a | b)(path, leaf) == (in_a or in_b)
    assert (b & a)(path, leaf) == (a & b)(path, leaf) == (in_a and in_b)
    assert (~b)(path, leaf) == (not in_b)


def test_combinator_repr_and_empty():
  sel = lw.any_of("**/bias", re.compile(".*norm.*")) & ~lw.ndim_at_least(2)
  # Named by the expression that builds it, parenthesized where the
  # operator changes.
  assert repr(sel) == ("('**/bias' | re.compile('.*norm.*')) & "
                       "~ndim_at_least(2)")
  assert repr(lw.all_of(lw.ndim_at_least(2),
                        lw.not_(lw.any_of("**/bias", "**/scale")))) == (
      "ndim_at_least(2) & ~('**/bias' | '**/scale')")
  assert repr(lw.any_of(lw.any_of("a", "b"), lw.all_of("c", "d"), "e")) == (
      "'a' | 'b' | ('c' & 'd') | 'e'")
  assert repr(lw.not_(lw.not_("a"))) == "~~'a'"
  assert repr(lw.any_of("a")) == "'a'" and repr(~lw.all_of("a")) == "~'a'"
  # A named selector keeps its name inside combinations.
  assert repr(lw.NO_DECAY | "**/pos_embed") == "lw.NO_DECAY | '**/pos_embed'"
  named = lw.Selector(sel, "norms and biases")
  assert repr(named & "a/**") == "norms and biases & 'a/**'"
  with pytest.raises(ValueError, match="at least one selector"):
    lw.any_of()


def test_no_decay_selector_without_lookahead():
  # "everything but biases and norms" without a negative-lookahead regex.
  decay = lw.resolve({lw.any_of("**/bias", "**/norm/**"): 0.0, "**": 0.1},
                     PARAMS)
  assert decay["encoder"]["layers_1"]["attn"] == {"kernel": 0.1, "bias": 0.0}
  assert decay["encoder"]["layers_1"]["norm"] == {"scale": 0.0}
  assert decay["head"] == {"kernel": 0.1, "bias": 0.0}


# -------------------------------------------------------------- resolution


def test_first_match_wins_in_order():
  rules = [("encoder/layers_0/**", 0.2), ("encoder/**", 0.5), ("**", 1.0)]
  out = lw.resolve(rules, PARAMS)
  assert out["encoder"]["layers_0"]["attn"]["kernel"] == 0.2
  assert out["encoder"]["layers_2"]["attn"]["kernel"] == 0.5
  assert out["head"]["bias"] == 1.0
  assert lw.resolve(dict(rules), PARAMS) == out


def test_default_fills_unmatched():
  out = lw.resolve({"head/**": 1.0}, PARAMS, default=0.0)
  assert out["head"] == {"kernel": 1.0, "bias": 1.0}
  assert out["embed"]["embedding"] == 0.0


def test_pytree_values_are_subtrees():
  out = lw.resolve({"**": (1, 2)}, {"w": jnp.ones(2)})
  assert out == {"w": (1, 2)}


def test_resolve_abstract_params_equals_concrete():
  rules = {lw.ndim_at_most(1): "vec", "embed/**": "emb", "**": "mat"}
  abstract = jax.eval_shape(lambda: PARAMS)
  assert lw.resolve(rules, abstract) == lw.resolve(rules, PARAMS)


def test_resolve_on_nnx_state(nnx_model):
  state = nnx.state(nnx_model, nnx.Param)
  out = lw.resolve({"layers/0/**": 0.1, "head/**": 1.0, "**": 0.5}, state)
  assert jax.tree_util.tree_leaves(out["layers"][0]["kernel"]) == [0.1]
  assert jax.tree_util.tree_leaves(out["head"]["bias"]) == [1.0]
  assert jax.tree_util.tree_leaves(out["norm"]["scale"]) == [0.5]


def test_non_array_leaf_is_named():
  with pytest.raises(TypeError, match=r"Parameter 'name' is a str"):
    lw.resolve({"**": 1.0}, {"name": "hello", "w": jnp.ones(2)})


def test_matching_is_cached_per_structure():
  calls = []

  def selector(path, leaf):
    calls.append(path)
    return True

  rule_set = _resolve.RuleSet({selector: 1.0})
  m1 = rule_set.match({"a": jnp.ones(2), "b": jnp.ones(3)})
  m2 = rule_set.match({"a": jnp.zeros(2), "b": jnp.zeros(3)})  # new values
  assert m1 is m2 and calls == ["a", "b"]
  rule_set.match({"a": jnp.ones(5), "b": jnp.ones(3)})  # new shape: rematched
  assert calls == ["a", "b", "a", "b"]


# ------------------------------------------------------------------ errors


def test_unmatched_leaves_error_names_paths_and_suggests():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"embed/**": 0.1, "encoder/**": 0.5}, PARAMS)
  msg = str(info.value)
  assert msg.startswith("2 parameter(s) match no rule:")
  assert "'head/bias'" in msg and "'head/kernel'" in msg
  assert "catch-all '**'" in msg and "default=<value>" in msg
  assert info.value.unmatched == ("head/bias", "head/kernel")
  assert isinstance(info.value, ValueError)


def test_unmatched_error_suggests_the_misspelled_selector():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"embed/**": 0.1, "encodr/**": 0.5, "head/**": 1.0}, PARAMS)
  msg = str(info.value)
  assert ("'encoder/layers_0/attn/bias'  (closest selector: 'encodr/**')"
          in msg)


def test_unmatched_error_lists_at_most_ten():
  params = {f"p{i:02d}": jnp.ones(1) for i in range(25)}
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"p00": 1.0}, params)
  msg = str(info.value)
  assert "24 parameter(s) match no rule" in msg
  assert "'p10'" in msg and "'p11'" not in msg
  assert "... and 14 more" in msg
  assert len(info.value.unmatched) == 24


def test_typo_selector_error_names_it_and_closest_paths():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"encodr/**": 0.5, "**": 1.0}, PARAMS)
  msg = str(info.value)
  assert msg.startswith("1 selector(s) match no parameter (a typo?):")
  assert "rule 0: 'encodr/**'  (closest: 'encoder/**'" in msg
  assert "lw.paths(params)" in msg and "strict=False" in msg
  assert info.value.unused == ("'encodr/**'",)


def test_bare_name_selector_suggests_double_star():
  with pytest.raises(lw.RuleError, match=r"rule 0: 'bias'  \(closest: '\*\*/bias'"):
    lw.resolve({"bias": 0.0, "**": 1.0}, PARAMS)


def test_typo_in_regex_suggests_real_paths():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({re.compile("head/kernal"): 0.0, "**": 1.0}, PARAMS)
  assert ("rule 0: re.compile('head/kernal')  (closest: 'head/kernel'"
          in str(info.value))


def test_callable_matching_nothing_is_reported():
  with pytest.raises(lw.RuleError, match=r"rule 0: ndim_at_least\(3\)"):
    lw.resolve({lw.ndim_at_least(3): 0.0, "**": 1.0}, PARAMS)


def test_shadowed_rule_error():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve({"encoder/**": 0.5, "encoder/layers_0/**": 0.2, "**": 1.0},
               PARAMS)
  msg = str(info.value)
  assert msg.startswith("1 rule(s) are shadowed by earlier rules:")
  assert ("rule 1: 'encoder/layers_0/**' never applies: all 3 parameter(s) "
          "it matches are taken by rule 0 ('encoder/**')") in msg
  assert "put more specific rules first" in msg
  assert info.value.shadowed == ("'encoder/layers_0/**'",)


def test_shadowed_by_several_rules():
  with pytest.raises(lw.RuleError, match=re.escape(
      "taken by rule 0 ('embed/**'), rule 1 ('head/**')")):
    lw.resolve([("embed/**", 1), ("head/**", 2), (re.compile("(embed|head)/.*"), 3),
                ("**", 4)], PARAMS)


@pytest.mark.parametrize("catch_all", ["**", "/**", re.compile(".*")])
def test_final_catch_all_may_take_nothing(catch_all):
  # Every leaf has two or more segments, so '**/*' takes them all and the
  # defensive catch-all that ends the rule set takes none: no error, and
  # every value is the one resolving without the catch-all gives.
  rules = [("embed/**", 0.1), ("**/*", 1.0), (catch_all, 0.0)]
  assert lw.resolve(rules, PARAMS) == lw.resolve(rules[:2], PARAMS)
  tx = lw.scale_by_rules(rules)
  assert tx.init(PARAMS).rules.values == (0.1,) + (1.0,) * 11


@pytest.mark.parametrize("rules, shadowed", [
    # a catch-all that is not the last rule
    ([("**/*", 1.0), ("**", 0.0), ("head/**", 2.0)], ("'**'", "'head/**'")),
    # a second catch-all after a first one is dead code
    ([("**", 1.0), ("**", 0.0)], ("'**'",)),
    # not a pure catch-all: a glob that happens to match everything here
    ([("**/*", 1.0), ("*/**", 0.0)], ("'*/**'",)),
    # nor a callable, which cannot be told apart from any other
    ([("**/*", 1.0), (lw.Selector(lambda p, x: True, "everything"), 0.0)],
     ("everything",)),
])
def test_other_rules_that_take_nothing_are_still_shadowed(rules, shadowed):
  with pytest.raises(lw.RuleError, match="never applies") as info:
    lw.resolve(rules, PARAMS)
  assert info.value.shadowed == shadowed


def test_all_problems_reported_together():
  with pytest.raises(lw.RuleError) as info:
    lw.resolve([("embed/**", 1), ("embed/embedding", 2), ("haed/**", 3)],
               PARAMS)
  e = info.value
  assert len(e.unmatched) == 11 and e.unused == ("'haed/**'",)
  assert e.shadowed == ("'embed/embedding'",)
  msg = str(e)
  assert msg.index("match no rule") < msg.index("match no parameter") < msg.index(
      "shadowed")


def test_strict_false_turns_errors_off():
  rules = {"encodr/**": 0.5, "embed/**": 0.1, "embed/embedding": 0.3}
  out = lw.resolve(rules, PARAMS, strict=False)
  assert out["embed"]["embedding"] == 0.1
  assert out["head"]["kernel"] is None
  out = lw.resolve(rules, PARAMS, strict=False, default=1.0)
  assert out["head"]["kernel"] == 1.0


def test_empty_rules_need_default():
  with pytest.raises(lw.RuleError, match="12 parameter"):
    lw.resolve({}, PARAMS)
  assert lw.resolve({}, {"w": jnp.ones(1)}, default=2.0) == {"w": 2.0}


# ------------------------------------------------------------------ labels


def test_labels_with_optax_partition_under_jit():
  params = {"backbone": {"w": jnp.full((3,), 2.0)},
            "head": {"w": jnp.full((2,), 3.0)}}
  calls = []

  def is_head(path, leaf):
    calls.append(path)
    return path.startswith("head/")

  label_fn = lw.labels({is_head: "train", "**": "frozen"})
  tx = optax.partition({"train": optax.sgd(0.5), "frozen": optax.set_to_zero()},
                       label_fn)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
  for _ in range(3):
    updates, state = step(grads, state, params)
  np.testing.assert_array_equal(updates["head"]["w"], -0.5 * np.ones(2))
  np.testing.assert_array_equal(updates["backbone"]["w"], np.zeros(3))
  # Matched once for the structure: init and the jitted trace share the cache.
  assert calls == ["backbone/w", "head/w"]


def test_labels_same_for_params_and_updates():
  label_fn = lw.labels({lw.ndim_at_most(1): "vector", "**": "matrix"})
  grads = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  assert label_fn(PARAMS) == label_fn(grads) == label_fn(
      jax.eval_shape(lambda: PARAMS))


@pytest.mark.parametrize("rules, kwargs", [
    ({"**": ["a"]}, {}),
    ({"**": None}, {}),
    ({"head/**": "a"}, {"default": None}),
])
def test_labels_must_be_hashable(rules, kwargs):
  with pytest.raises(TypeError, match="hashable"):
    lw.labels(rules, **kwargs)


def test_labels_errors_are_rule_errors():
  label_fn = lw.labels({"haed/**": "a", "**": "b"})
  with pytest.raises(lw.RuleError, match="'haed/\\*\\*'"):
    label_fn(PARAMS)
