"""partition, freeze, stop_gradient and grad on stacked (scanned) layers.

The reference is the same model unrolled: its params are the slices of the
stacked ones (``{"layers": [{...}] * L}``, paths ``layers/3/...``), trained
with the same rules, where the frozen layers are frozen leaves. Params and
updates must agree to float32 tolerance; frozen layers exactly. State sizes
and ``describe``'s note are checked against hand counts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw
from layerwise import _core, _resolve

L = 4
TOL = dict(rtol=1e-6, atol=1e-6)
RNG = np.random.default_rng(18)


def normal(*shape):
  return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


def models(axis):
  """A stacked tree (layer axis ``axis`` of the kernel) and its unrolled
  twin (the slices of the stacked leaves)."""
  kernel = normal(3, L, 5) if axis == 1 else normal(L, 3, 5)
  scale = normal(5, L) if axis == 1 else normal(L, 5)
  stacked = {"emb": normal(6, 3),
             "layers": {"kernel": kernel, "scale": scale}}
  unrolled = {"emb": stacked["emb"],
              "layers": [{"kernel": take(kernel, i, axis),
                          "scale": take(scale, i, axis)} for i in range(L)]}
  return stacked, unrolled


def take(x, i, axis):
  return x[:, i] if axis == 1 else x[i]


def layer(tree, i, name, axis):
  """Layer ``i`` of leaf ``name`` of a stacked tree."""
  return take(tree["layers"][name], i, axis)


def grads_at(params, k):
  return jax.tree_util.tree_map(lambda p: jnp.sin(p * (k + 1)) + 0.1 * p,
                                params)


def run(tx, params, steps=4, poison=None):
  """``steps`` jitted updates: the params, every step's updates and the
  last state. ``poison(grads)`` may put NaN in the gradients."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    grads = grads_at(params, k)
    if poison is not None:
      grads = poison(grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  history = []
  for k in range(steps):
    params, state, updates = step(params, state, k)
    history.append(updates)
  return params, history, state


def assert_twins(stacked, unrolled, axis, exact=()):
  """The stacked tree's layers equal the unrolled twin's leaves (exactly for
  the layers in ``exact``)."""
  np.testing.assert_allclose(stacked["emb"], unrolled["emb"], **TOL)
  for i in range(L):
    for name in ("kernel", "scale"):
      a, b = layer(stacked, i, name, axis), unrolled["layers"][i][name]
      if i in exact:
        np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(a, b, **TOL)


def nbytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------- freeze


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [1, 2])
def test_freeze_first_layers_matches_unrolled_twin(axis, k):
  stacked, unrolled = models(axis)
  stacks = {"layers": axis}
  frozen = f"layers/[0-{k - 1}]/**" if axis == 0 else re_frozen(k)
  inner = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(0.1, weight_decay=0.1))
  # NaN gradients on the frozen layers: an exact zero update all the same.
  def poison_stacked(g):
    layers = dict(g["layers"])
    if axis == 1:
      layers["kernel"] = layers["kernel"].at[:, :k].set(jnp.nan)
      layers["scale"] = layers["scale"].at[:, :k].set(jnp.inf)
    else:
      layers["kernel"] = layers["kernel"].at[:k].set(jnp.nan)
      layers["scale"] = layers["scale"].at[:k].set(jnp.inf)
    return {**g, "layers": layers}

  def poison_unrolled(g):
    return {**g, "layers": [
        jax.tree_util.tree_map(lambda x: x * jnp.nan, g["layers"][i])
        if i < k else g["layers"][i] for i in range(L)]}

  tx = lw.freeze(inner, frozen, stacks=stacks)
  twin = lw.freeze(inner, f"layers/[0-{k - 1}]/**")
  a, ua, state = run(tx, stacked, poison=poison_stacked)
  b, ub, _ = run(twin, unrolled, poison=poison_unrolled)
  assert_twins(a, b, axis, exact=range(k))
  for i in range(k):  # frozen layers are exactly as they were
    for name in ("kernel", "scale"):
      np.testing.assert_array_equal(layer(a, i, name, axis),
                                    layer(stacked, i, name, axis))
  for u, v in zip(ua, ub):
    np.testing.assert_allclose(u["emb"], v["emb"], **TOL)
    for i in range(L):
      for name in ("kernel", "scale"):
        got = layer(u, i, name, axis)
        np.testing.assert_allclose(got, v["layers"][i][name], **TOL)
        if i < k:
          assert not np.any(np.asarray(got)), (i, name)
  # The clip is active (the reference clips too): the trainable gradients'
  # global norm at the first step exceeds 0.5.
  g = grads_at(unrolled, 0)
  trained = [g["emb"]] + [g["layers"][i] for i in range(k, L)]
  assert optax.tree.norm(trained) > 0.5
  # The inner optimizer is given the whole stacked arrays.
  assert nbytes(state.inner_state) == nbytes(
      (inner.init(stacked)))


def re_frozen(k):
  """The frozen layers as a regex over layer paths (any selector works)."""
  import re
  return re.compile(rf"layers/[0-{k - 1}]/.*")


def test_frozen_stack_holds_no_state():
  stacked, _ = models(0)
  adam = optax.adam(0.1)
  tx = lw.freeze(adam, "layers/**", stacks={"layers": 0})
  state = tx.init(stacked)
  # Adam's state for emb alone: the count and two moments of emb.
  assert nbytes(state) == nbytes(adam.init({"emb": stacked["emb"]}))
  (u,), _ = zip(*[tx.update(grads_at(stacked, 0), state, stacked)])
  assert not np.any(np.asarray(u["layers"]["kernel"]))
  # Every layer frozen but for one: the stacked leaves are held whole.
  tx = lw.freeze(adam, "layers/[0-2]/**", stacks={"layers": 0})
  assert nbytes(tx.init(stacked)) == nbytes(adam.init(stacked))


def test_stack_in_one_group_is_routed_unmasked():
  """A stack all of whose layers are in one group is given to it as it
  is: the updates are those of the same partition without stacks, bit for
  bit, and no select is traced."""
  stacked, _ = models(0)
  sgd, adam = optax.sgd(0.1, momentum=0.9), optax.adam(0.1)
  tx = lw.partition({"layers/*/**": sgd, "emb": adam}, stacks={"layers": 0})
  ref = lw.partition({"layers/**": sgd, "emb": adam}, stacks={})
  a, ua, _ = run(tx, stacked, steps=3)
  b, ub, _ = run(ref, stacked, steps=3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, (a, ua), (b, ub))
  g = grads_at(stacked, 0)
  def selects(tx):
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, stacked))(
        g, tx.init(stacked))
    return str(jaxpr).count("select_n")
  assert selects(tx) == selects(ref)


# ---------------------------------------------------------------- partition


@pytest.mark.parametrize("axis", [0, 1])
def test_partition_layers_of_one_stack_matches_twin(axis):
  stacked, unrolled = models(axis)
  stacks = {"layers": axis}
  adam = optax.adamw(0.05, weight_decay=0.1)
  momentum = optax.chain(optax.clip_by_global_norm(0.3),
                         optax.sgd(0.1, momentum=0.9))
  rules = {"layers/0/**": None, "layers/[1-2]/**": momentum,
           "layers/3/**": adam, "emb": adam}
  tx = lw.partition(rules, stacks=stacks)
  a, ua, state = run(tx, stacked)
  b, ub, _ = run(lw.partition(rules), unrolled)
  assert_twins(a, b, axis, exact=[0])
  for u, v in zip(ua, ub):
    for i in range(L):
      for name in ("kernel", "scale"):
        np.testing.assert_allclose(layer(u, i, name, axis),
                                   v["layers"][i][name], **TOL)
  np.testing.assert_array_equal(layer(a, 0, "kernel", axis),
                                layer(stacked, 0, "kernel", axis))
  # Each group holds state for the whole stacked arrays it trains some
  # layers of: adamw's for emb and the stack, momentum's for the stack.
  momentum_state, adam_state = state.inner_states
  assert nbytes(momentum_state) == nbytes(
      momentum.init(stacked["layers"]))
  assert nbytes(adam_state) == nbytes(adam.init(stacked))


def test_inner_rule_sets_see_the_partition_stacks():
  """A scale_by_rules built with the default stacks inside a group sees the
  layer leaves of the partition (rules by layer), and its rules may name
  layers of the model that are only in other groups."""
  stacked, unrolled = models(0)
  inner = optax.chain(optax.adam(0.1), lw.scale_by_rules(
      {"layers/3/**": 0.5, "layers/0/**": 0.25, "**": 1.0}))
  rules = {"layers/[0-1]/**": None, "**": inner}
  a, _, state = run(lw.partition(rules, stacks={"layers": 0}), stacked)
  b, _, _ = run(lw.partition(rules), unrolled)
  assert_twins(a, b, 0, exact=[0, 1])
  scale = _core.find_states(state)[1]
  assert scale.rules.paths[:3] == ("emb", "layers/0/kernel",
                                   "layers/1/kernel")
  # Another group's rules name the stack's layers (a leaf of the whole
  # model, not of the group): no typo error.
  emb_only = optax.chain(optax.sgd(0.1),
                         lw.scale_by_rules({"layers/*/kernel": 0.5,
                                            "**": 1.0}))
  lw.partition({"emb": emb_only, "layers/**": optax.sgd(0.1)},
               stacks={"layers": 0}).init(stacked)
  # A real typo is still one.
  typo = optax.chain(optax.sgd(0.1),
                     lw.scale_by_rules({"layer/*/kernel": 0.5, "**": 1.0}))
  with pytest.raises(lw.RuleError, match="layer/\\*/kernel"):
    lw.partition({"emb": typo, "layers/**": optax.sgd(0.1)},
                 stacks={"layers": 0}).init(stacked)


def test_inner_rules_must_cover_the_untrained_layers_of_a_split_stack():
  stacked, _ = models(0)
  inner = lw.scale_by_rules({"emb": 1.0, "layers/[2-3]/**": 0.5})
  tx = lw.freeze(inner, "layers/[0-1]/**", stacks={"layers": 0})
  with pytest.raises(lw.RuleError,
                     match=r"(?s)layers/0/kernel.*whole array of the stacked "
                     r"parameter\(s\) 'layers/kernel'"):
    tx.init(stacked)
  # The unrolled twin needs no rule for the frozen layers.
  _, unrolled = models(0)
  lw.freeze(inner, "layers/[0-1]/**").init(unrolled)


def test_inherited_stacks_from_metadata():
  """Stacks found from linen's "layers" axis metadata reach a group's inner
  rule sets, whose tree of plain dicts holds no metadata."""
  stacked, unrolled = models(0)
  boxed = {"emb": stacked["emb"], "layers": {
      "kernel": nn.Partitioned(stacked["layers"]["kernel"],
                               names=("layers", None, None)),
      "scale": nn.Partitioned(stacked["layers"]["scale"],
                              names=("layers", None))}}
  inner = optax.chain(optax.adam(0.1),
                      lw.scale_by_rules({"layers/3/**": 0.5, "**": 1.0}))
  rules = {"layers/0/**": None, "**": inner}
  a, _, _ = run(lw.partition(rules), boxed)
  b, _, _ = run(lw.partition(rules), unrolled)
  a = nn.unbox(a)
  assert_twins(a, b, 0, exact=[0])


def test_stacks_of_is_only_the_default():
  """An inner transformation given stacks= explicitly keeps them."""
  tree = {"layers": {"w": jnp.ones((2, 3))}}
  rule_set = _resolve.RuleSet({"**": 1.0})
  with _resolve.stacks_of(("declared", (("layers", 0),))):
    assert rule_set.resolve(tree).paths == ("layers/0/w", "layers/1/w")
    assert rule_set.resolve(tree, stacks=("declared", ())).paths == (
        "layers/w",)
  assert rule_set.resolve(tree).paths == ("layers/w",)


# ----------------------------------------------------------------- describe


def test_describe_notes_the_extra_state_of_a_split_stack():
  stacked, _ = models(0)
  tx = lw.freeze(optax.adam(0.1), "layers/[0-1]/**", stacks={"layers": 0})
  d = lw.describe(tx, stacked)
  # Adam's two float32 moments of the 2 frozen layers, held by the optimizer
  # of the trainable leaves: kernel 2 x 2 x 3 x 5 x 4 bytes, scale 2 x 2 x 5 x 4.
  assert d.notes == (
      "layers/kernel (4, 3, 5) is stacked, its layers split (0-1 frozen, "
      "2-3 the trainable leaves): the optimizer of the trainable leaves is "
      "given the whole array and holds 240 bytes of state for the 2 "
      "layer(s) it does not train.",
      "layers/scale (4, 5) is stacked, its layers split (0-1 frozen, 2-3 "
      "the trainable leaves): the optimizer of the trainable leaves is "
      "given the whole array and holds 80 bytes of state for the 2 "
      "layer(s) it does not train.")
  text = str(d)
  assert "note: layers/kernel (4, 3, 5) is stacked" in text
  # A row per layer leaf, each with its own flag and a share of the bytes.
  rows = {r["path"]: r for r in d.rows}
  assert rows["layers/0/kernel"]["frozen"] is True
  assert rows["layers/2/kernel"]["frozen"] is False
  assert rows["layers/0/kernel"]["shape"] == (3, 5)
  assert rows["layers/0/kernel"]["state_bytes"] == 2 * 15 * 4
  assert sum(r["state_bytes"] for r in d.rows) + d.shared_state_bytes == (
      nbytes(tx.init(stacked)))
  # Three groups on one stack: a line names each group holding extra state.
  tx = lw.partition({"layers/0/**": None,
                     "layers/[1-2]/**": optax.sgd(0.1, momentum=0.9),
                     "**": optax.adam(0.1)}, stacks={"layers": 0})
  (kernel, _) = lw.describe(tx, stacked).notes
  assert kernel == (
      "layers/kernel (4, 3, 5) is stacked, its layers split (0 frozen, 1-2 "
      "'layers/[1-2]/**', 3 '**'): the optimizer of 'layers/[1-2]/**' is "
      "given the whole array and holds 120 bytes of state for the 2 "
      "layer(s) it does not train; the optimizer of '**' is given the "
      "whole array and holds 360 bytes of state for the 3 layer(s) it does "
      "not train.")
  # Nothing split: no note.
  tx = lw.freeze(optax.adam(0.1), "layers/**", stacks={"layers": 0})
  assert lw.describe(tx, stacked).notes == ()


# ------------------------------------------------------ stop_gradient, grad


def loss(params):
  layers = params["layers"]
  h = params["emb"].sum(0)
  for i in range(L):
    w = layers[i]["kernel"] if isinstance(layers, list) else layers["kernel"][i]
    s = layers[i]["scale"] if isinstance(layers, list) else layers["scale"][i]
    h = jnp.tanh(h @ w[:, :3]) * s[:3]
  return jnp.sum(h ** 2)


def test_stop_gradient_zeroes_the_frozen_layers_only():
  stacked, unrolled = models(0)
  stacks = {"layers": 0}
  g = jax.grad(lambda p: loss(lw.stop_gradient(p, "layers/[0-1]/**",
                                               stacks=stacks)))(stacked)
  ref = jax.grad(lambda p: loss(lw.stop_gradient(p, "layers/[0-1]/**")))(
      unrolled)
  np.testing.assert_allclose(g["emb"], ref["emb"], **TOL)
  for i in range(L):
    for name in ("kernel", "scale"):
      np.testing.assert_allclose(g["layers"][name][i],
                                 ref["layers"][i][name], **TOL)
  assert not np.any(np.asarray(g["layers"]["kernel"][:2]))
  # Values are unchanged.
  out = lw.stop_gradient(stacked, "layers/[0-1]/**", stacks=stacks)
  np.testing.assert_array_equal(out["layers"]["kernel"],
                                stacked["layers"]["kernel"])
  # A stack frozen whole is stopped whole, its backward pass dropped: no
  # select in its gradient.
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(lw.stop_gradient(
      p, "layers/**", stacks=stacks))))(stacked)
  assert "select_n" not in str(jaxpr)
  assert "select_n" in str(jax.make_jaxpr(jax.grad(lambda p: loss(
      lw.stop_gradient(p, "layers/0/**", stacks=stacks))))(stacked))


def test_grad_with_stacks():
  stacked, unrolled = models(0)
  stacks = {"layers": 0}
  value, g = lw.value_and_grad(loss, "layers/[0-1]/**", stacks=stacks)(
      stacked)
  ref_value, ref = lw.value_and_grad(loss, "layers/[0-1]/**")(unrolled)
  np.testing.assert_allclose(value, ref_value, **TOL)
  for i in range(L):
    for name in ("kernel", "scale"):
      got = g["layers"][name][i]
      if i < 2:  # partly frozen: zeros on the frozen layers, not None
        assert ref["layers"][i][name] is None
        np.testing.assert_array_equal(got, np.zeros_like(got))
      else:
        np.testing.assert_allclose(got, ref["layers"][i][name], **TOL)
  # Every layer frozen: None, as for a frozen leaf.
  g = jax.jit(lw.grad(loss, "layers/**", stacks=stacks))(stacked)
  assert g["layers"] == {"kernel": None, "scale": None}
  # The natural step: freeze takes the gradients as they are.
  tx = lw.freeze(optax.adam(0.1), "layers/[0-1]/**", stacks=stacks)
  g = lw.grad(loss, "layers/[0-1]/**", stacks=stacks)(stacked)
  updates, _ = tx.update(g, tx.init(stacked), stacked)
  assert not np.any(np.asarray(updates["layers"]["kernel"][:2]))
  tx = lw.freeze(optax.adam(0.1), "layers/**", stacks=stacks)
  g = lw.grad(loss, "layers/**", stacks=stacks)(stacked)
  updates, _ = tx.update(g, tx.init(stacked), stacked)
  np.testing.assert_array_equal(updates["layers"]["kernel"],
                                np.zeros((L, 3, 5), np.float32))


def test_freeze_inside_a_partition_group():
  """A freeze built with the default stacks inside a partition's group
  splits the stack the group holds further, as on the unrolled model."""
  stacked, unrolled = models(0)
  inner = lw.freeze(optax.adam(0.1), "layers/1/**")
  rules = {"layers/0/**": optax.sgd(0.1), "**": inner}
  a, ua, _ = run(lw.partition(rules, stacks={"layers": 0}), stacked)
  b, ub, _ = run(lw.partition(rules), unrolled)
  assert_twins(a, b, 0, exact=[1])
  np.testing.assert_array_equal(a["layers"]["kernel"][1],
                                stacked["layers"]["kernel"][1])


def test_alternating_groups_with_a_split_stack():
  """A group with no gradients skips its step, as without stacks; the
  stack split between the other groups steps."""
  stacked, _ = models(0)
  emb_tx = optax.adam(0.1)
  tx = lw.partition({"emb": emb_tx, "layers/[0-1]/**": optax.sgd(0.1),
                     "**": optax.sgd(0.2)}, stacks={"layers": 0})
  state = tx.init(stacked)
  grads = {"emb": None, "layers": grads_at(stacked["layers"], 0)}
  updates, new = tx.update(grads, state, stacked)
  assert updates["emb"] is None
  assert int(new.inner_states[0][0].count) == 0
  g = grads["layers"]["kernel"]
  np.testing.assert_allclose(updates["layers"]["kernel"][:2], -0.1 * g[:2])
  np.testing.assert_allclose(updates["layers"]["kernel"][2:], -0.2 * g[2:])


def test_whole_keeps_the_real_leaves():
  stacked, _ = models(0)
  res = _resolve.RuleSet({"**": 1.0}).resolve(
      stacked, stacks=("declared", (("layers", 0),)))
  whole = _resolve.Whole(res.paths, res.specs, res.layers)
  assert whole.paths[:3] == ("emb", "layers/0/kernel", "layers/1/kernel")
  assert whole.leaf_paths == ("emb", "layers/kernel", "layers/scale")
  assert [s.shape for s in whole.leaf_specs] == [(6, 3), (L, 3, 5), (L, 5)]
  assert whole != _resolve.Whole(res.paths, res.specs)


def test_split_stack_keeps_the_update_dtype():
  params = {"layers": {"w": jnp.ones((L, 3), jnp.bfloat16)}}
  tx = lw.freeze(optax.sgd(0.5), "layers/0/**", stacks={"layers": 0})
  updates, _ = tx.update(params, tx.init(params))
  w = updates["layers"]["w"]
  assert w.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(w, np.float32)[:, 0],
                                [0.0, -0.5, -0.5, -0.5])


def test_describe_rule_set_by_layer():
  stacked, _ = models(0)
  d = lw.describe({"layers/0/**": 0.0, "**": 1.0}, stacked,
                  stacks={"layers": 0})
  assert [r["path"] for r in d.rows][:3] == ["emb", "layers/0/kernel",
                                             "layers/1/kernel"]
  assert [r["value"] for r in d.rows][:3] == [1.0, 0.0, 1.0]
