"""Tests for lw.transplant: which leaves are copied, the checks, the report."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layerwise as lw
from conftest import LinenCNN, NNXMLP, flat


def _tree(seed, head=5, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {
      "embed": {"embedding": jax.random.normal(k[0], (7, 4), dtype)},
      "layers_0": {"kernel": jax.random.normal(k[1], (4, 4), dtype),
                   "bias": jax.random.normal(k[2], (4,), dtype)},
      "layers_1": {"kernel": jax.random.normal(k[3], (4, 4), dtype)},
      "head": {"kernel": jax.random.normal(k[4], (4, head), dtype)},
  }


def _assert_from(out, tree, paths):
  """``out``'s leaves at ``paths`` equal those of ``tree``."""
  flat_out, flat_tree = flat(out), flat(tree)
  for p in paths:
    np.testing.assert_array_equal(flat_out[p], flat_tree[p], err_msg=p)


def test_copies_the_selected_leaves_and_keeps_the_rest():
  source, target = _tree(0), _tree(1, head=3)
  out, report = lw.transplant(target, source, lw.not_("head/**"))
  body = ["embed/embedding", "layers_0/bias", "layers_0/kernel",
          "layers_1/kernel"]
  _assert_from(out, source, body)
  _assert_from(out, target, ["head/kernel"])
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
      target)
  assert report.copied == tuple(body)
  assert report.new == ("head/kernel",)
  assert report.skipped == ("head/kernel",)
  assert report.count("copied") == 7 * 4 + 4 + 16 + 16
  assert report.count("new") == 12 and report.count("skipped") == 20


def test_copies_are_fresh_arrays_with_the_target_placement():
  source, target = _tree(0), _tree(1)
  out, _ = lw.transplant(target, source, "**")
  for a, b, t in zip(jax.tree.leaves(out), jax.tree.leaves(source),
                     jax.tree.leaves(target)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    assert a.sharding == t.sharding
  # Donating the result leaves the source intact.
  step = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
  jax.block_until_ready(step(out))
  np.testing.assert_array_equal(source["layers_1"]["kernel"],
                                _tree(0)["layers_1"]["kernel"])


def test_rule_set_first_match_wins_and_must_cover_every_leaf():
  source, target = _tree(0), _tree(1)
  rules = {"layers_1/**": False, "layers_*/**": True, "embed/**": True,
           "**": False}
  out, report = lw.transplant(target, source, rules)
  assert report.copied == ("embed/embedding", "layers_0/bias",
                           "layers_0/kernel")
  _assert_from(out, target, ["layers_1/kernel", "head/kernel"])
  _assert_from(out, source, report.copied)
  with pytest.raises(lw.RuleError, match=r"'head/kernel'"):
    lw.transplant(target, source, {"layers_*/**": True, "embed/**": False})


def test_a_selector_matching_nothing_is_an_error_unless_not_strict():
  source, target = _tree(0), _tree(1)
  with pytest.raises(lw.RuleError, match=r"'layer_\*/\*\*'.*closest"):
    lw.transplant(target, source, "layer_*/**")
  out, report = lw.transplant(target, source, "layer_*/**", strict=False)
  assert report.copied == ()
  _assert_from(out, target, report.new)


def test_leaves_missing_from_the_source_name_the_closest_source_path():
  source = _tree(0)
  source["layers_1"] = {"kernal": source["layers_1"]["kernel"]}
  target = _tree(1)
  with pytest.raises(ValueError) as e:
    lw.transplant(target, source, "layers_*/**")
  msg = str(e.value)
  assert "1 selected leaf is not in the source" in msg
  assert "'layers_1/kernel'  (closest in source: 'layers_1/kernal'" in msg
  assert "strict=False" in msg
  out, report = lw.transplant(target, source, "layers_*/**", strict=False)
  assert report.copied == ("layers_0/bias", "layers_0/kernel")
  assert "layers_1/kernel" in report.new
  assert "layers_1/kernal" in report.skipped
  _assert_from(out, target, ["layers_1/kernel"])


def test_every_problem_is_reported_at_once_and_nothing_is_copied():
  source = _tree(0, head=5)
  del source["embed"]
  source["layers_0"]["bias"] = source["layers_0"]["bias"].astype(jnp.bfloat16)
  target = _tree(1, head=3)
  with pytest.raises(ValueError) as e:
    lw.transplant(target, source, "**")
  msg = str(e.value)
  assert msg.startswith("lw.transplant: 1 selected leaf is not in the source")
  assert "'embed/embedding'" in msg
  assert ("1 selected leaf has a different shape in the source:\n"
          "  'head/kernel': target (4, 3), source (4, 5)") in msg
  assert ("1 selected leaf has a different dtype in the source:\n"
          "  'layers_0/bias': target float32, source bfloat16") in msg
  assert "cast=True" in msg


def test_cast_converts_to_the_target_dtype():
  source, target = _tree(0), _tree(1, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="4 selected leaves have a different "
                     "dtype"):
    lw.transplant(target, source, lw.not_("head/**"))
  out, _ = lw.transplant(target, source, lw.not_("head/**"), cast=True)
  assert out["layers_0"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      out["layers_0"]["kernel"],
      source["layers_0"]["kernel"].astype(jnp.bfloat16))


def test_rename_maps_target_paths_to_source_paths():
  pretrained = _tree(0)
  target = {"backbone": _tree(1), "classifier": {"kernel": jnp.zeros((4, 2))}}
  out, report = lw.transplant(
      target, pretrained, lw.not_("backbone/head/**") & "backbone/**",
      rename=lambda p: p.removeprefix("backbone/"))
  np.testing.assert_array_equal(out["backbone"]["embed"]["embedding"],
                                pretrained["embed"]["embedding"])
  assert report.new == ("backbone/head/kernel", "classifier/kernel")
  assert report.skipped == ("head/kernel",)
  target["backbone"]["layers_0"]["kernel"] = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match=re.escape(
      "'backbone/layers_0/kernel <- layers_0/kernel': target (2, 2)")):
    lw.transplant(target, pretrained, "backbone/layers_0/kernel",
                  rename=lambda p: p.removeprefix("backbone/"))


def test_bad_arguments():
  source, target = _tree(0), _tree(1)
  with pytest.raises(TypeError, match=r"rule 'head/\*\*' has value 1.0; a "
                     r"rule set of copy flags maps selectors to True \(copy\)"):
    lw.transplant(target, source, {"head/**": 1.0, "**": False})
  with pytest.raises(TypeError, match="rename must be a function"):
    lw.transplant(target, source, "**", rename={"a": "b"})
  with pytest.raises(TypeError, match=r"rename\('embed/embedding'\) returned "
                     "None"):
    lw.transplant(target, source, "embed/**", rename=lambda p: None)


def test_numpy_source_and_abstract_target():
  source = jax.tree.map(np.asarray, _tree(0))
  abstract = jax.eval_shape(lambda: _tree(1))
  out, report = lw.transplant(abstract, source, "**")
  assert report.new == ()
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(source)):
    assert isinstance(a, jax.Array)
    np.testing.assert_array_equal(a, b)


def test_linen_new_head_and_wider_layer():
  x = jnp.ones((1, 8, 8, 1))
  pretrained = LinenCNN().init(jax.random.PRNGKey(0), x)
  fresh = LinenCNN(widths=(8, 16, 64)).init(jax.random.PRNGKey(1), x)
  with pytest.raises(ValueError) as e:
    lw.transplant(fresh, pretrained, "**")
  assert "'dense/kernel': target (1024, 64), source (1024, 32)" in str(e.value)
  assert "'head/kernel': target (64, 10), source (32, 10)" in str(e.value)
  out, report = lw.transplant(fresh, pretrained,
                              lw.any_of("conv*/**", "norm/**"))
  assert report.copied == ("conv1/bias", "conv1/kernel", "conv2/bias",
                           "conv2/kernel", "norm/bias", "norm/scale")
  # The copied lower layers compute what the pretrained ones did.
  def features(v):
    p = v["params"]
    h = jax.nn.relu(jax.lax.conv_general_dilated(
        x, p["conv1"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv1"]["bias"])
    return h
  np.testing.assert_array_equal(features(out), features(pretrained))
  LinenCNN(widths=(8, 16, 64)).apply(out, x)  # a valid variables dict


def test_nnx_state_roundtrip():
  pretrained = NNXMLP((4, 16, 16, 3), nnx.Rngs(0))
  model = NNXMLP((4, 16, 16, 5), nnx.Rngs(1))
  state = nnx.state(model, nnx.Param)
  out, report = lw.transplant(state, nnx.state(pretrained, nnx.Param),
                              lw.not_("head/**"))
  assert report.new == ("head/bias", "head/kernel")
  nnx.update(model, out)
  np.testing.assert_array_equal(model.layers[1].kernel[...],
                                pretrained.layers[1].kernel[...])
  np.testing.assert_array_equal(model.norm.scale[...],
                                pretrained.norm.scale[...])
  assert model.head.kernel[...].shape == (16, 5)
