"""Tests for partition, freeze and stop_gradient.

References: optax's own transformations run on the group's subtree alone
(``optax.adam`` on the generator's params), ``optax.partition`` with
hand-written labels, hand computations of norms and state sizes, and, for
``stop_gradient``, the XLA cost of a gradient taken only with respect to the
trainable params.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerwise as lw

RNG = np.random.default_rng(1)


def normal(*shape):
  return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


GAN = {
    "generator": {"dense": {"kernel": normal(4, 8), "bias": normal(8)},
                  "out": {"kernel": normal(8, 3)}},
    "discriminator": {"dense": {"kernel": normal(3, 8), "bias": normal(8)},
                      "out": {"kernel": normal(8, 1)}},
}


def grads_at(params, k):
  """Deterministic gradients that change with the step and the params."""
  return jax.tree_util.tree_map(lambda p: jnp.sin(p * (k + 1)) + 0.1 * p,
                                params)


def run(tx, params, steps=5):
  """``steps`` jitted updates; returns the params and the last state."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    updates, state = tx.update(grads_at(params, k), state, params)
    return optax.apply_updates(params, updates), state

  for k in range(steps):
    params, state = step(params, state, k)
  return params, state


def nbytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------- partition


def test_gan_groups_equal_separate_optimizers():
  tx = lw.partition({"generator/**": optax.adam(1e-2),
                     "discriminator/**": optax.adam(4e-2, b1=0.5)})
  ours, _ = run(tx, GAN)
  for name, ref_tx in (("generator", optax.adam(1e-2)),
                       ("discriminator", optax.adam(4e-2, b1=0.5))):
    # The reference sees the group's subtree only; grads_at is elementwise.
    ref, _ = run(ref_tx, GAN[name])
    chex.assert_trees_all_equal(ours[name], ref)


def test_equals_optax_partition_with_hand_written_labels():
  adam, sgd = optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)
  ours, _ = run(lw.partition({"**/bias": sgd, "**": adam}), GAN)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "sgd" if path[-1].key == "bias" else "adam", GAN)
  ref, _ = run(optax.partition({"sgd": sgd, "adam": adam}, labels), GAN)
  chex.assert_trees_all_close(ours, ref, rtol=0, atol=0)


def test_muon_style_split_by_ndim():
  # Matrices to one optimizer (momentum SGD), everything else to Adam.
  matrices = optax.sgd(0.1, momentum=0.9)
  tx = lw.partition({lw.ndim_at_least(2): matrices, "**": optax.adam(1e-2)})
  ours, state = run(tx, GAN)
  labels = jax.tree_util.tree_map(lambda p: "m" if p.ndim >= 2 else "v", GAN)
  ref, _ = run(optax.partition({"m": optax.sgd(0.1, momentum=0.9),
                                "v": optax.adam(1e-2)}, labels), GAN)
  chex.assert_trees_all_close(ours, ref, rtol=0, atol=0)
  # State: one momentum buffer per matrix, Adam's two moments (and a count)
  # per vector; nothing else.
  leaves = jax.tree_util.tree_leaves(GAN)
  matrix_bytes = sum(x.nbytes for x in leaves if x.ndim >= 2)
  vector_bytes = sum(x.nbytes for x in leaves if x.ndim < 2)
  assert nbytes(state) == matrix_bytes + 2 * vector_bytes + 4


def test_shared_transformation_is_one_group():
  adam = optax.adam(1e-2)
  tx = lw.partition({"generator/**": adam, "discriminator/**": adam})
  ours, state = run(tx, GAN)
  assert len(state.inner_states) == 1
  ref, _ = run(optax.adam(1e-2), GAN)
  chex.assert_trees_all_equal(ours, ref)


def test_group_norms_cover_their_group_only():
  a = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
  tx = lw.partition({"a": optax.chain(optax.clip_by_global_norm(1.0),
                                      optax.sgd(1.0)),
                     "b": optax.sgd(1.0)})
  updates, _ = tx.update(a, tx.init(a))
  # 'a' has norm 5 alone (13 with 'b'): clipped to norm 1 by its own norm.
  np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-12.0])


def test_frozen_group_has_zero_update_and_no_state():
  tx = lw.partition({"generator/**": optax.adam(1e-2),
                     "discriminator/**": None})
  params, state = run(tx, GAN)
  chex.assert_trees_all_equal(params["discriminator"], GAN["discriminator"])
  assert nbytes(state) == 2 * nbytes(GAN["generator"]) + 4
  d = lw.describe(tx, GAN)
  for row in d.rows:
    frozen = row["path"].startswith("discriminator")
    assert row["group"] == ("frozen" if frozen else "'generator/**'")
    assert row["state_bytes"] == (0 if frozen else 8 * row["size"])


def test_default_and_frozen_default():
  tx = lw.partition({"generator/**": optax.sgd(1.0)}, default=None)
  updates, _ = tx.update(GAN, tx.init(GAN))
  chex.assert_trees_all_equal(updates["generator"], jax.tree_util.tree_map(
      lambda x: -x, GAN["generator"]))
  assert all(float(jnp.abs(u).sum()) == 0.0 for u in
             jax.tree_util.tree_leaves(updates["discriminator"]))


def test_extra_args_reach_every_group():
  def scale_by_value():
    def update_fn(updates, state, params=None, *, value, **extra):
      del params, extra
      return jax.tree_util.tree_map(lambda u: u * value, updates), state
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(), update_fn)

  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = lw.partition({"a": scale_by_value(), "b": optax.sgd(1.0)})
  updates, _ = tx.update(params, tx.init(params), params, value=3.0)
  np.testing.assert_array_equal(updates["a"], [3.0, 3.0])
  np.testing.assert_array_equal(updates["b"], [-1.0, -1.0, -1.0])


def _absent_as(form, tree):
  """``tree``'s gradients left out, as a user writes it: the subtree ``None``,
  each leaf ``None``, or ``optax.MaskedNode()`` (as ``optax.partition``
  writes it)."""
  if form == "subtree":
    return None
  if form == "leaves":
    return jax.tree_util.tree_map(lambda _: None, tree)
  return optax.MaskedNode()


@pytest.mark.parametrize("form", ["subtree", "leaves", "masked"])
def test_alternating_gan_steps_equal_two_separate_adams(form):
  """D, G, D, G with one state: the idle group gets no gradients and skips
  its step, as two optax.adam states stepped on their own turns only."""
  tx = lw.partition({"generator/**": optax.adam(1e-3),
                     "discriminator/**": optax.adam(2e-4)})
  state = tx.init(GAN)
  # The references: optax.adam on each group's tree alone (nested dicts of
  # its paths, the tree each group's optimizer sees).
  refs = {"generator": optax.adam(1e-3), "discriminator": optax.adam(2e-4)}
  ref_states = {n: refs[n].init({n: GAN[n]}) for n in refs}
  ours, ref = GAN, GAN
  step = jax.jit(tx.update)
  for k, turn in enumerate(["discriminator", "generator"] * 2):
    idle = "generator" if turn == "discriminator" else "discriminator"
    g = grads_at(ours, k)
    grads = {turn: g[turn], idle: _absent_as(form, g[idle])}
    updates, state = step(grads, state, ours)
    # The idle group's updates come back as given: None stays None.
    assert (jax.tree_util.tree_structure(updates[idle])
            == jax.tree_util.tree_structure(grads[idle]))
    ours = {turn: optax.apply_updates(ours[turn], updates[turn]),
            idle: ours[idle]}
    u, ref_states[turn] = jax.jit(refs[turn].update)(
        {turn: grads_at(ref, k)[turn]}, ref_states[turn])
    ref = {**ref, turn: optax.apply_updates(ref[turn], u[turn])}
  chex.assert_trees_all_equal(ours, ref)
  # Each inner state (counts and moments) as if stepped on its turns only.
  chex.assert_trees_all_equal(
      state.inner_states,
      (ref_states["generator"], ref_states["discriminator"]))
  assert [int(s[0].count) for s in state.inner_states] == [2, 2]


def test_freeze_skips_the_step_without_trainable_gradients():
  tx = lw.freeze(optax.adam(1e-2), "discriminator/**")
  state = tx.init(GAN)
  g = grads_at(GAN, 0)
  # No gradient for the trainable leaves: the inner adam does not step.
  updates, skipped = jax.jit(tx.update)({**g, "generator": None}, state)
  assert updates["generator"] is None
  chex.assert_trees_all_equal(updates["discriminator"], jax.tree_util.tree_map(
      jnp.zeros_like, g["discriminator"]))
  chex.assert_trees_all_equal(skipped, state)
  # None for the frozen leaves: the trainable ones step as adam alone.
  updates, state = jax.jit(tx.update)({**g, "discriminator": None}, state)
  assert updates["discriminator"] is None
  ref = optax.adam(1e-2)
  expected, ref_state = jax.jit(ref.update)(
      {"generator": g["generator"]}, ref.init({"generator": GAN["generator"]}))
  chex.assert_trees_all_equal(updates["generator"], expected["generator"])
  chex.assert_trees_all_equal(state.inner_state, ref_state)


def test_partition_errors():
  with pytest.raises(TypeError, match=r"lw.partition: rule 'generator/\*\*' "
                     r"has value 0.1 \(float\); each value must be an optax "
                     "transformation"):
    lw.partition({"generator/**": 0.1})
  tx = lw.partition({"generatr/**": optax.adam(1e-3), "**": None})
  with pytest.raises(lw.RuleError, match=re.escape(
      "rule 0: 'generatr/**'  (closest: 'generator/**'")):
    tx.init(GAN)
  tx = lw.partition({"**": optax.sgd(1.0)})
  state = tx.init(GAN)
  with pytest.raises(ValueError, match="do not have the structure"):
    tx.update(GAN["generator"], state)


def test_partition_nests_and_finds_inner_rules():
  inner = optax.chain(optax.adam(1e-2),
                      lw.scale_by_rules({"**/kernel": 0.1, "**": 1.0}))
  tx = lw.partition({"generator/**": inner,
                     "discriminator/**": optax.sgd(0.1)})
  params, state = run(tx, GAN)
  ref, _ = run(inner, GAN["generator"])
  chex.assert_trees_all_equal(params["generator"], ref)
  # set_scale finds the scale_by_rules state inside the partition.
  state = lw.set_scale(state, "generator/out/kernel", 0.0)
  updates, _ = tx.update(grads_at(params, 0), state, params)
  assert float(jnp.abs(updates["generator"]["out"]["kernel"]).sum()) == 0.0
  d = lw.describe(tx, GAN)
  assert d.columns == ("path", "shape", "dtype", "size", "group", "scale",
                       "state_bytes")
  assert [r["scale"] for r in d.rows] == [None] * 3 + [1.0, 0.1, 0.1]


# -------------------------------------------------------------------- freeze


@pytest.mark.parametrize("frozen", [
    "discriminator/**",
    {"discriminator/**": True, "**": False},
    lambda path, leaf: path.startswith("discriminator"),
])
def test_freeze_equals_partition_with_set_to_zero(frozen):
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  ours, _ = run(lw.freeze(inner, frozen), GAN)
  labels = {"generator": "train", "discriminator": "frozen"}
  ref, _ = run(optax.partition({"train": inner,
                                "frozen": optax.set_to_zero()}, labels), GAN)
  chex.assert_trees_all_equal(ours, ref)
  chex.assert_trees_all_equal(ours["discriminator"], GAN["discriminator"])


def test_frozen_leaves_hold_no_state():
  tx = lw.freeze(optax.adamw(1e-3), "discriminator/**")
  state = tx.init(GAN)
  # Exactly Adam's state for the generator alone: two moments and a count.
  assert nbytes(state) == nbytes(optax.adamw(1e-3).init(GAN["generator"]))
  assert nbytes(state) == 2 * nbytes(GAN["generator"]) + 4
  abstract = jax.eval_shape(tx.init, GAN)
  assert nbytes(abstract) == nbytes(state)
  for row in lw.describe(tx, GAN).rows:
    frozen = row["path"].startswith("discriminator")
    assert row["frozen"] is frozen
    assert row["state_bytes"] == (0 if frozen else 8 * row["size"])


def test_frozen_leaves_are_left_out_of_norms():
  params = {"backbone": jnp.array([6.0, 8.0]), "head": jnp.array([3.0, 4.0])}
  # Inside: the global norm is the head's, 5 (with the backbone it is 15).
  tx = lw.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
                 "backbone")
  updates, _ = tx.update(params, tx.init(params))
  np.testing.assert_allclose(updates["head"], [-0.6, -0.8], rtol=1e-6)
  # Downstream: the frozen update is zero, so adds nothing to a norm.
  norm = jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree_util.tree_leaves(updates)))
  assert float(norm) == pytest.approx(1.0, rel=1e-6)


def test_nan_in_frozen_gradients_does_not_spread():
  grads = {"backbone": jnp.array([jnp.nan, 1.0]), "head": jnp.array([3.0])}
  tx = lw.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
                 "backbone")
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["backbone"], [0.0, 0.0])
  np.testing.assert_allclose(updates["head"], [-0.1], rtol=1e-5)
  assert not any(bool(jnp.isnan(x).any())
                 for x in jax.tree_util.tree_leaves(state))


def test_freeze_keeps_dtypes():
  params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  updates, _ = lw.freeze(optax.sgd(0.5), "a").update(
      params, lw.freeze(optax.sgd(0.5), "a").init(params))
  assert updates["a"].dtype == updates["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(updates["b"].astype(jnp.float32), [-0.5] * 3)


def test_freeze_on_nnx_state(nnx_model):
  params = nnx.state(nnx_model, nnx.Param)
  tx = lw.freeze(optax.adam(1e-3), "layers/**")
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  for path, u in zip(jax.tree_util.tree_leaves(lw.paths(updates)),
                     jax.tree_util.tree_leaves(updates)):
    assert (float(jnp.abs(u).sum()) == 0.0) == path.startswith("layers/")
  trainable = sum(x.nbytes for p, x in zip(
      jax.tree_util.tree_leaves(lw.paths(params)),
      jax.tree_util.tree_leaves(params)) if not p.startswith("layers/"))
  assert nbytes(state) == 2 * trainable + 4


def test_freeze_errors():
  with pytest.raises(lw.RuleError, match=re.escape(
      "rule 0: 'discriminatr/**'  (closest: 'discriminator/**'")):
    lw.freeze(optax.sgd(1.0), "discriminatr/**").init(GAN)
  with pytest.raises(TypeError, match="maps selectors to True"):
    lw.freeze(optax.sgd(1.0), {"discriminator/**": 1})
  with pytest.raises(TypeError, match="wraps an optax transformation"):
    lw.freeze("discriminator/**", optax.sgd(1.0))
  with pytest.raises(lw.RuleError, match="match no rule"):
    lw.freeze(optax.sgd(1.0), {"discriminator/**": True}).init(GAN)
  # A rule set inside freeze is checked against the whole model: a typo
  # in it is an error that says so.
  inner = optax.chain(optax.sgd(1.0),
                      lw.scale_by_rules({"discriminatr/**": 0.1, "**": 1.0}))
  with pytest.raises(lw.RuleError, match=re.escape(
      "belongs to the optimizer of the trainable leaves, which holds 3 of "
      "the model's 6 parameter(s). It is checked against the whole model"
  )) as info:
    lw.freeze(inner, "discriminator/**").init(GAN)
  assert info.value.unused == ("'discriminatr/**'",)


# -------------------------------- rule sets written for the whole model

# Three blocks and a head: lw.layer_decay(0.5, BLOCKS) gives the head 1.0,
# blocks/2 0.5, blocks/1 0.25, blocks/0 0.125 and the embedding 0.0625.
BLOCKS = {"embed": normal(4, 2),
          "blocks": [{"w": normal(2, 2), "b": normal(2)} for _ in range(3)],
          "head": {"w": normal(2, 3)}}
DECAY = {"embed": 0.0625, "blocks/0/b": 0.125, "blocks/0/w": 0.125,
         "blocks/1/b": 0.25, "blocks/1/w": 0.25, "blocks/2/b": 0.5,
         "blocks/2/w": 0.5, "head/w": 1.0}


def multipliers(tx, params):
  """Path -> multiplier of every scale_by_rules state in ``tx``'s state."""
  def is_scale(x):
    return isinstance(x, lw.ScaleByRulesState)
  out = {}
  for s in jax.tree_util.tree_leaves(tx.init(params), is_leaf=is_scale):
    if is_scale(s):
      out.update(zip(s.rules.paths, s.multipliers.tolist()))
  return out


def test_layer_decay_of_the_whole_model_inside_freeze():
  # The issue: with the top block frozen, layer_decay built on the whole
  # model failed (its blocks/2 rule matched only frozen leaves), and built
  # on the trainable subtree it re-inferred two blocks (blocks/0: 0.25).
  rules = lw.layer_decay(0.5, BLOCKS)
  assert lw.resolve(rules, BLOCKS) == jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(BLOCKS),
      [DECAY[p] for p in jax.tree_util.tree_leaves(lw.paths(BLOCKS))])
  inner = optax.chain(optax.sgd(1.0), lw.scale_by_rules(rules))
  tx = lw.freeze(inner, "blocks/2/**")
  grads = jax.tree_util.tree_map(jnp.ones_like, BLOCKS)
  updates, _ = jax.jit(tx.update)(grads, tx.init(BLOCKS))
  # The reference: the unfrozen model's updates, zero where frozen.
  unfrozen, _ = inner.update(grads, inner.init(BLOCKS))
  expected = {**unfrozen, "blocks": [*unfrozen["blocks"][:2], {
      "w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}]}
  chex.assert_trees_all_equal(updates, expected)
  assert float(updates["blocks"][0]["w"][0, 0]) == -0.125
  trainable = {p: v for p, v in DECAY.items() if not p.startswith("blocks/2")}
  assert multipliers(tx, BLOCKS) == trainable


def test_the_issue_call_with_the_embedding_frozen():
  # lw.freeze(lw.scale_by_rules(lw.layer_decay(0.8, params)), frozen) with
  # depth 0 frozen: the rules take every trainable leaf before the last.
  rules = lw.layer_decay(0.8, BLOCKS)
  whole = dict(zip(jax.tree_util.tree_leaves(lw.paths(BLOCKS)),
                   jax.tree_util.tree_leaves(lw.resolve(rules, BLOCKS))))
  tx = lw.freeze(lw.scale_by_rules(rules), "embed")
  assert multipliers(tx, BLOCKS) == {
      p: np.float32(v).item() for p, v in whole.items() if p != "embed"}


def test_whole_model_rules_inside_freeze_still_catch_mistakes():
  # A selector that matches nothing in the whole model is still a typo.
  with pytest.raises(lw.RuleError) as info:
    lw.freeze(lw.scale_by_rules({"blocks/2/**": 0.5, "haed/**": 1.0,
                                 "**": 0.1}), "blocks/2/**").init(BLOCKS)
  assert info.value.unused == ("'haed/**'",)
  assert "(closest: 'head/**'" in str(info.value)
  # A rule that wins nothing in the whole model is still shadowed.
  with pytest.raises(lw.RuleError) as info:
    lw.freeze(lw.scale_by_rules({"blocks/**": 0.5, "blocks/2/**": 0.1,
                                 "**": 1.0}), "blocks/2/**").init(BLOCKS)
  assert info.value.shadowed == ("'blocks/2/**'",)
  # Each trainable leaf needs a rule; the frozen ones do not.
  with pytest.raises(lw.RuleError) as info:
    lw.freeze(lw.scale_by_rules({"blocks/**": 0.5, "head/**": 1.0}),
              "blocks/2/**").init(BLOCKS)
  assert info.value.unmatched == ("embed",)


def test_partition_groups_each_given_rules_for_the_whole_model():
  rules = lw.layer_decay(0.5, BLOCKS)
  blocks_tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules(rules))
  rest_tx = optax.chain(optax.sgd(0.1), lw.scale_by_rules(rules))
  tx = lw.partition({"blocks/**": blocks_tx, "**": rest_tx})
  grads = jax.tree_util.tree_map(jnp.ones_like, BLOCKS)
  updates, _ = jax.jit(tx.update)(grads, tx.init(BLOCKS))
  # The reference: each group's chain on the whole model, restricted to it.
  ref_blocks, _ = blocks_tx.update(grads, blocks_tx.init(BLOCKS))
  ref_rest, _ = rest_tx.update(grads, rest_tx.init(BLOCKS))
  chex.assert_trees_all_equal(
      updates, {**ref_rest, "blocks": ref_blocks["blocks"]})
  assert float(updates["blocks"][0]["w"][0, 0]) == -0.125
  np.testing.assert_allclose(updates["embed"], -0.00625, rtol=1e-6)
  assert multipliers(tx, BLOCKS) == DECAY
  # A nested freeze checks against the model the partition was given.
  nested = lw.partition({"blocks/**": lw.freeze(blocks_tx, "blocks/2/**"),
                         "**": rest_tx})
  assert multipliers(nested, BLOCKS) == {
      p: v for p, v in DECAY.items() if not p.startswith("blocks/2")}


def test_label_function_inside_freeze_is_checked_against_the_whole_model():
  # optax.partition calls its label function at init and at every update:
  # a rule set for the whole model must pass at both.
  label_fn = lw.labels({"blocks/2/**": "slow", "blocks/**": "fast",
                        "**": "slow"})
  inner = optax.partition({"fast": optax.sgd(1.0), "slow": optax.sgd(0.1)},
                          label_fn)
  tx = lw.freeze(inner, "blocks/2/**")
  grads = jax.tree_util.tree_map(jnp.ones_like, BLOCKS)
  updates, _ = jax.jit(tx.update)(grads, tx.init(BLOCKS))
  assert [float(updates["blocks"][i]["w"][0, 0]) for i in range(3)] == [
      -1.0, -1.0, 0.0]
  np.testing.assert_allclose(updates["head"]["w"], -0.1, rtol=1e-6)
  # Outside freeze, the same label function on the trainable leaves alone
  # is strict as before: 'blocks/2/**' matches none of them.
  trainable = {**BLOCKS, "blocks": BLOCKS["blocks"][:2]}
  with pytest.raises(lw.RuleError):
    lw.labels({"blocks/2/**": "slow", "blocks/**": "fast",
               "**": "slow"})(trainable)


# ------------------------------------------------------------- stop_gradient

B, D = 32, 128
MLP = {f"l{i}": {"w": normal(D, D) * 0.05, "b": normal(D)} for i in range(3)}
X = normal(B, D)


def mlp_loss(params):
  x = X
  for i in range(3):
    x = jnp.tanh(x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"])
  return jnp.sum(x**2)


def flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # jax < 0.4.36: a list
  return cost["flops"]


def test_stop_gradient_zeroes_frozen_gradients_only():
  grads = jax.grad(lambda p: mlp_loss(lw.stop_gradient(p, "l[01]/**")))(MLP)
  full = jax.grad(mlp_loss)(MLP)
  for layer in ("l0", "l1"):
    for x in jax.tree_util.tree_leaves(grads[layer]):
      np.testing.assert_array_equal(x, 0.0)
  chex.assert_trees_all_equal(grads["l2"], full["l2"])
  chex.assert_trees_all_equal(lw.stop_gradient(MLP, "l[01]/**"), MLP)


def test_stop_gradient_on_nnx_state(nnx_model):
  graphdef, params = nnx.split(nnx_model, nnx.Param)
  x = jnp.ones((2, 4))

  def loss(params, frozen):
    if frozen is not None:
      params = lw.stop_gradient(params, frozen)
    return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

  grads = jax.grad(loss)(params, "layers/**")
  full = jax.grad(loss)(params, None)
  paths = jax.tree_util.tree_leaves(lw.paths(grads))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(
      params)
  for path, g, f in zip(paths, jax.tree_util.tree_leaves(grads),
                        jax.tree_util.tree_leaves(full)):
    if path.startswith("layers/"):
      np.testing.assert_array_equal(g, np.zeros_like(g))
    else:
      np.testing.assert_array_equal(g, f)


def test_stop_gradient_skips_the_frozen_backward_pass():
  frozen = {"l0/**": True, "l1/**": True, "**": False}
  ours = flops(jax.grad(lambda p: mlp_loss(lw.stop_gradient(p, frozen))), MLP)

  def trainable_only(params):  # the reference: differentiate l2 alone
    rest = {k: v for k, v in params.items() if k != "l2"}
    return jax.grad(lambda l2: mlp_loss({**rest, "l2": l2}))(params["l2"])

  assert ours == flops(trainable_only, MLP)
  # Four B x D x D matmuls fewer than the full gradient: the weight
  # gradients of l0 and l1 and the input gradients of l1 and l2.
  assert flops(jax.grad(mlp_loss), MLP) - ours >= 4 * 2 * B * D * D


# ------------------------------------------------------------ composition


def test_freeze_wraps_multisteps_and_apply_if_finite_wraps_partition():
  # MultiSteps inside freeze accumulates the trainable gradients only.
  tx = lw.freeze(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
                 "discriminator/**")
  ref = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
  ours, state = run(tx, GAN, steps=4)
  expected, _ = run(ref, GAN["generator"], steps=4)
  chex.assert_trees_all_equal(ours["generator"], expected)
  chex.assert_trees_all_equal(ours["discriminator"], GAN["discriminator"])
  assert nbytes(state) == nbytes(jax.eval_shape(ref.init, GAN["generator"]))
  assert all(r["state_bytes"] == 0 for r in lw.describe(tx, GAN).rows
             if r["frozen"])

  tx = optax.apply_if_finite(
      lw.partition({"discriminator/**": None, "**": optax.sgd(1.0)}), 3)
  state = tx.init(GAN)
  grads = jax.tree_util.tree_map(jnp.ones_like, GAN)
  grads["generator"]["out"]["kernel"] = grads["generator"]["out"]["kernel"].at[
      0, 0].set(jnp.inf)
  updates, state = jax.jit(tx.update)(grads, state, GAN)
  assert all(float(jnp.abs(u).sum()) == 0.0
             for u in jax.tree_util.tree_leaves(updates))  # step skipped
  assert int(state.notfinite_count) == 1


def _with_nan(grads, group):
  """``grads`` with a NaN in every leaf of ``group``."""
  return {**grads, group: jax.tree_util.tree_map(
      lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[group])}


def _is_zero(tree):
  return all(not bool(jnp.any(x)) for x in jax.tree_util.tree_leaves(tree))


def test_apply_if_finite_outside_freeze_sees_frozen_nans():
  # The trap, as optax defines it: apply_if_finite checks the gradients it
  # is given, all of them, before anything inside it runs, so freeze can
  # hide nothing from a wrapper around it. A NaN in frozen leaves alone
  # skips the step (the trainable leaves do not train), and after
  # max_consecutive_errors such steps it gives up: a NaN in a trainable
  # leaf then reaches the params. docs/freezing.md gives the order below.
  tx = optax.apply_if_finite(lw.freeze(optax.adam(1e-2), "discriminator/**"),
                             2)
  state, params = tx.init(GAN), GAN
  frozen_nan = _with_nan(grads_at(GAN, 0), "discriminator")
  for k in range(3):
    updates, state = jax.jit(tx.update)(frozen_nan, state, params)
    assert _is_zero(updates["generator"]) == (k < 2)  # skipped, then given up
    params = optax.apply_updates(params, updates)
  trainable_nan = _with_nan(grads_at(GAN, 0), "generator")
  updates, state = jax.jit(tx.update)(trainable_nan, state, params)
  assert int(state.notfinite_count) == 4
  assert bool(jnp.isnan(optax.apply_updates(params, updates)["generator"][
      "out"]["kernel"]).any())


def test_apply_if_finite_inside_freeze_keeps_protecting():
  # The order to write: apply_if_finite inside freeze sees the trainable
  # leaves only. NaN in frozen leaves: the step is applied as optax.adam's
  # on the trainable ones, and no error is counted, however many; NaN in a
  # trainable leaf: the step is skipped, for every leaf.
  tx = lw.freeze(optax.apply_if_finite(optax.adam(1e-2), 2), "discriminator/**")
  ref = optax.adam(1e-2)
  state, ref_state = tx.init(GAN), ref.init(GAN["generator"])
  params = GAN
  for k in range(4):
    grads = _with_nan(grads_at(params, k), "discriminator")
    updates, state = jax.jit(tx.update)(grads, state, params)
    expected, ref_state = jax.jit(ref.update)(grads["generator"], ref_state)
    chex.assert_trees_all_equal(updates["generator"], expected)
    assert _is_zero(updates["discriminator"])
    assert int(state.inner_state.notfinite_count) == 0
    params = optax.apply_updates(params, updates)
  before = state
  for k in range(2):  # up to max_consecutive_errors, every step is skipped
    grads = _with_nan(grads_at(params, k), "generator")
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert _is_zero(updates)
    assert int(state.inner_state.notfinite_count) == k + 1
  chex.assert_trees_all_equal(state.inner_state.inner_state,
                              before.inner_state.inner_state)


def test_stop_gradient_keeps_frozen_nans_from_apply_if_finite():
  # With lw.stop_gradient in the loss, frozen leaves get exact zero
  # gradients, NaN in their forward computation or not: a wrapper around
  # freeze then counts no error for them.
  frozen = "discriminator/**"

  def loss(p, stop):
    p = lw.stop_gradient(p, frozen) if stop else p
    return (jnp.sum(p["generator"]["out"]["kernel"] ** 2)
            + jnp.sum(jnp.sqrt(p["discriminator"]["out"]["kernel"] - 10.0)))

  nan = jax.grad(loss)(GAN, False)["discriminator"]["out"]["kernel"]
  assert bool(jnp.isnan(nan).all())
  grads = jax.grad(loss)(GAN, True)
  assert _is_zero(grads["discriminator"])
  tx = optax.apply_if_finite(lw.freeze(optax.adam(1e-2), frozen), 2)
  updates, state = jax.jit(tx.update)(grads, tx.init(GAN), GAN)
  assert int(state.notfinite_count) == 0
  assert not _is_zero(updates["generator"])
