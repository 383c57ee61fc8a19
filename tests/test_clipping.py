"""Tests for clip_by_rules, the clippers, track_norms, norms and map_updates.

References: optax's own transformations (``optax.clip``,
``optax.clip_by_global_norm``, ``optax.adaptive_grad_clip``) run on the
leaves a rule covers, the TensorFlow/Keras and PyTorch formulas transcribed
to NumPy (``tf.clip_by_norm``, ``clip_grad_norm_``), and step-by-step NumPy
transcriptions of AutoClip and ZClip as the issue states them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

RNG = np.random.default_rng(4)

TREE = {
    "embed": (16, 8),
    "encoder": {"layers": [{"attn": {"kernel": (8, 8), "bias": (8,)},
                            "conv": {"kernel": (3, 3, 4, 8)}}
                           for _ in range(2)]},
    "head": {"kernel": (8, 5), "bias": (5,), "scale": ()},
}


def sample(scale=1.0, dtype=jnp.float32, tree=TREE):
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(RNG.normal(size=s) * scale, dtype), tree,
      is_leaf=lambda x: isinstance(x, tuple))


def np_leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def jit_update(tx):
  return jax.jit(tx.update)


def close(actual, expected, dtype=jnp.float32):
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(
      rtol=1e-5, atol=1e-6)
  for a, e in zip(jax.tree_util.tree_leaves(actual),
                  jax.tree_util.tree_leaves(expected)):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(e, np.float64), **tol)


DTYPES = [jnp.float32, jnp.bfloat16]

# ------------------------------------------------------- fixed thresholds


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_value_is_optax_clip(dtype):
  grads = sample(2.0, dtype)
  tx = lw.clip_by_rules({"**": lw.clip_value(0.5)})
  got, state = jit_update(tx)(grads, tx.init(grads))
  ref, _ = optax.clip(0.5).update(grads, optax.EmptyState())
  close(got, ref, dtype)
  # Norms: each leaf's L2 norm before, and the largest entry's factor.
  n = lw.norms(state)
  g = np.asarray(grads["embed"], np.float64)
  np.testing.assert_allclose(n["clip/embed/norm"], np.linalg.norm(g),
                             rtol=1e-5)
  np.testing.assert_allclose(n["clip/embed/scale"], 0.5 / np.abs(g).max(),
                             rtol=1e-6)
  small = {"w": jnp.array([0.1, -0.2], dtype)}
  _, state = tx.update(small, tx.init(small))
  assert float(lw.norms(state)["clip/w/scale"]) == 1.0


def tf_clip_by_norm(t, c, ord):
  """``tf.clip_by_norm`` (ord 2): ``t * c / max(||t||, c)``, any ord."""
  norm = np.linalg.norm(t.ravel(), ord)
  return t * c / max(norm, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_clip_norm_is_tf_clip_by_norm(dtype, ord):
  grads = sample(1.0, dtype)
  c = 3.0 if ord != math.inf else 1.5
  tx = lw.clip_by_rules({"**": lw.clip_norm(c, ord=ord)})
  got, state = jit_update(tx)(grads, tx.init(grads))
  ref = [tf_clip_by_norm(g, c, ord) for g in np_leaves(grads)]
  close(got, ref, dtype)
  # Some leaves are clipped, some are not (the test covers both branches).
  scales = [float(v) for k, v in lw.norms(state).items()
            if k.endswith("/scale")]
  assert min(scales) < 1.0 and max(scales) == 1.0
  norms = [float(v) for k, v in lw.norms(state).items()
           if k.endswith("/norm")]
  for nrm, scale in zip(norms, scales):
    np.testing.assert_allclose(scale, min(1.0, c / nrm), rtol=1e-6)


def test_clip_norm_string_inf_and_keras_clipnorm():
  # Keras's clipnorm clips each gradient tensor by its own L2 norm.
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.6, 0.8]])}
  tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)})
  got, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(got["a"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(got["b"], [[0.6, 0.8]], rtol=1e-6)
  assert lw.clip_norm(1.0, ord="inf") == lw.clip_norm(1.0, ord=math.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_group_norm_over_everything_is_clip_by_global_norm(dtype):
  grads = sample(1.0, dtype)
  tx = lw.clip_by_rules({"**": lw.clip_group_norm(2.0)})
  got, state = jit_update(tx)(grads, tx.init(grads))
  ref, _ = optax.clip_by_global_norm(2.0).update(
      jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), grads),
      optax.EmptyState())
  close(got, ref, dtype)
  # PyTorch's clip_grad_norm_: coef = min(1, c / (total + 1e-6)).
  total = np.sqrt(sum(np.sum(g**2) for g in np_leaves(grads)))
  torch_ref = [g * min(1.0, 2.0 / (total + 1e-6)) for g in np_leaves(grads)]
  close(got, torch_ref, dtype)
  np.testing.assert_allclose(lw.norms(state)["clip/**/norm"], total,
                             rtol=1e-5 if dtype == jnp.float32 else 1e-6)


def test_each_rule_is_its_own_group():
  grads = sample(1.0)
  tx = lw.clip_by_rules({"encoder/**": lw.clip_group_norm(1.0),
                         "head/**": lw.clip_group_norm(0.5, ord=1),
                         "**": None})
  got, state = jit_update(tx)(grads, tx.init(grads))
  enc, _ = optax.clip_by_global_norm(1.0).update(grads["encoder"], None)
  close(got["encoder"], enc)
  head = np_leaves(grads["head"])
  l1 = sum(np.abs(h).sum() for h in head)
  close(got["head"], [h * 0.5 / max(l1, 0.5) for h in head])
  np.testing.assert_array_equal(got["embed"], grads["embed"])
  assert sorted(lw.norms(state)) == ["clip/encoder/**/norm",
                                     "clip/encoder/**/scale",
                                     "clip/head/**/norm", "clip/head/**/scale"]
  np.testing.assert_allclose(lw.norms(state)["clip/head/**/norm"], l1,
                             rtol=1e-5)


def test_same_clipper_in_two_rules_clips_two_groups():
  c = lw.clip_group_norm(1.0)
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([6.0, 8.0])}
  tx = lw.clip_by_rules({"a": c, "b": c})
  got, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(got["a"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(got["b"], [0.6, 0.8], rtol=1e-6)
  # One group: one rule.
  tx = lw.clip_by_rules({lw.any_of("a", "b"): c})
  got, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(got["a"], np.array([3.0, 4.0]) / np.sqrt(125),
                             rtol=1e-6)


# ---------------------------------------------------------------- adaptive


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_adaptive_is_optax_adaptive_grad_clip(dtype):
  params = sample(1.0, dtype)
  params["head"]["bias"] = jnp.zeros(5, dtype)  # eps takes over
  grads = sample(0.05, dtype)
  tx = lw.clip_by_rules({"head/**": None, "**": lw.clip_adaptive(0.02)})
  got, state = jit_update(tx)(grads, tx.init(params), params)
  body = {k: v for k, v in grads.items() if k != "head"}
  ref, _ = optax.adaptive_grad_clip(0.02).update(
      body, optax.EmptyState(), {k: v for k, v in params.items()
                                 if k != "head"})
  close({k: v for k, v in got.items() if k != "head"}, ref, dtype)
  assert got["head"] is grads["head"] or all(
      (a == b).all() for a, b in zip(jax.tree_util.tree_leaves(got["head"]),
                                     jax.tree_util.tree_leaves(grads["head"])))
  # Something was clipped, and the recorded scale is the norm ratio.
  n = lw.norms(state)
  k = "encoder/layers/0/attn/kernel"
  before = np.linalg.norm(np.asarray(grads["encoder"]["layers"][0]["attn"]
                                     ["kernel"], np.float64))
  after = np.linalg.norm(np.asarray(got["encoder"]["layers"][0]["attn"]
                                    ["kernel"], np.float64))
  assert after < before
  np.testing.assert_allclose(n[f"clip/{k}/scale"], after / before,
                             rtol=1e-4 if dtype == jnp.float32 else 2e-2)


def test_clip_adaptive_units():
  # A 5-D kernel (DHWIO) sums over the first four axes, a (1, n) kernel is
  # a vector, and axis= names the units of other shapes.
  p = jnp.asarray(RNG.normal(size=(2, 2, 2, 3, 4)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(2, 2, 2, 3, 4)), jnp.float32)
  tx = lw.clip_by_rules({"**": lw.clip_adaptive(0.1)})
  got, _ = tx.update({"k": g}, tx.init({"k": p}), {"k": p})
  gn = np.linalg.norm(np.asarray(g).reshape(-1, 4), axis=0)
  pn = np.linalg.norm(np.asarray(p).reshape(-1, 4), axis=0)
  expected = np.where(gn < 0.1 * pn, 1.0, 0.1 * pn / gn) * np.asarray(g)
  np.testing.assert_allclose(got["k"], expected, rtol=1e-5)

  row_p, row_g = jnp.full((1, 4), 1.0), jnp.full((1, 4), 1.0)
  got, _ = tx.update({"k": row_g}, tx.init({"k": row_p}), {"k": row_p})
  np.testing.assert_allclose(got["k"], np.full((1, 4), 0.1), rtol=1e-6)

  p6 = jnp.ones((1, 2, 1, 2, 1, 2))
  with pytest.raises(ValueError, match="axis=...") as e:
    tx.init({"deep": p6})
  assert "'deep'" in str(e.value)
  tx6 = lw.clip_by_rules({"**": lw.clip_adaptive(0.5, axis=(0, 1, 2, 3, 4))})
  got, _ = tx6.update({"deep": p6}, tx6.init({"deep": p6}), {"deep": p6})
  np.testing.assert_allclose(got["deep"], 0.5 * np.ones((1, 2, 1, 2, 1, 2)),
                             rtol=1e-6)


def test_clip_adaptive_needs_params():
  tx = lw.clip_by_rules({"**": lw.clip_adaptive(0.1)})
  grads = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(grads, tx.init(grads))


# --------------------------------------------------- AutoClip and ZClip


def spiky_norms(steps, seed):
  """Lognormal norms drifting down, with spikes of 10-50x (5% of steps)."""
  rng = np.random.default_rng(seed)
  base = np.exp(rng.normal(0.0, 0.3, steps)) * np.linspace(2.0, 0.5, steps)
  spikes = rng.random(steps) < 0.05
  return np.where(spikes, base * rng.uniform(10, 50, steps), base)


def grads_with_norms(norms, seed, dtype=jnp.float32):
  """Two-leaf gradients whose joint L2 norm is each of ``norms``."""
  rng = np.random.default_rng(seed)
  out = []
  for n in norms:
    a, b = rng.normal(size=3), rng.normal(size=(2, 2))
    s = n / np.sqrt(np.sum(a**2) + np.sum(b**2))
    out.append({"a": jnp.asarray(a * s, dtype), "b": jnp.asarray(b * s, dtype)})
  return out


def run_scales(clipper, steps=300, seed=0, dtype=jnp.float32):
  """Runs the clipper over spiky gradients; returns the exact norms of the
  inputs (in float64) and the scales applied, read from the updates and
  checked against the state."""
  grads = grads_with_norms(spiky_norms(steps, seed), seed, dtype)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 outputs round
  tx = lw.clip_by_rules({"**": clipper})
  update = jax.jit(tx.update)
  state = tx.init(grads[0])
  norms, scales = [], []
  for g in grads:
    u, state = update(g, state)
    n_in = np.sqrt(sum(np.sum(x**2) for x in np_leaves(g)))
    n_out = np.sqrt(sum(np.sum(x**2) for x in np_leaves(u)))
    norms.append(n_in)
    scales.append(n_out / n_in)
    assert u["a"].dtype == dtype
    np.testing.assert_allclose(lw.norms(state)["clip/**/scale"], n_out / n_in,
                               rtol=rtol)
    np.testing.assert_allclose(lw.norms(state)["clip/**/norm"], n_in,
                               rtol=1e-5)
  return np.array(norms), np.array(scales), state


def np_autoclip(norms, q, window):
  """AutoClip, step by step: the q-quantile of the last `window` norms."""
  history, scales = [], []
  for g in norms:
    history = (history + [g])[-window:]
    threshold = np.quantile(history, q)
    scales.append(threshold / g if g > threshold else 1.0)
  return np.array(scales)


@pytest.mark.parametrize("q,window", [(0.9, 50), (0.5, 7), (0.1, 300),
                                      (1.0, 10), (0.0, 3)])
def test_clip_quantile_matches_numpy(q, window):
  norms, scales, state = run_scales(lw.clip_quantile(q, window), seed=window)
  expected = np_autoclip(norms, q, window)
  np.testing.assert_allclose(scales, expected, rtol=2e-5)
  if q < 1:
    assert (expected < 1).sum() >= 10  # the spikes were clipped
  (stats,) = state.stats.values()  # one clipper, one group: row 0
  n = min(len(norms), window)
  np.testing.assert_allclose(np.sort(np.asarray(stats["history"][0])[:n]),
                             np.sort(norms[-n:]), rtol=1e-6)
  np.testing.assert_allclose(stats["threshold"][0],
                             np.quantile(norms[-n:], q), rtol=1e-5)


def np_zclip(norms, z, alpha, warmup):
  """ZClip as the issue states it, step by step, in float64."""
  buffer, mean, var, scales = [], None, None, []
  for g in norms:
    if mean is None:
      buffer.append(g)
      scales.append(1.0)
      if len(buffer) == warmup:
        mean = np.mean(buffer)
        var = np.mean((np.array(buffer) - mean) ** 2)
      continue
    std = np.sqrt(var)
    zscore = (g - mean) / (std + 1e-6)
    clipped = mean + z**2 * std / zscore if zscore > z else g
    scales.append(clipped / g)
    mean = alpha * mean + (1 - alpha) * clipped
    var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
  return np.array(scales), mean, var


def test_autoclip_and_zclip_in_bfloat16():
  # The statistics are float32 whatever the gradients: the scales follow
  # the float64 reference computed from the same bf16 gradients.
  norms, scales, _ = run_scales(lw.clip_quantile(0.9, 20), seed=3,
                                dtype=jnp.bfloat16)
  np.testing.assert_allclose(scales, np_autoclip(norms, 0.9, 20), rtol=1e-2)
  norms, scales, _ = run_scales(lw.clip_zscore(), seed=3, dtype=jnp.bfloat16)
  expected = np_zclip(norms, 2.5, 0.97, 25)[0]
  np.testing.assert_allclose(scales, expected, rtol=1e-2)
  assert (expected < 0.9).sum() >= 5


@pytest.mark.parametrize("z,alpha,warmup", [(2.5, 0.97, 25), (1.5, 0.9, 5),
                                            (3.0, 0.99, 1)])
def test_clip_zscore_matches_numpy(z, alpha, warmup):
  norms, scales, state = run_scales(lw.clip_zscore(z, alpha, warmup),
                                    seed=warmup)
  expected, mean, var = np_zclip(norms, z, alpha, warmup)
  np.testing.assert_allclose(scales, expected, rtol=1e-4)
  assert (expected < 0.9).sum() >= 5  # spikes were clipped
  assert (scales[:warmup] == 1.0).all()
  stats = state.stats[lw.clip_zscore(z, alpha, warmup).stats_key()]
  np.testing.assert_allclose(stats["mean"][0], mean, rtol=1e-4)
  np.testing.assert_allclose(stats["var"][0], var, rtol=1e-3)


def test_statistics_skip_non_finite_norms():
  # A NaN gradient passes through as NaN (not hidden) and is not recorded:
  # the next steps clip as if it had never happened.
  for clipper in (lw.clip_quantile(0.5, 4), lw.clip_zscore(2.0, 0.9, 3)):
    tx = lw.clip_by_rules({"**": clipper})
    update = jax.jit(tx.update)
    clean = tx.init({"w": jnp.zeros(2)})
    dirty = clean
    for k, g in enumerate([1.0, 2.0, 1.5, 1.0, 40.0, 1.2]):
      grads = {"w": jnp.array([g, 0.0])}
      u_clean, clean = update(grads, clean)
      if k == 2:
        u_nan, dirty = update({"w": jnp.array([jnp.nan, 1.0])}, dirty)
        assert np.isnan(u_nan["w"][0])
      u_dirty, dirty = update(grads, dirty)
      np.testing.assert_array_equal(u_dirty["w"], u_clean["w"])
    assert float(u_clean["w"][0]) < 40.0  # the spike was clipped


# -------------------------------------------------------------- bad values


CLIPPERS = [lw.clip_value(1.0), lw.clip_norm(1.0), lw.clip_norm(1.0, ord=1),
            lw.clip_norm(1.0, ord="inf"), lw.clip_group_norm(1.0),
            lw.clip_adaptive(0.01), lw.clip_adaptive(0.01, eps=0.0),
            lw.clip_quantile(0.5, 3), lw.clip_zscore(warmup=1)]


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
def test_zero_gradients_and_params_stay_finite(clipper):
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = lw.clip_by_rules({"**": clipper})
  state = tx.init(params)
  shapes = {"w": (3, 2), "b": (2,)}
  for grads in (params, sample(1e-30, tree=shapes), sample(1e15, tree=shapes),
                params):
    u, state = jax.jit(tx.update)(grads, state, params)
    for x in jax.tree_util.tree_leaves((u, lw.norms(state))):
      assert np.isfinite(np.asarray(x)).all(), (clipper, grads)
  # Past ~1e19 the float32 norm overflows to inf: the updates stay finite
  # (scaled to 0, the limit of c / norm) and no norm is NaN.
  u, state = jax.jit(tx.update)(sample(1e20, tree=shapes), state, params)
  for x in jax.tree_util.tree_leaves(u):
    assert np.isfinite(np.asarray(x)).all(), clipper
  for x in lw.norms(state).values():
    assert not np.isnan(x), clipper


@pytest.mark.parametrize("clipper", CLIPPERS, ids=repr)
def test_non_finite_gradients_are_not_hidden(clipper):
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  tx = lw.clip_by_rules({"**": clipper})
  state = tx.init(params)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    grads = {"w": jnp.ones((3, 2)).at[1, 1].set(bad), "b": jnp.ones(2)}
    u, _ = jax.jit(tx.update)(grads, state, params)
    assert not np.isfinite(np.asarray(u["w"])).all(), (clipper, bad)


def test_apply_if_finite_skips_the_step_and_keeps_statistics():
  tx = optax.apply_if_finite(
      optax.chain(lw.clip_by_rules({"**": lw.clip_zscore(warmup=2)}),
                  optax.sgd(0.1)), max_consecutive_errors=3)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.array([1.0, 0.0])}, state, params)
  before = jax.tree_util.tree_leaves(state.inner_state)
  u, state = update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])  # step skipped
  assert int(state.notfinite_count) == 1
  for a, b in zip(before, jax.tree_util.tree_leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)


def test_zero_nans_before_clipping():
  tx = optax.chain(optax.zero_nans(),
                   lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}))
  grads = {"w": jnp.array([jnp.nan, 3.0, 4.0])}
  u, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(u["w"], [0.0, 0.6, 0.8], rtol=1e-6)


# ----------------------------------------------------------------- stages


def test_stages_chain_and_show_in_describe_and_norms():
  params = sample(1.0)
  tx = optax.chain(
      lw.clip_by_rules({"embed": lw.clip_norm(0.5), "**": None}),
      lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}),
      optax.sgd(1.0))
  grads = sample(1.0)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  # Reference: clip embed by its norm, then everything by the global norm.
  leaves = np_leaves(grads)
  embed = leaves[0] * 0.5 / max(np.linalg.norm(leaves[0]), 0.5)
  staged = [embed] + leaves[1:]
  total = np.sqrt(sum(np.sum(x**2) for x in staged))
  close(u, [-x * min(1.0, 1.0 / total) for x in staged])
  n = lw.norms(state)
  assert sorted(n) == ["clip/**/norm", "clip/**/scale", "clip/embed/norm",
                       "clip/embed/scale"]
  np.testing.assert_allclose(n["clip/**/norm"], total, rtol=1e-5)
  d = lw.describe(tx, params, opt_state=state)
  assert d.columns[4:] == ("clip", "clip_norm", "clip_scale", "clip2",
                           "clip2_norm", "clip2_scale", "state_bytes")
  row = d.rows[0]
  assert row["path"] == "embed" and row["clip"] == lw.clip_norm(0.5)
  assert row["clip_norm"] == pytest.approx(np.linalg.norm(leaves[0]),
                                           rel=1e-5)
  assert row["clip2_norm"] == pytest.approx(total, rel=1e-5)
  assert d.rows[1]["clip"] is None and d.rows[1]["clip_norm"] is None
  assert d.rows[1]["clip2_scale"] == pytest.approx(min(1.0, 1.0 / total),
                                                   rel=1e-5)
  text = str(d)
  assert "clip_norm(0.5)" in text and "clip_group_norm(1.0)" in text


def test_norms_in_partition_groups_get_numbered_keys():
  params = {"g": {"w": jnp.ones(2)}, "d": {"w": jnp.ones(2)}}
  clip = lambda: lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})  # noqa: E731
  tx = lw.partition({"g/**": optax.chain(clip(), optax.sgd(1.0)),
                     "d/**": optax.chain(clip(), optax.sgd(1.0))})
  grads = {"g": {"w": jnp.array([3.0, 4.0])}, "d": {"w": jnp.array([0.3, 0.4])}}
  _, state = tx.update(grads, tx.init(params), params)
  n = {k: float(v) for k, v in lw.norms(state).items()}
  assert n == pytest.approx({"clip/**/norm": 5.0, "clip/**/scale": 0.2,
                             "clip2/**/norm": 0.5, "clip2/**/scale": 1.0})
  # describe: the two groups cover disjoint leaves and share one column.
  d = lw.describe(tx, params, opt_state=state)
  assert [r["clip_norm"] for r in d.rows] == pytest.approx([0.5, 5.0])


def test_frozen_leaves_are_left_out_of_group_norms():
  params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
  tx = lw.freeze(optax.chain(
      lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}), optax.sgd(1.0)),
      "backbone")
  grads = {"backbone": jnp.array([30.0, 40.0]), "head": jnp.array([3.0, 4.0])}
  u, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["head"], [-0.6, -0.8], rtol=1e-6)
  assert float(lw.norms(state)["clip/**/norm"]) == pytest.approx(5.0)


def test_state_is_stable_under_jit_and_has_no_retrace():
  params = sample(1.0, jnp.bfloat16)
  tx = optax.chain(
      lw.track_norms({"**": "{parent}"}),
      lw.clip_by_rules({"embed": lw.clip_value(0.1),
                        "head/bias": lw.clip_quantile(0.9, 8),
                        "encoder/**": lw.clip_zscore(warmup=2),
                        "**": lw.clip_adaptive(0.1)}),
      lw.map_updates(lambda u, p, path: u * 0.5))
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  for _ in range(4):
    u, new_state = step(sample(1.0, jnp.bfloat16), state)
    assert jax.tree_util.tree_structure(new_state) == \
        jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(new_state),
                    jax.tree_util.tree_leaves(state)):
      assert a.dtype == b.dtype and a.shape == b.shape
    state = new_state
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(u))
  assert len(traces) == 1
  # init also works on abstract params.
  abstract = jax.eval_shape(tx.init, params)
  assert jax.tree_util.tree_structure(abstract) == \
      jax.tree_util.tree_structure(state)


def test_multisteps_and_inside_chain():
  params = {"w": jnp.ones(2)}
  tx = optax.MultiSteps(optax.chain(
      lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}), optax.sgd(1.0)),
      every_k_schedule=2)
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])
  u, state = tx.update({"w": jnp.array([9.0, 12.0])}, state, params)
  # The mean of the two gradients, [6, 8], clipped to norm 1.
  np.testing.assert_allclose(u["w"], [-0.6, -0.8], rtol=1e-6)
  assert float(lw.norms(state)["clip/**/norm"]) == pytest.approx(10.0)


# ------------------------------------------------------------ track_norms


def test_track_norms_groups_and_names():
  params = sample(1.0)
  grads = sample(1.0)
  tx = lw.track_norms({"encoder/layers/*/**": "{parent}",
                       "head/**": "head", "embed": None})
  u, state = jax.jit(tx.update)(grads, tx.init(params))
  assert u is grads or all(
      (a == b).all() for a, b in zip(jax.tree_util.tree_leaves(u),
                                     jax.tree_util.tree_leaves(grads)))
  n = lw.norms(state)
  layer0 = grads["encoder"]["layers"][0]["attn"]
  expected = np.sqrt(sum(np.sum(x**2) for x in np_leaves(layer0)))
  np.testing.assert_allclose(
      n["grad_norm/encoder/layers/0/attn"], expected, rtol=1e-5)
  head = np.sqrt(sum(np.sum(x**2) for x in np_leaves(grads["head"])))
  np.testing.assert_allclose(n["grad_norm/head"], head, rtol=1e-5)
  assert sorted(n) == [
      "grad_norm/encoder/layers/0/attn", "grad_norm/encoder/layers/0/conv",
      "grad_norm/encoder/layers/1/attn", "grad_norm/encoder/layers/1/conv",
      "grad_norm/head"]
  d = lw.describe(tx, params, opt_state=state)
  assert d.rows[0]["track"] is None and d.rows[-1]["track"] == "grad_norm/head"
  assert d.rows[-1]["track_norm"] == pytest.approx(head, rel=1e-5)


def test_track_norms_per_leaf_and_prefix():
  grads = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([1.0])}}
  tx = optax.chain(lw.track_norms({"**": "{path}"}),
                   optax.sgd(0.5),
                   lw.track_norms({"**": "all"}, prefix="update_norm"))
  _, state = tx.update(grads, tx.init(grads))
  n = {k: float(v) for k, v in lw.norms(state).items()}
  assert n == pytest.approx({"grad_norm/a": 5.0, "grad_norm/b/c": 1.0,
                             "update_norm/all": 0.5 * np.sqrt(26)})


# ------------------------------------------------------------ map_updates


def test_map_updates_gets_param_and_path():
  params = {"enc": {"w": jnp.array([1.0, 2.0])}, "head": jnp.array([5.0])}
  seen = []

  def fn(u, p, path):
    seen.append(path)
    return u * p + (10.0 if path.endswith("w") else 0.0)

  tx = lw.map_updates(fn, "enc/**")
  grads = {"enc": {"w": jnp.array([3.0, 4.0])}, "head": jnp.array([7.0])}
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(u["enc"]["w"], [13.0, 18.0])
  np.testing.assert_array_equal(u["head"], [7.0])
  assert seen == ["enc/w"]
  # Without params, fn gets None; a bf16 update stays bf16.
  tx = lw.map_updates(lambda u, p, path: u * jnp.float32(2.0) if p is None
                      else u)
  g = {"w": jnp.ones(2, jnp.bfloat16)}
  u, _ = tx.update(g, tx.init(g))
  assert u["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(u["w"], [2.0, 2.0])
  assert "map" in lw.describe(tx, g).columns


def test_map_updates_errors():
  g = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="callable"):
    lw.map_updates("sign")
  tx = lw.map_updates(lambda u, p, path: u.sum())
  with pytest.raises(ValueError, match="'w' of shape"):
    tx.update(g, tx.init(g))
  with pytest.raises(lw.RuleError, match="match no parameter"):
    lw.map_updates(lambda u, p, path: u, "encoder/**").init(g)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("make,error,match", [
    (lambda: lw.clip_value(0.0), ValueError, "freeze"),
    (lambda: lw.clip_value(-1.0), ValueError, "> 0"),
    (lambda: lw.clip_norm(float("nan")), ValueError, "finite"),
    (lambda: lw.clip_group_norm(float("inf")), ValueError, "finite"),
    (lambda: lw.clip_norm("1"), TypeError, "number"),
    (lambda: lw.clip_norm(1.0, ord=3), ValueError, "ord must be"),
    (lambda: lw.clip_adaptive(0.0), ValueError, "clipping"),
    (lambda: lw.clip_adaptive(0.1, eps=-1.0), ValueError, "eps"),
    (lambda: lw.clip_adaptive(0.1, axis="0"), TypeError, "axis"),
    (lambda: lw.clip_quantile(90, 10), ValueError, "not a percentile"),
    (lambda: lw.clip_quantile(0.9, 0), ValueError, "window"),
    (lambda: lw.clip_quantile(0.9, 1.5), TypeError, "window"),
    (lambda: lw.clip_zscore(z=0.0), ValueError, "z"),
    (lambda: lw.clip_zscore(alpha=1.0), ValueError, "alpha"),
    (lambda: lw.clip_zscore(warmup=0), ValueError, "warmup"),
    (lambda: lw.clip_by_rules({"**": 1.0}), TypeError, "must be a clipper"),
    (lambda: lw.clip_by_rules({"**": lw.clip_value}), TypeError,
     "must be a clipper"),
    (lambda: lw.track_norms({"**": 1}), TypeError, "group name"),
    (lambda: lw.track_norms({"**": "{layer}"}), ValueError, "{path}"),
])
def test_bad_arguments(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_rule_errors_and_integer_leaves():
  params = {"w": jnp.ones(2), "step": jnp.zeros([], jnp.int32)}
  with pytest.raises(TypeError, match="'step' has dtype int32"):
    lw.clip_by_rules({"**": lw.clip_norm(1.0)}).init(params)
  tx = lw.clip_by_rules({"step": None, "**": lw.clip_norm(1.0)})
  tx.init(params)  # None leaves an integer leaf alone
  with pytest.raises(lw.RuleError, match="'W'"):
    lw.clip_by_rules({"W": lw.clip_norm(1.0)}, default=None).init(params)
  tx = lw.clip_by_rules({"**": lw.clip_norm(1.0)})
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="structure of the params"):
    tx.update({"w": jnp.ones(2), "v": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match="opt_state"):
    lw.describe(tx, {"w": jnp.ones(2)}, opt_state=(state,))


# ------------------------------------------------------------ complex leaves
#
# One dtype gate for every rule that changes or measures a leaf: floating
# point and complex leaves pass, integers and bools do not. A norm is the
# modulus norm, sqrt(sum |z|^2), as numpy.linalg.norm computes it.

def complex_leaf(seed, shape):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(
      np.complex64)


def test_norm_clippers_and_tracking_measure_complex_leaves_by_modulus():
  z, r = complex_leaf(0, (3, 4)), np.random.default_rng(1).normal(size=4)
  grads = {"z": jnp.asarray(z), "r": jnp.asarray(r, jnp.float32)}
  joint = np.sqrt(np.linalg.norm(z) ** 2 + np.linalg.norm(r) ** 2)
  tx = lw.clip_by_rules({"z": lw.clip_norm(1.0), "r": None})
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["z"], z / np.linalg.norm(z), rtol=1e-6)
  assert updates["z"].dtype == jnp.complex64
  np.testing.assert_allclose(lw.norms(state)["clip/z/norm"], np.linalg.norm(z),
                             rtol=1e-6)
  tx = lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["z"], z / joint, rtol=1e-6)
  np.testing.assert_allclose(updates["r"], r / joint, rtol=1e-6)
  tx = lw.track_norms({"**": "all"})
  _, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(lw.norms(state)["grad_norm/all"], joint,
                             rtol=1e-6)


def test_clip_adaptive_units_of_a_complex_kernel():
  g, p = complex_leaf(2, (5, 3)), complex_leaf(3, (5, 3))
  tx = lw.clip_by_rules({"**": lw.clip_adaptive(0.5)})
  params = {"w": jnp.asarray(p)}
  updates, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
  # By hand: each column (unit) scaled to 0.5 * its param column's norm.
  g_norm = np.linalg.norm(g, axis=0, keepdims=True)
  max_norm = 0.5 * np.maximum(np.linalg.norm(p, axis=0, keepdims=True), 1e-3)
  want = np.where(g_norm < max_norm, g, g * max_norm / g_norm)
  np.testing.assert_allclose(updates["w"], want, rtol=1e-5)


def test_clip_value_refuses_complex_leaves_and_scaling_takes_them():
  z = {"z": jnp.asarray(complex_leaf(4, (2,)))}
  with pytest.raises(TypeError, match=(
      r"parameter 'z' has dtype complex64; clip_value clips each entry.*"
      r"lw\.clip_norm")):
    lw.clip_by_rules({"**": lw.clip_value(1.0)}).init(z)
  tx = lw.scale_by_rules({"**": 0.5})
  updates, _ = tx.update(z, tx.init(z))
  np.testing.assert_array_equal(updates["z"], 0.5 * z["z"])
  with pytest.raises(TypeError, match="only floating point and complex leaves"):
    lw.clip_by_rules({"**": lw.clip_norm(1.0)}).init(
        {"n": jnp.zeros(2, jnp.int32)})


@pytest.mark.parametrize("kind", [float, np.float32, np.array, jnp.float32],
                         ids=["float", "np.float32", "np-0d", "jnp.float32"])
def test_thresholds_take_any_concrete_real_scalar(kind):
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([3.0, 4.0])}
  tx = lw.clip_by_rules({"a": lw.clip_norm(kind(2.5)),
                         "b": lw.clip_value(kind(1.0))})
  state = tx.init(grads)
  updates, _ = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(updates["a"], [1.5, 2.0], rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], [1.0, 1.0])
  state = lw.set_threshold(state, "a", kind(1.0))
  updates, _ = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=1e-6)
  with pytest.raises(TypeError, match="lw.set_threshold: value must be a "
                     "real number"):
    lw.set_threshold(state, "a", np.complex64(1.0))
  with pytest.raises(TypeError, match="threshold must be a concrete number, "
                     "got a traced value"):
    jax.jit(lambda c: lw.clip_norm(c))(1.0)
