"""Stacked (scanned) layers, whole models: a rule set written for the unrolled
model trains the stacked one identically (issue 18).

The reference of every test here is the same model unrolled
(tests/stacked_models.py): its params are the slices of the stacked ones,
its paths are ``layers/<i>/...``, and it is trained with the same rules and
``stacks={}``. Params, updates and norms after each of 5 jitted steps must
agree to float32 tolerance, for a linen ``nn.scan`` model, an NNX
``nnx.vmap`` + ``nnx.scan`` model, an Equinox ``filter_vmap`` stack and a
dict with its layer axis at 1 (MaxText).

The second part checks that Flax's own axis metadata declares the stack
(linen ``nn.scan(..., metadata_params=...)``, NNX ``nnx.vmap(...,
transform_metadata=...)``), so that ``stacks=`` can be left out.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw
import stacked_models as sm
from layerwise import _paths

STEPS = 5
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _model(name):
  if name == "linen-scan":
    return sm.linen()
  if name == "nnx-vmap-scan":
    return sm.nnx_twins()
  if name == "equinox":
    pytest.importorskip("equinox")
    return sm.equinox_twins()
  return sm.axis1_twins()


MODELS = ["linen-scan", "nnx-vmap-scan", "equinox", "axis-1"]


@pytest.fixture(name="twins", params=MODELS, scope="module")
def _twins(request):
  return _model(request.param)


def train(tx, params, loss, batches):
  """``len(batches)`` jitted steps of ``tx``: the final params, and per step
  the updates and ``lw.norms`` of the state."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates, lw.norms(
        state)

  history = []
  for batch in batches:
    params, state, updates, norms = step(params, state, batch)
    history.append((updates, norms))
  return params, history


def assert_twins(stacked, twin, twins, what):
  """``stacked`` (a tree like the stacked params) sliced equals ``twin``."""
  sliced = sm.unroll(stacked, twin, twins.stacks)
  got = dict(zip(_paths.flatten_with_paths(sliced)[0],
                 jax.tree_util.tree_leaves(sliced)))
  want = dict(zip(_paths.flatten_with_paths(twin)[0],
                  jax.tree_util.tree_leaves(twin)))
  for path, value in want.items():
    np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value),
                               err_msg=f"{what}: {path}", **TOL)


def assert_same_training(tx_of, twins):
  """Trains both twins, ``tx_of(params, stacks)`` each, and compares."""
  data = sm.batches(STEPS)
  p_s, hist_s = train(tx_of(twins.stacked, twins.stacks), twins.stacked,
                      twins.stacked_loss, data)
  p_t, hist_t = train(tx_of(twins.twin, {}), twins.twin, twins.twin_loss,
                      data)
  assert_twins(p_s, p_t, twins, "params")
  for i, ((u_s, n_s), (u_t, n_t)) in enumerate(zip(hist_s, hist_t)):
    assert_twins(u_s, u_t, twins, f"updates of step {i}")
    assert sorted(n_s) == sorted(n_t), f"norm keys of step {i}"
    for key, value in n_t.items():
      np.testing.assert_allclose(n_s[key], value, err_msg=f"{key} step {i}",
                                 **TOL)
  return p_s, hist_s, p_t, hist_t


# ------------------------------------------------------------ the twins


def test_twins_compute_the_same_loss_and_gradients(twins):
  """The reference itself: the unrolled twin is the same function of the
  same numbers, so its gradients are the stacked gradients' slices."""
  batch = sm.batches(1)[0]
  np.testing.assert_allclose(twins.stacked_loss(twins.stacked, batch),
                             twins.twin_loss(twins.twin, batch), **TOL)
  assert_twins(jax.grad(twins.stacked_loss)(twins.stacked, batch),
               jax.grad(twins.twin_loss)(twins.twin, batch), twins,
               "gradients")


def test_layer_paths_are_the_twins_paths(twins):
  """Each stacked leaf is L layer leaves named like the twin's leaves."""
  stacked = jax.tree_util.tree_leaves(
      lw.paths(twins.stacked, stacks=twins.stacks))
  twin = jax.tree_util.tree_leaves(lw.paths(twins.twin, stacks={}))
  assert sorted(stacked) == sorted(twin)
  assert f"layers/{sm.L - 1}/mlp/{'weight' if twins.name == 'equinox' else 'kernel'}" in twin


# ------------------------------------------- the core: per-layer multipliers

RATES = {"layers/0/**": 0.0,
         "layers/1/**": optax.linear_schedule(0.0, 1.0, 4),
         "layers/*/mlp/**": 0.5,
         "layers/3/ln/**": 2.0,
         "**": 1.0}


def test_per_layer_multipliers_train_the_stacked_model_like_its_twin(twins):
  """chain(adamw, scale_by_rules(per-layer rules)): layer 0 frozen by an
  exact zero, layer 1 warmed up by a schedule, the mlp of every layer at
  half rate."""

  def tx_of(params, stacks):
    del params
    return optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                       lw.scale_by_rules(RATES, stacks=stacks))

  p_s, hist_s, _, _ = assert_same_training(tx_of, twins)
  frozen = lw.resolve({"layers/0/**": True, "**": False}, twins.twin,
                      stacks={})
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                 twins.twin,
                                 sm.unroll(p_s, twins.twin, twins.stacks))
  assert jax.tree_util.tree_leaves(moved) == [
      not f for f in jax.tree_util.tree_leaves(frozen)]
  del hist_s


def test_set_scale_reaches_layers_of_the_stacked_model(twins):
  """lw.set_scale(state, 'layers/[2-3]/**', 0.25) changes those layers only,
  in the stacked model's state as in the twin's."""
  data = sm.batches(2)
  out = []
  for params, loss, stacks in [
      (twins.stacked, twins.stacked_loss, twins.stacks),
      (twins.twin, twins.twin_loss, {})]:
    tx = optax.chain(optax.sgd(0.1),
                     lw.scale_by_rules({"**": 1.0}, stacks=stacks))
    state = lw.set_scale(tx.init(params), "layers/[2-3]/**", 0.25)
    grads = jax.grad(loss)(params, data[0])
    updates, _ = jax.jit(tx.update)(grads, state, params)
    out.append((grads, updates))
  (g_s, u_s), (g_t, u_t) = out
  assert_twins(u_s, u_t, twins, "updates")
  expect = jax.tree_util.tree_map(
      lambda g, r: -0.1 * r * g, g_t,
      lw.resolve({"layers/[2-3]/**": 0.25, "**": 1.0}, twins.twin,
                 stacks={}))
  assert_twins(u_s, expect, twins, "updates against -lr * scale * grad")
  del g_s


# --------------------------------------------------- the whole chain

_STACKED_APIS = [lw.clip_by_rules, lw.track_norms, lw.freeze,
                 lw.add_decayed_weights, lw.layer_decay]


def _missing_stacks():
  return [f.__name__ for f in _STACKED_APIS
          if "stacks" not in inspect.signature(f).parameters]


def whole_chain(params, stacks):
  """The issue's chain: per-layer clipping (a group clipper over one layer,
  per-leaf clippers on each layer's slices, a group over the rest), norms
  logged per layer, layers 0 and 1 frozen around an AdamW whose weight decay
  skips NO_DECAY by layer shape, and layer-wise rate decay."""
  clip = lw.clip_by_rules({"layers/2/**": lw.clip_group_norm(0.02),
                           "layers/*/mlp/**": lw.clip_norm(0.01),
                           "**": lw.clip_group_norm(0.05)}, stacks=stacks)
  per_layer = {f"layers/{i}/**": f"layers/{i}" for i in range(sm.L)}
  track = lw.track_norms({**per_layer, "**": "{path}"}, stacks=stacks)
  adamw = optax.chain(
      optax.scale_by_adam(),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1}, stacks=stacks),
      optax.scale(-1e-2))
  frozen = lw.freeze(adamw, "layers/[0-1]/**", stacks=stacks)
  rates = lw.scale_by_rules(lw.layer_decay(0.75, params, stacks=stacks),
                            stacks=stacks)
  return optax.chain(clip, track, frozen, rates)


def test_whole_chain_trains_the_stacked_model_like_its_twin(twins):
  """Per-layer clipping, per-layer norms, frozen bottom layers, NO_DECAY by
  layer shape and layer-wise decay: 5 jitted steps of the stacked model
  agree with the twin's (params, updates, every norm)."""
  missing = _missing_stacks()
  if missing:
    pytest.skip(f"no stacks= yet in {missing} (issue 18's other parts)")
  p_s, hist_s, p_t, hist_t = assert_same_training(whole_chain, twins)
  # The test proves something only if every part acted: clipping clipped,
  # the bottom layers stayed where they were, the per-layer norms exist.
  norms = hist_t[0][1]
  assert {f"grad_norm/layers/{i}" for i in range(sm.L)} <= set(norms)
  scales = [v for k, v in norms.items() if k.endswith("/scale")]
  assert scales and min(float(s) for s in scales) < 1.0
  frozen = lw.resolve({"layers/[0-1]/**": True, "**": False}, twins.twin,
                      stacks={})
  for f, a, b in zip(jax.tree_util.tree_leaves(frozen),
                     jax.tree_util.tree_leaves(twins.twin),
                     jax.tree_util.tree_leaves(p_t)):
    assert bool(jnp.all(a == b)) == f
  del p_s, hist_s
