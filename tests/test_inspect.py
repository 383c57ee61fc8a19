"""Tests for layerwise.inspect.describe on real Flax models."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import layerwise as lw

LINEN_RULES = {"conv*/**": 0.0, lw.ndim_at_most(1): 0.5, "**": 1.0}

LINEN_TABLE = """\
path          shape          dtype      size  rule             value
------------  -------------  -------  ------  ---------------  -----
conv1/bias    (8,)           float32       8  'conv*/**'       0.0
conv1/kernel  (3, 3, 1, 8)   float32      72  'conv*/**'       0.0
conv2/bias    (16,)          float32      16  'conv*/**'       0.0
conv2/kernel  (3, 3, 8, 16)  float32   1,152  'conv*/**'       0.0
dense/bias    (32,)          float32      32  ndim_at_most(1)  0.5
dense/kernel  (1024, 32)     float32  32,768  '**'             1.0
head/bias     (10,)          float32      10  ndim_at_most(1)  0.5
head/kernel   (32, 10)       float32     320  '**'             1.0
norm/bias     (16,)          float32      16  ndim_at_most(1)  0.5
norm/scale    (16,)          float32      16  ndim_at_most(1)  0.5

value  leaves  params   share
0.0         4   1,248    3.6%
0.5         4      74    0.2%
1.0         2  33,088   96.2%
total      10  34,410  100.0%"""

NNX_TABLE = """\
path             shape     dtype    size  rule           value
---------------  --------  -------  ----  -------------  -----
head/bias        (3,)      float32     3  '**'           1.0
head/kernel      (16, 3)   float32    48  '**'           1.0
layers/0/bias    (16,)     float32    16  'layers/0/**'  0.25
layers/0/kernel  (4, 16)   float32    64  'layers/0/**'  0.25
layers/1/bias    (16,)     float32    16  'layers/*/**'  0.5
layers/1/kernel  (16, 16)  float32   256  'layers/*/**'  0.5
norm/bias        (16,)     float32    16  '**'           1.0
norm/scale       (16,)     float32    16  '**'           1.0

value  leaves  params   share
1.0         4      83   19.1%
0.25        2      80   18.4%
0.5         2     272   62.5%
total       8     435  100.0%"""


def test_linen_cnn_table(linen_variables):
  # Sizes by hand: conv2 kernel 3*3*8*16 = 1152; dense sees 8*8*16 = 1024.
  assert str(lw.describe(LINEN_RULES, linen_variables)) == LINEN_TABLE
  assert repr(lw.describe(LINEN_RULES, linen_variables["params"])) == LINEN_TABLE


def test_linen_rows_are_data(linen_variables):
  d = lw.describe(LINEN_RULES, linen_variables)
  assert d.columns == ("path", "shape", "dtype", "size", "rule", "value")
  leaves = jax.tree_util.tree_leaves(linen_variables)
  assert [r["size"] for r in d.rows] == [x.size for x in leaves]
  assert [r["shape"] for r in d.rows] == [x.shape for x in leaves]
  assert d.rows[5] == {"path": "dense/kernel", "shape": (1024, 32),
                       "dtype": "float32", "size": 32768, "rule": "'**'",
                       "value": 1.0}
  totals = d.totals()
  assert [(t["value"], t["leaves"], t["size"]) for t in totals] == [
      (0.0, 4, 1248), (0.5, 4, 74), (1.0, 2, 33088)]
  assert math.isclose(sum(t["fraction"] for t in totals), 1.0)


def test_nnx_mlp_table(nnx_model):
  rules = {"layers/0/**": 0.25, "layers/*/**": 0.5, "**": 1.0}
  assert str(lw.describe(rules, nnx.state(nnx_model, nnx.Param))) == NNX_TABLE


def test_abstract_params_describe_the_same(linen_variables):
  abstract = jax.eval_shape(lambda: linen_variables)
  assert (lw.describe(LINEN_RULES, abstract).rows
          == lw.describe(LINEN_RULES, linen_variables).rows)


def test_default_rule_and_non_float_values():
  params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.ones(2)}
  d = lw.describe({"w": "adam"}, params, default="sgd")
  assert [(r["path"], r["dtype"], r["rule"], r["value"]) for r in d.rows] == [
      ("b", "float32", "(default)", "sgd"), ("w", "bfloat16", "'w'", "adam")]


def test_schedule_values_show_their_name():
  schedule = optax.linear_schedule(0.0, 1.0, 10)
  d = lw.describe({"**": schedule}, {"w": jnp.ones(2)})
  assert d.rows[0]["value"] is schedule
  assert "schedule" in str(d).splitlines()[2]


def test_describe_raises_rule_errors():
  with pytest.raises(lw.RuleError, match="'haed/\\*\\*'"):
    lw.describe({"haed/**": 1.0, "**": 0.0}, {"head": {"w": jnp.ones(2)}})


@pytest.mark.parametrize("obj", ["**", 1.0, None])
def test_describe_rejects_non_rule_sets(obj):
  with pytest.raises(TypeError, match="describe\\(\\) takes a rule set"):
    lw.describe(obj, {"w": jnp.ones(2)})


def test_describe_plain_optax_counts_state_bytes():
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2, jnp.bfloat16)}
  d = lw.describe(optax.sgd(0.1, momentum=0.9), params)
  assert d.columns == ("path", "shape", "dtype", "size", "state_bytes")
  # The momentum trace is shaped (and typed) like each parameter.
  assert [(r["path"], r["state_bytes"]) for r in d.rows] == [("b", 4), ("w", 24)]
  assert d.shared_state_bytes == 0
  assert [(t["value"], t["state_bytes"]) for t in d.totals()] == [
      ("bfloat16", 4), ("float32", 24)]


def test_empty_tree():
  d = lw.describe({}, {}, default=1.0)
  assert d.rows == () and d.totals() == []
  assert str(d).splitlines()[-1].split() == ["total", "0", "0", "0.0%"]


def test_describe_reads_an_nnx_optimizer_state(nnx_model):
  # nnx.Optimizer keeps the optax state in Variables (OptArray, OptVariable);
  # the table reads through them, as from the plain state.
  tx = optax.chain(lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}),
                   optax.sgd(1.0),
                   lw.scale_by_rules({"head/**": 0.5, "**": 1.0}))
  params = nnx.state(nnx_model, nnx.Param)
  optimizer = nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)
  d = lw.describe(tx, params, opt_state=optimizer.opt_state)
  assert d.rows == lw.describe(tx, params, opt_state=tx.init(params)).rows
  assert [r["clip_norm"] for r in d.rows] == [0.0] * 8
