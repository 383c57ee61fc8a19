"""Tests for layerwise.inspect.describe on real Flax models."""

import dataclasses
import math
import re

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


def named_schedule(count):
  return 0.25 + 0.0 * count


@pytest.mark.parametrize("schedule, cell", [
    # linear_schedule is polynomial_schedule(power=1) in optax, and
    # warmup_cosine_decay_schedule a join_schedules: shown as what they are.
    (optax.linear_schedule(0.5, 1.0, 10), "polynomial_schedule (0.5 at step 0)"),
    (optax.cosine_decay_schedule(2.0, 10),
     "cosine_decay_schedule (2.0 at step 0)"),
    (optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10),
     "join_schedules (0.0 at step 0)"),
    (optax.join_schedules([optax.constant_schedule(0.1),
                           optax.constant_schedule(1.0)], [5]),
     "join_schedules (0.1 at step 0)"),
    (optax.constant_schedule(0.3), "constant_schedule (0.3 at step 0)"),
    (optax.exponential_decay(1e-3, 10, 0.5),
     "exponential_decay (0.001 at step 0)"),
    (lambda count: 0.5, "<lambda> (0.5 at step 0)"),
    (named_schedule, "named_schedule (0.25 at step 0)"),
])
def test_schedule_values_show_their_name_and_value_at_step_0(schedule, cell):
  d = lw.describe({"**": schedule}, {"w": jnp.ones(2)})
  assert d.rows[0]["value"] is schedule
  lines = str(d).splitlines()
  assert re.split(r"\s{2,}", lines[2])[-1] == cell
  assert lines[-2].startswith(cell + "  ")  # the totals, by the same text


def test_a_nested_function_is_named_by_its_own_name():
  def warmup(count):
    return count * 0.1

  def my_decay(rate):
    def schedule(count):  # named as optax names its closures
      return rate ** count
    return schedule

  def broken(count):
    raise RuntimeError("not at 0")

  d = lw.describe({"a": warmup, "b": my_decay(0.5), "c": broken,
                   "d": lambda u, p, path: u, "e": lambda count: 0.125},
                  {k: jnp.ones(1) for k in "abcde"})
  cells = [re.split(r"\s{2,}", line.strip())[-1]
           for line in str(d).splitlines()[2:7]]
  assert cells == ["warmup (0.0 at step 0)", "my_decay (1.0 at step 0)",
                   "broken", "<lambda>", "<lambda> (0.125 at step 0)"]


def test_table_sorts_paths_naturally_and_rows_keep_the_tree_order():
  params = {f"layers_{k}": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
            for k in (0, 1, 2, 10, 11)}
  params["head"] = {"w": jnp.ones((2, 3))}
  rules = {"layers_1*/**": 0.5, "**": 1.0}
  d = lw.describe(rules, params)
  # Data and read-outs follow the pytree (dict keys sorted as strings),
  # which indices into state vectors follow too.
  tree_order = ["head/w", "layers_0/b", "layers_0/w", "layers_1/b",
                "layers_1/w", "layers_10/b", "layers_10/w", "layers_11/b",
                "layers_11/w", "layers_2/b", "layers_2/w"]
  assert [r["path"] for r in d.rows] == tree_order
  assert jax.tree_util.tree_leaves(lw.paths(params)) == tree_order
  tx = optax.chain(optax.sgd(0.1), lw.scale_by_rules(rules))
  assert tx.init(params)[1].rules.paths == tuple(tree_order)
  # The table counts as people do.
  lines = str(d).splitlines()
  assert [line.split()[0] for line in lines[2:13]] == [
      "head/w", "layers_0/b", "layers_0/w", "layers_1/b", "layers_1/w",
      "layers_2/b", "layers_2/w", "layers_10/b", "layers_10/w",
      "layers_11/b", "layers_11/w"]
  # Totals come in the table's order (1.0 first: head); the data's totals
  # in the rows' order.
  assert [line.split()[0] for line in lines[15:17]] == ["1.0", "0.5"]
  assert [t["value"] for t in d.totals()] == [1.0, 0.5]
  rows = str(lw.describe(tx, params)).splitlines()[2:13]
  assert [line.split()[0] for line in rows][5:9] == [
      "layers_2/b", "layers_2/w", "layers_10/b", "layers_10/w"]
  # Segments compare number by number, in lists as in names.
  lists = {"blocks": [{"w": jnp.ones(1)} for _ in range(12)]}
  lines = str(lw.describe({"**": 1.0}, lists)).splitlines()
  assert [line.split()[0] for line in lines[2:14]] == [
      f"blocks/{k}/w" for k in range(12)]


def test_composite_selectors_read_as_the_expression():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
            "norm": {"scale": jnp.ones(2)}}
  matrices = lw.all_of(lw.ndim_at_least(2),
                       lw.not_(lw.any_of("**/bias", "**/scale")))
  d = lw.describe({matrices: 1.0, lw.NO_DECAY: 0.0}, params)
  assert [r["rule"] for r in d.rows] == [
      "lw.NO_DECAY", "ndim_at_least(2) & ~('**/bias' | '**/scale')",
      "lw.NO_DECAY"]
  named = lw.describe({lw.Selector(matrices, "matrices"): 1.0, "**": 0.0},
                      params)
  assert [r["rule"] for r in named.rows] == ["'**'", "matrices", "'**'"]
  tx = optax.chain(lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1}),
                   optax.sgd(0.1))
  assert [r["weight_decay_rule"] for r in lw.describe(tx, params).rows] == [
      "lw.NO_DECAY", "'**'", "lw.NO_DECAY"]


def test_totals_by_another_column():
  params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2), "h": jnp.ones(3)}
  tx = optax.chain(lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1}),
                   optax.sgd(0.1),
                   lw.scale_by_rules({"h": 0.5, "**": 1.0}))
  d = lw.describe(tx, params)
  assert d.group_by == "weight_decay"  # the first layerwise column
  by_scale = dataclasses.replace(d, group_by="scale")
  assert [(t["value"], t["leaves"], t["size"]) for t in by_scale.totals()] == [
      (1.0, 2, 6), (0.5, 1, 3)]
  lines = str(by_scale).splitlines()
  foot = lines[lines.index("") + 1:]
  assert [line.split()[:4] for line in foot[:3]] == [
      ["scale", "leaves", "params", "share"], ["1.0", "2", "6", "66.7%"],
      ["0.5", "1", "3", "33.3%"]]
  # Per rule: the selectors of a column, which rows hold beside it.
  by_rule = dataclasses.replace(d, group_by="scale_rule")
  assert [(t["value"], t["leaves"]) for t in by_rule.totals()] == [
      ("'**'", 2), ("'h'", 1)]
  with pytest.raises(ValueError, match="group_by='lr' is not a column"):
    dataclasses.replace(d, group_by="lr")


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
  # The live values read through the Variables too.
  assert lw.hyperparams(optimizer.opt_state) == lw.hyperparams(
      tx.init(params))
  assert lw.hyperparams(optimizer.opt_state)["scale/head/bias"] == 0.5
