"""Every public transformation on a mesh of 8 CPU devices.

Parameters are placed data-parallel (replicated on every device) or
FSDP-style (the first axis split over the mesh when it divides). The state
of each transformation must then be placed like the parameters (a state leaf
shaped like a parameter, sharded like it; statistics and counts
replicated), its updates sharded like the parameters, and the jitted
update must compile without moving parameter tensors between devices (no
all-gather, all-to-all or collective-permute). Values equal a run on one
device. ``conftest.py`` asks XLA for the 8 devices.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import layerwise as lw
from layerwise import _core
from cases import CASES, SHAPES, grads_like
from cases import params as make_params
from conftest import flat

NAMES = sorted(CASES)
MODES = ["replicated", "fsdp"]
# Collectives that move (parts of) tensors between devices. An all-reduce
# of a norm is expected under FSDP; resharding a parameter is not.
MOVES = ("all-gather", "all-to-all", "collective-permute")


@pytest.fixture(scope="module")
def mesh():
  devices = jax.devices("cpu")
  if len(devices) < 8:
    pytest.skip("needs 8 CPU devices: XLA_FLAGS="
                "--xla_force_host_platform_device_count=8 (conftest sets it)")
  return Mesh(np.array(devices[:8]), ("data",))


def sharding_of(mesh, mode, shape):
  if mode == "fsdp" and len(shape) >= 1 and shape[0] % 8 == 0:
    return NamedSharding(mesh, P("data"))
  return NamedSharding(mesh, P())


def place(tree, mesh, mode):
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(x, sharding_of(mesh, mode, x.shape)), tree)


def assert_placed_like_params(tree, mesh, mode, what):
  """A leaf shaped like a parameter is sharded like it; any other leaf is
  replicated (or, as optax's step counts after an eager init, an
  uncommitted single-device array that jit may place anywhere)."""
  param_shapes = {s for s in SHAPES.values() if s}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = f"{what}{jax.tree_util.keystr(path)}"
    if isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
      committed = getattr(x, "committed", None)
      if committed is None:
        committed = x._committed
      assert not committed, f"{name} is committed to one device"
      assert x.shape not in param_shapes, f"{name} is not sharded"
      continue
    if x.shape in param_shapes:
      want = sharding_of(mesh, mode, x.shape)
      assert x.sharding.is_equivalent_to(want, x.ndim), (
          f"{name}: {x.sharding} instead of {want}")
    else:
      assert x.sharding.is_fully_replicated, f"{name}: {x.sharding}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_state_and_updates_are_placed_like_the_params(mesh, name, mode):
  host_params = make_params()
  grads = [grads_like(host_params, seed=s) for s in (1, 2, 3)]
  tx = CASES[name].make()
  params = place(host_params, mesh, mode)
  state = tx.init(params)
  assert_placed_like_params(state, mesh, mode, "init state")

  step = jax.jit(tx.update)
  ref_step = jax.jit(lambda *args: tx.update(*args))  # its own cache
  ref_state = tx.init(host_params)
  sizes = []
  for g in grads:
    updates, state = step(place(g, mesh, mode), state, params)
    ref, ref_state = ref_step(g, ref_state, host_params)
    assert_placed_like_params(state, mesh, mode, "state")
    for path, u in flat(updates).items():
      want = flat(params)[path].sharding
      assert u.sharding.is_equivalent_to(want, u.ndim), (
          f"update {path}: {u.sharding} instead of {want}")
      np.testing.assert_allclose(u, flat(ref)[path], rtol=1e-5, atol=1e-6,
                                 err_msg=path)
    sizes.append(step._cache_size())
  # The first step sees an eagerly made state (uncommitted counts), the
  # next ones the step's own output: at most one more compile, then none.
  assert sizes[1] == sizes[2] <= 2

  hlo = step.lower(place(grads[0], mesh, mode), state,
                   params).compile().as_text()
  moved = [op for op in MOVES if op in hlo]
  assert not moved, f"the update moves tensors between devices: {moved}"
  if mode == "replicated":
    assert "all-reduce" not in hlo


def _model(params, x):
  """A model of the battery's tree: x (batch, 16) -> (batch, 3)."""
  h = x @ params["embed"]["embedding"]
  hidden = sum(jnp.tanh(h @ layer["kernel"] + layer["bias"])
               for layer in params["layers"])
  features = jnp.concatenate([hidden, h], axis=-1)
  return (features @ params["head"]["kernel"] + params["head"]["bias"]) * (
      params["temperature"])


def test_a_jitted_fsdp_train_step_keeps_every_placement(mesh):
  # A fine-tuning step as users write it: the embedding frozen (no state,
  # no backward), per-layer rates and clipping, AdamW.
  tx = optax.chain(
      lw.clip_by_rules({"layers/**": lw.clip_group_norm(1.0), "**": None}),
      lw.freeze(optax.adamw(1e-2, weight_decay=0.1), "embed/**"),
      lw.scale_by_rules({"layers/0/**": 0.1, "**": 1.0}))

  def loss_fn(params, x, y):
    params = lw.stop_gradient(params, "embed/**")
    return jnp.mean((_model(params, x) - y) ** 2)

  def train_step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  host = make_params()
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
  y = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
  params = place(host, mesh, "fsdp")
  batch = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  state = tx.init(params)
  step = jax.jit(train_step)
  ref_step = jax.jit(lambda *args: train_step(*args))  # its own cache
  ref_params, ref_state = host, tx.init(host)
  for _ in range(3):
    params, state = step(params, state, xs, ys)
    ref_params, ref_state = ref_step(ref_params, ref_state, x, y)
    assert_placed_like_params(params, mesh, "fsdp", "params")
    assert_placed_like_params(state, mesh, "fsdp", "state")
  for path, p in flat(params).items():
    np.testing.assert_allclose(p, flat(ref_params)[path], rtol=1e-5,
                               atol=1e-6, err_msg=path)
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                host["embed"]["embedding"])
  assert step._cache_size() <= 2

  # A new multiplier between steps keeps the state's placement: no
  # recompilation.
  before = step._cache_size()
  state = lw.set_scale(state, "layers/0/**", 0.5)
  assert_placed_like_params(state, mesh, "fsdp", "state after set_scale")
  params, state = step(params, state, xs, ys)
  assert step._cache_size() == before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_state_shardings_place_the_state_as_an_eager_init_does(mesh, name,
                                                               mode):
  # The reference: tx.init of placed params, eagerly (each moment computed
  # from its parameter, sharded like it). lw.state_shardings gives the same
  # placement without allocating, from arrays or ShapeDtypeStructs, and
  # jit(tx.init, out_shardings=...) makes the state there, values equal.
  tx = CASES[name].make()
  params = place(make_params(), mesh, mode)
  eager = tx.init(params)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  for given in (params, abstract):
    shardings = lw.state_shardings(tx, given)
    assert (jax.tree_util.tree_structure(shardings)
            == jax.tree_util.tree_structure(eager))
    for (path, want), x in zip(
        jax.tree_util.tree_leaves_with_path(shardings),
        jax.tree_util.tree_leaves(eager)):
      name_ = jax.tree_util.keystr(path)
      if x.shape in {s for s in SHAPES.values() if s}:
        assert want.is_equivalent_to(x.sharding, x.ndim), name_
      else:
        assert want.is_fully_replicated, name_
        assert want.mesh == mesh, name_
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert_placed_like_params(state, mesh, mode, "jitted init state")
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(eager)):
    np.testing.assert_array_equal(a, b)


class _Mark:
  """What optax.tree_map_params made of a state leaf (a pytree leaf)."""

  def __init__(self, kind, shape=None):
    self.kind, self.shape = kind, shape


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params_maps_every_layerwise_state(name):
  # optax.tree_map_params inits with a placeholder for the params: a
  # layerwise init cannot match its rules against it (it raised a RuleError,
  # "selector(s) match no parameter", on every layerwise transformation).
  # Its function reaches the copies of the params (Adam's moments, inside
  # lw.partition and lw.freeze too), transform_non_params the rest, and the
  # plans come back as they were.
  tx = optax.chain(CASES[name].make(), optax.adam(1e-3))
  params = make_params()
  state = tx.init(params)
  marked = optax.tree_map_params(
      tx, lambda x: _Mark("param", x.shape), state,
      transform_non_params=lambda x: jax.tree_util.tree_map(
          lambda _: _Mark("other"), x))
  assert (jax.tree_util.tree_structure(marked)
          == jax.tree_util.tree_structure(state))
  param_shapes = set(SHAPES.values())
  kinds = set()
  for (path, x), m in zip(jax.tree_util.tree_leaves_with_path(state),
                          jax.tree_util.tree_leaves(marked)):
    where = jax.tree_util.keystr(path)
    kinds.add(m.kind)
    if re.search(r"\.(mu|nu)\b", where):
      assert (m.kind, m.shape) == ("param", x.shape), where
    elif m.kind == "param":
      assert m.shape == x.shape and x.shape in param_shapes, where
  assert "param" in kinds and "other" in kinds
  assert ([s.rules for s in _core.find_states(marked)]
          == [s.rules for s in _core.find_states(state)])
  # The optax use: a state of the same structure, its moments cast.
  cast = optax.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert {x.dtype for x in jax.tree_util.tree_leaves(cast[1][0].mu)} == {
      jnp.dtype(jnp.bfloat16)}
  updates, _ = tx.update(grads_like(params), cast, params)
  assert jax.tree_util.tree_structure(updates) == (
      jax.tree_util.tree_structure(params))


def test_state_shardings_of_a_stack_split_between_groups(mesh):
  # A stacked model, its stack split by lw.freeze (layers 0-1 frozen) and
  # ruled per layer: the state is placed as an eager init of the placed
  # params places it (moments like their stacked params, vectors replicated).
  stacks = {"layers": 0}
  params = {"embed": jnp.arange(64.0).reshape(16, 4),
            "layers": {"kernel": jnp.ones((4, 8, 8)), "scale": jnp.ones((4, 8))}}
  placed = jax.device_put(params, {
      "embed": NamedSharding(mesh, P("data")),
      "layers": {"kernel": NamedSharding(mesh, P(None, "data")),
                 "scale": NamedSharding(mesh, P())}})
  tx = optax.chain(
      lw.clip_by_rules({"**": lw.clip_norm(1.0)}, stacks=stacks),
      lw.freeze(optax.adamw(1e-3), "layers/[0-1]/**", stacks=stacks),
      lw.scale_by_rules({"layers/3/**": 0.5, "**": 1.0}, stacks=stacks))
  eager = tx.init(placed)
  shardings = lw.state_shardings(tx, placed)
  moments = 0
  for x, want in zip(jax.tree_util.tree_leaves(eager),
                     jax.tree_util.tree_leaves(shardings)):
    if x.shape in {(16, 4), (4, 8, 8), (4, 8)}:  # a moment of a param
      assert want.is_equivalent_to(x.sharding, x.ndim), x.shape
      moments += 1
    else:  # a count or a layerwise vector (one entry per layer leaf)
      assert want.is_fully_replicated and want.mesh == mesh, x.shape
  assert moments == 6  # adam's two moments of the 3 trained leaves
  state = jax.jit(tx.init, out_shardings=shardings)(placed)
  updates, state = jax.jit(tx.update)(placed, state, placed)
  assert updates["layers"]["kernel"].sharding.is_equivalent_to(
      placed["layers"]["kernel"].sharding, 3)
  np.testing.assert_array_equal(updates["layers"]["kernel"][:2], 0.0)
