"""Integration tests: Flax linen TrainState, Flax NNX Optimizer,
orbax-checkpoint and optax.MultiSteps around layerwise transformations, and
the examples that show them.

References: plain optax run by hand on the same data (``optax.multi_transform``
with one optimizer per group at rate ``lr * r_g``, ``optax.clip``,
``optax.clip_by_global_norm``), with rates that are powers of two so that
``lr * r_g`` and ``lr`` then ``* r_g`` round alike; for checkpoints, an
uninterrupted run (bit for bit) and AutoClip and AdamW written out in NumPy
for the step after a restore; for MultiSteps, one step of the bare chain on
the mean of the micro-batch gradients. After ``lw.set_scale``, the updates
the old multipliers give, scaled by hand.
"""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import layerwise as lw
from conftest import LinenCNN, NNXMLP, flat, optimizer_update

LR = 2.0**-7
# Two XLA programs that compute the same numbers (a layerwise chain and its
# plain optax reference, a MultiSteps and its bare chain) may round an entry
# differently; from the first differing bit on, the trajectories agree to
# float32 rounding.
CLOSE = {"rtol": 1e-6, "atol": 1e-9}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def key_names(path):
  """A jax key path as its dict keys and attribute names."""
  return [getattr(k, "key", getattr(k, "name", None)) for k in path]


# ------------------------------------------------------- linen TrainState


def cnn_params():
  """The CNN's params: shapes from ``eval_shape``, values from NumPy (faster
  than compiling Flax's initializers, and alike in every jax version)."""
  shapes = jax.eval_shape(LinenCNN().init, jax.random.PRNGKey(0),
                          jnp.ones((1, 8, 8, 1)))["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(
      rng.normal(size=s.shape).astype(np.float32)
      / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 10.0)),
                                shapes)


def cnn_batch(seed, n=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          rng.integers(0, 10, n))


def cnn_loss(params, x, y):
  logits = LinenCNN().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


cnn_grad = jax.jit(jax.grad(cnn_loss))


def test_train_state_per_layer_rates_clipping_and_set_scale():
  params = cnn_params()
  tx = optax.chain(
      lw.clip_by_rules({"conv*/**": lw.clip_value(0.01),
                        "**": lw.clip_group_norm(0.5)}),
      optax.adam(LR),
      lw.scale_by_rules({"conv*/**": 0.25, "norm/**": 0.5, "**": 1.0}))
  state = train_state.TrainState.create(
      apply_fn=LinenCNN().apply, params=params, tx=tx)
  traces = []

  @jax.jit
  def step(state, grads):
    traces.append(None)
    return state.apply_gradients(grads=grads)

  # The reference: plain optax, one clipper and one adam per group.
  def group(path, _):
    name = key_names(path)[0]
    return "conv" if name.startswith("conv") else name

  labels = jax.tree_util.tree_map_with_path(group, params)
  clip_labels = jax.tree_util.tree_map(
      lambda g: "value" if g == "conv" else "norm", labels)
  ref_tx = optax.chain(
      optax.multi_transform({"value": optax.clip(0.01),
                             "norm": optax.clip_by_global_norm(0.5)},
                            clip_labels),
      optax.multi_transform({"conv": optax.adam(LR * 0.25),
                             "norm": optax.adam(LR * 0.5),
                             "dense": optax.adam(LR),
                             "head": optax.adam(LR)}, labels))
  ref_update = jax.jit(ref_tx.update)

  ref_params, ref_state = params, ref_tx.init(params)
  for k in range(4):
    x, y = cnn_batch(k)
    state = step(state, cnn_grad(state.params, x, y))
    grads = cnn_grad(ref_params, x, y)
    updates, ref_state = ref_update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    # Equal up to the rounding of the group norm's clipping factor, which
    # Adam magnifies where a gradient is near 0 (to 3.5e-8 here; 1e-6 is
    # 1/8000 of a step).
    chex.assert_trees_all_close(state.params, ref_params, rtol=0,
                                atol=1e-6)
  # Both clippers clipped: the comparison covers clipping.
  norms = lw.norms(state.opt_state)
  assert float(norms["clip/**/scale"]) < 1.0
  assert float(norms["clip/conv2/kernel/scale"]) < 1.0
  group_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                           for p, g in flat(grads).items()
                           if not p.startswith("conv")))
  np.testing.assert_allclose(norms["clip/**/norm"], group_norm, rtol=1e-6)

  rows = {r["path"]: r for r in lw.describe(
      state.tx, state.params, opt_state=state.opt_state).rows}
  assert [rows[p]["scale"] for p in ("conv1/kernel", "norm/scale",
                                     "head/kernel")] == [0.25, 0.5, 1.0]
  assert repr(rows["conv1/bias"]["clip"]) == "clip_value(0.01)"
  assert rows["dense/kernel"]["clip_norm"] == pytest.approx(group_norm,
                                                            rel=1e-6)
  # Adam's two moments (the multiplier is an entry of one shared vector).
  assert rows["conv1/kernel"]["state_bytes"] == 2 * 4 * 3 * 3 * 1 * 8

  # Between jitted steps: stop the convolutions, double the head's rate.
  opt_state = lw.set_scale(state.opt_state, "conv*/**", 0.0)
  state = state.replace(opt_state=lw.set_scale(opt_state, "head/**", 2.0))
  before = state.params
  x, y = cnn_batch(4)
  state = step(state, cnn_grad(state.params, x, y))
  assert len(traces) == 1  # no recompilation
  updates, _ = ref_update(cnn_grad(ref_params, x, y), ref_state, ref_params)
  factor = {"conv": 0.0, "norm": 1.0, "dense": 1.0, "head": 2.0}
  expected = jax.tree_util.tree_map(lambda p, u, g: p + factor[g] * u,
                                    ref_params, updates, labels)
  chex.assert_trees_all_close(state.params, expected, rtol=0, atol=1e-6)
  chex.assert_trees_all_equal(state.params["conv1"], before["conv1"])
  chex.assert_trees_all_equal(state.params["conv2"], before["conv2"])


# ------------------------------------------------------------ NNX Optimizer

X_NNX = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
Y_NNX = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32)


def nnx_model():
  return NNXMLP((4, 16, 16, 3), nnx.Rngs(0))


def nnx_trainer(wrt):
  """A jitted step of an ``nnx.Optimizer`` whose gradients are taken with
  respect to ``wrt``, and the list of its traces."""
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(None)
    loss = lambda m: jnp.mean((m(X_NNX) - Y_NNX) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer_update(optimizer, model, grads)

  return step, traces


def params_of(model):
  """The model's params as nested dicts of arrays."""
  state = nnx.state(model, nnx.Param)
  if hasattr(nnx, "to_pure_dict"):  # flax >= 0.11 deprecates the method
    return nnx.to_pure_dict(state)
  return state.to_pure_dict()


def hand_labels(rate_of):
  """Labels for optax.multi_transform from the path keys, by hand."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: rate_of(key_names(path)), params)


def test_nnx_optimizer_rates_over_state_paths_and_set_scale():
  tx = optax.chain(optax.adam(LR), lw.scale_by_rules(
      {"layers/0/**": 0.25, "layers/*/**": 0.5, "**": 1.0}))
  model, ref_model = nnx_model(), nnx_model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def rate(keys):
    return ("0.25" if keys[:2] == ["layers", 0] else
            "0.5" if keys[0] == "layers" else "1.0")

  ref = nnx.Optimizer(ref_model, optax.multi_transform(
      {r: optax.adam(LR * float(r)) for r in ("0.25", "0.5", "1.0")},
      hand_labels(rate)), wrt=nnx.Param)
  step, traces = nnx_trainer(nnx.Param)
  for _ in range(3):
    step(model, optimizer)
    step(ref_model, ref)
  chex.assert_trees_all_close(params_of(model), params_of(ref_model), **CLOSE)

  rows = lw.describe(tx, nnx.state(model, nnx.Param),
                     opt_state=optimizer.opt_state).rows
  assert {r["path"]: r["scale"] for r in rows} == {
      "head/bias": 1.0, "head/kernel": 1.0, "layers/0/bias": 0.25,
      "layers/0/kernel": 0.25, "layers/1/bias": 0.5, "layers/1/kernel": 0.5,
      "norm/bias": 1.0, "norm/scale": 1.0}

  # The optimizer's state is in nnx Variables; set_scale keeps them.
  optimizer.opt_state = lw.set_scale(optimizer.opt_state, "layers/0/**", 0.0)
  before = params_of(model)
  step(model, optimizer)
  step(ref_model, ref)
  assert len(traces) == 2  # one per optimizer, none after set_scale
  after, expected = params_of(model), params_of(ref_model)
  chex.assert_trees_all_equal(after["layers"][0], before["layers"][0])
  for name in ("norm", "head"):
    chex.assert_trees_all_close(after[name], expected[name], **CLOSE)
  chex.assert_trees_all_close(after["layers"][1], expected["layers"][1],
                              **CLOSE)


def test_nnx_freezing_by_filter_and_by_lw_freeze():
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("layers")))
  inner = optax.chain(
      optax.adam(LR), lw.scale_by_rules({"norm/**": 0.5, "head/**": 1.0}))
  # 1. NNX filters: the optimizer and the gradient see the trainable
  #    Variables only, so the rules name only those.
  by_filter = nnx_model()
  opt_filter = nnx.Optimizer(by_filter, inner, wrt=trainable)
  # 2. lw.freeze over every Param: frozen leaves get zero updates, no state.
  by_freeze = nnx_model()
  tx_freeze = lw.freeze(inner, "layers/**")
  opt_freeze = nnx.Optimizer(by_freeze, tx_freeze, wrt=nnx.Param)
  # Reference: plain optax over the trainable Variables.
  ref_model = nnx_model()
  ref = nnx.Optimizer(ref_model, optax.multi_transform(
      {"norm": optax.adam(LR * 0.5), "head": optax.adam(LR)},
      hand_labels(lambda keys: keys[0])), wrt=trainable)
  initial = params_of(ref_model)

  step_filter, _ = nnx_trainer(trainable)
  step_all, _ = nnx_trainer(nnx.Param)
  for _ in range(3):
    step_filter(by_filter, opt_filter)
    step_all(by_freeze, opt_freeze)
    step_filter(ref_model, ref)
  expected = params_of(ref_model)
  assert not np.array_equal(expected["head"]["kernel"],
                            initial["head"]["kernel"])
  for model in (by_filter, by_freeze):
    got = params_of(model)
    chex.assert_trees_all_equal(got["layers"], initial["layers"])
    for name in ("norm", "head"):
      chex.assert_trees_all_close(got[name], expected[name], **CLOSE)

  # The filtered optimizer's rules and state cover the trainable leaves only.
  rows = lw.describe(inner, nnx.state(by_filter, trainable),
                     opt_state=opt_filter.opt_state).rows
  assert [r["path"] for r in rows] == ["head/bias", "head/kernel",
                                       "norm/bias", "norm/scale"]
  # lw.freeze: the frozen layers hold no optimizer state.
  rows = lw.describe(tx_freeze, nnx.state(by_freeze, nnx.Param),
                     opt_state=opt_freeze.opt_state).rows
  assert {r["path"]: r["state_bytes"] for r in rows
          if r["path"].startswith("layers/")} == {
              "layers/0/bias": 0, "layers/0/kernel": 0, "layers/1/bias": 0,
              "layers/1/kernel": 0}
  assert {r["path"]: r["state_bytes"] for r in rows if r["path"].startswith(
      "head/")} == {"head/bias": 2 * 4 * 3, "head/kernel": 2 * 4 * 48}

  # A rule for a Variable outside the filter is a typo-like error.
  with pytest.raises(lw.RuleError, match=r"'layers/\*\*'"):
    nnx.Optimizer(nnx_model(), lw.scale_by_rules(
        {"layers/**": 0.1, "**": 1.0}), wrt=trainable)


# --------------------------------------------------------------- orbax

RNG = np.random.default_rng(3)
PARAMS = {"embed": RNG.normal(size=(6, 3)).astype(np.float32),
          "block": {"w": RNG.normal(size=(3, 3)).astype(np.float32),
                    "b": RNG.normal(size=(3,)).astype(np.float32)},
          "head": {"w": RNG.normal(size=(3, 2)).astype(np.float32)}}
# Gradient scales per step, with spikes for the clippers to catch.
SPIKES = np.array([1.0, 1.2, 0.9, 6.0, 1.1, 0.8, 5.0, 1.0, 1.3, 0.7],
                  np.float32)
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 0.1


def spiky_grads(params, t):
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(SPIKES)[t] * (jnp.sin(3.0 * p + t) + 0.1 * p),
      params)


CKPT_TX = optax.chain(
    lw.clip_by_rules({"embed": lw.clip_quantile(0.5, window=4),
                      "**": lw.clip_zscore(z=1.5, warmup=3)}),
    optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
    lw.track_norms({"**": "{parent}"}, prefix="update_norm"),
    lw.scale_by_rules({"embed": 0.25, "**": 1.0}))


@jax.jit
def ckpt_step(params, opt_state, t):
  updates, opt_state = CKPT_TX.update(spiky_grads(params, t), opt_state,
                                      params)
  return optax.apply_updates(params, updates), opt_state, updates


def run_from(params, opt_state, start, stop):
  trajectory = []
  for t in range(start, stop):
    params, opt_state, _ = ckpt_step(params, opt_state, t)
    trajectory.append((params, opt_state))
  return trajectory


def save_and_restore(directory, tree, target):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, tree)
  if hasattr(checkpointer, "wait_until_finished"):  # asynchronous saves
    checkpointer.wait_until_finished()
  return checkpointer.restore(directory, target)


def test_orbax_checkpoint_resumes_bitwise_and_set_scale_after(tmp_path):
  # On the device, as restored arrays are: one compiled step serves all runs.
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, PARAMS),
                          sharding)
  steps, k = 10, 5
  uninterrupted = run_from(
      params, jax.device_put(CKPT_TX.init(params), sharding), 0, steps)
  saved = uninterrupted[k - 1]
  # Both clippers clipped the spike of step 3, before the checkpoint.
  norms = lw.norms(uninterrupted[3][1])
  assert float(norms["clip/embed/scale"]) < 1.0
  assert float(norms["clip/**/scale"]) < 1.0

  # Restore against shapes only, with the shardings the arrays will have.
  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      {"params": params, "opt_state": jax.eval_shape(CKPT_TX.init, params)})
  restored = save_and_restore(tmp_path / "step5",
                              {"params": saved[0], "opt_state": saved[1]},
                              target)
  # The static rules come back with the structure of the target.
  assert (jax.tree_util.tree_structure(restored["opt_state"])
          == jax.tree_util.tree_structure(saved[1]))
  chex.assert_trees_all_equal(restored, {"params": saved[0],
                                         "opt_state": saved[1]})
  assert lw.norms(restored["opt_state"]).keys() == lw.norms(saved[1]).keys()

  resumed = run_from(restored["params"], restored["opt_state"], k, steps)
  for (p, s), (p_ref, s_ref) in zip(resumed, uninterrupted[k:]):
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_equal(s, s_ref)
  # Without the statistics (a fresh state), the trajectory differs.
  fresh = run_from(restored["params"],
                   jax.device_put(CKPT_TX.init(params), sharding), k, steps)
  assert not np.array_equal(fresh[-1][0]["embed"], resumed[-1][0]["embed"])

  # describe reads the restored rules and norms.
  rows = {r["path"]: r for r in lw.describe(
      CKPT_TX, params, opt_state=restored["opt_state"]).rows}
  assert rows["embed"]["scale"] == 0.25
  assert rows["embed"]["clip_norm"] == float(
      lw.norms(saved[1])["clip/embed/norm"])

  # A new multiplier after the restore; AutoClip and AdamW by hand.
  p, s = restored["params"], lw.set_scale(restored["opt_state"], "embed",
                                          0.5)
  _, _, updates = ckpt_step(p, s, k)
  assert ckpt_step._cache_size() == 1  # nothing compiled again
  g = np.asarray(spiky_grads(p, k)["embed"], np.float64)
  stats = {f: np.asarray(v[0], np.float64) for f, v in
           s[0].stats["clip_quantile(window=4)"].items()}
  history = stats["history"].copy()
  history[int(stats["next"])] = np.linalg.norm(g)
  filled = min(int(stats["filled"]) + 1, 4)
  g = g * min(1.0, np.quantile(history[:filled], 0.5) / np.linalg.norm(g))
  adam = s[1][0]
  mu = B1 * np.asarray(adam.mu["embed"], np.float64) + (1 - B1) * g
  nu = B2 * np.asarray(adam.nu["embed"], np.float64) + (1 - B2) * g**2
  count = int(adam.count) + 1
  u = (mu / (1 - B1**count)) / (np.sqrt(nu / (1 - B2**count)) + EPS)
  expected = -LR * (u + WD * np.asarray(p["embed"], np.float64)) * 0.5
  np.testing.assert_allclose(updates["embed"], expected, rtol=1e-5,
                             atol=1e-8)


# ----------------------------------------------------------- MultiSteps


def mean(grads):
  return jax.tree_util.tree_map(
      lambda *gs: np.mean(np.asarray(gs, np.float64), axis=0), *grads)


def test_multisteps_accumulates_then_steps_the_chain_once():
  params = jax.tree_util.tree_map(jnp.asarray, PARAMS)
  k = 4
  inner = optax.chain(
      lw.clip_by_rules({"head/**": lw.clip_norm(0.5),
                        "**": lw.clip_group_norm(1.0)}),
      optax.adamw(LR, weight_decay=0.05),
      lw.scale_by_rules({"embed": 0.25, "**": 1.0}))
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  update, bare_update = jax.jit(tx.update), jax.jit(inner.update)

  def window(params, state, first):
    """``k`` micro-steps; the micro-batch gradients and the last update."""
    grads = [spiky_grads(params, t) for t in range(first, first + k)]
    for i, g in enumerate(grads):
      updates, state = update(g, state, params)
      if i < k - 1:
        assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates))
    return grads, updates, state

  grads, updates, state = window(params, tx.init(params), 0)
  expected, bare_state = bare_update(mean(grads), inner.init(params), params)
  chex.assert_trees_all_close(updates, expected, **CLOSE)
  chex.assert_trees_all_close(state.inner_opt_state, bare_state, **CLOSE)
  norms = lw.norms(state)
  assert float(norms["clip/**/scale"]) < 1.0  # it clipped
  assert float(norms["clip/head/w/scale"]) < 1.0
  chex.assert_trees_all_close(norms, lw.norms(bare_state), **CLOSE)

  # describe and set_scale reach the inner state through MultiStepsState.
  rows = {r["path"]: r for r in lw.describe(tx, params, opt_state=state).rows}
  assert [rows[p]["scale"] for p in ("embed", "head/w")] == [0.25, 1.0]
  assert repr(rows["head/w"]["clip"]) == "clip_norm(0.5)"
  # The accumulator and AdamW's two moments.
  assert rows["embed"]["state_bytes"] == 3 * 4 * 18
  params = optax.apply_updates(params, updates)
  grads, halved, _ = window(params, lw.set_scale(state, "head/**", 0.5), k)
  _, updates, _ = window(params, state, k)
  # By hand: the same window's updates, the head's halved.
  chex.assert_trees_all_equal(halved, {
      n: jax.tree_util.tree_map(lambda u: 0.5 * u, u) if n == "head" else u
      for n, u in updates.items()})
  expected, _ = bare_update(mean(grads), bare_state, params)
  chex.assert_trees_all_close(updates, expected, **CLOSE)


# ------------------------------------------------------------- examples


EXAMPLES = {
    "train_state.py": "train_step traced 1 time(s): no recompilation",
    "nnx_optimizer.py": "frozen layers unchanged: True",
    "checkpoint.py": "resumed run equals the uninterrupted one: True",
    "accumulate.py": "4 micro-steps equal one step on the mean: True",
    # 2 local processes of one jax.distributed run (its own launch, which
    # ends them on a failure or after its timeout).
    "multihost.py": "2 processes, ",
}


def test_examples_run():
  path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
  # All at once: most of their time is starting up and compiling.
  runs = {script: subprocess.Popen(
      [sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for script in EXAMPLES}
  for script, run in runs.items():
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, f"{script} failed:\n{stderr}"
    assert EXAMPLES[script] in stdout, f"{script} printed:\n{stdout}"
