"""Tests for grad and value_and_grad (gradients for the trainable leaves
only), and for the transformations that take their ``None`` gradients.

References: ``jax.grad`` of the loss with :func:`layerwise.stop_gradient` on
the frozen leaves, fed to the same ``lw.freeze`` (bit for bit), ``jax.grad``
with respect to the trainable subtree alone, and each transformation run on
the trainable subtree alone.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import layerwise as lw
from conftest import NNXMLP


class LinenTagger(nn.Module):
  """Token embeddings, two residual blocks and a head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8, name="embed")(tokens)
    for i in range(2):
      h = nn.Dense(16, name=f"block_{i}_up")(nn.LayerNorm(name=f"block_{i}_norm")(x))
      x = x + nn.Dense(8, name=f"block_{i}_down")(nn.gelu(h))
    return nn.Dense(5, name="head")(x)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 6)))
LABELS = jnp.asarray(np.random.default_rng(1).integers(0, 5, (4, 6)))
LINEN = LinenTagger().init(jax.random.PRNGKey(0), TOKENS)["params"]
LINEN_FROZEN = lw.any_of("embed/**", "block_0_*/**")


def linen_loss(params, tokens, labels):
  logits = LinenTagger().apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def _train(grad_fn, tx, params, steps=3):
  """``steps`` jitted natural training steps (optax.apply_updates); the
  params and each step's updates."""
  @jax.jit
  def step(params, state):
    grads = grad_fn(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  state, seen = tx.init(params), []
  for _ in range(steps):
    params, state, updates = step(params, state)
    seen.append(updates)
  return params, seen


def _stopped(loss, frozen):
  return jax.grad(lambda p: loss(lw.stop_gradient(p, frozen)))


def _assert_as_stop_gradient(loss, params, frozen):
  """``lw.freeze(adam)`` fed by ``lw.grad`` steps as fed by ``jax.grad``
  with ``lw.stop_gradient``, bit for bit."""
  tx = lw.freeze(optax.adam(1e-2), frozen)
  ours, ours_updates = _train(lw.grad(loss, frozen), tx, params)
  ref, ref_updates = _train(_stopped(loss, frozen), tx, params)
  for a, b in zip(ours_updates, ref_updates):
    chex.assert_trees_all_equal(a, b)  # zeros for frozen leaves, structure
  chex.assert_trees_all_equal(ours, ref)
  assert not all(bool(jnp.all(a == b)) for a, b in zip(
      jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(params)))


def test_linen_updates_equal_freeze_with_stop_gradient():
  _assert_as_stop_gradient(lambda p: linen_loss(p, TOKENS, LABELS), LINEN,
                           LINEN_FROZEN)


def test_nnx_state_updates_equal_freeze_with_stop_gradient():
  graphdef, params = nnx.split(NNXMLP((4, 16, 16, 3), nnx.Rngs(0)), nnx.Param)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

  grads = lw.grad(loss, "layers/**")(params)
  # The params' structure (Param boxes included), None for frozen leaves.
  filled = jax.tree_util.tree_map(lambda g: 0, grads, is_leaf=lambda g: g is None)
  assert (jax.tree_util.tree_structure(filled)
          == jax.tree_util.tree_structure(params))
  paths = jax.tree_util.tree_leaves(lw.paths(params))
  assert sorted(jax.tree_util.tree_leaves(lw.paths(grads))) == sorted(
      p for p in paths if not p.startswith("layers/"))
  _assert_as_stop_gradient(loss, params, "layers/**")


def test_equinox_module_updates_equal_freeze_with_stop_gradient():
  eqx = pytest.importorskip("equinox")
  # The arrays of the module are its params (the activation is not), split
  # off as for any optax optimizer.
  params, static = eqx.partition(
      eqx.nn.MLP(4, 3, 8, 2, key=jax.random.PRNGKey(0)), eqx.is_array)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)

  def loss(params):
    return jnp.mean(jax.vmap(eqx.combine(params, static))(x) ** 2)

  assert jax.tree_util.tree_leaves(lw.paths(params))[:2] == [
      "layers/0/weight", "layers/0/bias"]
  grads = lw.grad(loss, "layers/{0..1}/**")(params)
  assert grads.layers[0].weight is None and grads.layers[1].bias is None
  assert grads.layers[2].weight.shape == (3, 8)
  _assert_as_stop_gradient(loss, params, "layers/{0..1}/**")


def test_gradients_are_those_of_the_trainable_subtree():
  frozen = {"embed/**": True, "block_0_*/**": True, "**": False}
  value, grads = jax.jit(lw.value_and_grad(linen_loss, frozen))(
      LINEN, TOKENS, LABELS)
  trainable = [k for k in LINEN if not k.startswith(("embed", "block_0"))]
  rest = {k: v for k, v in LINEN.items() if k not in trainable}
  ref_value, ref = jax.jit(jax.value_and_grad(
      lambda t: linen_loss({**rest, **t}, TOKENS, LABELS)))(
          {k: LINEN[k] for k in trainable})
  # The same math; XLA fuses the two programs differently (float rounding).
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  assert set(grads) == set(LINEN)
  for k in rest:
    assert jax.tree_util.tree_leaves(grads[k]) == []
    assert all(g is None for g in jax.tree_util.tree_leaves(
        grads[k], is_leaf=lambda x: x is None))
  chex.assert_trees_all_close({k: grads[k] for k in trainable}, ref,
                              rtol=1e-5, atol=1e-7)


def test_argnums_has_aux_and_grad():
  def loss(batch, params, scale=1.0):
    y = params["w"] * batch * scale + params["b"]
    return jnp.sum(y ** 2), {"y": y}

  params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
  batch = jnp.array([3.0, -1.0])
  (value, aux), grads = lw.value_and_grad(loss, "b", argnums=1,
                                          has_aux=True)(batch, params,
                                                        scale=2.0)
  ref = jax.grad(lambda w: loss(batch, {**params, "w": w}, 2.0)[0])(
      params["w"])
  assert grads["b"] is None
  np.testing.assert_array_equal(grads["w"], ref)
  np.testing.assert_array_equal(value, loss(batch, params, 2.0)[0])
  np.testing.assert_array_equal(aux["y"], loss(batch, params, 2.0)[1]["y"])
  g, aux2 = lw.grad(loss, "b", argnums=-1, has_aux=True)(batch, params)
  assert g["b"] is None and set(aux2) == {"y"}
  # Everything frozen: no gradient at all.
  assert lw.grad(lambda p: jnp.sum(p["w"]), "**")(params) == {"w": None,
                                                              "b": None}


# ------------------------------ the transformations that take None gradients

PARAMS = {"backbone": {"w": jnp.array([3.0, -4.0]), "b": jnp.array([1.0])},
          "head": {"w": jnp.array([0.3, 0.4, 1.2]), "b": jnp.array([-2.0])}}
TRAINABLE = {"head": PARAMS["head"]}
GRADS = {"backbone": {"w": None, "b": None},
         "head": {"w": jnp.array([6.0, 8.0, -1.0]), "b": jnp.array([0.5])}}


@pytest.mark.parametrize("make", [
    lambda: lw.clip_by_rules({"*/w": lw.clip_norm(1.0),
                              "**": lw.clip_group_norm(0.1)}),
    lambda: lw.clip_by_rules({"**": lw.clip_adaptive(0.05)}),
    lambda: lw.track_norms({"*/w": "weights", "**": "{parent}"}),
    lambda: lw.scale_by_rules({"*/w": 0.5, "**": 2.0}),
    lambda: lw.add_decayed_weights({"*/w": 0.1, "**": 0.0}),
    lambda: lw.map_updates(lambda u, p, path: u * 3.0, "*/b"),
], ids=["clip", "clip-adaptive", "track", "scale", "decay", "map"])
@pytest.mark.parametrize("form", ["leaves", "subtree", "masked"])
def test_none_gradients_pass_as_on_the_trainable_subtree(make, form):
  """A None leaf is left out of every norm and group: the present leaves'
  updates (and the norms measured) are those on the trainable subtree
  alone, and the None stays None."""
  grads = {**GRADS, "backbone": {"leaves": GRADS["backbone"],
                                 "subtree": None,
                                 "masked": optax.MaskedNode()}[form]}
  tx = make()
  updates, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
  ref_updates, ref_state = jax.jit(tx.update)(
      {"head": GRADS["head"]}, tx.init(TRAINABLE), TRAINABLE)
  assert (jax.tree_util.tree_structure(updates)
          == jax.tree_util.tree_structure(grads))
  chex.assert_trees_all_equal(updates["head"], ref_updates["head"])
  ours, ref = lw.norms(state), lw.norms(ref_state)
  for key, value in ref.items():
    np.testing.assert_array_equal(ours[key], value)
  for key in set(ours) - set(ref):  # a group without gradients: as at init
    np.testing.assert_array_equal(ours[key], lw.norms(tx.init(PARAMS))[key])


def test_a_group_without_gradients_keeps_its_clip_statistics():
  tx = lw.clip_by_rules({"backbone/**": lw.clip_quantile(0.5, 4),
                         "**": lw.clip_zscore()})
  full = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  _, state = jax.jit(tx.update)(full, tx.init(PARAMS), PARAMS)
  _, after = jax.jit(tx.update)(GRADS, state, PARAMS)
  for field in ("norms", "scales"):
    assert float(getattr(after, field)[0]) == float(getattr(state, field)[0])
  ref = {"head": GRADS["head"]}
  ref_tx = lw.clip_by_rules({"**": lw.clip_zscore()})
  _, ref_state = jax.jit(ref_tx.update)(
      ref, jax.jit(ref_tx.update)({"head": full["head"]},
                                  ref_tx.init(TRAINABLE), TRAINABLE)[1],
      TRAINABLE)
  np.testing.assert_array_equal(after.norms[1], ref_state.norms[0])
  key = "clip_quantile(window=4)"  # the backbone's window of norms
  assert int(state.stats[key]["filled"][0]) == 1
  chex.assert_trees_all_equal(after.stats[key], state.stats[key])


def test_freeze_gives_frozen_leaves_without_gradients_a_zero_update():
  """So that optax.apply_updates takes the updates: zeros like the params
  (a None subtree filled with the params' structure), or, without params,
  zeros of the shape at init for each None leaf."""
  for tx in (lw.freeze(optax.sgd(1.0), "backbone/**"),
             lw.partition({"backbone/**": None, "**": optax.sgd(1.0)})):
    state = tx.init(PARAMS)
    expected = {"backbone": jax.tree_util.tree_map(jnp.zeros_like,
                                                   PARAMS["backbone"]),
                "head": jax.tree_util.tree_map(jnp.negative, GRADS["head"])}
    for grads in (GRADS, {**GRADS, "backbone": None},
                  {**GRADS, "backbone": optax.MaskedNode()}):
      updates, _ = jax.jit(tx.update)(grads, state, PARAMS)
      chex.assert_trees_all_equal(updates, expected)
    updates, _ = jax.jit(tx.update)(GRADS, state)  # None leaves, no params
    chex.assert_trees_all_equal(updates, expected)
    chex.assert_trees_all_equal(optax.apply_updates(PARAMS, updates), {
        "backbone": PARAMS["backbone"],
        "head": optax.apply_updates(PARAMS["head"], expected["head"])})


def test_a_chain_outside_freeze_on_grad_gradients():
  """clip, track and scale before freeze, on lw.grad's gradients, update
  the trainable leaves as the same chain on the trainable subtree."""
  def chain(inner):
    return optax.chain(lw.clip_by_rules({"**": lw.clip_group_norm(0.5)}),
                       lw.track_norms({"**": "all"}),
                       lw.scale_by_rules({"*/w": 0.5, "**": 1.0}), inner)

  loss = lambda p: jnp.sum(jnp.sin(p["backbone"]["w"]).sum() * p["head"]["w"]
                           + p["head"]["b"] ** 2)
  tx = chain(lw.freeze(optax.adam(0.1), "backbone/**"))
  ref_tx = chain(optax.adam(0.1))
  ours, _ = _train(lw.grad(loss, "backbone/**"), tx, PARAMS)
  rest = {"backbone": PARAMS["backbone"]}
  ref, _ = _train(jax.grad(lambda t: loss({**rest, **t})), ref_tx, TRAINABLE)
  chex.assert_trees_all_equal(ours, {**rest, **ref})
