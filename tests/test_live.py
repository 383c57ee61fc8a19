"""Hyperparameters in the state: multipliers, weight decays and clip thresholds.

Each is an entry of a float32 vector in its transformation's state, so
``lw.set_scale``, ``lw.set_weight_decay`` and ``lw.set_threshold`` change it
between jitted steps without recompiling, ``lw.describe`` shows it, and a
sweep over hyperparameters compiles its step once. The reference for every
setter is the same transformation built with the new value.
"""

import json
import os
import re
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw

PARAMS = {"embed": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)),
                               jnp.float32),
          "layers": [{"w": jnp.full((4, 4), 0.5), "b": jnp.zeros(4)}] * 2,
          "head": {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)),
                                    jnp.float32)}}
GRADS = jax.tree_util.tree_map(lambda p: 3.0 * p + 0.25, PARAMS)


def updates_of(tx, state, steps=3):
  """The updates of ``steps`` jitted steps from ``state`` (one compile)."""
  step = jax.jit(tx.update)
  out = []
  for k in range(steps):
    grads = jax.tree_util.tree_map(lambda g: g * (1.0 + k), GRADS)
    u, state = step(grads, state, PARAMS)
    out.append(u)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  return out


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("make, setter, selector, old, new", [
    (lambda v: lw.scale_by_rules({"embed": v, "**": 1.0}), lw.set_scale,
     "embed", 0.3, 0.05),
    (lambda v: lw.add_decayed_weights({"layers/**": v, "**": 0.0}),
     lw.set_weight_decay, "layers/**", 0.1, 0.02),
    (lambda v: lw.clip_by_rules({"embed": lw.clip_value(v), "**": None}),
     lw.set_threshold, "embed", 0.5, 0.25),
    (lambda v: lw.clip_by_rules({"embed": lw.clip_norm(v), "**": None}),
     lw.set_threshold, "embed", 1.0, 3.0),
    (lambda v: lw.clip_by_rules({"**": lw.clip_group_norm(v)}),
     lw.set_threshold, "head/w", 5.0, 2.0),
    (lambda v: lw.clip_by_rules({"**": lw.clip_adaptive(v)}),
     lw.set_threshold, "**", 0.1, 0.02),
    (lambda v: lw.clip_by_rules({"**": lw.clip_quantile(v, window=3)}),
     lw.set_threshold, "**", 0.9, 0.2),
    (lambda v: lw.clip_by_rules({"**": lw.clip_zscore(v, warmup=2)}),
     lw.set_threshold, "**", 3.0, 0.5),
])
def test_a_set_value_trains_as_if_built_with_it(make, setter, selector, old,
                                                new):
  reference = make(new)
  want = updates_of(reference, reference.init(PARAMS))
  tx = make(old)
  got = updates_of(tx, setter(tx.init(PARAMS), selector, new))
  assert_trees_equal(got, want)
  # And the old value does train differently (the test can fail).
  unchanged = updates_of(tx, tx.init(PARAMS))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(unchanged), jax.tree_util.tree_leaves(want)))


def test_setters_in_one_chain_by_hand_and_without_recompiling():
  tx = optax.chain(
      lw.clip_by_rules({"embed": lw.clip_norm(100.0), "**": None}),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01}),
      optax.sgd(0.1),
      lw.scale_by_rules({"embed": 1.0, "**": 0.5}))
  step = jax.jit(tx.update)
  state = tx.init(PARAMS)
  state = lw.set_threshold(state, "embed", 2.0)
  state = lw.set_weight_decay(state, "head/w", 0.2)
  state = lw.set_scale(state, "embed", 0.25)
  u, _ = step(GRADS, state, PARAMS)
  # By hand: embed clipped to norm 2, decayed 0.01, sgd, times 0.25.
  g, p = np.asarray(GRADS["embed"]), np.asarray(PARAMS["embed"])
  g = g * 2.0 / max(np.linalg.norm(g), 2.0)
  np.testing.assert_allclose(u["embed"], -0.1 * 0.25 * (g + 0.01 * p),
                             rtol=1e-6)
  h, ph = np.asarray(GRADS["head"]["w"]), np.asarray(PARAMS["head"]["w"])
  np.testing.assert_allclose(u["head"]["w"], -0.1 * 0.5 * (h + 0.2 * ph),
                             rtol=1e-6)
  np.testing.assert_allclose(u["layers"][0]["b"],
                             -0.1 * 0.5 * np.asarray(GRADS["layers"][0]["b"]),
                             rtol=1e-6)
  state = lw.set_scale(state, "**", 1.0)
  step(GRADS, state, PARAMS)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_a_schedule_is_multiplied_by_the_set_value():
  schedule = optax.linear_schedule(0.5, 1.0, 4)
  for make, setter in [
      (lambda v: lw.scale_by_rules({"**": v}), lw.set_scale),
      (lambda v: lw.add_decayed_weights({"**": v}), lw.set_weight_decay)]:
    tx = make(schedule)
    got = updates_of(tx, setter(tx.init(PARAMS), "**", 0.5))
    reference = make(lambda count: 0.5 * schedule(count))
    assert_trees_equal(got, updates_of(reference, reference.init(PARAMS)))


@pytest.mark.parametrize("inner, setter, value, name", [
    (lw.scale_by_rules({"**": 1.0}), lw.set_scale, 0.5, "lw.scale_by_rules"),
    (lw.add_decayed_weights({"**": 0.1}), lw.set_weight_decay, 0.5,
     "lw.add_decayed_weights"),
    (lw.clip_by_rules({"**": lw.clip_norm(1.0)}), lw.set_threshold, 0.5,
     "lw.clip_by_rules"),
])
def test_a_setter_says_which_states_it_found_and_what_they_cover(
    inner, setter, value, name):
  """The parameters exist, but the state that holds the value sits in
  another group's optimizer: the error says so, not "fix the selector"."""
  fn = setter.__name__
  tx = lw.partition({"layers/**": optax.chain(inner, optax.adam(1e-3)),
                     "**": optax.adam(1e-3)})
  state = tx.init(PARAMS)
  with pytest.raises(ValueError) as e:
    setter(state, "head/**", value)
  assert str(e.value) == (
      f"lw.{fn}: selector 'head/**' matches 1 parameter(s) of the model "
      f"('head/w'), but none that a {name} covers: the 1 {name} state found "
      "covers 4 parameters: 'layers/**' (4), while the PartitionState found "
      f"gives them group '**'. A {name} inside lw.partition or lw.freeze "
      "sees its group's parameters only: add a rule for them to a "
      f"{name} in the optimizer of their group, or chain {name} outside "
      "the partition, where it covers every parameter (lw.describe(tx, "
      "params) shows each parameter's rules).")
  # A selector that no state knows is a typo, and the error says what the
  # states found cover.
  with pytest.raises(ValueError) as e:
    setter(state, "layer/**", value)
  assert str(e.value).startswith(
      f"lw.{fn}: selector 'layer/**' matches no parameter (closest: "
      f"'layers/**'"), str(e.value)
  assert (f"The 1 {name} state found covers 4 parameters: 'layers/**' (4). "
          "Fix the selector") in str(e.value)
  # The same setter on the covered leaves works.
  setter(state, "layers/**", value)


def test_a_state_restored_without_a_target_is_named_as_such(tmp_path):
  """orbax without a target gives plain lists and dicts back: update,
  lw.norms and the setters say so and point to lw.restore_state, instead
  of an AttributeError or an empty dict."""
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = optax.chain(lw.clip_by_rules({"**": lw.clip_norm(1.0)}),
                   optax.sgd(0.1), lw.scale_by_rules({"**": 0.5}))
  _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  raw = checkpointer.restore(tmp_path / "ckpt")
  assert isinstance(raw, list) and isinstance(raw[2], dict)
  hint = "lw.restore_state(tx.init(params), restored)"
  with pytest.raises(TypeError, match=re.escape(
      "lw.clip_by_rules: the state passed to update is a dict")):
    tx.update(GRADS, raw, PARAMS)
  with pytest.raises(TypeError) as e:
    lw.norms(raw)
  assert str(e.value).startswith(
      "lw.norms: opt_state is a list of plain dicts, lists and arrays, not "
      "an optimizer state")
  assert hint in str(e.value)
  for setter, value in [(lw.set_scale, 0.1), (lw.set_threshold, 2.0)]:
    with pytest.raises(TypeError) as e:
      setter(raw, "**", value)
    assert str(e.value).startswith(f"lw.{setter.__name__}: opt_state is a "
                                   "list of plain dicts"), str(e.value)
    assert hint in str(e.value)
  # Restored into a state, everything reads it again.
  state = lw.restore_state(tx.init(PARAMS), raw)
  assert set(lw.norms(state)) == {"clip/embed/norm", "clip/embed/scale",
                                  "clip/head/w/norm", "clip/head/w/scale",
                                  "clip/layers/0/b/norm",
                                  "clip/layers/0/b/scale",
                                  "clip/layers/0/w/norm",
                                  "clip/layers/0/w/scale",
                                  "clip/layers/1/b/norm",
                                  "clip/layers/1/b/scale",
                                  "clip/layers/1/w/norm",
                                  "clip/layers/1/w/scale"}
  # An optimizer state that tracks no norms still reads as none.
  assert lw.norms(optax.adam(0.1).init(PARAMS)) == {}


def test_describe_shows_what_the_state_holds():
  tx = optax.chain(
      lw.clip_by_rules({"embed": lw.clip_norm(1.0), "**": None}),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01}),
      optax.sgd(0.1),
      lw.scale_by_rules({"embed": 0.3, "**": 1.0}))
  state = tx.init(PARAMS)
  plain = lw.describe(tx, PARAMS, opt_state=state)
  assert "clip_threshold" not in plain.columns and "(rule:" not in str(plain)
  state = lw.set_scale(lw.set_threshold(state, "embed", 4.0), "embed", 0.1)
  state = lw.set_weight_decay(state, "head/**", 0.05)
  d = lw.describe(tx, PARAMS, opt_state=state)
  rows = {r["path"]: r for r in d.rows}
  assert rows["embed"]["scale"] == pytest.approx(0.1)
  assert rows["embed"]["scale_given"] == 0.3
  assert rows["embed"]["clip_threshold"] == 4.0
  assert rows["embed"]["clip_threshold_given"] == 1.0
  assert rows["head/w"]["weight_decay"] == pytest.approx(0.05)
  assert rows["layers/0/w"]["weight_decay"] == 0.01  # as the rule gave it
  assert "scale_given" not in rows["head/w"]
  text = str(d)
  assert "0.1 (rule: 0.3)" in text and "4.0 (rule: 1.0)" in text
  assert "0.05 (rule: 0.01)" in text


def f32(x):
  return np.float32(x)


def hyperparams_chain():
  return optax.chain(
      lw.clip_by_rules({"embed": lw.clip_norm(1.0),
                        "layers/**": lw.clip_group_norm(2.0), "**": None}),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01}),
      optax.sgd(0.1),
      lw.scale_by_rules({"embed": 0.3, "**": 1.0}))


def test_hyperparams_reads_the_values_set_and_works_under_jit():
  tx = hyperparams_chain()
  state = lw.set_scale(tx.init(PARAMS), "embed", 0.1)
  state = lw.set_weight_decay(state, "head/**", 0.05)
  state = lw.set_threshold(lw.set_threshold(state, "embed", 4.0),
                           "layers/1/w", 0.5)
  # What was set, in float32 (the state's dtype); the rest as the rules
  # gave it: NO_DECAY's 0.0 for vectors, the clipping groups' thresholds.
  want = {"clip/embed/threshold": f32(4.0),
          "clip/layers/**/threshold": f32(0.5),
          "weight_decay/embed": f32(0.01), "weight_decay/head/w": f32(0.05),
          "weight_decay/layers/0/b": f32(0.0),
          "weight_decay/layers/0/w": f32(0.01),
          "weight_decay/layers/1/b": f32(0.0),
          "weight_decay/layers/1/w": f32(0.01),
          "scale/embed": f32(0.1), "scale/head/w": f32(1.0),
          "scale/layers/0/b": f32(1.0), "scale/layers/0/w": f32(1.0),
          "scale/layers/1/b": f32(1.0), "scale/layers/1/w": f32(1.0)}
  assert list(lw.hyperparams(state)) == list(want)  # in the chain's order
  for got in (lw.hyperparams(state), jax.jit(lw.hyperparams)(state)):
    assert sorted(got) == sorted(want)  # jit returns a dict's keys sorted
    for key, value in got.items():
      assert isinstance(value, jax.Array) and value.shape == ()
      assert value.dtype == jnp.float32 and value == want[key], key

  # A train step returns them as metrics, beside the norms, and a step
  # with another setting reads the new values without compiling again.
  @jax.jit
  def step(state):
    updates, state = tx.update(GRADS, state, PARAMS)
    return updates, state, {**lw.norms(state), **lw.hyperparams(state)}

  _, state, metrics = step(state)
  assert metrics["scale/embed"] == f32(0.1)
  assert metrics["clip/embed/threshold"] == f32(4.0)
  assert "clip/embed/norm" in metrics
  _, _, metrics = step(lw.set_scale(state, "embed", 0.7))
  assert metrics["scale/embed"] == f32(0.7)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_hyperparams_of_nested_and_repeated_states():
  # Two scale_by_rules over the same leaves: the second's keys are numbered
  # as lw.norms numbers them; the states inside lw.partition are found.
  tx = optax.chain(
      lw.partition({"embed": optax.chain(
          optax.sgd(0.1), lw.scale_by_rules({"**": 0.5})),
                    "**": optax.adam(0.1)}),
      lw.scale_by_rules({"embed": 2.0, "**": 1.0}),
      lw.scale_by_rules({"head/**": 3.0, "**": 1.0}))
  state = tx.init(PARAMS)
  got = jax.device_get(lw.hyperparams(lw.set_scale(state, "head/w", 0.25)))
  # set_scale sets every state that covers head/w: both of the chain's.
  assert got == {"scale/embed": 0.5,
                 "scale2/embed": 2.0, "scale2/head/w": 0.25,
                 "scale2/layers/0/b": 1.0, "scale2/layers/0/w": 1.0,
                 "scale2/layers/1/b": 1.0, "scale2/layers/1/w": 1.0,
                 "scale3/embed": 1.0, "scale3/head/w": 0.25,
                 "scale3/layers/0/b": 1.0, "scale3/layers/0/w": 1.0,
                 "scale3/layers/1/b": 1.0, "scale3/layers/1/w": 1.0}
  # No layerwise hyperparameters: nothing to read.
  assert lw.hyperparams(optax.adam(0.1).init(PARAMS)) == {}
  tracked = optax.chain(lw.track_norms({"**": "all"}), optax.sgd(0.1))
  assert lw.hyperparams(tracked.init(PARAMS)) == {}


def test_a_schedules_factor_is_read_and_described():
  schedule = optax.linear_schedule(0.5, 1.0, 4)
  tx = optax.chain(optax.sgd(0.1),
                   lw.scale_by_rules({"embed": schedule, "**": 1.0}))
  state = tx.init(PARAMS)
  assert lw.hyperparams(state)["scale/embed"] == f32(1.0)
  rows = {r["path"]: r for r in lw.describe(tx, PARAMS, opt_state=state).rows}
  assert rows["embed"]["scale"] is schedule
  state = lw.set_scale(state, "embed", 0.5)
  assert lw.hyperparams(state)["scale/embed"] == f32(0.5)
  text = str(lw.describe(tx, PARAMS, opt_state=state))
  # 0.5 times the schedule, which gives 0.5 at step 0: 0.25.
  assert "0.5 x polynomial_schedule (0.25 at step 0)" in text


def restored_into(new_tx, old_state):
  """``old_state``'s arrays in a state of ``new_tx``, as a checkpoint
  restored against ``jax.eval_shape(new_tx.init, params)`` gives it (the
  arrays by position; the static rules are the target's)."""
  target = jax.eval_shape(new_tx.init, PARAMS)
  treedef = jax.tree_util.tree_structure(target)
  return jax.tree_util.tree_unflatten(treedef,
                                      jax.tree_util.tree_leaves(old_state))


def test_a_restored_value_wins_over_a_rule_changed_in_code_and_shows():
  """Trained with rule 0.3 and set to 0.1; the code now says 0.5. The
  restored 0.1 trains (the checkpoint wins), describe shows it marked as
  differing from the rule 0.5, and hyperparams reads it. The same for a
  weight decay and a clip threshold."""
  def make(scale, decay, threshold):
    return optax.chain(
        lw.clip_by_rules({"embed": lw.clip_norm(threshold), "**": None}),
        lw.add_decayed_weights({"head/**": decay, "**": 0.0}),
        optax.sgd(0.1),
        lw.scale_by_rules({"embed": scale, "**": 1.0}))

  old_tx = make(0.3, 0.02, 1.0)
  saved = lw.set_scale(old_tx.init(PARAMS), "embed", 0.1)
  saved = lw.set_weight_decay(saved, "head/**", 0.04)
  saved = lw.set_threshold(saved, "embed", 3.0)
  new_tx = make(0.5, 0.06, 2.0)
  for state in (restored_into(new_tx, saved),
                lw.restore_state(new_tx.init(PARAMS), saved)):
    d = lw.describe(new_tx, PARAMS, opt_state=state)
    rows = {r["path"]: r for r in d.rows}
    assert rows["embed"]["scale"] == f32(0.1)
    assert rows["embed"]["scale_given"] == 0.5
    assert rows["head/w"]["weight_decay"] == f32(0.04)
    assert rows["head/w"]["weight_decay_given"] == 0.06
    assert rows["embed"]["clip_threshold"] == 3.0
    assert rows["embed"]["clip_threshold_given"] == 2.0
    text = str(d)
    assert "0.1 (rule: 0.5)" in text and "0.04 (rule: 0.06)" in text
    assert "3.0 (rule: 2.0)" in text
    # Leaves whose restored value is the new rule's are not marked.
    assert "scale_given" not in rows["head/w"]
    assert lw.hyperparams(state) == {
        "clip/embed/threshold": f32(3.0),
        "weight_decay/embed": f32(0.0), "weight_decay/head/w": f32(0.04),
        "weight_decay/layers/0/b": f32(0.0),
        "weight_decay/layers/0/w": f32(0.0),
        "weight_decay/layers/1/b": f32(0.0),
        "weight_decay/layers/1/w": f32(0.0),
        "scale/embed": f32(0.1), "scale/head/w": f32(1.0),
        "scale/layers/0/b": f32(1.0), "scale/layers/0/w": f32(1.0),
        "scale/layers/1/b": f32(1.0), "scale/layers/1/w": f32(1.0)}
    # And the restored values are the ones that train: as the old
    # transformation from the saved state.
    assert_trees_equal(updates_of(new_tx, state), updates_of(old_tx, saved))


# ------------------------------------------------- a sweep compiles once

SWEEP = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import layerwise as lw

    events = {"hits": 0, "misses": 0}
    counting = [False]

    def listener(event, **kwargs):
      if counting[0] and event.startswith("/jax/compilation_cache/cache_"):
        key = event.rsplit("_", 1)[-1]
        if key in events:
          events[key] += 1

    jax.monitoring.register_event_listener(listener)
    rng = np.random.default_rng(0)
    params = {"embed": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
              "layers": [{"w": jnp.asarray(rng.normal(size=(4, 4)),
                                           jnp.float32),
                          "b": jnp.zeros(4)} for _ in range(2)],
              "head": {"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}
    grads = jax.tree_util.tree_map(lambda p: p * 0.3 + 0.1, params)
    values = []
    for m, wd, c, q in json.loads(sys.argv[1]):
      # A new transformation per setting, as a sweep builds it.
      tx = optax.chain(
          lw.clip_by_rules({"embed": lw.clip_norm(c),
                            "head/**": lw.clip_adaptive(c / 10),
                            "**": lw.clip_quantile(q, window=4)}),
          lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": wd}),
          optax.sgd(0.1),
          lw.scale_by_rules({"embed": m, "layers/**": 0.5 * m, "**": 1.0}))
      state = tx.init(params)

      def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      counting[0] = True
      new, _ = jax.jit(step)(params, state, grads)
      jax.block_until_ready(new)
      counting[0] = False
      values.append(np.asarray(new["embed"]).tolist())
    print(json.dumps({"events": events, "values": values}))
''')

SETTINGS = [(0.1 * (k + 1), 0.01 * k, 1.0 + k, 0.1 + 0.15 * k)
            for k in range(6)]


def test_a_sweep_over_six_settings_compiles_the_step_once(tmp_path):
  """Six settings of multipliers, weight decays, thresholds and quantiles,
  each a new transformation: with the persistent compilation cache, the
  first compiles the step and the other five find it (jax's cache
  counters), because no hyperparameter is a constant of the program."""
  script = tmp_path / "sweep.py"
  script.write_text(SWEEP)
  env = {**os.environ,
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
  env.pop("XLA_FLAGS", None)  # one device, as a user's sweep has
  done = subprocess.run([sys.executable, str(script), json.dumps(SETTINGS)],
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["events"] == {"hits": 5, "misses": 1}, result["events"]
  # The six settings trained differently (the sweep is a real one).
  assert len({json.dumps(v) for v in result["values"]}) == 6
