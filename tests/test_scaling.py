"""Tests for scale_by_rules and set_scale: per-group learning rates.

References: PyTorch's AdamW and SGD update rules, written out in NumPy
(torch/optim/adamw.py, torch/optim/sgd.py, single-tensor path), with param
groups ``lr_g = lr * r_g``; and optax's own transformations.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerwise as lw
from conftest import flat, optimizer_update

RNG = np.random.default_rng(0)
PARAMS = {
    "embed": RNG.normal(size=(6, 3)).astype(np.float32),
    "block": {"w": RNG.normal(size=(3, 3)).astype(np.float32),
              "b": RNG.normal(size=(3,)).astype(np.float32)},
    "head": {"w": RNG.normal(size=(3, 2)).astype(np.float32)},
}
RULES = {"embed": 0.1, "block/**": 0.5, "head/**": 1.0}
GROUP_OF = {"embed": 0.1, "block/w": 0.5, "block/b": 0.5, "head/w": 1.0}
TARGET = jax.tree_util.tree_map(lambda p: 0.5 * np.ones_like(p), PARAMS)


def grad_fn(params, xp=jnp):
  """Gradient of sum((p - t)**2 * (1 + |p|)): depends on the trajectory."""
  return jax.tree_util.tree_map(
      lambda p, t: 2 * (p - t) * (1 + xp.abs(p)) + (p - t)**2 * xp.sign(p),
      params, TARGET)


def run_optax(tx, steps=10):
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(grad_fn(p), s, p)))
  for _ in range(steps):
    params, state = step(params, state)
  return params


def group_wd(wd, key):
  """A weight decay for all groups, or one per group ({path: wd})."""
  return wd[key] if isinstance(wd, dict) else wd


def torch_adamw(lr, wd, b1=0.9, b2=0.999, eps=1e-8, steps=10):
  """PyTorch AdamW with one param group per multiplier: lr_g = lr * r_g."""
  params = {k: v.astype(np.float64) for k, v in flat(PARAMS).items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t in range(1, steps + 1):
    grads = flat(grad_fn(lw_unflat(params), xp=np))
    for k in params:
      lr_g = lr * GROUP_OF[k]
      params[k] = params[k] * (1 - lr_g * group_wd(wd, k))  # decoupled
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      v[k] = b2 * v[k] + (1 - b2) * grads[k]**2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      params[k] = params[k] - lr_g * m_hat / (np.sqrt(v_hat) + eps)
  return params


def torch_sgd(lr, momentum, nesterov, wd, steps=10):
  """PyTorch SGD (dampening 0, coupled weight decay), lr_g = lr * r_g."""
  params = {k: v.astype(np.float64) for k, v in flat(PARAMS).items()}
  buf = {}
  for _ in range(steps):
    grads = flat(grad_fn(lw_unflat(params), xp=np))
    for k in params:
      d_p = grads[k] + group_wd(wd, k) * params[k]
      if momentum:
        buf[k] = d_p.copy() if k not in buf else momentum * buf[k] + d_p
        d_p = d_p + momentum * buf[k] if nesterov else buf[k]
      params[k] = params[k] - lr * GROUP_OF[k] * d_p
  return params


def lw_unflat(flat_params):
  return {"embed": flat_params["embed"],
          "block": {"w": flat_params["block/w"], "b": flat_params["block/b"]},
          "head": {"w": flat_params["head/w"]}}


def assert_close(ours, reference, rtol=2e-5, atol=2e-6):
  ours = flat(ours)
  assert ours.keys() == reference.keys()
  for k in ours:
    np.testing.assert_allclose(ours[k], reference[k], rtol=rtol, atol=atol,
                               err_msg=k)


# --------------------------------------------------- PyTorch param groups


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_equals_torch_param_groups(wd):
  tx = optax.chain(optax.adamw(1e-2, weight_decay=wd),
                   lw.scale_by_rules(RULES))
  assert_close(run_optax(tx), torch_adamw(1e-2, wd))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False),
                                                (0.9, True)])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_sgd_equals_torch_param_groups(momentum, nesterov, wd):
  tx = optax.chain(optax.add_decayed_weights(wd),
                   optax.sgd(1e-2, momentum=momentum or None, nesterov=nesterov),
                   lw.scale_by_rules(RULES))
  assert_close(run_optax(tx), torch_sgd(1e-2, momentum, nesterov, wd))


def test_groups_equal_separate_optimizers():
  # Per group, the chain equals optax.adam with the group's learning rate.
  ours = flat(run_optax(optax.chain(optax.adam(3e-2), lw.scale_by_rules(RULES))))
  for key, r in GROUP_OF.items():
    alone = flat(run_optax(optax.adam(3e-2 * r)))
    np.testing.assert_allclose(ours[key], alone[key], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ weight decay

WD_RULES = {lw.NO_DECAY: 0.0, "embed": 0.01, "**": 0.1}
WD_OF = {"embed": 0.01, "block/w": 0.1, "block/b": 0.0, "head/w": 0.1}


def test_per_group_decoupled_decay_equals_torch_adamw_param_groups():
  # PyTorch AdamW groups with lr_g = lr * r_g and their own weight_decay.
  lr = 1e-2
  tx = optax.chain(optax.scale_by_adam(), lw.add_decayed_weights(WD_RULES),
                   optax.scale_by_learning_rate(lr), lw.scale_by_rules(RULES))
  assert_close(run_optax(tx), torch_adamw(lr, WD_OF))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, True)])
def test_per_group_coupled_decay_equals_torch_sgd_param_groups(momentum,
                                                               nesterov):
  tx = optax.chain(lw.add_decayed_weights(WD_RULES),
                   optax.sgd(1e-2, momentum=momentum or None, nesterov=nesterov),
                   lw.scale_by_rules(RULES))
  assert_close(run_optax(tx), torch_sgd(1e-2, momentum, nesterov, WD_OF))


def test_one_rule_equals_optax_add_decayed_weights():
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  grads = grad_fn(params)
  ours, _ = lw.add_decayed_weights({"**": 0.05}).update(
      grads, lw.add_decayed_weights({"**": 0.05}).init(params), params)
  ref, _ = optax.add_decayed_weights(0.05).update(grads, optax.EmptyState(),
                                                 params)
  chex.assert_trees_all_equal(ours, ref)


def test_no_decay_selector():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "norm": {"scale": jnp.ones(4)}, "temperature": jnp.ones(()),
            "attn": {"bias": jnp.ones((2, 4))},  # a 2-D bias (timm: no decay)
            "embed": {"embedding": jnp.ones((5, 4))}}
  assert lw.resolve({lw.NO_DECAY: 0.0, "**": 0.1}, params) == {
      "dense": {"kernel": 0.1, "bias": 0.0}, "norm": {"scale": 0.0},
      "temperature": 0.0, "attn": {"bias": 0.0},
      "embed": {"embedding": 0.1}}
  extended = lw.NO_DECAY | "embed/**"
  assert lw.resolve({extended: 0.0, "**": 0.1}, params)["embed"] == {
      "embedding": 0.0}
  assert repr(lw.NO_DECAY) == "lw.NO_DECAY"


def test_no_decay_on_linen_model(linen_variables):
  wd = lw.resolve({lw.NO_DECAY: 0.0, "**": 0.05}, linen_variables)
  flat_wd = flat(wd)
  assert {k for k, v in flat_wd.items() if v} == {
      "conv1/kernel", "conv2/kernel", "dense/kernel", "head/kernel"}


def test_weight_decay_schedule_and_zero_groups():
  sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  params = {"a": jnp.full(2, 2.0), "b": jnp.full(2, 2.0)}
  tx = lw.add_decayed_weights({"a": sched, "b": 0.0})
  state = tx.init(params)
  zeros = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  for step in range(5):
    updates, state = jax.jit(tx.update)(zeros, state, params)
    np.testing.assert_allclose(updates["a"], 2.0 * float(sched(step)))
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_decay_keeps_dtype(dtype):
  params = {"a": jnp.ones(3, dtype), "b": jnp.ones(3, dtype)}
  tx = lw.add_decayed_weights({"a": 0.5, "b": optax.constant_schedule(0.25)})
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert updates["a"].dtype == updates["b"].dtype == dtype
  np.testing.assert_array_equal(updates["a"], jnp.full(3, 1.5, dtype))
  np.testing.assert_array_equal(updates["b"], jnp.full(3, 1.25, dtype))


def test_weight_decay_errors():
  with pytest.raises(ValueError, match=re.escape(
      "rule 'head/**' has weight decay -0.1; a weight decay must be finite")):
    lw.add_decayed_weights({"head/**": -0.1, "**": 0.0})
  with pytest.raises(TypeError, match="has weight decay True"):
    lw.add_decayed_weights({"**": True})
  tx = lw.add_decayed_weights({"**": 0.1})
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(PARAMS, tx.init(PARAMS))
  with pytest.raises(lw.RuleError, match="match no rule"):
    lw.add_decayed_weights({"head/**": 0.1}).init(PARAMS)


def test_describe_shows_decay_scale_and_frozen():
  tx = lw.freeze(optax.chain(optax.scale_by_adam(),
                             lw.add_decayed_weights({lw.NO_DECAY: 0.0,
                                                     "**": 0.1}),
                             optax.scale_by_learning_rate(1e-3),
                             lw.scale_by_rules({"block/**": 0.5, "**": 1.0})),
                 "embed")
  d = lw.describe(tx, PARAMS)
  assert d.columns == ("path", "shape", "dtype", "size", "frozen",
                       "weight_decay", "scale", "state_bytes")
  rows = {r["path"]: r for r in d.rows}
  assert rows["embed"]["frozen"] is True
  assert rows["embed"]["weight_decay"] is None  # the frozen leaf: not seen
  assert rows["embed"]["state_bytes"] == 0
  assert rows["block/b"]["weight_decay"] == 0.0
  assert rows["block/b"]["weight_decay_rule"] == "lw.NO_DECAY"
  assert rows["block/w"]["weight_decay"] == 0.1
  assert rows["block/w"]["scale"] == 0.5
  # Adam's mu and nu (8 bytes per entry); the multiplier is an entry of
  # scale_by_rules' vector, counted with the state no one leaf holds.
  assert rows["block/w"]["state_bytes"] == 9 * 8


# ------------------------------------------------------------- schedules


def test_schedule_evaluated_at_count_like_scale_by_schedule():
  sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = lw.scale_by_rules({"a": sched, "b": 0.5})
  ref = optax.scale_by_schedule(sched)
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(6):
    grads = {"a": jnp.full(2, 2.0), "b": jnp.full(2, 2.0)}
    updates, state = jax.jit(tx.update)(grads, state)
    expected, ref_state = ref.update(grads, ref_state)
    np.testing.assert_array_equal(updates["a"], expected["a"])
    np.testing.assert_array_equal(updates["b"], np.full(2, 1.0))
  assert int(state.count) == 6


def test_gradual_unfreezing_keeps_inner_state_warm():
  # A group whose multiplier is 0 until step 3 (ULMFiT): its update is zero,
  # but Adam keeps accumulating its moments meanwhile, so from step 3 on the
  # update is plain Adam's, with the moments of every step seen.
  unfreeze = lambda count: jnp.where(count < 3, 0.0, 1.0)
  params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
  tx = optax.chain(optax.adam(0.1),
                   lw.scale_by_rules({"backbone": unfreeze, "head": 1.0}))
  ref = optax.adam(0.1)
  state, ref_state = tx.init(params), ref.init(params)
  for step in range(6):
    grads = {"backbone": jnp.array([step + 1.0, -0.5 * step]),
             "head": jnp.ones(2)}
    updates, state = tx.update(grads, state)
    expected, ref_state = ref.update(grads, ref_state)
    if step < 3:
      np.testing.assert_array_equal(updates["backbone"], np.zeros(2))
    else:
      np.testing.assert_array_equal(updates["backbone"], expected["backbone"])
    np.testing.assert_array_equal(updates["head"], expected["head"])


def test_schedule_must_return_scalar():
  tx = lw.scale_by_rules({"**": lambda count: jnp.ones(2)})
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"schedule of rule '\*\*' returned shape \(2,\)"):
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_update_dtype_is_kept(dtype):
  params = {"a": jnp.ones(3, dtype), "b": jnp.ones(3, dtype)}
  tx = lw.scale_by_rules({"a": 0.1, "b": optax.constant_schedule(0.5)})
  state = tx.init(params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(params, state)
  assert updates["a"].dtype == dtype and updates["b"].dtype == dtype
  np.testing.assert_array_equal(updates["a"], jnp.full(3, jnp.asarray(0.1, dtype)))
  np.testing.assert_array_equal(updates["b"], jnp.full(3, 0.5, dtype))
  chex.assert_trees_all_equal_dtypes(state, tx.init(params))


def test_abstract_init_and_state_layout():
  params = jax.eval_shape(lambda: PARAMS)
  state = lw.scale_by_rules(RULES).init(params)
  assert isinstance(state, lw.ScaleByRulesState)
  # One float32 vector, an entry per leaf in the order of the paths: a
  # jitted step takes one array for all the multipliers.
  assert state.multipliers.shape == (4,)
  assert state.multipliers.dtype == jnp.float32
  assert dict(zip(state.rules.paths, state.multipliers.tolist())) == pytest.approx(
      {"embed": 0.1, "block/b": 0.5, "block/w": 0.5, "head/w": 1.0})
  assert state.rules.paths == ("block/b", "block/w", "embed", "head/w")
  assert state.rules.rule_texts == ("'block/**'", "'block/**'", "'embed'",
                                    "'head/**'")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("value, error, message", [
    (-0.1, ValueError, "finite and >= 0"),
    (float("nan"), ValueError, "finite and >= 0"),
    (float("inf"), ValueError, "finite and >= 0"),
    ("0.1", TypeError, "is a number or a schedule"),
    (True, TypeError, "is a number or a schedule"),
    (None, TypeError, "is a number or a schedule"),
])
def test_bad_multipliers(value, error, message):
  with pytest.raises(error, match=re.escape("rule 'head/**' has multiplier")
                     + ".*" + re.escape(message)):
    lw.scale_by_rules({"head/**": value, "**": 1.0})


def test_rule_errors_at_init():
  tx = lw.scale_by_rules({"haed/**": 0.1, "**": 1.0})
  with pytest.raises(lw.RuleError, match="'haed/\\*\\*'  \\(closest: 'head/\\*\\*'"):
    tx.init(PARAMS)


def test_default_multiplier():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = lw.scale_by_rules({"a": 0.5}, default=1.0)
  updates, _ = tx.update(params, tx.init(params))
  np.testing.assert_array_equal(updates["b"], np.ones(2))
  with pytest.raises(ValueError, match="default has multiplier -1"):
    lw.scale_by_rules({"a": 0.5}, default=-1)


def test_structure_change_between_init_and_update():
  tx = lw.scale_by_rules({"**": 1.0})
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="do not have the structure of the params"):
    tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)


# -------------------------------------------------------------- set_scale


def test_set_scale_between_jitted_steps_without_retrace():
  params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
  tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0}))
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state)

  state = tx.init(params)
  updates, state = step(params, state)
  np.testing.assert_array_equal(updates["backbone"], -np.ones(2))
  state = lw.set_scale(state, "backbone", 0.25)
  updates, state = step(params, state)
  np.testing.assert_array_equal(updates["backbone"], -0.25 * np.ones(2))
  np.testing.assert_array_equal(updates["head"], -np.ones(2))
  state = lw.set_scale(state, lw.ndim_at_most(1), 2.0)
  updates, state = step(params, state)
  np.testing.assert_array_equal(updates["head"], -2 * np.ones(2))
  assert len(traces) == 1


def test_set_scale_scales_a_schedule():
  tx = lw.scale_by_rules({"**": optax.constant_schedule(0.5)})
  params = {"w": jnp.ones(2)}
  state = lw.set_scale(tx.init(params), "w", 3.0)
  updates, _ = tx.update(params, state)
  np.testing.assert_array_equal(updates["w"], np.full(2, 1.5))


def test_set_scale_finds_states_inside_wrappers():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  inner = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0}))
  tx = optax.MultiSteps(inner, every_k_schedule=1)
  state = lw.set_scale(tx.init(params), "a", 0.0)
  updates, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(updates["a"], np.zeros(2))
  np.testing.assert_array_equal(updates["b"], -np.ones(2))
  # Two scale_by_rules states in one chain: both are updated.
  tx2 = optax.chain(lw.scale_by_rules({"**": 1.0}), lw.scale_by_rules({"**": 2.0}))
  state2 = lw.set_scale(tx2.init(params), "b", 0.5)
  updates, _ = tx2.update(params, state2)
  np.testing.assert_array_equal(updates["b"], np.full(2, 0.25))


def test_set_scale_errors():
  params = {"encoder": {"w": jnp.ones(2)}}
  state = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0})).init(params)
  with pytest.raises(ValueError, match=r"selector 'encodr/\*\*' matches no "
                     r"parameter \(closest: 'encoder/\*\*'"):
    lw.set_scale(state, "encodr/**", 0.5)
  with pytest.raises(ValueError, match="holds no lw.scale_by_rules state"):
    lw.set_scale(optax.sgd(1.0).init(params), "**", 0.5)
  with pytest.raises(TypeError, match="takes a number, not a schedule"):
    lw.set_scale(state, "**", optax.constant_schedule(1.0))
  with pytest.raises(ValueError, match="finite and >= 0"):
    lw.set_scale(state, "**", -1.0)


def test_set_scale_keeps_a_committed_state_committed():
  # A restored or sharded state is committed to its devices; an uncommitted
  # new multiplier would make the jitted step compile again.
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0}))
  step = jax.jit(tx.update)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for state in (tx.init(params), jax.device_put(tx.init(params), device)):
    _, state = step(params, state, params)
    size = step._cache_size()
    new = lw.set_scale(state, "a", 0.5)
    updates, _ = step(params, new, params)
    assert step._cache_size() == size
    old_m, new_m = state[1].multipliers, new[1].multipliers
    assert new_m.sharding == old_m.sharding
    np.testing.assert_array_equal(new_m, [0.5, 1.0])
    np.testing.assert_array_equal(old_m, [1.0, 1.0])  # the old state is kept
    np.testing.assert_array_equal(updates["a"], [-0.5, -0.5])


def test_set_scale_on_an_nnx_optimizer_state(nnx_model):
  # nnx.Optimizer keeps its state in Variables, which flax < 0.11 flattens
  # as leaves: the new state keeps them, so the optimizer takes it.
  tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules({"**": 1.0}))
  optimizer = nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)
  new = lw.set_scale(optimizer.opt_state, "head/**", 0.5)
  assert ([type(x) for x in jax.tree_util.tree_leaves(new)]
          == [type(x) for x in jax.tree_util.tree_leaves(optimizer.opt_state)])
  optimizer.opt_state = new
  before = flat(nnx.state(nnx_model, nnx.Param))
  grads = jax.tree_util.tree_map(jnp.ones_like,
                                 nnx.state(nnx_model, nnx.Param))
  optimizer_update(optimizer, nnx_model, grads)
  for path, p in flat(nnx.state(nnx_model, nnx.Param)).items():
    step = -0.5 if path.startswith("head/") else -1.0
    np.testing.assert_allclose(p - before[path], step, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- describe


def test_describe_chain_reads_rules_without_allocating():
  sched = optax.linear_schedule(0.0, 1.0, 10)
  tx = optax.chain(optax.adamw(1e-3),
                   lw.scale_by_rules({"embed": sched, "block/**": 0.5,
                                      "head/**": 1.0}))
  d = lw.describe(tx, jax.eval_shape(lambda: PARAMS))
  assert d.columns == ("path", "shape", "dtype", "size", "scale", "state_bytes")
  rows = {r["path"]: r for r in d.rows}
  assert rows["embed"]["scale"] is sched
  assert rows["embed"]["scale_rule"] == "'embed'"
  assert rows["block/w"]["scale"] == 0.5 and rows["head/w"]["scale"] == 1.0
  # adamw: mu and nu (2 x 4 bytes per entry).
  assert rows["block/w"]["state_bytes"] == 9 * 8
  assert rows["embed"]["state_bytes"] == 18 * 8
  # adam's count, scale_by_rules' count and its vector of 4 multipliers.
  assert d.shared_state_bytes == 4 + 4 + 4 * 4
  assert [(t["value"], t["leaves"]) for t in d.totals()] == [
      (0.5, 2), (sched, 1), (1.0, 1)]


# ------------------------------------------------- a zero is an exact zero

# A model with blocks, for layer_decay; layers_0/w is the leaf whose factor
# is 0, and its gradient is NaN and inf.
DEEP = {"embed": jnp.full((2, 2), 0.5), "layers_0": {"w": jnp.full((2, 2), 0.5)},
        "layers_1": {"w": jnp.full((2, 2), 0.5)}, "head": {"w": jnp.ones(2)}}
BAD = jnp.array([[jnp.nan, jnp.inf], [-jnp.inf, 1.0]])


# Each leaf's multiplier at the first two steps, but for layer_decay.
ONE_ZERO = {"embed": 1.0, "layers_0/w": 0.0, "layers_1/w": 1.0, "head/w": 1.0}


def _zero_by_rule():
  return lw.scale_by_rules({"layers_0/**": 0.0, "**": 1.0}), None, ONE_ZERO


def _zero_by_set_scale():
  return (lw.scale_by_rules({"**": 1.0}),
          lambda state: lw.set_scale(state, "layers_0/**", 0.0), ONE_ZERO)


def _zero_by_schedule():
  return lw.scale_by_rules({"layers_0/**": lambda count: jnp.where(
      count < 5, 0.0, 1.0), "**": 1.0}), None, ONE_ZERO


def _zero_by_layer_decay():
  # 0.5 ** 2 = 0.25 (layers_0) and 0.125 (embed) are below 0.3: frozen.
  rules = lw.layer_decay(0.5, DEEP, freeze_below=0.3)
  return lw.scale_by_rules(rules), None, {
      "embed": 0.0, "layers_0/w": 0.0, "layers_1/w": 0.5, "head/w": 1.0}


@pytest.mark.parametrize("make", [_zero_by_rule, _zero_by_set_scale,
                                  _zero_by_schedule, _zero_by_layer_decay],
                         ids=["rule", "set_scale", "schedule", "layer_decay"])
def test_a_zero_multiplier_gives_exact_zeros_for_nan_and_inf(make):
  # 0 * nan is nan: the zero must be decided at run time, from the factor.
  scale, setup, factor = make()
  tx = optax.chain(optax.adam(0.1), scale)
  ref = optax.adam(0.1)  # elementwise: the other leaves' updates are its
  state, ref_state = tx.init(DEEP), ref.init(DEEP)
  if setup is not None:
    state = setup(state)
  params = DEEP
  grads = jax.tree_util.tree_map(jnp.ones_like, DEEP)
  grads["layers_0"]["w"] = BAD
  for _ in range(2):  # the second step: Adam's moments of layers_0/w are NaN
    updates, state = jax.jit(tx.update)(grads, state, params)
    expected, ref_state = jax.jit(ref.update)(grads, ref_state, params)
    for path, u in flat(updates).items():
      if factor[path] == 0.0:
        np.testing.assert_array_equal(u, np.zeros_like(u), err_msg=path)
      else:
        np.testing.assert_array_equal(u, flat(expected)[path] * factor[path],
                                      err_msg=path)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new_params["layers_0"]["w"],
                                  DEEP["layers_0"]["w"])
    params = new_params
  # The layerwise state holds nothing the gradients reach: it stays finite.
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree_util.tree_leaves(state[1]))


def test_a_zero_weight_decay_leaves_the_update_as_it_is():
  # 0 * nan is nan: a NaN or inf param with weight decay 0 (by its rule or
  # set between steps) must not reach its update.
  params = {"a": BAD, "b": BAD, "c": jnp.ones((2, 2))}
  grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.25), params)
  tx = lw.add_decayed_weights({"a": 0.0, "**": 0.1})
  state = lw.set_weight_decay(tx.init(params), "b", 0.0)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates["a"], grads["a"])
  np.testing.assert_array_equal(updates["b"], grads["b"])
  ref, _ = optax.add_decayed_weights(0.1).update(grads, None, params)
  np.testing.assert_array_equal(updates["c"], ref["c"])


# -------------------------------------------- decay toward given weights (L2-SP)

# The pretrained weights the fine-tune decays toward; the head is new.
P0 = jax.tree_util.tree_map(lambda p: (0.5 * p + 0.25).astype(p.dtype),
                            PARAMS)
TOWARD_RULES = {lw.NO_DECAY: 0.0, "embed": 0.01, "**": 0.1}


def test_toward_adds_wd_times_p_minus_p0_by_hand():
  # u + wd_g * (p - p0), in NumPy: two decayed groups, NO_DECAY (block/b)
  # left as it is, and the new head (None in toward) decayed toward zero.
  toward = {**P0, "head": None}
  tx = lw.add_decayed_weights(TOWARD_RULES, toward=toward)
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  grads = grad_fn(params)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  p, p0, u = flat(PARAMS), flat(P0), flat(grads)
  expected = {"embed": u["embed"] + np.float32(0.01) * (p["embed"] - p0["embed"]),
              "block/w": u["block/w"] + np.float32(0.1) * (p["block/w"]
                                                          - p0["block/w"]),
              "block/b": u["block/b"],
              "head/w": u["head/w"] + np.float32(0.1) * p["head/w"]}
  got = flat(updates)
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(got["block/b"], u["block/b"])
  # p0 lives in the state, a copy of what was given, shaped like the params
  # (None where it decays toward zero), and the update keeps it.
  assert new_state.toward["head"] == {"w": None}
  for k, v in flat(new_state.toward).items():
    np.testing.assert_array_equal(v, p0[k])
  assert state.toward["embed"] is not P0["embed"]


def test_toward_is_a_copy_that_donated_params_do_not_take_along():
  # p0 given as the params themselves (the usual call after lw.transplant):
  # a step that donates the params must not delete the state's p0.
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  start = flat(PARAMS)
  tx = lw.add_decayed_weights({"**": 0.1}, toward=params)
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(2):
    params, state = step(params, state)
  for k, v in flat(state.toward).items():
    np.testing.assert_array_equal(v, start[k])
  updates, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.zeros_like,
                                                          params),
                                  state, params)
  for k, v in flat(updates).items():
    np.testing.assert_allclose(
        v, np.float32(0.1) * (np.asarray(flat(params)[k]) - start[k]),
        rtol=1e-6, atol=1e-8)


def test_toward_init_is_the_params_given_to_init():
  # toward="init" decays toward the params init was given: the same as
  # passing them as the tree, bit for bit, under a jitted init and a step
  # that donates the params; and the jitted init takes p0 as its argument,
  # where a tree given as toward= is a constant of the compiled init.
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  start = flat(PARAMS)
  by_tree = lw.add_decayed_weights(TOWARD_RULES, toward=params)
  by_init = lw.add_decayed_weights(TOWARD_RULES, toward="init")

  def run(tx):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(params, state):
      updates, state = tx.update(grad_fn(params), state, params)
      return optax.apply_updates(params, updates), state
    p = jax.tree_util.tree_map(jnp.array, params)
    state = jax.jit(tx.init)(p)
    for _ in range(3):
      p, state = step(p, state)
    return p, state

  (p_tree, s_tree), (p_init, s_init) = run(by_tree), run(by_init)
  for k, v in flat(p_init).items():
    assert np.asarray(v).tobytes() == np.asarray(flat(p_tree)[k]).tobytes(), k
  for k, v in flat(s_init.toward).items():
    np.testing.assert_array_equal(v, start[k])
  assert flat(s_init.toward).keys() == flat(s_tree.toward).keys()
  consts = lambda tx: jax.jit(tx.init).lower(params).as_text().count(
      "stablehlo.constant dense<[")
  assert consts(by_init) + len(flat(s_tree.toward)) == consts(by_tree)


@pytest.mark.parametrize("rules", [TOWARD_RULES, {"**": 0.05}])
def test_toward_zeros_is_plain_weight_decay_bit_for_bit(rules):
  # p - 0 is p exactly (NaN, inf and -0 too), and a zero weight decay still
  # leaves the update as it is.
  params = {**jax.tree_util.tree_map(jnp.asarray, PARAMS),
            "bad": {"w": BAD}}
  grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, -0.0), params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  rules = {"bad/**": 0.0, **rules}
  ours = lw.add_decayed_weights(rules, toward=zeros)
  plain = lw.add_decayed_weights(rules)
  varied = {**grad_fn({k: v for k, v in params.items() if k != "bad"}),
            "bad": {"w": jnp.full((2, 2), 0.25)}}
  for g in [grads, varied]:
    got, _ = jax.jit(ours.update)(g, ours.init(params), params)
    ref, _ = jax.jit(plain.update)(g, plain.init(params), params)
    chex.assert_trees_all_equal(got, ref)
    if rules.get("**") == 0.05:
      without_bad = lambda t: {k: v for k, v in t.items() if k != "bad"}
      optax_ref, _ = optax.add_decayed_weights(0.05).update(
          without_bad(g), None, without_bad(params))
      chex.assert_trees_all_equal(without_bad(got), optax_ref)


def test_toward_zeros_in_the_adamw_chain_is_optax_adamw():
  # optax.adamw is chain(scale_by_adam, add_decayed_weights, lr): decoupled
  # decay toward p0 goes where its decay goes.
  zeros = jax.tree_util.tree_map(np.zeros_like, PARAMS)
  ours = optax.chain(optax.scale_by_adam(),
                     lw.add_decayed_weights({"**": 0.1}, toward=zeros),
                     optax.scale_by_learning_rate(1e-2))
  chex.assert_trees_all_equal(run_optax(ours),
                              run_optax(optax.adamw(1e-2, weight_decay=0.1)))


def test_toward_with_set_weight_decay():
  tx = lw.add_decayed_weights(TOWARD_RULES, toward=P0)
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  state = lw.set_weight_decay(tx.init(params), "block/b", 0.5)   # NO_DECAY
  state = lw.set_weight_decay(state, "head/**", 0.0)
  update = jax.jit(tx.update)
  updates, _ = update(zeros, state, params)
  p, p0 = flat(PARAMS), flat(P0)
  np.testing.assert_allclose(updates["block"]["b"],
                             np.float32(0.5) * (p["block/b"] - p0["block/b"]),
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["head"]["w"], np.zeros((3, 2)))
  assert update._cache_size() == 1  # the same step, new coefficients


def test_toward_inside_freeze_is_of_the_whole_model():
  # Inside lw.freeze the inner transformation sees the trainable leaves
  # only; toward is written for the whole model, as the rule sets are.
  inner = lw.add_decayed_weights({"**": 0.1}, toward=P0)
  tx = lw.freeze(inner, "embed")
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)
  p, p0 = flat(PARAMS), flat(P0)
  np.testing.assert_array_equal(updates["embed"], np.zeros((6, 3)))
  for k in ["block/w", "block/b", "head/w"]:
    np.testing.assert_allclose(flat(updates)[k],
                               np.float32(0.1) * (p[k] - p0[k]), rtol=1e-6)
  is_decay = lambda s: isinstance(s, lw.AddDecayedWeightsState)
  (inner_state,) = [s for s in jax.tree_util.tree_leaves(state,
                                                         is_leaf=is_decay)
                    if is_decay(s)]
  assert set(flat(inner_state.toward)) == {"block/w", "block/b", "head/w"}


def test_toward_checkpoint_round_trip_keeps_p0():
  # The state's p0 is saved and restored like any array of the state: by
  # path, whether against a target or restored without one.
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  tx = optax.chain(optax.scale_by_adam(),
                   lw.add_decayed_weights(TOWARD_RULES,
                                          toward={**P0, "head": None}),
                   optax.scale_by_learning_rate(1e-2))
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  saved = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
           jax.tree_util.tree_flatten_with_path(state)[0]}
  assert "[1].toward['block']['w']" in saved
  assert not any(k.startswith("[1].toward['head']") for k in saved)
  # A target built with other weights gets the saved p0 back.
  other = lw.add_decayed_weights(TOWARD_RULES, toward={
      **jax.tree_util.tree_map(np.zeros_like, P0), "head": None})
  target = optax.chain(optax.scale_by_adam(), other,
                       optax.scale_by_learning_rate(1e-2)).init(
                           jax.tree_util.tree_map(jnp.asarray, PARAMS))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  restored = treedef.unflatten([saved[jax.tree_util.keystr(k)]
                                for k, _ in leaves])
  raw = lw.restore_state(target, {
      "0": {"count": saved["[0].count"],
            "mu": state[0].mu, "nu": state[0].nu},
      "1": {"count": saved["[1].count"],
            "weight_decays": saved["[1].weight_decays"],
            "toward": jax.tree_util.tree_map(np.asarray, state[1].toward)},
      "2": {}})
  for back in [restored, raw]:
    chex.assert_trees_all_equal(back[1].toward, state[1].toward)
    ours, _ = tx.update(grad_fn(params), back, params)
    ref, _ = tx.update(grad_fn(params), state, params)
    chex.assert_trees_all_equal(ours, ref)


def test_without_toward_the_state_is_as_before():
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  plain = lw.add_decayed_weights(TOWARD_RULES).init(params)
  assert plain.toward is None
  assert [jax.tree_util.keystr(k) for k, _ in
          jax.tree_util.tree_flatten_with_path(plain)[0]] == [
              ".count", ".weight_decays"]
  # With it, describe counts the copy of p0 as each parameter's state.
  tx = lw.add_decayed_weights(TOWARD_RULES, toward={**P0, "head": None})
  rows = {r["path"]: r for r in lw.describe(tx, params).rows}
  assert rows["block/w"]["state_bytes"] == 9 * 4
  assert rows["head/w"]["state_bytes"] == 0
  assert lw.hyperparams(tx.init(params)) == lw.hyperparams(plain)


# ------------------------------------------------------------ scalar types

# The same number as each kind of concrete real scalar a user may hold.
SCALARS = [0.25, np.float32(0.25), np.array(0.25), jnp.float32(0.25),
           jnp.asarray(0.25, jnp.bfloat16)]
SCALAR_IDS = ["float", "np.float32", "np-0d", "jnp.float32", "jnp-bf16"]


@pytest.mark.parametrize("x", SCALARS, ids=SCALAR_IDS)
def test_any_concrete_real_scalar_is_a_rate(x):
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  grads = {"a": jnp.full(2, 2.0), "b": jnp.full(2, 2.0)}
  expected = {"a": jnp.full(2, 0.5), "b": jnp.full(2, 2.0)}
  for tx in [lw.scale_by_rules({"a": x, "**": 1.0}),
             lw.scale_by_rules({"b": 1.0}, default=x)]:
    updates, _ = jax.jit(tx.update)(grads, tx.init(params))
    np.testing.assert_array_equal(updates["a"], expected["a"])
  for tx in [lw.add_decayed_weights({"a": x, "**": 0.0}),
             lw.add_decayed_weights({"b": 0.0}, default=x)]:
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["a"], jnp.full(2, 2.25))
    np.testing.assert_array_equal(updates["b"], grads["b"])
  # The setters take it too, and store it as a float32 entry.
  state = lw.set_scale(lw.scale_by_rules({"**": 1.0}).init(params), "a", x)
  assert state.multipliers.tolist() == [0.25, 1.0]
  state = lw.set_weight_decay(
      lw.add_decayed_weights({"**": 0.0}).init(params), "a", x)
  assert state.weight_decays.tolist() == [0.25, 0.0]


def test_a_traced_rate_is_refused_and_a_traced_setter_value_is_taken():
  params = {"a": jnp.ones(2)}

  @jax.jit
  def build(x):
    return lw.scale_by_rules({"**": x})

  with pytest.raises(TypeError, match=re.escape(
      "rule '**' has multiplier") + ".*It is a traced value.*lw.set_scale"):
    build(0.5)
  with pytest.raises(TypeError, match="It is a traced value.*"
                     "lw.set_weight_decay"):
    jax.jit(lambda x: lw.add_decayed_weights({"**": 0.0}, default=x))(0.5)
  # A setter may run inside a jitted function: its value is an entry.
  state = jax.jit(lambda s, x: lw.set_scale(s, "a", x))(
      lw.scale_by_rules({"**": 1.0}).init(params), jnp.float32(0.5))
  assert state.multipliers.tolist() == [0.5]


@pytest.mark.parametrize("value", [jnp.bool_(True), np.bool_(True),
                                   np.complex64(1.0), jnp.complex64(1.0),
                                   jnp.ones(2)],
                         ids=["jnp-bool", "np-bool", "np-complex",
                              "jnp-complex", "vector"])
def test_other_scalars_are_refused_everywhere(value):
  params = {"a": jnp.ones(2)}
  with pytest.raises(TypeError, match="has multiplier"):
    lw.scale_by_rules({"**": value})
  with pytest.raises(TypeError, match="default has weight decay"):
    lw.add_decayed_weights({"a": 0.0}, default=value)
  with pytest.raises(TypeError, match="lw.set_scale: value must be a"):
    lw.set_scale(lw.scale_by_rules({"**": 1.0}).init(params), "a", value)


def test_a_default_changed_under_inject_hyperparams_is_an_error():
  # inject_hyperparams rebuilds the transformation at every update with the
  # hyperparameters from its state; the multipliers stay those at init, so
  # a changed default would silently not apply (outside jit: inside, it is
  # a traced value, refused).
  params = {"a": jnp.ones(2), "head": jnp.ones(2)}
  tx = optax.inject_hyperparams(lw.scale_by_rules)({"head": 0.5}, default=1.0)
  state = tx.init(params)
  updates, state = tx.update(params, state)  # unchanged: fine
  np.testing.assert_array_equal(updates["a"], np.ones(2))
  state.hyperparams["default"] = jnp.asarray(0.25)
  with pytest.raises(ValueError, match=re.escape(
      "the multiplier of default is 0.25 in this transformation, but the "
      "state was initialised with 1.0 (parameter 'a')")):
    tx.update(params, state)
  with pytest.raises(TypeError, match="It is a traced value"):
    jax.jit(tx.update)(params, state)
  # A rule's value, from an argument of a factory: the same.
  tx = optax.inject_hyperparams(
      lambda m: lw.scale_by_rules({"head": m, "**": 1.0}))(m=0.5)
  state = tx.init(params)
  state.hyperparams["m"] = jnp.asarray(0.25)
  with pytest.raises(ValueError, match=re.escape(
      "the multiplier of rule 'head' is 0.25 in this transformation, but the "
      "state was initialised with 0.5 (parameter 'head')")):
    tx.update(params, state)
  # The recipe the messages give: default static, multipliers set.
  tx = optax.inject_hyperparams(lw.scale_by_rules, static_args=("default",))(
      {"head": 0.5}, default=1.0)
  state = lw.set_scale(tx.init(params), "a", 0.25)
  updates, _ = jax.jit(tx.update)(params, state)
  np.testing.assert_array_equal(updates["a"], np.full(2, 0.25))
  np.testing.assert_array_equal(updates["head"], np.full(2, 0.5))
