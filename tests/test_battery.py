"""The optax compatibility battery: every public transformation, one contract.

Each case of ``cases.CASES`` must: give the same values under ``jax.jit`` as
eagerly and compile once; keep float32, bfloat16 and float16 updates and
state dtypes stable; accept and ignore extra arguments; compose with
``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite`` and
``optax.inject_hyperparams``; initialize from ``jax.ShapeDtypeStruct``\\ s;
give finite results for finite input of any magnitude; and keep a
non-finite gradient inside its own group. The references are the
transformation's own eager run and optax's definitions of the wrappers.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw
from cases import CASES, NOT_TRANSFORMATIONS, covered_names, grads_like
from cases import params as make_params
from conftest import flat

NAMES = sorted(CASES)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


# Compiled differently (jit, a wrapper's cond or scan), float32 arithmetic
# may fuse and round differently: a few ulps.
ULPS = 1e-5


def assert_trees_equal(a, b, rtol=0.0):
  """Equal trees: bitwise, or to ``rtol`` (and an absolute 1e-6 near 0)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=0.0 if rtol == 0.0 else 1e-6)


def run(tx, grads_seq, params, step=None):
  """The updates and final state of ``tx`` over a sequence of gradients
  (jitted, unless ``step`` says otherwise)."""
  step = step or jax.jit(tx.update)
  state = tx.init(params)
  outs = []
  for g in grads_seq:
    u, state = step(g, state, params)
    outs.append(u)
  return outs, state


def three_grads(params):
  return [grads_like(params, seed=s) for s in (1, 2, 3)]


# ------------------------------------------------------------- coverage


def test_every_public_name_is_covered():
  public = set(lw.__all__)
  covered = covered_names()
  assert not covered - public, f"cases name non-public {covered - public}"
  assert not set(NOT_TRANSFORMATIONS) - public
  missing = public - covered - set(NOT_TRANSFORMATIONS)
  assert not missing, (
      f"public names in no battery case: {sorted(missing)}; add a Case to "
      "tests/cases.py (or, for what is not a transformation, an entry in "
      "NOT_TRANSFORMATIONS naming its tests)")
  # What returns a transformation must be a case, not an exemption.
  for name in NOT_TRANSFORMATIONS:
    obj = getattr(lw, name)
    if callable(obj) and not isinstance(obj, type):
      returns = str(inspect.signature(obj).return_annotation)
      assert "GradientTransformation" not in returns, name


def test_every_transformation_is_an_optax_transformation():
  for name in NAMES:
    tx = CASES[name].make()
    assert isinstance(tx, optax.GradientTransformationExtraArgs), name


# ------------------------------------------------------------------ jit


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager_and_compiles_once(name):
  params = make_params()
  grads = three_grads(params)
  tx = CASES[name].make()
  eager, eager_state = run(tx, grads, params, tx.update)
  step = jax.jit(tx.update)
  jitted, jit_state = run(tx, grads, params, step)
  assert step._cache_size() == 1
  assert_trees_equal(jitted, eager, rtol=ULPS)
  assert_trees_equal(jit_state, eager_state, rtol=ULPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_of_updates_and_state_are_stable(name, dtype):
  params = make_params(dtype)
  tx = CASES[name].make(params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in three_grads(params):
    updates, new_state = step(g, state, params)
    assert {k: v.dtype for k, v in flat(updates).items()} == {
        k: jnp.dtype(dtype) for k in flat(params)}
    assert [(x.shape, x.dtype) for x in leaves(new_state)] == [
        (x.shape, x.dtype) for x in leaves(state)]
    state = new_state
  assert step._cache_size() == 1


# ----------------------------------------------------------- extra args


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_are_accepted_and_ignored(name):
  params = make_params()
  g = grads_like(params)
  tx = CASES[name].make()
  state = tx.init(params)
  plain = jax.jit(tx.update)(g, state, params)
  extra = jax.jit(tx.update)(g, state, params, value=jnp.float32(3.0),
                             loss=1.0)
  assert_trees_equal(extra, plain)
  chained = optax.chain(tx, optax.sgd(0.1))
  u, _ = jax.jit(chained.update)(g, chained.init(params), params, value=1.0)
  assert_trees_equal(u, jax.tree_util.tree_map(lambda x: -0.1 * x, plain[0]),
                     rtol=ULPS)


# ------------------------------------------------------------ wrappers


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_equals_composing_by_hand(name):
  params = make_params()
  tx = CASES[name].make()
  chain = optax.chain(optax.scale_by_adam(), tx, optax.scale(-0.01))
  adam, scale = optax.scale_by_adam(), optax.scale(-0.01)
  cs = chain.init(params)
  states = [adam.init(params), tx.init(params), scale.init(params)]

  @jax.jit
  def by_hand(g, states):
    states = list(states)
    for i, t in enumerate((adam, tx, scale)):
      g, states[i] = t.update(g, states[i], params)
    return g, states

  for g in three_grads(params):
    u, cs = jax.jit(chain.update)(g, cs, params)
    ref, states = by_hand(g, states)
    assert_trees_equal(u, ref, rtol=ULPS)


@pytest.mark.parametrize("name", NAMES)
def test_inside_multisteps_is_one_step_on_the_mean_gradient(name):
  params = make_params()
  g1, g2 = grads_like(params, seed=1), grads_like(params, seed=2)
  tx = CASES[name].make()
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  ms = multi.init(params)
  step = jax.jit(multi.update)
  u1, ms = step(g1, ms, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in leaves(u1))
  u2, ms = step(g2, ms, params)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  (ref,), ref_state = run(tx, [mean], params)
  assert_trees_equal(u2, ref, rtol=ULPS)
  assert_trees_equal(ms.inner_opt_state, ref_state, rtol=ULPS)


@pytest.mark.parametrize("name", NAMES)
def test_inside_apply_if_finite_skips_a_nan_step(name):
  params = make_params()
  g = grads_like(params)
  tx = CASES[name].make()
  guarded = optax.apply_if_finite(tx, max_consecutive_errors=3)
  state = guarded.init(params)
  step = jax.jit(guarded.update)
  nan = jax.tree_util.tree_map(lambda x: x.at[...].set(jnp.nan), g)
  u, skipped = step(nan, state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in leaves(u))
  assert int(skipped.notfinite_count) == 1
  assert_trees_equal(skipped.inner_state, state.inner_state)
  u, state = step(g, skipped, params)
  (ref,), ref_state = run(tx, [g], params)
  assert_trees_equal(u, ref, rtol=ULPS)
  assert_trees_equal(state.inner_state, ref_state, rtol=ULPS)


@pytest.mark.parametrize("name", NAMES)
def test_inside_inject_hyperparams_matches_the_plain_transformation(name):
  # Layerwise keeps its numbers in the state (lw.set_scale changes them), so
  # a number passed as an argument, like `default`, is static.
  case = CASES[name]
  params = make_params()
  args = case.args(params)
  numbers = tuple(k for k, v in case.kwargs.items()
                  if isinstance(v, (int, float)))
  injected = optax.inject_hyperparams(
      case.factory, static_args=case.static_args + numbers)(
          *args, **case.kwargs)
  outs, state = run(injected, three_grads(params), params)
  ref, ref_state = run(case.factory(*args, **case.kwargs),
                       three_grads(params), params)
  assert_trees_equal(outs, ref, rtol=ULPS)
  assert_trees_equal(state.inner_state, ref_state, rtol=ULPS)


@pytest.mark.parametrize("name", ["partition", "freeze", "reparameterize"])
def test_an_inner_optimizers_injected_rate_can_change_between_steps(name):
  # The wrappers keep the inner state as optax made it: a learning rate
  # injected by optax.inject_hyperparams stays settable through them.
  params = make_params()
  g = grads_like(params)

  def inner():
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)

  tx = {"partition": lambda: lw.partition({"head/**": None, "**": inner()}),
        "freeze": lambda: lw.freeze(inner(), "embed/**"),
        "reparameterize": lambda: lw.reparameterize(inner(),
                                                    {"**": 2.0})}[name]()
  state = tx.init(params)
  step = jax.jit(tx.update)
  before, _ = step(g, state, params)
  state = optax.tree_utils.tree_set(state, learning_rate=jnp.float32(0.3))
  after, _ = step(g, state, params)
  assert step._cache_size() == 1
  assert_trees_equal(after, jax.tree_util.tree_map(lambda x: 3 * x, before),
                     rtol=ULPS)
  assert any(float(jnp.abs(x).max()) > 0 for x in leaves(after))


# ----------------------------------------------------- abstract params


@pytest.mark.parametrize("name", NAMES)
def test_init_on_shape_dtype_structs(name):
  params = make_params()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = CASES[name].make(abstract)
  concrete = tx.init(params)
  spec = jax.eval_shape(tx.init, abstract)
  direct = tx.init(abstract)  # as optax's own init accepts
  assert (jax.tree_util.tree_structure(spec)
          == jax.tree_util.tree_structure(concrete)
          == jax.tree_util.tree_structure(direct))
  for s, c, d in zip(leaves(spec), leaves(concrete), leaves(direct)):
    assert s.shape == c.shape == d.shape and s.dtype == c.dtype == d.dtype
  # describe reads the rules from the abstract state alone.
  text = str(lw.describe(tx, abstract, opt_state=spec))
  assert "layers/1/kernel" in text


# ------------------------------------------------------------- numerics

REGIMES = {
    "zero grads": (1.0, 0.0),
    "zero params": (0.0, 1.0),
    "huge": (1e30, 1e30),
    "tiny": (1e-30, 1e-30),
    "subnormal": (1e-40, 1e-40),
    "huge grads, tiny params": (1e-30, 1e30),
}


@pytest.mark.parametrize("name", NAMES)
def test_finite_input_never_gives_nan(name):
  tx = CASES[name].make()
  step = jax.jit(tx.update)
  for regime, (p_scale, g_scale) in REGIMES.items():
    params = make_params(scale=p_scale)
    grads = [grads_like(params, seed=s, scale=g_scale) for s in (1, 2, 3)]
    outs, state = run(tx, grads, params, step)
    for u in outs:
      assert all(np.isfinite(np.asarray(x)).all() for x in leaves(u)), regime
    assert not any(np.isnan(np.asarray(x, np.float64)).any()
                   for x in leaves(state)
                   if jnp.issubdtype(x.dtype, jnp.inexact)), regime
  assert step._cache_size() == 1


# Leaves that share the group of ``layers/0/kernel``: a NaN there reaches
# them (their group norm is NaN), and no other leaf. The adaptive clippers
# (quantile, z-score) do not clip on a NaN norm (a comparison with NaN is
# false) and do not record it, so the NaN stays in its leaf.
NAN_GROUP = {
    "clip_group_norm": {"layers/0/kernel", "layers/0/bias", "layers/1/kernel",
                        "layers/1/bias"},
}
FROZEN = {"partition": {"head/kernel"}, "freeze": {"embed/embedding"}}


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_gradient_stays_in_its_group(name):
  params = make_params()
  tx = CASES[name].make()
  g = grads_like(params)
  bad = jax.tree_util.tree_map(lambda x: x, g)
  bad["layers"][0]["kernel"] = g["layers"][0]["kernel"].at[0, 0].set(jnp.nan)
  state = tx.init(params)
  step = jax.jit(tx.update)
  clean, _ = step(g, state, params)
  dirty, dirty_state = step(bad, state, params)
  reached = NAN_GROUP.get(name, {"layers/0/kernel"})
  for path, u in flat(dirty).items():
    if path in FROZEN.get(name, ()):
      assert float(jnp.abs(u).max()) == 0.0, path  # frozen stays zero
    elif path in reached:
      assert np.isnan(np.asarray(u)).any(), path
    else:
      np.testing.assert_array_equal(u, flat(clean)[path], err_msg=path)
  if name in ("clip_quantile", "clip_zscore"):
    # The statistics skip the NaN norm: the next step is as if it never was.
    stats = dirty_state.stats
    assert_trees_equal(stats, state.stats)
