"""Stacked (scanned) layers in the rate transformations: scale_by_rules,
set_scale, add_decayed_weights, set_weight_decay, layer_decay,
discriminative, hyperparams, map_updates and lw.check (issue 18).

The reference is always the same model unrolled: its params are the slices
of the stacked ones (``layers/3/...`` a leaf of its own), trained with the
same rules and the same gradients. Params, updates and the states' vectors
must agree to float32 tolerance, layer by layer.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

L = 4
AXES = [0, 1, -1]


def _insert(shape, axis):
  """``shape`` with the layer axis (of length L) inserted at ``axis``."""
  shape = list(shape)
  at = axis if axis >= 0 else len(shape) + 1 + axis
  return tuple(shape[:at] + [L] + shape[at:])


def stacked_params(axis=0, seed=0):
  """A small transformer-like tree whose ``layers`` subtree is stacked on
  ``axis``: an attention kernel, a LayerNorm scale (1-D per layer) and a
  bias, with an embedding and a head beside it."""
  rng = np.random.default_rng(seed)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape).astype(np.float32))

  return {
      "embed": arr(6, 3),
      "layers": {"attn": {"kernel": arr(*_insert((3, 3), axis))},
                 "ln": {"scale": arr(*_insert((3,), axis))},
                 "mlp": {"bias": arr(*_insert((3,), axis))}},
      "head": {"w": arr(3, 2)},
  }


def unroll(tree, axis=0):
  """The unrolled twin: ``layers`` as a list of L subtrees, the slices."""
  return {**tree, "layers": [
      jax.tree_util.tree_map(lambda x, i=i: jnp.take(x, i, axis=axis),
                             tree["layers"]) for i in range(L)]}


def restack(tree, axis=0):
  """An unrolled tree stacked again, to compare with the stacked one."""
  return {**tree, "layers": jax.tree_util.tree_map(
      lambda *xs: jnp.stack(xs, axis=axis), *tree["layers"])}


def grads_of(params, step):
  """Gradients that depend on the params and the step (and so on the
  trajectory)."""
  return jax.tree_util.tree_map(
      lambda p: jnp.sin(3.0 * p + step) * (1.0 + 0.1 * step), params)


def train(tx, params, steps=3, grads=grads_of):
  """``steps`` jitted steps; the final params, last updates and state."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(grads(params, i), state, params)
    return optax.apply_updates(params, updates), updates, state

  updates = None
  for i in range(steps):
    params, updates, state = step(params, state, jnp.float32(i))
  return params, updates, state


def assert_twins(stacked, unrolled, axis=0, rtol=1e-6, atol=1e-6):
  a = jax.tree_util.tree_leaves(stacked)
  b = jax.tree_util.tree_leaves(restack(unrolled, axis))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def run_twins(make_tx, axis=0, steps=3, params=None, grads=grads_of):
  """Trains the stacked tree (``make_tx(stacks)``) and its unrolled twin
  (``make_tx({})``), checks params and updates agree, returns both runs."""
  params = stacked_params(axis) if params is None else params
  s = train(make_tx({"layers": axis}), params, steps, grads)
  u = train(make_tx({}), unroll(params, axis), steps, grads)
  assert_twins(s[0], u[0], axis)
  assert_twins(s[1], u[1], axis)
  return s, u


# ----------------------------------------------------------- scale_by_rules

PER_LAYER = {"layers/0/**": 0.0, "layers/1/**": 0.5,
             "layers/*/attn/**": 2.0, "**": 1.0}


@pytest.mark.parametrize("axis", AXES)
def test_per_layer_multipliers_train_like_the_unrolled_twin(axis):
  (_, _, s), (_, _, u) = run_twins(lambda stacks: optax.chain(
      optax.adam(0.1), lw.scale_by_rules(PER_LAYER, stacks=stacks)), axis)
  # The same multipliers by path: one entry per layer leaf.
  hs, hu = lw.hyperparams(s), lw.hyperparams(u)
  assert sorted(hs) == sorted(hu)
  for k in hs:
    assert float(hs[k]) == float(hu[k])
  assert float(hs["scale/layers/0/attn/kernel"]) == 0.0
  assert float(hs["scale/layers/2/attn/kernel"]) == 2.0
  assert float(hs["scale/layers/3/ln/scale"]) == 1.0


@pytest.mark.parametrize("axis", AXES)
def test_per_layer_schedules(axis):
  rules = {"layers/1/**": optax.linear_schedule(0.0, 1.0, 3),
           "layers/2/**": optax.cosine_decay_schedule(1.0, 3),
           "layers/3/ln/**": optax.constant_schedule(0.25), "**": 1.0}
  run_twins(lambda stacks: optax.chain(
      optax.adam(0.1), lw.scale_by_rules(rules, stacks=stacks)), axis,
      steps=4)


@pytest.mark.parametrize("axis", AXES)
def test_exact_zero_for_one_layer_with_nan_updates(axis):
  params = stacked_params(axis)

  def grads(p, i):
    g = grads_of(p, i)
    # NaN and inf in layer 0 of every stacked leaf.
    bad = jnp.where(jnp.arange(L) == 0, jnp.nan, 0.0)
    layers = jax.tree_util.tree_map(
        lambda x: x + lw._core.along(bad, axis % x.ndim, x.ndim),
        g["layers"])
    return {**g, "layers": layers}

  def grads_unrolled(p, i):
    g = grads_of(p, i)
    return {**g, "layers": [
        jax.tree_util.tree_map(lambda x: x + jnp.nan, g["layers"][0]),
        *g["layers"][1:]]}

  rules = {"layers/0/**": 0.0, "**": 0.5}
  s = train(optax.chain(optax.sgd(0.1), lw.scale_by_rules(
      rules, stacks={"layers": axis})), params, 1, grads)
  u = train(optax.chain(optax.sgd(0.1), lw.scale_by_rules(rules, stacks={})),
            unroll(params, axis), 1, grads_unrolled)
  assert_twins(s[1], u[1], axis)
  for leaf in jax.tree_util.tree_leaves(s[1]["layers"]):
    first = np.take(np.asarray(leaf), 0, axis=axis)
    np.testing.assert_array_equal(first, np.zeros_like(first))
    assert np.isfinite(np.asarray(leaf)).all()


def test_integer_leaves_in_a_stack_pass_through():
  params = stacked_params()
  params["layers"]["count"] = jnp.arange(L * 2, dtype=jnp.int32).reshape(L, 2)
  tx = lw.scale_by_rules({"layers/*/count": 1.0, "layers/0/**": 0.0,
                          "**": 0.5}, stacks={"layers": 0})
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_array_equal(updates["layers"]["count"],
                                np.ones((L, 2), np.int32))
  assert updates["layers"]["count"].dtype == jnp.int32
  k = np.asarray(updates["layers"]["attn"]["kernel"])
  np.testing.assert_array_equal(k[0], 0.0)
  np.testing.assert_array_equal(k[1:], 0.5)
  # Scaling one layer of an integer leaf is refused, naming that layer.
  with pytest.raises(TypeError, match="layers/0/count"):
    lw.scale_by_rules({"layers/0/**": 0.0, "**": 1.0},
                      stacks={"layers": 0}).init(params)


@pytest.mark.parametrize("axis", AXES)
def test_set_scale_on_some_layers(axis):
  params = stacked_params(axis)
  rules = {"layers/*/attn/**": 2.0, "**": 1.0}

  def run(p, stacks):
    tx = optax.chain(optax.adam(0.1), lw.scale_by_rules(rules, stacks=stacks))
    state = lw.set_scale(tx.init(p), "layers/[2-3]/**", 0.25)
    g = grads_of(p, 0.0)
    updates, state = jax.jit(tx.update)(g, state, p)
    return updates, state

  us, ss = run(params, {"layers": axis})
  uu, su = run(unroll(params, axis), {})
  assert_twins(us, uu, axis)
  hs = {k: float(v) for k, v in lw.hyperparams(ss).items()}
  assert hs == {k: float(v) for k, v in lw.hyperparams(su).items()}
  assert hs["scale/layers/2/attn/kernel"] == 0.25
  assert hs["scale/layers/1/attn/kernel"] == 2.0
  assert hs["scale/embed"] == 1.0


@pytest.mark.parametrize("axis", AXES)
def test_a_stacked_leaf_whose_layers_share_a_rule(axis):
  rules = {"layers/**": 0.5, "**": 1.0}
  (ps, us, _), _ = run_twins(lambda stacks: optax.chain(
      optax.adam(0.1), lw.scale_by_rules(rules, stacks=stacks)), axis)
  # And as plain optax with the same rate on the stacked tree.
  params = stacked_params(axis)
  mask = {"embed": False, "head": {"w": False},
          "layers": jax.tree_util.tree_map(lambda _: True, params["layers"])}
  ref = train(optax.chain(optax.adam(0.1), optax.masked(optax.scale(0.5),
                                                       mask)), params)
  for x, y in zip(jax.tree_util.tree_leaves(ps),
                  jax.tree_util.tree_leaves(ref[0])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_stacked_and_unrolled_leaves_in_one_tree():
  """A tree with both a stack and unrolled blocks: a rule set for both."""
  params = {"stack": {"w": jnp.ones((L, 2))},
            "blocks": [{"w": jnp.ones(2)} for _ in range(2)]}
  rules = {"stack/1/**": 0.0, "blocks/1/**": 0.5, "**": 1.0}
  tx = lw.scale_by_rules(rules, stacks={"stack": 0})
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params),
                         tx.init(params))
  np.testing.assert_array_equal(updates["stack"]["w"][:, 0], [1, 0, 1, 1])
  np.testing.assert_array_equal(updates["blocks"][1]["w"], [0.5, 0.5])


# ------------------------------------------------------ add_decayed_weights


def test_no_decay_judges_a_stacked_layernorm_scale_by_its_layer_shape():
  """The silent bug of issue 18: a stacked LayerNorm scale (L, D) is 2-D,
  so NO_DECAY decayed it; each layer's scale is 1-D, and is not decayed."""
  params = stacked_params()
  tx = lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1},
                              stacks={"layers": 0})
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, state = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates["layers"]["ln"]["scale"], 0.0)
  np.testing.assert_array_equal(updates["layers"]["mlp"]["bias"], 0.0)
  np.testing.assert_allclose(updates["layers"]["attn"]["kernel"],
                             0.1 * params["layers"]["attn"]["kernel"],
                             rtol=1e-7)
  assert state.rules.rule_texts[state.rules.paths.index(
      "layers/2/ln/scale")] == "lw.NO_DECAY"
  # Without stacks the whole (L, D) array is 2-D, and decayed: the stack
  # must be declared (or read from Flax metadata).
  plain = lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1}, stacks={})
  updates, _ = plain.update(zeros, plain.init(params), params)
  assert np.all(np.asarray(updates["layers"]["ln"]["scale"]) != 0.0)


def test_no_decay_by_layer_shape_from_flax_metadata():
  from flax import linen as nn
  params = {"layers": {
      "kernel": nn.Partitioned(jnp.ones((L, 2, 2)), names=("layers", None,
                                                           None)),
      "scale": nn.Partitioned(jnp.ones((L, 2)), names=("layers", None))},
            "head": jnp.ones((2, 2))}
  tx = lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.1})  # detected
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates["layers"]["scale"].value, 0.0)
  np.testing.assert_allclose(updates["layers"]["kernel"].value, 0.1)


WD_RULES = {lw.NO_DECAY: 0.0, "layers/0/**": 0.0,
            "layers/1/**": optax.linear_schedule(0.0, 0.2, 3),
            "layers/[2-3]/attn/**": 0.05, "**": 0.1}


@pytest.mark.parametrize("axis", AXES)
def test_per_layer_weight_decay_trains_like_the_unrolled_twin(axis):
  (_, _, s), (_, _, u) = run_twins(lambda stacks: optax.chain(
      optax.scale_by_adam(), lw.add_decayed_weights(WD_RULES, stacks=stacks),
      optax.scale_by_learning_rate(0.1)), axis, steps=4)
  hs = {k: float(v) for k, v in lw.hyperparams(s).items()}
  assert hs == {k: float(v) for k, v in lw.hyperparams(u).items()}
  assert hs["weight_decay/layers/2/attn/kernel"] == np.float32(0.05)
  assert hs["weight_decay/layers/2/ln/scale"] == 0.0


@pytest.mark.parametrize("toward", ["init", "tree"])
@pytest.mark.parametrize("axis", [0, 1])
def test_decay_toward_with_stacks(axis, toward):
  params = stacked_params(axis)
  p0 = stacked_params(axis, seed=1)

  def make(stacks):
    if toward == "init":
      target = "init"
    else:
      target = {**(p0 if stacks else unroll(p0, axis)), "head": None}
    return optax.chain(lw.add_decayed_weights(
        {"layers/0/**": 0.0, "**": 0.1}, toward=target, stacks=stacks),
        optax.sgd(0.1))

  (_, _, s), _ = run_twins(make, axis, params=params)
  # The state holds the real (stacked) arrays.
  t = s[0].toward
  assert (t["head"]["w"] is None) == (toward == "tree")
  want = params if toward == "init" else p0
  np.testing.assert_array_equal(t["layers"]["attn"]["kernel"],
                                want["layers"]["attn"]["kernel"])


def test_decay_toward_with_stacks_inside_partition():
  """Inside lw.partition, toward= is of the whole model (real arrays)."""
  params = stacked_params()
  p0 = stacked_params(seed=1)
  inner = optax.chain(lw.add_decayed_weights(
      {"layers/0/**": 0.0, "**": 0.1}, toward=p0, stacks={"layers": 0}),
      optax.sgd(1.0))
  tx = lw.partition({"layers/**": inner, "**": optax.sgd(1.0)})
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  k, k0 = params["layers"]["attn"]["kernel"], p0["layers"]["attn"]["kernel"]
  np.testing.assert_array_equal(updates["layers"]["attn"]["kernel"][0], 0.0)
  np.testing.assert_allclose(updates["layers"]["attn"]["kernel"][1:],
                             -0.1 * (k[1:] - k0[1:]), rtol=1e-6)
  np.testing.assert_array_equal(updates["head"]["w"], 0.0)


def test_toward_of_the_wrong_shape_names_the_stacked_leaf():
  params = stacked_params()
  bad = {**params, "layers": {**params["layers"],
                              "ln": {"scale": jnp.ones((L, 5))}}}
  tx = lw.add_decayed_weights({"**": 0.1}, toward=bad, stacks={"layers": 0})
  with pytest.raises(ValueError, match=r"toward 'layers/ln/scale' has shape"
                     r" \(4, 5\), the parameter \(4, 3\)"):
    tx.init(params)


@pytest.mark.parametrize("axis", AXES)
def test_weight_decay_zero_leaves_the_update_per_layer(axis):
  """A NaN param in layer 0, whose weight decay is 0: its update is the
  update given, exactly; the other layers are decayed."""
  params = stacked_params(axis)
  nan0 = jnp.where(jnp.arange(L) == 0, jnp.nan, 0.0)
  params["layers"] = jax.tree_util.tree_map(
      lambda x: x + lw._core.along(nan0, axis % x.ndim, x.ndim),
      params["layers"])
  tx = lw.add_decayed_weights({"layers/0/**": 0.0, "**": 0.1},
                              stacks={"layers": axis})
  g = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
  for u, p in zip(jax.tree_util.tree_leaves(updates["layers"]),
                  jax.tree_util.tree_leaves(params["layers"])):
    first = np.take(np.asarray(u), 0, axis=axis)
    np.testing.assert_array_equal(first, np.ones_like(first))
    rest = np.take(np.asarray(u), np.arange(1, L), axis=axis)
    np.testing.assert_allclose(
        rest, 1 + 0.1 * np.take(np.asarray(p), np.arange(1, L), axis=axis),
        rtol=1e-7)


@pytest.mark.parametrize("axis", [0, 1])
def test_set_weight_decay_per_layer(axis):
  params = stacked_params(axis)

  def run(p, stacks):
    tx = optax.chain(lw.add_decayed_weights({"**": 0.1}, stacks=stacks),
                     optax.sgd(0.1))
    state = lw.set_weight_decay(tx.init(p), "layers/[0-1]/**", 0.0)
    updates, state = jax.jit(tx.update)(grads_of(p, 0.0), state, p)
    return updates, state

  us, ss = run(params, {"layers": axis})
  uu, su = run(unroll(params, axis), {})
  assert_twins(us, uu, axis)
  hs = {k: float(v) for k, v in lw.hyperparams(ss).items()}
  assert hs == {k: float(v) for k, v in lw.hyperparams(su).items()}
  assert hs["weight_decay/layers/1/ln/scale"] == 0.0
  assert hs["weight_decay/layers/2/ln/scale"] == pytest.approx(0.1)


def test_hyperparams_lists_one_value_per_layer_in_the_plans_order():
  params = stacked_params()
  tx = lw.scale_by_rules({"layers/1/**": 0.5, "**": 1.0},
                         stacks={"layers": 0})
  keys = list(lw.hyperparams(tx.init(params)))
  assert keys == ["scale/embed", "scale/head/w"] + [
      f"scale/layers/{i}/{name}" for name in ("attn/kernel", "ln/scale",
                                              "mlp/bias") for i in range(L)]


# ------------------------------------------------ layer_decay, discriminative


@pytest.mark.parametrize("axis", [0, 1])
def test_layer_decay_on_the_stacked_model_is_the_unrolled_twins(axis):
  params = stacked_params(axis)
  stacks = {"layers": axis}
  rules = lw.layer_decay(0.75, params, stacks=stacks)
  twin_rules = lw.layer_decay(0.75, unroll(params, axis))
  # The same depths and multipliers.
  assert [(str(s), v) for s, v in rules] == [(str(s), v)
                                             for s, v in twin_rules]
  got = lw.resolve(rules, params, stacks=stacks)
  want = lw.resolve(twin_rules, unroll(params, axis))
  for i in range(L):
    for name in ("attn", "ln", "mlp"):
      (leaf,) = got["layers"][name].values()
      (twin,) = want["layers"][i][name].values()
      assert leaf[i] == twin == 0.75 ** (L - i)
  assert got["embed"] == want["embed"] == 0.75 ** (L + 1)
  assert got["head"] == want["head"]
  run_twins(lambda s: optax.chain(optax.adamw(0.1, weight_decay=0.01),
                                  lw.scale_by_rules(rules if s else twin_rules,
                                                    stacks=s)), axis)


def test_layer_decay_reads_the_stack_from_flax_metadata():
  """A linen nn.scan model marks its layer axis "layers": layer_decay and
  scale_by_rules find the stack without stacks=."""
  from flax import linen as nn
  params = stacked_params()
  boxed = {**params, "layers": jax.tree_util.tree_map(
      lambda x: nn.Partitioned(x, names=("layers",) + (None,) * (x.ndim - 1)),
      params["layers"])}
  rules = lw.layer_decay(0.75, boxed)
  assert [(str(s), v) for s, v in rules] == [
      (str(s), v) for s, v in lw.layer_decay(0.75, unroll(params))]
  tx = optax.chain(optax.sgd(1.0), lw.scale_by_rules(rules))
  grads = jax.tree_util.tree_map(jnp.ones_like, boxed)
  updates, _ = tx.update(grads, tx.init(boxed))
  np.testing.assert_allclose(
      updates["layers"]["ln"]["scale"].value[:, 0],
      [-(0.75 ** (L - i)) for i in range(L)], rtol=1e-6)


def test_layer_decay_freeze_below_with_stacks():
  params = stacked_params()
  rules = lw.layer_decay(0.5, params, stacks={"layers": 0}, freeze_below=0.1)
  got = lw.resolve(rules, params, stacks={"layers": 0})
  assert got["layers"]["attn"]["kernel"] == (0.0, 0.125, 0.25, 0.5)
  assert got["embed"] == 0.0


def test_layer_decay_on_stacked_params_without_stacks_says_to_declare_them():
  with pytest.raises(ValueError, match=(
      r"found no block.*If 'layers' holds the blocks stacked on one axis "
      r"\(nn.scan, nnx.vmap, an Equinox stack\), declare it: "
      r"stacks=\{'layers': 0\}")):
    lw.layer_decay(0.75, stacked_params(), stacks={})


def test_discriminative_groups_of_layers_with_stacks():
  params = stacked_params()
  rules = lw.discriminative(["embed", "layers/[0-1]/**", "layers/**", "**"],
                            0.01, 1.0)
  run_twins(lambda s: optax.chain(optax.adam(0.1),
                                  lw.scale_by_rules(rules, stacks=s)), 0,
            params=params)
  got = lw.resolve(rules, params, stacks={"layers": 0})
  d = dict(rules)
  assert got["layers"]["ln"]["scale"] == (d["layers/[0-1]/**"],) * 2 + (
      d["layers/**"],) * 2


# ------------------------------------------------------------- map_updates

MAPS = {
    "shared": (lambda u, p, path: jnp.sign(u) * jnp.sqrt(jnp.abs(u)) + 0.1 * p,
               "**"),
    "by-path": (lambda u, p, path: u * 2.0 if path.startswith("layers/1/")
                else u - p, "**"),
    "some-layers": (lambda u, p, path: u / (1e-3 + jnp.linalg.norm(u)),
                    "layers/[1-2]/**"),
    # A constant array (not a literal) that depends on the path.
    "path-constant": (lambda u, p, path: u * jnp.asarray(np.full(
        u.shape[-1:], 1.0 + (int(path[7]) if path.startswith("layers/")
                             else 0), np.float32)), "**"),
}


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("axis", AXES)
def test_map_updates_on_layer_slices_is_the_unrolled_twins(axis, name):
  fn, where = MAPS[name]
  run_twins(lambda stacks: optax.chain(
      lw.map_updates(fn, where, stacks=stacks), optax.sgd(0.1)), axis)


def _count(jaxpr, primitive):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for sub in _jaxprs_in(eqn.params):
      n += _count(sub, primitive)
  return n


def _jaxprs_in(params):
  """The jaxprs in an equation's params (jax.extend.core.jaxprs_in_params,
  which jax 0.4.30 lacks)."""
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield inner


def test_map_updates_calls_fn_once_per_stacked_leaf():
  """Layers that share the function are one vmapped call: as many signs in
  the step as real leaves, not as layer leaves; a function that branches on
  the path is one call per distinct function."""
  params = stacked_params()

  def count(fn, stacks, tree):
    tx = lw.map_updates(fn, stacks=stacks)
    state = tx.init(tree)
    return _count(jax.make_jaxpr(lambda g: tx.update(g, state, tree)[0])(
        tree).jaxpr, "sign")

  def sign(u, p, path):
    return jnp.sign(u)

  assert count(sign, {"layers": 0}, params) == 5
  assert count(sign, {}, unroll(params)) == 2 + 3 * L

  def by_path(u, p, path):
    return jnp.sign(u) * (2.0 if path.startswith("layers/1/") else 1.0)

  assert count(by_path, {"layers": 0}, params) == 2 + 3 * 2

  big = jnp.asarray(np.linspace(0.0, 1.0, 5000, dtype=np.float32))

  def closes_over(u, p, path):  # a large constant, the same for all layers
    return jnp.sign(u) * big[:u.size].reshape(u.shape)

  assert count(closes_over, {"layers": 0}, params) == 5


def test_map_updates_without_params_and_errors_name_the_layer():
  params = stacked_params()
  tx = lw.map_updates(lambda u, p, path: u * 2, "layers/3/**",
                      stacks={"layers": 0})
  updates, _ = tx.update(params, tx.init(params))
  k = params["layers"]["attn"]["kernel"]
  np.testing.assert_array_equal(updates["layers"]["attn"]["kernel"],
                                jnp.concatenate([k[:3], 2 * k[3:]]))
  tx = lw.map_updates(
      lambda u, p, path: u * (2 if path.startswith("layers/3/") else 3),
      "layers/[1-3]/**", stacks={"layers": 0})
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  np.testing.assert_array_equal(updates["layers"]["attn"]["kernel"],
                                jnp.concatenate([k[:1], 3 * k[1:3], 2 * k[3:]]))
  bad = lw.map_updates(lambda u, p, path: u[0], "layers/**",
                       stacks={"layers": 0})
  with pytest.raises(ValueError, match=r"parameter 'layers/0/attn/kernel' of"
                     r" shape \(3, 3\)"):
    bad.update(params, bad.init(params))


# --------------------------------------------------------------- lw.check


def test_check_finds_layer_multipliers_before_an_adaptive_optimizer():
  """The plan's paths are layer paths and the optimizer's state holds the
  stacked arrays: the trap was missed when they were compared as they are."""
  params = stacked_params()
  tx = optax.chain(lw.scale_by_rules({"layers/0/**": 0.5, "**": 1.0},
                                     stacks={"layers": 0}), optax.adam(1e-3))
  with pytest.raises(ValueError, match=r"\[scale-before-adaptive\].*"
                     r"'layers/0/attn/kernel', 'layers/0/ln/scale'"):
    lw.check(tx, params)
  lw.check(optax.chain(optax.adam(1e-3), lw.scale_by_rules(
      {"layers/0/**": 0.5, "**": 1.0}, stacks={"layers": 0})), params)
