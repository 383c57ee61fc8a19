"""clip_by_rules and track_norms on stacked (scanned) layers.

The reference is the same model unrolled: its params are the slices of the
stacked ones (``encoder/layers/3/attn/kernel`` is layer 3 of the stacked
``encoder/layers/attn/kernel``), trained with the same rules and the same
gradients. Updates, params, the clip statistics (norms, scales, thresholds,
AutoClip's and ZClip's) and the tracked norms must agree to float32
tolerance, over 3 jitted steps, with the layer axis at 0 and at 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw
from test_compile import count_fusions

L = 5
RNG = np.random.default_rng(18)


def normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def stacked_params(axis):
  """Leaves of a stack hold L layers on ``axis``; ``embed`` and ``head``
  are in no stack."""
  def stack(*layer_shape):
    shape = list(layer_shape)
    shape.insert(axis, L)
    return normal(*shape)

  return {"embed": normal(6, 3),
          "encoder": {"layers": {"attn": {"kernel": stack(3, 4),
                                          "bias": stack(4)},
                                 "ln": {"scale": stack(3)}}},
          "head": {"kernel": normal(3, 2)}}


def unrolled(tree, axis):
  """The unrolled twin: ``encoder/layers`` as a list of L layers."""
  layers = tree["encoder"]["layers"]
  return {**tree, "encoder": {"layers": [
      jax.tree_util.tree_map(lambda x, i=i: jnp.take(x, i, axis=axis), layers)
      for i in range(L)]}}


def grads_at(params, step):
  # Different per leaf, per layer and per step; some entries large enough
  # to clip, layer 2 scaled up so that layers differ in norm.
  def g(x):
    return jnp.sin(3.0 * x + step) * (1.0 + step) + 0.5 * x
  return jax.tree_util.tree_map(g, params)


def train(tx, params, steps=3, grads_fn=grads_at):
  """``steps`` jitted steps of ``chain(tx, sgd)``: every step's updates, the
  final params and the final state of ``tx``."""
  opt = optax.chain(tx, optax.sgd(0.1))
  state = opt.init(params)
  update = jax.jit(opt.update)
  history = []
  for step in range(steps):
    updates, state = update(grads_fn(params, step), state, params)
    history.append(updates)
    params = optax.apply_updates(params, updates)
  return history, params, state[0]


def assert_twins(stacked, twin, axis):
  """The stacked tree equals the unrolled one, layer by layer."""
  np.testing.assert_allclose(stacked["embed"], twin["embed"], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(stacked["head"]["kernel"], twin["head"]["kernel"],
                             rtol=1e-6, atol=1e-6)
  for i, layer in enumerate(twin["encoder"]["layers"]):
    got = jax.tree_util.tree_map(lambda x: jnp.take(x, i, axis=axis),
                                 stacked["encoder"]["layers"])
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(layer)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                 err_msg=f"layer {i}")


def assert_same_metrics(state, twin_state):
  # The same keys; the order is the plan's, where the layers of a stacked
  # leaf are consecutive.
  got, want = lw.norms(state), lw.norms(twin_state)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6,
                               err_msg=key)


def by_group(state):
  """Each group's norm, scale, threshold and statistics, by its name."""
  out = {}
  rows = {}
  for g, (name, (key, row)) in enumerate(zip(state.group_names(),
                                             state.rules.layout)):
    rows[key] = rows.get(key, -1) + 1
    out[name] = {"norm": state.norms[g], "scale": state.scales[g],
                 "threshold": state.thresholds[g]}
    if key is not None:
      assert row == rows[key]
      out[name].update({f"{key}/{f}": v[row]
                        for f, v in state.stats[key].items()})
  return out


def assert_same_clip_state(state, twin_state):
  got, want = by_group(state), by_group(twin_state)
  assert sorted(got) == sorted(want)
  for name, values in want.items():
    assert sorted(got[name]) == sorted(values)
    for field, v in values.items():
      np.testing.assert_allclose(got[name][field], v, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{name} {field}")


RULES = {
    # Per-leaf clippers: each layer's slice on its own.
    "clip_value": {"**": lw.clip_value(0.4)},
    "clip_norm": {"**": lw.clip_norm(0.8)},
    "clip_norm_ords": {"encoder/layers/[0-1]/**": lw.clip_norm(1.0, ord=1),
                       "encoder/layers/2/**": lw.clip_norm(0.3, ord="inf"),
                       "**": lw.clip_norm(0.8)},
    "clip_adaptive": {"head/**": None, "**": lw.clip_adaptive(0.05)},
    "clip_adaptive_axis": {"**": lw.clip_adaptive(0.05, eps=1e-2, axis=-1)},
    # A group over several leaves of one layer, the rest per leaf.
    "one_layer": {"encoder/layers/3/**": lw.clip_group_norm(0.5),
                  "**": lw.clip_norm(0.8)},
    # A group over several layers; the other layers unclipped.
    "several_layers": {"encoder/layers/[0-3]/**": lw.clip_group_norm(1.0),
                       "**": None},
    # Groups mixing stacked and unstacked leaves.
    "global": {"**": lw.clip_group_norm(1.5)},
    "mixed_group": {lw.any_of("embed", "encoder/layers/[0-1]/**"):
                    lw.clip_group_norm(1.0),
                    "encoder/layers/[2-4]/attn/**": lw.clip_group_norm(
                        0.5, ord="inf"),
                    "**": lw.clip_group_norm(0.7, ord=1)},
    "quantile": {"encoder/layers/[1-2]/**": lw.clip_quantile(0.5, window=2),
                 "embed": lw.clip_quantile(0.3, window=3),
                 "**": lw.clip_quantile(0.5, window=2)},
    "zscore": {lw.any_of("head/**", "encoder/layers/[0-2]/**"):
               lw.clip_zscore(z=1.0, warmup=1),
               "**": lw.clip_zscore(z=0.5, alpha=0.5, warmup=2)},
    # One stacked leaf, its layers clipped four ways (and one not at all).
    "every_kind": {"encoder/layers/0/**": lw.clip_value(0.3),
                   "encoder/layers/1/**": lw.clip_adaptive(0.02),
                   "encoder/layers/[2-3]/**": lw.clip_group_norm(0.6),
                   "encoder/layers/4/attn/**": lw.clip_norm(0.5),
                   "encoder/**": None,
                   "**": lw.clip_zscore(warmup=1)},
}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(RULES))
def test_clip_by_rules_is_its_unrolled_twin(name, axis):
  rules = RULES[name]
  params = stacked_params(axis)
  twin = unrolled(params, axis)
  got, got_params, state = train(
      lw.clip_by_rules(rules, stacks={"encoder/layers": axis}), params)
  want, want_params, twin_state = train(lw.clip_by_rules(rules, stacks={}),
                                        twin)
  for u, v in zip(got, want):
    assert_twins(u, v, axis)
  assert_twins(got_params, want_params, axis)
  assert_same_clip_state(state, twin_state)
  assert_same_metrics(state, twin_state)
  # The clipping did something (the thresholds are low enough).
  assert np.any(np.asarray(state.scales) < 1.0)


def test_negative_layer_axis():
  """``{"encoder/layers": -2}`` on (3, L, 4) kernels is axis 1."""
  params = stacked_params(1)
  kernels = {"encoder": {"layers": {"kernel": params["encoder"]["layers"][
      "attn"]["kernel"]}}}
  twin = {"encoder": {"layers": [{"kernel": layer["attn"]["kernel"]} for layer
                                 in unrolled(params, 1)["encoder"]["layers"]]}}
  rules = {"encoder/layers/[0-1]/**": lw.clip_adaptive(0.02),
           "encoder/layers/2/**": lw.clip_value(0.2),
           "**": lw.clip_norm(0.5)}
  got, _, state = train(lw.clip_by_rules(rules,
                                         stacks={"encoder/layers": -2}),
                        kernels)
  want, _, twin_state = train(lw.clip_by_rules(rules), twin)
  for u, v in zip(got, want):
    for i in range(L):
      np.testing.assert_allclose(u["encoder"]["layers"]["kernel"][:, i],
                                 v["encoder"]["layers"][i]["kernel"],
                                 rtol=1e-6, atol=1e-6)
  assert_same_clip_state(state, twin_state)
  assert_same_metrics(state, twin_state)


def test_adaptive_units_leave_out_the_layer_axis():
  """The silent bug of issue 18: on a stacked (L, in, out) kernel,
  clip_adaptive's default units (axis 0) summed over the layers. With the
  stack declared, each layer is clipped as optax.adaptive_grad_clip clips
  that layer's (in, out) kernel."""
  kernel = normal(L, 3, 4) * 0.1
  grads = {"layers": {"kernel": normal(L, 3, 4)}}
  params = {"layers": {"kernel": kernel}}
  tx = lw.clip_by_rules({"**": lw.clip_adaptive(0.05)},
                        stacks={"layers": 0})
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  agc = optax.adaptive_grad_clip(0.05)
  for i in range(L):
    want, _ = agc.update(grads["layers"]["kernel"][i], agc.init(None),
                         kernel[i])
    np.testing.assert_allclose(got["layers"]["kernel"][i], want, rtol=1e-6,
                               atol=1e-7)
  # Without the stack, the units run across the layers: another result.
  plain = lw.clip_by_rules({"**": lw.clip_adaptive(0.05)}, stacks={})
  mixed, _ = plain.update(grads, plain.init(params), params)
  assert not np.allclose(mixed["layers"]["kernel"], got["layers"]["kernel"])


@pytest.mark.parametrize("axis", [0, 1])
def test_set_threshold_per_layer(axis):
  rules = {"encoder/layers/*/attn/**": lw.clip_norm(5.0),
           "**": lw.clip_group_norm(5.0)}
  params = stacked_params(axis)
  twin = unrolled(params, axis)
  tx = lw.clip_by_rules(rules, stacks={"encoder/layers": axis})
  twin_tx = lw.clip_by_rules(rules)
  state, twin_state = tx.init(params), twin_tx.init(twin)
  for selector, value in [("encoder/layers/[0-3]/**", 0.25),
                          ("encoder/layers/4/attn/bias", 0.05)]:
    state = lw.set_threshold(state, selector, value)
    twin_state = lw.set_threshold(twin_state, selector, value)
  assert_same_clip_state(state, twin_state)
  # Layer 0's kernel and bias are groups of their own; [0-3] also picked
  # the group clipper's group (its ln leaves), whose rule covers all.
  names = state.group_names()
  t = dict(zip(names, np.asarray(state.thresholds).tolist()))
  assert t["encoder/layers/0/attn/kernel"] == 0.25
  assert t["encoder/layers/4/attn/kernel"] == 5.0
  assert t["encoder/layers/4/attn/bias"] == np.float32(0.05)
  assert t["**"] == 0.25
  grads = grads_at(params, 0)
  got, state = jax.jit(tx.update)(grads, state)
  want, twin_state = jax.jit(twin_tx.update)(unrolled(grads, axis), twin_state)
  assert_twins(got, want, axis)
  assert_same_clip_state(state, twin_state)


# ------------------------------------------------------------- track_norms

TRACK_RULES = {
    "per_module": {"**": "{parent}"},
    "per_leaf": {"head/**": None, "**": "{path}"},
    "per_layer": {"encoder/layers/0/**": "first",
                  "encoder/layers/[1-3]/**": "middle",
                  "encoder/layers/*/ln/**": "ln", "**": None},
    "mixed": {"encoder/layers/[0-1]/**": "bottom", "embed": "bottom",
              "**": "rest"},
}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(TRACK_RULES))
def test_track_norms_is_its_unrolled_twin(name, axis):
  rules = TRACK_RULES[name]
  params = stacked_params(axis)
  twin = unrolled(params, axis)
  tx = optax.chain(lw.track_norms(rules, stacks={"encoder/layers": axis}),
                   lw.clip_by_rules({"**": lw.clip_norm(0.5)},
                                    stacks={"encoder/layers": axis}),
                   lw.track_norms(rules, prefix="update_norm",
                                  stacks={"encoder/layers": axis}))
  twin_tx = optax.chain(lw.track_norms(rules),
                        lw.clip_by_rules({"**": lw.clip_norm(0.5)}),
                        lw.track_norms(rules, prefix="update_norm"))
  state, twin_state = tx.init(params), twin_tx.init(twin)
  step, twin_step = jax.jit(tx.update), jax.jit(twin_tx.update)

  @jax.jit
  def metrics(state):  # lw.norms inside jit
    return lw.norms(state)

  for i in range(3):
    grads = grads_at(params, i)
    got, state = step(grads, state)
    want, twin_state = twin_step(unrolled(grads, axis), twin_state)
    assert_twins(got, want, axis)
    m, twin_m = metrics(state), metrics(twin_state)
    assert list(m) == list(twin_m)
    for key in twin_m:
      np.testing.assert_allclose(m[key], twin_m[key], rtol=1e-6, atol=1e-6,
                                 err_msg=key)
  if name == "per_module":
    assert "grad_norm/encoder/layers/3/attn" in m
    # The norm of layer 3's attention, by hand.
    layers = grads["encoder"]["layers"]["attn"]
    by_hand = np.sqrt(sum(
        np.sum(np.square(np.take(np.asarray(x, np.float64), 3, axis=axis)))
        for x in (layers["kernel"], layers["bias"])))
    np.testing.assert_allclose(m["grad_norm/encoder/layers/3/attn"], by_hand,
                               rtol=1e-6)


def test_absent_stacked_leaves_keep_their_norms():
  """Updates with None for a stacked leaf (lw.grad's frozen leaves): its
  layer leaves are left out of their groups, and a group with no gradient
  at all keeps its last norm, as on the unrolled twin."""
  params = stacked_params(0)
  twin = unrolled(params, 0)
  # Two groups whose statistics are stacked (one key): one loses its
  # gradients at step 2, the other keeps them.
  rules = {"encoder/layers/*/ln/**": lw.clip_zscore(z=0.5, warmup=1),
           "encoder/layers/[0-1]/**": lw.clip_zscore(z=1.0, warmup=1),
           "embed": lw.clip_group_norm(0.5),
           "**": lw.clip_norm(0.5)}
  track = {"**": "{parent}"}
  tx = optax.chain(lw.clip_by_rules(rules, stacks={"encoder/layers": 0}),
                   lw.track_norms(track, stacks={"encoder/layers": 0}))
  twin_tx = optax.chain(lw.clip_by_rules(rules), lw.track_norms(track))
  state, twin_state = tx.init(params), twin_tx.init(twin)

  def without_ln(tree):
    layers = tree["encoder"]["layers"]
    if isinstance(layers, list):
      return {**tree, "encoder": {"layers": [
          {**layer, "ln": None} for layer in layers]}}
    return {**tree, "encoder": {"layers": {**layers, "ln": None}}}

  for i in range(2):
    grads = grads_at(params, i)
    if i == 1:
      grads = without_ln(grads)
    got, state = jax.jit(tx.update)(grads, state, params)
    want, twin_state = jax.jit(twin_tx.update)(
        without_ln(unrolled(grads_at(params, i), 0)) if i == 1 else
        unrolled(grads, 0), twin_state, twin)
  assert got["encoder"]["layers"]["ln"] is None
  for x, y in zip(jax.tree_util.tree_leaves(got["encoder"]["layers"]["attn"]),
                  [jnp.stack(v) for v in zip(*[
                      jax.tree_util.tree_leaves(layer["attn"])
                      for layer in want["encoder"]["layers"]])]):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  assert_same_metrics(state, twin_state)
  assert_same_clip_state(state[0], twin_state[0])
  # The ln group had no gradient at step 2: its norm is step 1's.
  n = lw.norms(state)
  ln = np.sqrt(sum(np.sum(np.square(np.asarray(
      grads_at(params, 0)["encoder"]["layers"]["ln"]["scale"][k])))
                   for k in range(L)))
  np.testing.assert_allclose(n["clip/encoder/layers/*/ln/**/norm"], ln,
                             rtol=1e-6)


def test_bfloat16_keeps_its_dtype():
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                  stacked_params(0))
  twin = unrolled(params, 0)
  rules = RULES["every_kind"]
  got, _, state = train(lw.clip_by_rules(rules, stacks={"encoder/layers": 0}),
                        params, steps=1)
  want, _, twin_state = train(lw.clip_by_rules(rules), twin, steps=1)
  for x in jax.tree_util.tree_leaves(got[0]):
    assert x.dtype == jnp.bfloat16
  layers = got[0]["encoder"]["layers"]
  for i in range(L):
    for a, b in zip(jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda x: x[i], layers)),
                    jax.tree_util.tree_leaves(want[0]["encoder"]["layers"][i])):
      np.testing.assert_allclose(np.asarray(a, np.float32),
                                 np.asarray(b, np.float32), rtol=1e-2,
                                 atol=1e-2)
  # Norms are float32 whatever the updates' dtype.
  assert state.norms.dtype == jnp.float32


def test_stacked_state_and_metrics_by_layer():
  params = stacked_params(0)
  tx = lw.clip_by_rules({"encoder/layers/3/**": lw.clip_group_norm(1.0),
                         "encoder/**": lw.clip_norm(1.0), "**": None},
                        stacks={"encoder/layers": 0})
  state = tx.init(params)
  names = state.group_names()
  # One group per layer leaf for the per-leaf clipper, one for the group.
  assert names[:3] == ["encoder/layers/0/attn/bias",
                       "encoder/layers/1/attn/bias",
                       "encoder/layers/2/attn/bias"]
  assert "encoder/layers/3/**" in names
  assert len(names) == 3 * (L - 1) + 1
  assert state.norms.shape == state.scales.shape == (len(names),)
  _, state = jax.jit(tx.update)(grads_at(params, 0), state)
  keys = list(lw.norms(state))
  assert "clip/encoder/layers/3/**/norm" in keys
  assert "clip/encoder/layers/4/ln/scale/scale" in keys


# ------------------------------------------------------------- compile size


def distinct_fusions(tx, tree):
  """Distinct fused computations of the compiled step (as
  tests/test_compile.py counts them)."""
  state = jax.eval_shape(tx.init, tree)
  text = jax.jit(tx.update).lower(tree, state, tree).compile().as_text()
  return count_fusions(text)[1]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="counts the CPU's kernels")
@pytest.mark.parametrize("kind", ["clip_norm", "clip_value", "zscore",
                                  "group_per_layer"])
def test_kernels_do_not_grow_with_the_layers(kind):
  """A stacked leaf is one array: what the step compiles does not depend on
  the number of layers, even with one rule (one group, one set of ZClip
  statistics) per layer."""
  def count(n_layers):
    sd = jax.ShapeDtypeStruct
    tree = {"embed": sd((8, 4), jnp.float32),
            "layers": {"kernel": sd((n_layers, 4, 4), jnp.float32),
                       "scale": sd((n_layers, 4), jnp.float32)}}
    rules = {
        "clip_norm": {"**": lw.clip_norm(1.0)},
        "clip_value": {"**": lw.clip_value(1.0)},
        "zscore": {f"layers/{i}/**": lw.clip_zscore() for i in
                   range(n_layers)} | {"**": None},
        "group_per_layer": {f"layers/{i}/**": lw.clip_group_norm(1.0)
                            for i in range(n_layers)} | {"**": None},
    }[kind]
    return distinct_fusions(lw.clip_by_rules(rules, stacks={"layers": 0}),
                            tree)

  assert count(3) == count(12)
