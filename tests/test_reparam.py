"""reparameterize, its equivalences, and mup_scales.

The reference for exactness is a model that really is reparameterized: its
loss is written in ``phi`` (``theta = lam * phi``) and plain optax optimizes
``phi``. The equivalences are checked against the plain optax optimizer
with the rate, epsilon and weight decay the derivation gives.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

# jax.enable_x64 is new; older releases have it in jax.experimental.
enable_x64 = getattr(jax, "enable_x64", None)
if enable_x64 is None:
  from jax.experimental import enable_x64  # noqa: F811

# ------------------------------------------------------------------ model

SIZES = (6, 8, 8, 3)


def mlp_params(key=0, sizes=SIZES, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(key), len(sizes))
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    name = "head" if i == len(sizes) - 2 else f"layers_{i}"
    params[name] = {
        "kernel": (jax.random.normal(keys[i], (a, b)) / math.sqrt(a)
                   ).astype(dtype),
        "bias": (0.1 * jax.random.normal(keys[i + 1], (b,))).astype(dtype),
    }
  return params


def forward(params, x):
  h = x
  for name in sorted(k for k in params if k.startswith("layers_")):
    h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


X = jax.random.normal(jax.random.PRNGKey(7), (16, SIZES[0]))
Y = jax.random.normal(jax.random.PRNGKey(8), (16, SIZES[-1]))


def loss(params, x=X, y=Y):
  return jnp.mean((forward(params, x.astype(jnp.result_type(
      params["head"]["kernel"]))) - y) ** 2)


#: Scales that are powers of two: multiplying and dividing by them is exact
#: in floating point, so the wrapper and the reparameterized model round
#: the same way.
POW2 = {"layers_0/kernel": 0.25, "layers_0/bias": 2.0, "layers_1/**": 4.0,
        "head/kernel": 0.5, "head/bias": 1.0}
#: Scales that are not.
GENERIC = {"layers_0/kernel": 0.3, "layers_0/bias": 1.7, "layers_1/**": 3.1,
           "head/kernel": 0.45, "head/bias": 1.0}


def lam_tree(scales, params):
  return lw.resolve(scales, params)


def reference_trajectory(opt, scales, params, steps=20):
  """theta_t of a model written in phi, optimized by plain optax."""
  lam = lam_tree(scales, params)

  def loss_phi(phi):
    return loss(jax.tree.map(lambda p, l: p * l, phi, lam))

  phi = jax.tree.map(lambda p, l: p / jnp.asarray(l, p.dtype), params, lam)
  return [jax.tree.map(lambda p, l: p * jnp.asarray(l, p.dtype), phi, lam)
          for phi in trajectory(opt, phi, steps, loss_fn=loss_phi)]


def wrapped_and_reference(name, scales, params):
  """The trajectories of ``reparameterize(OPTIMIZERS[name](), scales)`` on
  the ordinary model, and of the bare optimizer on the model written in
  phi."""
  opt = OPTIMIZERS[name]()
  return (trajectory(lw.reparameterize(opt, scales), params),
          reference_trajectory(opt, scales, params))


def trajectory(tx, params, steps=20, loss_fn=loss):
  """The params after each of ``steps`` jitted steps of ``tx`` on
  ``loss_fn`` (theta_t of the ordinary model, by default)."""

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  out = []
  for _ in range(steps):
    with float32_matmuls():
      params, state = step(params, state)
    out.append(params)
  return out


# The trajectories are computed with float32 matmuls (not TF32, which GPUs
# use by default): the tests are about the optimizer's arithmetic.
def float32_matmuls():
  return jax.default_matmul_precision("float32")

#: On CPU the wrapper and the model written in phi round alike; on GPU, XLA
#: fuses the two programs differently (multiply-adds contracted in other
#: places), so they agree to float32 rounding, amplified by 20 steps.
ON_CPU = jax.default_backend() == "cpu"


def assert_trajectories(a, b, rtol, atol=0.0):
  for t, (x, y) in enumerate(zip(a, b)):
    for path, u, v in zip(jax.tree.leaves(lw.paths(x)), jax.tree.leaves(x),
                          jax.tree.leaves(y)):
      np.testing.assert_allclose(
          np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol,
          atol=atol, err_msg=f"step {t + 1}, {path}")


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(0.01),
    "adafactor": lambda: optax.adafactor(0.01, min_dim_size_to_factor=4),
    "lion": lambda: optax.lion(0.003, weight_decay=0.1),
    "lamb": lambda: optax.lamb(0.01, weight_decay=0.1),
}


#: How far float32 rounding takes the two trajectories apart in 20 steps.
#: Lion's sign (and RMSprop's g / sqrt(v) early on) turn a rounding
#: difference of an entry near zero into a full step: those two get a looser
#: bound; the float64 test shows that it is rounding, not a bias.
ROUNDING = {name: 2e-3 if name in ("lion", "rmsprop") else 2e-5
            for name in OPTIMIZERS}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_exact_against_a_reparameterized_model(name):
  # With power-of-two scales there is no rounding in lam * g or theta / lam:
  # on CPU the two are equal to the last bit (adafactor and lamb to one
  # rounding of their norms), for 20 steps, under jit.
  params = mlp_params()
  got, want = wrapped_and_reference(name, POW2, params)
  if ON_CPU:
    assert_trajectories(got, want, rtol=1e-6, atol=1e-7)
  else:
    assert_trajectories(got, want, rtol=ROUNDING[name], atol=ROUNDING[name])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_exact_in_float64_with_any_scales(name):
  # Any scales: in float64 the two agree to 1e-10, so what differs in
  # float32 (below) is rounding, not a bias.
  with enable_x64(True):
    params = mlp_params(dtype=jnp.float64)
    got, want = wrapped_and_reference(name, GENERIC, params)
    assert got[-1]["head"]["kernel"].dtype == jnp.float64
    assert_trajectories(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_with_any_scales_differs_by_rounding(name):
  params = mlp_params()
  got, want = wrapped_and_reference(name, GENERIC, params)
  assert_trajectories(got, want, rtol=ROUNDING[name], atol=ROUNDING[name] / 10)


def test_the_wrapper_differs_from_the_bare_optimizer():
  # The reference itself is sensitive: a trajectory with lam = 1 everywhere
  # is far from one with the scales (the tests above could not pass by
  # accident).
  params = mlp_params()
  opt = optax.adam(0.01)
  plain = trajectory(opt, params)
  wrapped = trajectory(lw.reparameterize(opt, POW2), params)
  diff = np.abs(np.asarray(plain[-1]["layers_1"]["kernel"])
                - np.asarray(wrapped[-1]["layers_1"]["kernel"]))
  assert diff.max() > 0.1


def test_all_ones_is_the_bare_optimizer():
  params = mlp_params()
  for opt in (optax.adamw(0.01, weight_decay=0.1), optax.sgd(0.05, 0.9)):
    assert_trajectories(trajectory(lw.reparameterize(opt, {"**": 1.0}),
                                   params),
                        trajectory(opt, params), rtol=0, atol=0)


# ----------------------------------------------------------- equivalences

LAM = 0.4


def uniform(opt):
  return lw.reparameterize(opt, {"**": LAM})


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9},
                                    {"momentum": 0.9, "nesterov": True}])
def test_sgd_is_lam_squared_times_the_rate(kwargs):
  params = mlp_params()
  want = trajectory(optax.sgd(LAM**2 * 0.05, **kwargs), params)
  got = trajectory(uniform(optax.sgd(0.05, **kwargs)), params)
  assert_trajectories(got, want, rtol=2e-5, atol=1e-6)


def test_sgd_coupled_weight_decay_is_divided_by_lam_squared():
  params = mlp_params()
  wd = 0.3
  want = trajectory(optax.chain(optax.add_decayed_weights(wd / LAM**2),
                                optax.sgd(LAM**2 * 0.05, 0.9)), params)
  got = trajectory(uniform(optax.chain(optax.add_decayed_weights(wd),
                                       optax.sgd(0.05, 0.9))), params)
  assert_trajectories(got, want, rtol=2e-5, atol=1e-6)


def test_adam_is_lam_times_the_rate_with_epsilon_over_lam():
  params = mlp_params()
  eps, eps_root = 1e-3, 1e-4  # large, so that a wrong epsilon shows
  want = trajectory(optax.adam(LAM * 0.01, eps=eps / LAM,
                               eps_root=eps_root / LAM**2), params)
  got = trajectory(uniform(optax.adam(0.01, eps=eps, eps_root=eps_root)),
                   params)
  assert_trajectories(got, want, rtol=2e-5, atol=1e-6)
  # With epsilon left as it is, the two differ by epsilon's effect only.
  plain_eps = trajectory(optax.adam(LAM * 0.01, eps=eps, eps_root=eps_root),
                         params)
  with pytest.raises(AssertionError):
    assert_trajectories(got, plain_eps, rtol=2e-5, atol=1e-6)


def test_adam_with_the_usual_epsilon_is_approximately_lam_times_the_rate():
  params = mlp_params()
  want = trajectory(optax.adam(LAM * 0.01), params)
  got = trajectory(uniform(optax.adam(0.01)), params)
  assert_trajectories(got, want, rtol=1e-4, atol=1e-5)


def test_decoupled_weight_decay_is_divided_by_lam():
  # The decay of theta per step, lr * wd * theta, is what it was: in the
  # equivalent adamw with rate lam * lr, the coefficient is wd / lam.
  params = mlp_params()
  wd = 0.5
  want = trajectory(optax.adamw(LAM * 0.01, eps=1e-3 / LAM,
                                weight_decay=wd / LAM), params)
  got = trajectory(uniform(optax.adamw(0.01, eps=1e-3, weight_decay=wd)),
                   params)
  assert_trajectories(got, want, rtol=2e-5, atol=1e-6)


def test_clipping_outside_sees_theta_and_inside_sees_phi():
  params = mlp_params()
  c = 0.05  # small enough to clip every step
  sgd = optax.sgd(0.05, 0.9)
  outside = optax.chain(optax.clip_by_global_norm(c), uniform(sgd))
  want = trajectory(optax.chain(optax.clip_by_global_norm(c),
                                optax.sgd(LAM**2 * 0.05, 0.9)), params)
  assert_trajectories(trajectory(outside, params), want, rtol=2e-5,
                      atol=1e-6)
  # Inside, the threshold bounds lam * g: it is c / lam on the gradients.
  inside = uniform(optax.chain(optax.clip_by_global_norm(c), sgd))
  want = trajectory(optax.chain(optax.clip_by_global_norm(c / LAM),
                                optax.sgd(LAM**2 * 0.05, 0.9)), params)
  assert_trajectories(trajectory(inside, params), want, rtol=2e-5, atol=1e-6)


def _by_name(name, lr):
  """An optax optimizer by its name, with a small epsilon and no decoupled
  weight decay (which the equivalent multiplier leaves to the user to divide
  by lam: tested above)."""
  if name in ("sgd", "momentum", "nesterov"):
    return optax.sgd(lr, momentum=None if name == "sgd" else 0.9,
                     nesterov=name == "nesterov")
  if name == "yogi":
    return optax.chain(
        optax.scale_by_yogi(eps=1e-12, initial_accumulator_value=1e-30),
        optax.scale_by_learning_rate(lr))
  factory = getattr(optax, name)
  if name == "lion":
    return factory(lr, weight_decay=0.0)
  if name in ("adamw", "nadamw"):
    return factory(lr, eps=1e-12, weight_decay=0.0)
  if name == "rmsprop":
    return factory(lr, eps=1e-16)
  if name == "adagrad":
    return factory(lr, eps=1e-12, initial_accumulator_value=1e-12)
  return factory(lr, eps=1e-12)


FAMILIES = sorted(lw.reparam._FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_equivalent_multipliers_match_the_wrapper(name):
  # Per-leaf scales, one optimizer: the plain multipliers the helper gives
  # train as the wrapper does (epsilon made negligible).
  params = mlp_params()
  lr = 0.003 if name == "lion" else 0.01
  opt = _by_name(name, lr)
  want = trajectory(lw.reparameterize(opt, POW2), params, steps=10)
  rules = lw.equivalent_multipliers(POW2, name)
  got = trajectory(optax.chain(opt, lw.scale_by_rules(rules)), params,
                   steps=10)
  assert_trajectories(got, want, rtol=1e-4, atol=1e-6)
  # And the reverse form gives the wrapper back.
  assert lw.equivalent_scales(rules, name) == pytest.approx(POW2)


def test_equivalent_values_by_hand():
  assert lw.equivalent_multipliers(0.5, "sgd") == 0.25
  assert lw.equivalent_multipliers(0.5, "nesterov") == 0.25
  assert lw.equivalent_multipliers(0.5, "AdamW") == 0.5
  assert lw.equivalent_scales(0.09, "momentum") == pytest.approx(0.3)
  pairs = [("a/**", 2.0), (lw.ndim_at_most(1), 3.0)]
  got = lw.equivalent_multipliers(pairs, "sgd")
  assert [v for _, v in got] == [4.0, 9.0]
  assert got[1][0] is pairs[1][0]


@pytest.mark.parametrize("name", ["adafactor", "lamb", "lars", "radam"])
def test_no_equivalent_multiplier(name):
  with pytest.raises(ValueError, match="lw.reparameterize"):
    lw.equivalent_multipliers(0.5, name)
  with pytest.raises(ValueError, match="no per-layer multiplier"):
    lw.equivalent_scales(0.5, name)


def test_radam_really_has_no_multiplier():
  # Its first steps are momentum SGD: the wrapper moves by lam**2, not lam.
  params = mlp_params()
  g = jax.grad(loss)(params)
  got, _ = uniform(optax.radam(0.01)).update(
      g, uniform(optax.radam(0.01)).init(params), params)
  plain, _ = optax.radam(0.01).update(g, optax.radam(0.01).init(params),
                                      params)
  np.testing.assert_allclose(got["head"]["kernel"],
                             LAM**2 * plain["head"]["kernel"], rtol=1e-5)


def test_equivalent_errors():
  with pytest.raises(ValueError, match="unknown optimizer 'adma'"):
    lw.equivalent_multipliers(0.5, "adma")
  with pytest.raises(TypeError, match="name of an optax optimizer"):
    lw.equivalent_multipliers(0.5, optax.adam(0.1))
  with pytest.raises(ValueError, match="lw.freeze"):
    lw.equivalent_scales({"**": 0.0}, "sgd")
  with pytest.raises(TypeError, match="must be a number"):
    lw.equivalent_scales({"**": optax.linear_schedule(0.0, 1.0, 10)}, "sgd")
  with pytest.raises(ValueError, match="finite and > 0"):
    lw.equivalent_multipliers(-1.0, "sgd")


# ---------------------------------------------------- the wrapper in optax


def test_describe_shows_lam_inside_a_chain():
  params = mlp_params()
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      lw.reparameterize(optax.chain(optax.adam(0.01),
                                    lw.scale_by_rules({"head/**": 2.0,
                                                       "**": 1.0})),
                        POW2))
  d = lw.describe(tx, params)
  assert d.columns[4:] == ("lam", "scale", "state_bytes")
  rows = {r["path"]: r for r in d.rows}
  assert rows["layers_0/kernel"]["lam"] == 0.25
  assert rows["layers_1/bias"]["lam"] == 4.0
  assert rows["layers_1/bias"]["lam_rule"] == "'layers_1/**'"
  assert rows["head/kernel"]["scale"] == 2.0
  # Adam's two moments, in phi-space, are still per parameter (the
  # multiplier is an entry of scale_by_rules' vector, held by no one leaf).
  assert rows["layers_0/kernel"]["state_bytes"] == 2 * 6 * 8 * 4


def test_inner_state_is_in_phi_space():
  params = mlp_params()
  g = jax.grad(loss)(params)
  tx = lw.reparameterize(optax.adam(0.01), POW2)
  _, state = tx.update(g, tx.init(params), params)
  mu = state.inner_state[0].mu
  np.testing.assert_allclose(mu["layers_1"]["kernel"],
                             0.1 * 4.0 * g["layers_1"]["kernel"], rtol=1e-6)


def needs_value():
  """A transformation that multiplies the updates by an extra arg."""

  def update_fn(updates, state, params=None, *, value, **extra):
    del params, extra
    return jax.tree.map(lambda u: u * value, updates), state

  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                               update_fn)


def test_extra_args_reach_the_inner_optimizer():
  params = {"w": jnp.ones(2)}
  tx = lw.reparameterize(optax.chain(needs_value(), optax.sgd(1.0)),
                         {"w": 0.5})
  u, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params, value=3.0)
  np.testing.assert_allclose(u["w"], -3.0 * 0.25)
  # and the wrapper ignores extra args the inner optimizer ignores
  tx = lw.reparameterize(optax.sgd(1.0), {"w": 0.5})
  u, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params, value=3.0)
  np.testing.assert_allclose(u["w"], -0.25)


def test_composes_with_multisteps_apply_if_finite_and_inject_hyperparams():
  params = mlp_params()
  # inject_hyperparams inside: the rate is in the state, still lam * lr.
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
  want = trajectory(optax.sgd(LAM**2 * 0.05), params, steps=3)
  got = trajectory(uniform(inner), params, steps=3)
  assert_trajectories(got, want, rtol=2e-5, atol=1e-6)
  # MultiSteps outside and inside: every second step applies the mean.
  for tx in (optax.MultiSteps(uniform(optax.sgd(0.05)), 2),
             uniform(optax.MultiSteps(optax.sgd(0.05), 2))):
    state = tx.init(params)
    g = jax.grad(loss)(params)
    u1, state = tx.update(g, state, params)
    u2, state = tx.update(g, state, params)
    assert float(jnp.abs(u1["head"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(u2["head"]["kernel"],
                               -LAM**2 * 0.05 * g["head"]["kernel"],
                               rtol=1e-5)
  # apply_if_finite: a NaN step is skipped, the inner state kept.
  tx = optax.apply_if_finite(uniform(optax.adam(0.01)), 3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, jax.grad(loss)(params))
  u, new_state = tx.update(bad, state, params)
  assert float(jnp.abs(u["head"]["kernel"]).max()) == 0.0
  assert jax.tree.all(jax.tree.map(
      lambda a, b: bool(jnp.array_equal(a, b)), new_state.inner_state,
      state.inner_state))


def test_dtypes_are_kept_and_there_is_no_retrace():
  params = mlp_params(dtype=jnp.bfloat16)
  tx = lw.reparameterize(optax.adam(0.01), GENERIC)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, u

  state = tx.init(params)
  for _ in range(3):
    params, state, u = step(params, state)
  assert len(traces) == 1
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert state.inner_state[0].mu["head"]["kernel"].dtype == jnp.bfloat16


def test_abstract_init():
  params = mlp_params()
  tx = lw.reparameterize(optax.adamw(0.01), GENERIC)
  abstract = jax.eval_shape(tx.init, params)
  assert abstract.rules.values == tuple(
      jax.tree.leaves(lam_tree(GENERIC, params)))
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       params)
  state = tx.init(specs)  # init on ShapeDtypeStructs directly
  assert state.rules.kind == "lam"


def test_without_params_the_inner_optimizer_gets_none():
  params = {"w": jnp.ones(2)}
  tx = lw.reparameterize(optax.sgd(1.0), {"w": 2.0})
  u, _ = tx.update({"w": jnp.ones(2)}, tx.init(params))
  np.testing.assert_allclose(u["w"], -4.0)
  tx = lw.reparameterize(optax.adamw(1.0), {"w": 2.0})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(2)}, tx.init(params))


def test_inside_partition_and_with_freeze():
  params = mlp_params()
  tx = lw.partition({"head/**": lw.reparameterize(optax.sgd(0.05),
                                                  {"head/kernel": 0.5,
                                                   "head/bias": 1.0}),
                     "**": optax.sgd(0.05)})
  g = jax.grad(loss)(params)
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(u["head"]["kernel"],
                             -0.25 * 0.05 * g["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(u["layers_0"]["kernel"],
                             -0.05 * g["layers_0"]["kernel"], rtol=1e-6)
  tx = lw.freeze(lw.reparameterize(optax.sgd(0.05), {"**": 2.0}),
                 "layers_*/**")
  u, state = tx.update(g, tx.init(params), params)
  assert float(jnp.abs(u["layers_0"]["kernel"]).max()) == 0.0
  np.testing.assert_allclose(u["head"]["bias"], -4 * 0.05 * g["head"]["bias"],
                             rtol=1e-6)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("value,error,match", [
    (0.0, ValueError, "lw.freeze"),
    (-1.0, ValueError, "finite and > 0"),
    (math.inf, ValueError, "finite and > 0"),
    (math.nan, ValueError, "finite and > 0"),
    (True, TypeError, "must be a number"),
    ("0.5", TypeError, "must be a number"),
    (optax.linear_schedule(0.1, 1.0, 10), TypeError, "scale_by_rules"),
])
def test_bad_scales(value, error, match):
  with pytest.raises(error, match=match) as e:
    lw.reparameterize(optax.sgd(0.1), {"head/**": value, "**": 1.0})
  assert "'head/**'" in str(e.value)
  with pytest.raises(error, match=match):
    lw.reparameterize(optax.sgd(0.1), {"head/**": 1.0}, default=value)


def test_bad_inner_and_rules():
  with pytest.raises(TypeError, match="optax transformation"):
    lw.reparameterize(optax.sgd, {"**": 1.0})
  with pytest.raises(TypeError, match="Rules must be a mapping"):
    lw.reparameterize(optax.sgd(0.1), 0.5)
  params = mlp_params()
  with pytest.raises(lw.RuleError, match="match no rule"):
    lw.reparameterize(optax.sgd(0.1), {"head/**": 0.5}).init(params)
  with pytest.raises(lw.RuleError, match="closest: 'head/"):
    lw.reparameterize(optax.sgd(0.1), {"haed/**": 0.5, "**": 1.0}).init(
        params)


def test_integer_leaves_and_structure_changes():
  params = {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match="'step' has dtype int32"):
    lw.reparameterize(optax.sgd(0.1), {"**": 2.0}).init(params)
  # lam = 1 on an integer leaf is fine (it is left alone)
  lw.reparameterize(optax.sgd(0.1), {"w": 2.0, "step": 1.0}).init(params)
  tx = lw.reparameterize(optax.sgd(0.1), {"**": 2.0})
  state = tx.init({"w": jnp.ones(2), "v": jnp.ones(2)})
  with pytest.raises(ValueError, match="structure of the params"):
    tx.update({"w": jnp.ones(2), "u": jnp.ones(2)}, state)


# -------------------------------------------------------------------- muP


def mup_mlp(width, fan_in=16, out=4, hidden_out=None):
  hidden_out = width if hidden_out is None else hidden_out
  return {"in": {"kernel": jnp.zeros((fan_in, width)),
                 "bias": jnp.zeros(width)},
          "hidden": {"kernel": jnp.zeros((width, hidden_out)),
                     "bias": jnp.zeros(hidden_out)},
          "norm": {"scale": jnp.zeros(hidden_out)},
          "head": {"kernel": jnp.zeros((hidden_out, out)),
                   "bias": jnp.zeros(out)}}


def test_mup_adam_and_sgd_tables():
  # microsoft/mup's MuAdam and MuSGD on the same shapes: hidden weights
  # (two width dims) 1/fan_in_mult for Adam, fan_out/fan_in for SGD;
  # vector-like (one width dim: input weights, biases, norms, output
  # weights) 1 for Adam, their width multiplier for SGD; fixed: 1.
  base, target = mup_mlp(32), mup_mlp(128, hidden_out=64)  # in x4, out x2
  adam = lw.resolve(lw.mup_scales(base, target, "adam"), target)
  assert adam == {"in": {"kernel": 1.0, "bias": 1.0},
                  "hidden": {"kernel": 0.25, "bias": 1.0},
                  "norm": {"scale": 1.0},
                  "head": {"kernel": 1.0, "bias": 1.0}}
  sgd = lw.resolve(lw.mup_scales(base, target, "sgd"), target)
  assert sgd == {"in": {"kernel": 4.0, "bias": 4.0},
                 "hidden": {"kernel": 0.5, "bias": 2.0},
                 "norm": {"scale": 2.0},
                 "head": {"kernel": 2.0, "bias": 1.0}}
  # The PyTorch layout (out, in) reads the other dimension as fan-in.
  torch_layout = jax.tree.map(lambda x: x.T, target)
  torch_base = jax.tree.map(lambda x: x.T, base)
  flipped = lw.resolve(lw.mup_scales(torch_base, torch_layout, "adam",
                                     layout="out_in"), torch_layout)
  assert flipped["hidden"]["kernel"] == 0.25
  assert lw.resolve(lw.mup_scales(torch_base, torch_layout, "adam"),
                    torch_layout)["hidden"]["kernel"] == 0.5


def test_mup_rules_are_a_strict_rule_set_and_describe_names_them():
  base, target = mup_mlp(32), mup_mlp(128)
  rules = lw.mup_scales(base, target, "adamw")
  d = lw.describe(rules, target)
  rule_of = {r["path"]: r["rule"] for r in d.rows}
  assert rule_of["hidden/kernel"] == "muP hidden (x0.25)"
  assert rule_of["head/bias"] == "muP fixed (x1)"
  assert rule_of["in/kernel"] == "muP vector-like (x1)"
  # The same width: every multiplier is 1.
  same = lw.resolve(lw.mup_scales(base, base), base)
  assert set(jax.tree.leaves(same)) == {1.0}
  # Abstract trees work.
  abstract = jax.eval_shape(lambda: mup_mlp(128))
  assert lw.resolve(lw.mup_scales(jax.eval_shape(lambda: base), abstract),
                    abstract)["hidden"]["kernel"] == 0.25


def test_mup_on_the_linen_cnn(linen_variables):
  # Channels x2: conv kernels (3, 3, in, out) between hidden channels are
  # hidden weights; conv1's input has 1 channel, so it is vector-like.
  from conftest import LinenCNN

  base = linen_variables["params"]
  wide = jax.eval_shape(LinenCNN(widths=(16, 32, 64)).init,
                        jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))["params"]
  m = lw.resolve(lw.mup_scales(base, wide, "adam"), wide)
  assert m["conv2"]["kernel"] == 0.5
  assert m["conv1"]["kernel"] == 1.0
  assert m["dense"]["kernel"] == 0.5  # (8*8*16, 32) -> (8*8*32, 64)
  assert m["head"]["kernel"] == 1.0


def test_mup_override_and_errors():
  base, target = mup_mlp(32), mup_mlp(128)
  rules = lw.mup_scales(base, target, override={"head/kernel": 0.5})
  assert rules[0] == ("head/kernel", 0.5)
  assert lw.resolve(rules, target)["head"]["kernel"] == 0.5
  with pytest.raises(lw.RuleError, match="match no parameter"):
    lw.mup_scales(base, target, override={"haed/kernel": 0.5})
  with pytest.raises(ValueError, match="finite and > 0"):
    lw.mup_scales(base, target, override={"head/kernel": 0.0})
  # Three width dimensions: an error that names the leaf and the way out.
  b3 = {"attn": jnp.zeros((8, 2, 4)), "b": jnp.zeros(8)}
  t3 = {"attn": jnp.zeros((16, 4, 8)), "b": jnp.zeros(16)}
  with pytest.raises(ValueError, match=r"'attn'.*override=\{'attn'"):
    lw.mup_scales(b3, t3)
  assert lw.resolve(lw.mup_scales(b3, t3, override={"attn": 0.125}),
                    t3) == {"attn": 0.125, "b": 1.0}
  with pytest.raises(ValueError, match="Not in the base model: \\['extra'\\]"):
    lw.mup_scales(base, {**target, "extra": jnp.zeros(3)})
  with pytest.raises(ValueError, match="same number of dimensions"):
    lw.mup_scales({"w": jnp.zeros((4, 4))}, {"w": jnp.zeros(16)})
  with pytest.raises(ValueError, match="non-zero sizes"):
    lw.mup_scales({"w": jnp.zeros((0, 4))}, {"w": jnp.zeros((4, 4))})
  with pytest.raises(ValueError, match="'adam', 'adamw' or 'sgd'"):
    lw.mup_scales(base, target, "lion")
  with pytest.raises(ValueError, match="layout must be"):
    lw.mup_scales(base, target, layout="io")


# The coordinate check of Tensor Programs V (Fig. 5) on a 3-layer MLP: after
# a few Adam steps at a fixed rate, how much do the activations of each layer
# move, per coordinate, as the width grows? Under the standard
# parametrization (SP) the hidden layer's and the output's changes grow with
# width, so the best rate shrinks; under muP they stay put, and so does the
# best rate.

D_IN, D_OUT, BASE = 16, 4, 32


def coord_params(width, zero_head):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  lecun = jax.nn.initializers.lecun_normal()
  head = (jnp.zeros((width, D_OUT)) if zero_head
          else lecun(keys[2], (width, D_OUT)))
  return {"in": {"kernel": lecun(keys[0], (D_IN, width)),
                 "bias": jnp.zeros(width)},
          "hidden": {"kernel": lecun(keys[1], (width, width)),
                     "bias": jnp.zeros(width)},
          "head": {"kernel": head, "bias": jnp.zeros(D_OUT)}}


def coord_activations(p, x):
  h1 = jax.nn.relu(x @ p["in"]["kernel"] + p["in"]["bias"])
  h2 = jax.nn.relu(h1 @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  return h1, h2, h2 @ p["head"]["kernel"] + p["head"]["bias"]


def coordinate_changes(width, mup, lr=1e-3, steps=2):
  x = jax.random.normal(jax.random.PRNGKey(1), (64, D_IN))
  y = jax.random.normal(jax.random.PRNGKey(2), (64, D_OUT))
  p0 = coord_params(width, zero_head=mup)
  if mup:
    base = jax.eval_shape(lambda: coord_params(BASE, True))
    # MuReadout's 1/width_mult on the logits, as a reparameterization of
    # the ordinary head (zero-initialised, so no change to its init).
    tx = lw.reparameterize(
        optax.chain(optax.adam(lr), lw.scale_by_rules(lw.mup_scales(base,
                                                                    p0))),
        {"head/kernel": BASE / width, "**": 1.0})
  else:
    tx = optax.adam(lr)

  def loss_fn(p):
    return jnp.mean((coord_activations(p, x)[2] - y)**2)

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss_fn)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, steps)
    return [jnp.sqrt(jnp.mean((a - b)**2))
            for a, b in zip(coord_activations(p0, x), coord_activations(p, x))]

  return np.asarray(run(p0))


def test_mup_coordinate_check():
  widths = [32, 128, 512]  # 4x and 16x the base
  sp = np.stack([coordinate_changes(w, mup=False) for w in widths])
  mup = np.stack([coordinate_changes(w, mup=True) for w in widths])
  # muP: every layer's change is the same at every width, within 25%
  # (measured: within 10%).
  assert (mup.max(0) / mup.min(0) < 1.25).all(), mup
  # SP: the hidden layer's and the output's changes grow with width
  # (measured over 16x: 8x and 24x).
  assert sp[-1, 1] / sp[0, 1] > 4, sp
  assert sp[-1, 2] / sp[0, 2] > 8, sp
