"""reparameterize and mup_scales on stacked (scanned) layers.

Two references, as for every stacked transformation:

* a model that really is reparameterized: its loss is written in ``phi``
  (``theta = lam * phi``, with one ``lam`` per layer broadcast along the
  layer axis, built by hand) and plain optax optimizes ``phi``;
* the unrolled twin: the same model with one subtree per layer (its params
  are the slices of the stacked ones, paths ``layers/3/...``), given the
  same rules without stacks.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

L = 4
D = 8
STACKS = {"layers": 0}


def stacked_params(seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {
      "embed": {"kernel": (jax.random.normal(k[0], (6, D)) / math.sqrt(6)
                           ).astype(dtype)},
      "layers": {
          "kernel": (jax.random.normal(k[1], (L, D, D)) / math.sqrt(D)
                     ).astype(dtype),
          "bias": (0.1 * jax.random.normal(k[2], (L, D))).astype(dtype),
      },
      "head": {"kernel": (jax.random.normal(k[3], (D, 3)) / math.sqrt(D)
                          ).astype(dtype),
               "bias": (0.1 * jax.random.normal(k[4], (3,))).astype(dtype)},
  }


def unrolled(params):
  """The unrolled twin: one subtree per layer, the slices of the stack."""
  return {"embed": params["embed"],
          "layers": [{"kernel": params["layers"]["kernel"][i],
                      "bias": params["layers"]["bias"][i]} for i in range(L)],
          "head": params["head"]}


def layer(params, i):
  """Layer ``i``'s kernel and bias, from either form."""
  p = params["layers"]
  if isinstance(p, list):
    return p[i]["kernel"], p[i]["bias"]
  return p["kernel"][i], p["bias"][i]


def forward(params, x):
  h = jnp.tanh(x @ params["embed"]["kernel"])
  for i in range(L):
    kernel, bias = layer(params, i)
    h = jnp.tanh(h @ kernel + bias)
  return h @ params["head"]["kernel"] + params["head"]["bias"]


X = jax.random.normal(jax.random.PRNGKey(7), (16, 6))
Y = jax.random.normal(jax.random.PRNGKey(8), (16, 3))


def loss(params):
  dtype = params["head"]["kernel"].dtype
  return jnp.mean((forward(params, X.astype(dtype)) - Y.astype(dtype)) ** 2)


#: Per-layer scales that are powers of two (no rounding in lam * g or
#: theta / lam), and scales that are not.
POW2 = {"embed/**": 2.0, "layers/0/**": 0.25, "layers/1/kernel": 4.0,
        "layers/1/bias": 2.0, "layers/3/**": 0.5, "**": 1.0}
GENERIC = {"embed/**": 1.3, "layers/0/**": 0.3, "layers/1/kernel": 3.1,
           "layers/1/bias": 1.7, "layers/3/**": 0.45, "**": 1.0}


def lam_by_hand(scales):
  """The stacked model's ``lam`` tree, written out: one entry per layer,
  broadcast along axis 0."""
  first = scales["layers/0/**"]
  kernel = np.array([first, scales["layers/1/kernel"], 1.0,
                     scales["layers/3/**"]])
  bias = np.array([first, scales["layers/1/bias"], 1.0,
                   scales["layers/3/**"]])
  return {"embed": {"kernel": scales["embed/**"]},
          "layers": {"kernel": kernel[:, None, None], "bias": bias[:, None]},
          "head": {"kernel": 1.0, "bias": 1.0}}


def float32_matmuls():
  return jax.default_matmul_precision("float32")


def trajectory(tx, params, steps=10, loss_fn=loss):
  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, u

  state = tx.init(params)
  out = []
  for _ in range(steps):
    with float32_matmuls():
      params, state, u = step(params, state)
    out.append((params, u))
  return out


def reference(opt, scales, params, steps=10):
  """theta_t of the stacked model written in phi, optimized by plain optax."""
  lam = lam_by_hand(scales)

  def to_theta(phi):
    return jax.tree.map(lambda p, l: p * jnp.asarray(l, p.dtype), phi, lam)

  phi = jax.tree.map(lambda p, l: p / jnp.asarray(l, p.dtype), params, lam)
  return [to_theta(p) for p, _ in trajectory(
      opt, phi, steps, loss_fn=lambda phi: loss(to_theta(phi)))]


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(0.01),
    "lion": lambda: optax.lion(0.003, weight_decay=0.1),
}

ON_CPU = jax.default_backend() == "cpu"


def assert_close(a, b, rtol, atol, what=""):
  for path, u, v in zip(jax.tree.leaves(lw.paths(a)), jax.tree.leaves(a),
                        jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u, np.float64),
                               np.asarray(v, np.float64), rtol=rtol,
                               atol=atol, err_msg=f"{what} {path}")


# ------------------------------------------------------------ reparameterize


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_per_layer_scales_against_a_reparameterized_stacked_model(name):
  params = stacked_params()
  opt = OPTIMIZERS[name]()
  got = trajectory(lw.reparameterize(opt, POW2, stacks=STACKS), params)
  want = reference(opt, POW2, params)
  tol = 1e-6 if ON_CPU else (2e-3 if name in ("lion", "rmsprop") else 2e-5)
  for t, ((p, _), q) in enumerate(zip(got, want)):
    assert_close(p, q, rtol=tol, atol=tol / 10, what=f"step {t + 1}")


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("scales", [POW2, GENERIC], ids=["pow2", "generic"])
def test_stacked_trains_like_the_unrolled_twin(name, scales):
  # The same rule set, unchanged, on the stacked model and on its unrolled
  # twin: params and updates agree at every step (any scales: each layer's
  # lam rounds the same way as the number it is on the twin).
  params = stacked_params()
  opt = OPTIMIZERS[name]()
  got = trajectory(lw.reparameterize(opt, scales, stacks=STACKS), params)
  want = trajectory(lw.reparameterize(opt, scales), unrolled(params))
  # Off the CPU, XLA may fuse the stacked and the unrolled programs
  # differently: float32 rounding, amplified by 10 steps (more by lion's
  # sign and rmsprop's g / sqrt(v)).
  tol = 1e-6 if ON_CPU else (2e-3 if name in ("lion", "rmsprop") else 2e-5)
  for t, ((p, u), (q, v)) in enumerate(zip(got, want)):
    assert_close(unrolled(p), q, rtol=tol, atol=tol, what=f"step {t + 1}")
    assert_close(unrolled(u), v, rtol=tol, atol=tol, what=f"step {t + 1}")


def test_the_per_layer_scales_matter():
  # The reference is sensitive: the same scales for every layer (those of
  # layer 0) train the stack far from the per-layer ones.
  params = stacked_params()
  opt = optax.adam(0.01)
  per_layer = trajectory(lw.reparameterize(opt, POW2, stacks=STACKS), params)
  same = trajectory(lw.reparameterize(opt, {"layers/**": 0.25, "**": 1.0},
                                      stacks=STACKS), params)
  diff = np.abs(np.asarray(per_layer[-1][0]["layers"]["kernel"][1])
                - np.asarray(same[-1][0]["layers"]["kernel"][1]))
  assert diff.max() > 0.05


def test_first_update_by_hand_and_the_inner_state_in_phi_space():
  # sgd: u = -lr * lam**2 * g per layer; the inner momentum holds lam * g.
  params = {"layers": {"w": jnp.ones((3, 2))}}
  grads = {"layers": {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}}
  scales = {"layers/0/**": 0.5, "layers/1/**": 2.0, "layers/2/**": 1.0}
  tx = lw.reparameterize(optax.sgd(0.1, momentum=0.9), scales, stacks=STACKS)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(grads, state, params)
  lam = np.array([0.5, 2.0, 1.0])[:, None]
  np.testing.assert_allclose(u["layers"]["w"],
                             -0.1 * lam**2 * np.asarray(grads["layers"]["w"]),
                             rtol=1e-6)
  trace = state.inner_state[0].trace["layers"]["w"]
  np.testing.assert_allclose(trace, lam * np.asarray(grads["layers"]["w"]),
                             rtol=1e-6)
  assert state.rules.paths == ("layers/0/w", "layers/1/w", "layers/2/w")
  assert state.rules.values == (0.5, 2.0, 1.0)


def test_layer_axis_one():
  # MaxText's layout: the layers on axis 1, (d, L, d).
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  params = {"layers": {"w": jax.random.normal(k[0], (2, 3, 5))}}
  grads = {"layers": {"w": jax.random.normal(k[1], (2, 3, 5))}}
  scales = {"layers/0/**": 0.3, "layers/1/**": 1.0, "layers/2/**": 2.5}
  tx = lw.reparameterize(optax.adam(0.1), scales, stacks={"layers": 1})
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  twin = {"layers": [{"w": params["layers"]["w"][:, i]} for i in range(3)]}
  twin_g = {"layers": [{"w": grads["layers"]["w"][:, i]} for i in range(3)]}
  ref = lw.reparameterize(optax.adam(0.1), scales)
  v, _ = jax.jit(ref.update)(twin_g, ref.init(twin), twin)
  for i in range(3):
    np.testing.assert_allclose(u["layers"]["w"][:, i], v["layers"][i]["w"],
                               rtol=1e-6, atol=1e-7)


def test_bfloat16_is_kept_and_rounds_like_the_twin():
  params = stacked_params(dtype=jnp.bfloat16)
  grads = jax.tree.map(lambda x: jnp.sin(x * 3).astype(x.dtype), params)
  tx = lw.reparameterize(optax.sgd(0.1), GENERIC, stacks=STACKS)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref = lw.reparameterize(optax.sgd(0.1), GENERIC)
  v, _ = jax.jit(ref.update)(unrolled(grads), ref.init(unrolled(params)),
                             unrolled(params))
  assert u["layers"]["kernel"].dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(unrolled(u)), jax.tree.leaves(v)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_all_ones_is_the_bare_optimizer_and_equal_layers_are_one_number():
  params = stacked_params()
  opt = optax.adamw(0.01, weight_decay=0.1)
  ones = trajectory(lw.reparameterize(opt, {"**": 1.0}, stacks=STACKS), params)
  bare = trajectory(opt, params)
  for (p, _), (q, _) in zip(ones, bare):
    assert_close(p, q, rtol=0, atol=0)
  # One lam for every layer of a stack is one number, as on a plain leaf:
  # the stacked model then trains as without stacks, to the last bit.
  same = {"layers/**": 0.5, "**": 1.0}
  a = trajectory(lw.reparameterize(opt, same, stacks=STACKS), params)
  b = trajectory(lw.reparameterize(opt, same, stacks={}), params)
  for (p, _), (q, _) in zip(a, b):
    assert_close(p, q, rtol=0, atol=0)


def test_abstract_init_and_no_retrace():
  params = stacked_params()
  tx = lw.reparameterize(optax.adam(0.01), GENERIC, stacks=STACKS)
  abstract = jax.eval_shape(tx.init, params)
  assert abstract.rules.paths == (
      "embed/kernel", "head/bias", "head/kernel",
      *(f"layers/{i}/bias" for i in range(L)),
      *(f"layers/{i}/kernel" for i in range(L)))
  assert abstract.rules.values[3:7] == (0.3, 1.7, 1.0, 0.45)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  state = tx.init(params)
  for _ in range(3):
    _, state = step(params, state, params)
  assert len(traces) == 1


def test_integer_layer_error_names_the_layer():
  params = {"layers": {"w": jnp.ones((2, 3)),
                       "count": jnp.zeros((2,), jnp.int32)}}
  tx = lw.reparameterize(optax.sgd(0.1), {"layers/1/**": 2.0, "**": 1.0},
                         stacks=STACKS)
  with pytest.raises(TypeError, match="'layers/1/count'"):
    tx.init(params)


# ------------------------------------------------------------------ mup


def mup_stacked(width, layers=L, axis=0, fan_in=16, out=4):
  kernel = (layers, width, width) if axis == 0 else (width, layers, width)
  return {"in": {"kernel": jnp.zeros((fan_in, width))},
          "layers": {"kernel": jnp.zeros(kernel),
                     "bias": jnp.zeros((layers, width) if axis == 0
                                       else (width, layers))},
          "head": {"kernel": jnp.zeros((width, out)),
                   "bias": jnp.zeros(out)}}


def mup_unrolled(width, layers=L, fan_in=16, out=4):
  return {"in": {"kernel": jnp.zeros((fan_in, width))},
          "layers": [{"kernel": jnp.zeros((width, width)),
                      "bias": jnp.zeros(width)} for _ in range(layers)],
          "head": {"kernel": jnp.zeros((width, out)),
                   "bias": jnp.zeros(out)}}


def as_table(rules):
  """A rule set from mup_scales as comparable data."""
  return [(getattr(s, "text", s), sorted(getattr(s, "paths", ()) or ()), v)
          for s, v in rules]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_mup_stacked_equals_the_unrolled_twin(optimizer):
  got = lw.mup_scales(mup_stacked(32), mup_stacked(128), optimizer,
                      stacks=STACKS)
  want = lw.mup_scales(mup_unrolled(32), mup_unrolled(128), optimizer)
  assert as_table(got) == as_table(want)
  # Each layer's (128, 128) kernel is a hidden matrix with fan-in x4 (never
  # L, nor L * in): Adam 1/4, SGD fan_out/fan_in = 1; its bias vector-like.
  m = lw.resolve(got, mup_stacked(128), stacks=STACKS)
  hidden, bias = (0.25, 1.0) if optimizer == "adam" else (1.0, 4.0)
  assert m["layers"] == {"kernel": (hidden,) * L, "bias": (bias,) * L}


def test_mup_fan_in_of_a_stacked_kernel_by_hand():
  # (L, in, out): in x4, out x2 -> Adam 1 / 4, SGD 2 / 4. On axis 1 (MaxText,
  # (in, L, out)) the same. The PyTorch layout (L, out, in) with out_in.
  base = {"layers": {"kernel": jnp.zeros((3, 16, 32))}}
  target = {"layers": {"kernel": jnp.zeros((3, 64, 64))}}
  for opt, want in (("adam", 0.25), ("sgd", 0.5)):
    m = lw.resolve(lw.mup_scales(base, target, opt, stacks=STACKS), target,
                   stacks=STACKS)
    assert m["layers"]["kernel"] == (want,) * 3
  swap = lambda t: jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), t)  # noqa: E731
  m = lw.resolve(lw.mup_scales(swap(base), swap(target), "adam",
                               stacks={"layers": 1}),
                 swap(target), stacks={"layers": 1})
  assert m["layers"]["kernel"] == (0.25,) * 3
  flip = lambda t: jax.tree.map(lambda x: jnp.swapaxes(x, 1, 2), t)  # noqa: E731
  m = lw.resolve(lw.mup_scales(flip(base), flip(target), "adam",
                               layout="out_in", stacks=STACKS),
                 flip(target), stacks=STACKS)
  assert m["layers"]["kernel"] == (0.25,) * 3


def test_mup_rules_train_the_stack_like_the_twin():
  base, target = mup_stacked(8), mup_stacked(32)
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  params = jax.tree.map(
      lambda x, key: jax.random.normal(key, x.shape), target,
      jax.tree.unflatten(jax.tree.structure(target), list(k[:5])))
  grads = jax.tree.map(lambda x: jnp.cos(3 * x), params)
  rules = lw.mup_scales(base, target, "adam", stacks=STACKS)
  tx = optax.chain(optax.adam(0.1), lw.scale_by_rules(rules, stacks=STACKS))
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)

  def twin(t):
    return {"in": t["in"], "head": t["head"],
            "layers": [{"kernel": t["layers"]["kernel"][i],
                        "bias": t["layers"]["bias"][i]} for i in range(L)]}

  twin_rules = lw.mup_scales(twin(base), twin(target), "adam")
  ref = optax.chain(optax.adam(0.1), lw.scale_by_rules(twin_rules))
  v, _ = jax.jit(ref.update)(twin(grads), ref.init(twin(params)),
                             twin(params))
  assert_close(twin(u), v, rtol=1e-6, atol=1e-7)
  # By hand: Adam's first step is -lr * g / (|g| + eps), times muP's 1/4.
  g = np.asarray(grads["layers"]["kernel"], np.float64)
  np.testing.assert_allclose(u["layers"]["kernel"],
                             -0.1 * 0.25 * g / (np.abs(g) + 1e-8), rtol=1e-5)


def test_mup_override_per_layer_and_depth_must_match():
  base, target = mup_stacked(32), mup_stacked(128)
  rules = lw.mup_scales(base, target, override={"layers/0/kernel": 0.5},
                        stacks=STACKS)
  m = lw.resolve(rules, target, stacks=STACKS)
  assert m["layers"]["kernel"] == (0.5, 0.25, 0.25, 0.25)
  with pytest.raises(lw.RuleError, match="match no parameter"):
    lw.mup_scales(base, target, override={"layers/9/kernel": 0.5},
                  stacks=STACKS)
  # A deeper target is not a wider one: its extra layers are not in the base.
  with pytest.raises(ValueError) as e:
    lw.mup_scales(mup_stacked(32, layers=2), target, stacks=STACKS)
  assert "Not in the base model: ['layers/2/bias', 'layers/2/kernel'" in str(
      e.value)
  assert "as many layers in each stack" in str(e.value)
