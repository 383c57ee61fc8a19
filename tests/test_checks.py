"""lw.check and describe's warnings: the traps of placement in a chain.

Each trap is first reproduced (the chain trains wrongly, against a named
reference), then found by ``lw.check`` and printed by ``lw.describe``, and
its fix is shown to train rightly and to pass the check. The list of
optimizers after which a multiplier is exact ("learning rate last") is
proved against ``optax.partition`` with one ``opt(lr * r_g)`` per group.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise as lw
from layerwise import checks

import cases

PARAMS = {
    "backbone": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
                 "b": jnp.linspace(0.5, 1.0, 4)},
    "head": {"w": jnp.linspace(1.0, -0.5, 6).reshape(2, 3)},
    "scale": jnp.linspace(0.2, 0.9, 5),
}
# Per-group multipliers, and the same groups as optax.partition labels.
RATES = {"backbone/**": 0.1, "head/**": 0.5, "**": 1.0}
LABELS = {"backbone": {"w": "backbone", "b": "backbone"},
          "head": {"w": "head"}, "scale": "rest"}
GROUP_RATE = {"backbone": 0.1, "head": 0.5, "rest": 1.0}


def grads_at(params, step):
  """A gradient that depends on the trajectory (and on the step)."""
  return jax.tree_util.tree_map(
      lambda p: jnp.sin(3.0 * p + step) + 0.1 * p, params)


def run(tx, steps=6, params=PARAMS, grads=grads_at):
  """The params after ``steps`` jitted updates, and the last updates."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates = None
  for step in range(steps):
    updates, state = update(grads(params, step), state, params)
    params = optax.apply_updates(params, updates)
  return params, updates


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def relative_gap(ours, ref):
  """The largest difference of two results, relative to the largest move
  of the reference from PARAMS."""
  leaves = jax.tree_util.tree_leaves
  gap = max(float(jnp.max(jnp.abs(x - y)))
            for x, y in zip(leaves(ours), leaves(ref)))
  moved = max(float(jnp.max(jnp.abs(y - p)))
              for y, p in zip(leaves(ref), leaves(PARAMS)))
  return gap / moved


def trap_ids(tx, params=PARAMS):
  return [t.id for t in checks.traps(tx, params)]


# -------------------------------------------------- learning rate last


# Each optimizer after which a multiplier is exact, as a factory of lr.
LEARNING_RATE_LAST = {
    "sgd": lambda lr: optax.sgd(lr),
    "sgd(momentum=...)": lambda lr: optax.sgd(lr, momentum=0.9),
    "sgd(nesterov=True)": lambda lr: optax.sgd(lr, momentum=0.9,
                                               nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr, weight_decay=0.1),
    "nadam": lambda lr: optax.nadam(lr),
    "adamax": lambda lr: optax.adamax(lr),
    "amsgrad": lambda lr: optax.amsgrad(lr),
    "adabelief": lambda lr: optax.adabelief(lr),
    "yogi": lambda lr: optax.yogi(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr, momentum=0.5, centered=True),
    "adagrad": lambda lr: optax.adagrad(lr),
    "adadelta": lambda lr: optax.adadelta(lr),
    "lion": lambda lr: optax.lion(lr, weight_decay=0.1),
    "lamb": lambda lr: optax.lamb(lr, weight_decay=0.1),
    "lars": lambda lr: optax.lars(lr, weight_decay=0.1),
    "novograd": lambda lr: optax.novograd(lr, weight_decay=0.1),
    "adan": lambda lr: optax.adan(lr, weight_decay=0.1),
    "adafactor": lambda lr: optax.adafactor(lr),
    "sm3": lambda lr: optax.sm3(lr),
    "optax.contrib.muon": lambda lr: optax.contrib.muon(lr),
}


def test_the_tested_list_is_the_documented_one():
  assert tuple(LEARNING_RATE_LAST) == checks.LEARNING_RATE_LAST


def per_group(make, lr):
  """The reference: optax.partition with one ``opt(lr * r_g)`` per group."""
  return optax.partition({g: make(lr * r) for g, r in GROUP_RATE.items()},
                         LABELS)


@pytest.mark.parametrize("name", list(LEARNING_RATE_LAST))
def test_a_multiplier_after_a_learning_rate_last_optimizer_is_exact(name):
  make, lr = LEARNING_RATE_LAST[name], 0.05
  tx = optax.chain(make(lr), lw.scale_by_rules(RATES))
  ours, _ = run(tx)
  ref, _ = run(per_group(make, lr))
  assert_trees_close(ours, ref, rtol=2e-5, atol=1e-6)
  assert not trap_ids(tx)


@pytest.mark.parametrize("name, make, lr, steps", [
    ("schedule_free_sgd", lambda lr: optax.contrib.schedule_free_sgd(lr),
     0.05, 6),
    ("schedule_free_adamw",
     lambda lr: optax.contrib.schedule_free_adamw(lr), 0.05, 6),
    ("fromage", lambda lr: optax.fromage(lr), 0.05, 6),
    # They start with tiny steps, and estimate larger ones as they go.
    ("prodigy", lambda lr: optax.contrib.prodigy(lr), 1.0, 100),
    ("dadapt_adamw", lambda lr: optax.contrib.dadapt_adamw(lr), 1.0, 6),
])
def test_a_multiplier_after_these_optimizers_is_not_a_learning_rate(
    name, make, lr, steps):
  ours, _ = run(optax.chain(make(lr), lw.scale_by_rules(RATES)), steps=steps)
  ref, _ = run(per_group(make, lr), steps=steps)
  assert relative_gap(ours, ref) > 0.05, name
  assert name.split("_")[0] in " ".join(checks.NOT_LEARNING_RATE_LAST)


# ------------------------------------- trap a: a multiplier before Adam


ADAPTIVE = {
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr),
    "adagrad": lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0),
    "lion": lambda lr: optax.lion(lr),
    "adafactor": lambda lr: optax.adafactor(lr),
    "adabelief": lambda lr: optax.adabelief(lr),
    "amsgrad": lambda lr: optax.amsgrad(lr),
    "novograd": lambda lr: optax.novograd(lr),
    "nadam": lambda lr: optax.nadam(lr),
    "adamax": lambda lr: optax.adamax(lr),
    "rmsprop(centered=True)": lambda lr: optax.rmsprop(lr, centered=True),
    "adan": lambda lr: optax.adan(lr),
    "sm3": lambda lr: optax.sm3(lr),
    "optax.contrib.muon": lambda lr: optax.contrib.muon(lr),
}
# Flagged too: a multiplier before them is distorted by their eps (1e-3 in
# yogi, 1e-6 inside adadelta's square roots) rather than cancelled, and is
# no learning rate either.
DISTORTING = {
    "yogi": lambda lr: optax.yogi(lr),
    "adadelta": lambda lr: optax.adadelta(lr),
}


def test_a_multiplier_before_adam_is_undone():
  """The trap: chain(scale_by_rules({'**': 0.01}), adam) updates exactly as
  adam alone (ratio 1.0, not 0.01); after adam it is adam(1e-3 * 0.01)."""
  before = optax.chain(lw.scale_by_rules({"**": 0.01}), optax.adam(1e-3))
  after = optax.chain(optax.adam(1e-3), lw.scale_by_rules({"**": 0.01}))
  _, plain = run(optax.adam(1e-3), steps=3)
  _, undone = run(before, steps=3)
  _, scaled = run(after, steps=3)
  assert_trees_close(undone, plain, rtol=1e-5)
  _, slower = run(optax.adam(1e-5), steps=3)
  assert_trees_close(scaled, slower, rtol=1e-5)
  assert trap_ids(before) == ["scale-before-adaptive"]
  with pytest.raises(ValueError, match=(
      r"(?s)1 trap in how.*\[scale-before-adaptive\].*cancel out.*"
      r"optax.chain\(optax.adam\(lr\), lw.scale_by_rules\(rules\)\)")):
    lw.check(before, PARAMS)
  lw.check(after, PARAMS)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_a_multiplier_before_each_adaptive_optimizer_is_undone(name):
  make = ADAPTIVE[name]
  _, plain = run(make(1e-2), steps=3)
  _, undone = run(optax.chain(lw.scale_by_rules({"**": 0.01}), make(1e-2)),
                  steps=3)
  assert_trees_close(undone, plain, rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("name", list(ADAPTIVE) + list(DISTORTING))
def test_a_multiplier_before_an_adaptive_optimizer_is_no_learning_rate(name):
  make = {**ADAPTIVE, **DISTORTING}[name]
  tx = optax.chain(lw.scale_by_rules(RATES), make(0.05))
  ours, _ = run(tx)
  ref, _ = run(per_group(make, 0.05))
  assert relative_gap(ours, ref) > 0.05
  assert trap_ids(tx) == ["scale-before-adaptive"]


def test_a_multiplier_before_sgd_is_a_learning_rate_and_no_trap():
  tx = optax.chain(lw.scale_by_rules(RATES), optax.sgd(0.05, momentum=0.9))
  ours, _ = run(tx)
  ref, _ = run(per_group(lambda lr: optax.sgd(lr, momentum=0.9), 0.05))
  assert_trees_close(ours, ref, rtol=2e-5, atol=1e-6)
  assert not trap_ids(tx)


def test_what_the_order_check_sees_and_does_not():
  scale = lambda: lw.scale_by_rules(RATES, strict=False)
  # Inside wrappers, partition groups and schedule-free's base: found.
  assert trap_ids(optax.MultiSteps(optax.chain(
      scale(), optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)),
      2)) == ["scale-before-adaptive"]
  assert trap_ids(lw.partition({
      "head/**": optax.chain(scale(), optax.adam(1e-3)),
      "**": optax.sgd(0.1)})) == ["scale-before-adaptive"]
  assert trap_ids(optax.chain(scale(), optax.contrib.schedule_free_adamw(
      1e-3))) == ["scale-before-adaptive"]
  # Side by side in lw.partition, or before a group that is plain SGD: no
  # trap (the scaled leaves reach no adaptive optimizer).
  assert not trap_ids(lw.partition({"head/**": scale(),
                                    "**": optax.adam(1e-3)}, strict=False))
  assert not trap_ids(optax.chain(
      lw.scale_by_rules({"head/**": 0.1, "**": 1.0}),
      lw.partition({"head/**": optax.sgd(0.1), "**": optax.adam(1e-3)})))
  # Params that are one array (path '').
  assert trap_ids(optax.chain(lw.scale_by_rules({"**": 0.1}),
                              optax.adam(1e-3)), jnp.ones(3)) == [
      "scale-before-adaptive"]
  # Multipliers of 0 and 1 pass an adaptive optimizer unchanged.
  assert not trap_ids(optax.chain(
      lw.scale_by_rules({"head/**": 0.0, "**": 1.0}), optax.adam(1e-3)))


def test_no_public_case_after_adam_is_a_trap():
  """No false alarm on the battery's transformations (frozen groups
  included), placed after adam as the docs place them."""
  params = cases.params()
  for name, case in cases.CASES.items():
    tx = optax.chain(optax.adam(1e-3), case.make(params))
    assert not checks.traps(tx, params), name


# ------------------------------- trap b: a multiplier after schedule-free


def test_a_multiplier_after_schedule_free_trains_wrongly():
  """chain(schedule_free_sgd(lr), scale_by_rules({'**': r})) is not
  schedule_free_sgd(lr * r): schedule-free recomputes its averaged sequence
  from the params, which the multiplier moved elsewhere."""
  lr, r = 0.5, 0.3
  tx = optax.chain(optax.contrib.schedule_free_sgd(lr),
                   lw.scale_by_rules({"**": r}))
  ours, _ = run(tx)
  ref, _ = run(optax.contrib.schedule_free_sgd(lr * r))
  assert relative_gap(ours, ref) > 0.05
  assert trap_ids(tx) == ["scale-after-schedule-free"]
  with pytest.raises(ValueError, match=(
      r"(?s)\[scale-after-schedule-free\].*optax.contrib.schedule_free\("
      r"optax.chain\(optax.sgd\(lr\), lw.scale_by_rules\(rules\)\), "
      r"learning_rate=lr\)")):
    lw.check(tx, PARAMS)


def test_a_multiplier_inside_schedule_free_is_a_learning_rate_per_group():
  """The fix: multiply the base optimizer's update, inside schedule_free.
  It equals one schedule-free optimizer per group with lr * r_g (each with
  its own step weights, as PyTorch's schedulefree param groups)."""
  lr, b2, eps, wd = 0.05, 0.999, 1e-8, 0.01
  sgd = optax.contrib.schedule_free(
      optax.chain(optax.sgd(lr), lw.scale_by_rules(RATES)), learning_rate=lr)
  ref = per_group(lambda lr: optax.contrib.schedule_free_sgd(lr), lr)
  assert_trees_close(run(sgd)[0], run(ref)[0], rtol=2e-5, atol=1e-6)
  assert not trap_ids(sgd)
  adamw = optax.contrib.schedule_free(optax.chain(
      optax.scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True),
      optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr),
      lw.scale_by_rules(RATES)), learning_rate=lr)
  ref = per_group(lambda lr: optax.contrib.schedule_free_adamw(
      lr, b2=b2, eps=eps, weight_decay=wd), lr)
  assert_trees_close(run(adamw)[0], run(ref)[0], rtol=2e-5, atol=1e-6)
  assert not trap_ids(adamw)


# ------------------------------ trap c: a global norm before lw.freeze

FROZEN = "backbone/**"


def with_frozen_grad(value):
  """Gradients that are finite except one entry of a frozen leaf."""
  def grads(params, step):
    g = grads_at(params, step)
    return {**g, "backbone": {**g["backbone"],
                              "b": g["backbone"]["b"].at[0].set(value)}}
  return grads


def test_a_global_norm_before_freeze_makes_every_update_nan():
  """optax.clip_by_global_norm before lw.freeze measures the frozen
  gradients too: a NaN there makes the norm NaN and every trainable update
  NaN; an inf makes them 0; the fix (the clip inside the freeze) clips
  the trainable leaves by their own norm."""
  trap = optax.chain(optax.clip_by_global_norm(0.1),
                     lw.freeze(optax.sgd(1.0), FROZEN))
  fix = lw.freeze(optax.chain(optax.clip_by_global_norm(0.1),
                              optax.sgd(1.0)), FROZEN)
  _, nan = run(trap, steps=1, grads=with_frozen_grad(jnp.nan))
  _, inf = run(trap, steps=1, grads=with_frozen_grad(jnp.inf))
  assert all(bool(jnp.all(jnp.isnan(u))) for u in
             [nan["head"]["w"], nan["scale"]])
  assert all(bool(jnp.all(u == 0)) for u in [inf["head"]["w"], inf["scale"]])
  # The reference: clipping and SGD on the trainable leaves alone.
  trainable = {"head": PARAMS["head"], "scale": PARAMS["scale"]}
  ref = optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.0))
  _, expected = run(ref, steps=1, params=trainable)
  _, fixed = run(fix, steps=1, grads=with_frozen_grad(jnp.nan))
  assert_trees_close({"head": fixed["head"], "scale": fixed["scale"]},
                     expected, rtol=1e-6)
  assert trap_ids(trap) == ["frozen-gradients-reach-updates"]
  with pytest.raises(ValueError, match=(
      r"(?s)\[frozen-gradients-reach-updates\].*trainable 'head/w', "
      r"'scale'.*frozen 'backbone/b', 'backbone/w'.*every update NaN.*"
      r"lw.freeze\(optax.chain\(optax.clip_by_global_norm\(c\), "
      r"optimizer\), frozen\)")):
    lw.check(trap, PARAMS)
  lw.check(fix, PARAMS)


def test_what_sees_frozen_gradients_is_found_by_its_data_flow():
  clip = lambda: lw.clip_by_rules({"**": lw.clip_group_norm(1.0)})
  # Any global statistic, layerwise's own included, and frozen groups of
  # lw.partition: found.
  assert trap_ids(optax.chain(clip(), lw.freeze(optax.adam(1e-3),
                                                FROZEN))) == [
      "frozen-gradients-reach-updates"]
  assert trap_ids(optax.chain(optax.clip_by_global_norm(1.0), lw.partition(
      {FROZEN: None, "**": optax.adam(1e-3)}))) == [
      "frozen-gradients-reach-updates"]
  # After the freeze the frozen updates are exact zeros, which a global norm
  # may see: no trap; nor per-leaf clipping before it.
  assert not trap_ids(optax.chain(lw.freeze(optax.adam(1e-3), FROZEN),
                                  optax.clip_by_global_norm(1.0)))
  assert not trap_ids(optax.chain(
      lw.clip_by_rules({"**": lw.clip_norm(1.0)}),
      lw.freeze(optax.adam(1e-3), FROZEN)))


# ------------------------------ trap d: apply_if_finite around lw.freeze


def test_apply_if_finite_around_freeze_gives_up_for_good():
  """NaN gradients of frozen leaves count as failed steps; after
  max_consecutive_errors the wrapper applies them, and a later NaN of a
  trainable leaf reaches the update. Inside the freeze it never does."""
  nan_frozen = with_frozen_grad(jnp.nan)

  def nan_head(params, step):
    g = grads_at(params, step)
    return {**g, "head": {"w": g["head"]["w"].at[0, 0].set(jnp.nan)}}

  def steps(tx):
    state = tx.init(PARAMS)
    for step in range(3):
      _, state = tx.update(nan_frozen(PARAMS, step), state, PARAMS)
    updates, state = tx.update(nan_head(PARAMS, 3), state, PARAMS)
    return updates, state

  trap = optax.apply_if_finite(lw.freeze(optax.sgd(1.0), FROZEN), 2)
  fix = lw.freeze(optax.apply_if_finite(optax.sgd(1.0), 2), FROZEN)
  updates, state = steps(trap)
  assert int(state.total_notfinite) == 4
  assert bool(jnp.isnan(updates["head"]["w"][0, 0]))
  updates, state = steps(fix)
  assert int(state.inner_state.total_notfinite) == 1
  assert bool(jnp.all(updates["head"]["w"] == 0))
  assert trap_ids(trap) == ["apply-if-finite-around-freeze"]
  with pytest.raises(ValueError, match=(
      r"(?s)\[apply-if-finite-around-freeze\].*gives up.*"
      r"lw.freeze\(optax.apply_if_finite\(optimizer, "
      r"max_consecutive_errors\), frozen\)")):
    lw.check(trap, PARAMS)
  lw.check(fix, PARAMS)


# ------------------------------------------------------ check and describe


def test_check_lists_every_trap_at_once():
  tx = optax.apply_if_finite(optax.chain(
      lw.scale_by_rules(RATES), optax.adam(1e-3),
      lw.freeze(optax.sgd(1.0), FROZEN)), 3)
  with pytest.raises(ValueError, match=(
      r"(?s)2 traps.*1\. \[scale-before-adaptive\].*"
      r"2\. \[apply-if-finite-around-freeze\]")):
    lw.check(tx, PARAMS)


def test_check_takes_abstract_params():
  abstract = jax.eval_shape(lambda: PARAMS)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   lw.freeze(optax.adam(1e-3), FROZEN))
  assert trap_ids(tx, abstract) == ["frozen-gradients-reach-updates"]


def test_describe_prints_each_trap_as_a_warning():
  tx = optax.chain(lw.scale_by_rules(RATES), optax.adam(1e-3))
  d = lw.describe(tx, PARAMS)
  assert d.warnings == tuple(t.message for t in checks.traps(tx, PARAMS))
  lines = str(d).splitlines()
  assert lines[-1] == "warning: " + d.warnings[0]
  assert "lw.scale_by_rules runs before an adaptive optimizer" in lines[-1]
  fine = lw.describe(optax.chain(optax.adam(1e-3), lw.scale_by_rules(RATES)),
                     PARAMS)
  assert fine.warnings == ()
  assert "warning" not in str(fine)
