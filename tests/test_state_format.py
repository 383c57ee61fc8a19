"""The checkpoint format of layerwise states: what a saved state is named.

A checkpoint (orbax, flax serialization) names each array of an optimizer
state by its key path: the states' fields, and the keys of the statistics of
``clip_by_rules``. ``tests/data/state_v*.npz`` hold a state of every layerwise
transformation as a release saved it (written by
``tests/make_state_fixture.py``), and the updates it gave one step later:

* ``state_v0.npz``: layerwise 0.1.0.dev0 (3f6ca3e). Its clip statistics
  were keyed with the quantile and z-score, and it had no weight decays
  and thresholds in the state: it no longer restores against a target, and
  ``lw.restore_state`` brings it over.
* ``state_v1.npz``: the format since the hyperparameters moved into the
  state (issue 22). It restores against today's target as saved.

Each continues as it would have (v1 bit for bit on the jax that wrote it). A failure here means a
checkpoint saved before no longer restores: it needs a line in CHANGELOG.md
and, if it can be brought over, a case in ``lw.restore_state``.
"""

import pathlib
import re

import jax
import numpy as np
import pytest

import layerwise as lw
import make_state_fixture as fixture

DATA = pathlib.Path(__file__).parent / "data"


def by_key_path(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(k): v for k, v in leaves}, treedef


def saved(version, prefix):
  data = np.load(DATA / f"state_{version}.npz")
  return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def as_restored_without_target(arrays):
  """The arrays as orbax restores them without a target: nested dicts (a
  list's items and a NamedTuple's fields keyed by index and name)."""
  tree = {}
  for key, value in arrays.items():
    segments = re.findall(r"\[(\d+)\]|\.(\w+)|\['([^']*)'\]", key)
    *parents, leaf = ["".join(s) for s in segments]
    node = tree
    for seg in parents:
      node = node.setdefault(seg, {})
    node[leaf] = value
  return tree


def continues_as_saved(version, state, exact=True):
  tx = fixture.chain()
  updates, _ = jax.jit(tx.update)(fixture.grads(3), state, fixture.params())
  expected = saved(version, "updates")
  got, _ = by_key_path(updates)
  assert set(got) == set(expected)
  written_by = str(np.load(DATA / f"state_{version}.npz")["written_by"])
  for key, value in got.items():
    # Bit for bit with the jax and backend that wrote them; others may fuse
    # the same arithmetic differently.
    if exact and written_by.endswith(
        f"jax {jax.__version__}, {jax.default_backend()}"):
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


def test_todays_state_restores_against_a_target_and_continues():
  tx = fixture.chain()
  target, treedef = by_key_path(jax.eval_shape(tx.init, fixture.params()))
  arrays = saved("v1", "state")
  only_saved = sorted(set(arrays) - set(target))
  only_now = sorted(set(target) - set(arrays))
  if only_saved or only_now:
    pytest.fail(
        "The checkpoint format changed: a state saved in format v1 does not "
        "restore into today's target, because its arrays are named "
        f"otherwise. Only in the saved state: {only_saved}. Only in today's: "
        f"{only_now}. Keep the names (Clipper.stats_key, the states' fields), "
        "or add a format, say in CHANGELOG.md how to move a checkpoint over, "
        "and teach lw.restore_state to.")
  for key, spec in target.items():
    assert (arrays[key].shape, arrays[key].dtype) == (spec.shape, spec.dtype), key
  continues_as_saved("v1", treedef.unflatten([arrays[k] for k in target]))


def test_a_state_saved_by_layerwise_0_1_needs_restore_state():
  tx = fixture.chain()
  target, _ = by_key_path(jax.eval_shape(tx.init, fixture.params()))
  arrays = saved("v0", "state")
  # Against a target it does not restore: new hyperparameter arrays, and
  # statistics keys without the quantile and z-score.
  assert sorted(set(target) - set(arrays)) == [
      "[1].stats['clip_quantile(window=4)']['filled']",
      "[1].stats['clip_quantile(window=4)']['history']",
      "[1].stats['clip_quantile(window=4)']['next']",
      "[1].stats['clip_quantile(window=4)']['threshold']",
      "[1].stats['clip_zscore(alpha=0.9, warmup=2)']['count']",
      "[1].stats['clip_zscore(alpha=0.9, warmup=2)']['mean']",
      "[1].stats['clip_zscore(alpha=0.9, warmup=2)']['threshold']",
      "[1].stats['clip_zscore(alpha=0.9, warmup=2)']['var']",
      "[1].stats['clip_zscore(alpha=0.9, warmup=2)']['warmup_norms']",
      "[1].thresholds",
      "[3].inner_states[1].inner_state.inner_state[0].weight_decays"]
  # lw.restore_state brings it over; the weight decays and thresholds come
  # from the rules, as the old code had them as constants.
  restored = as_restored_without_target(arrays)
  state = lw.restore_state(tx.init(fixture.params()), restored)
  # To float32 rounding, not bit for bit: 0.1.0.dev0 compiled the weight
  # decays and thresholds in as constants, and XLA rewrites arithmetic with
  # constants (a division by one becomes a multiplication).
  continues_as_saved("v0", state, exact=False)
  with pytest.raises(ValueError, match="pass tx.init\\(params\\) as the target"):
    lw.restore_state(jax.eval_shape(tx.init, fixture.params()), restored)


def test_restore_state_names_what_does_not_fit():
  tx = fixture.chain()
  restored = as_restored_without_target(saved("v1", "state"))
  target = tx.init(fixture.params())
  state = lw.restore_state(target, restored)
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
      target)
  del restored["3"]["inner_states"]["0"]
  restored["3"]["extra"] = np.zeros(2)
  restored["0"]["norms"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as info:
    lw.restore_state(target, restored)
  message = str(info.value)
  assert "missing: '3/inner_states/0/0/trace/head/w'" in message
  assert "not in the target: '3/extra'" in message
  assert "'0/norms': (5,) float32 restored, (3,) float32 in the target" in message
  assert "Build the target with the transformation" in message


@pytest.mark.parametrize("clipper", [lw.clip_quantile(0.5, window=4),
                                     lw.clip_zscore(z=2.0, warmup=3)])
def test_statistics_keys_do_not_follow_repr(clipper, monkeypatch):
  tx = lw.clip_by_rules({"**": clipper})
  params = {"w": np.zeros(2, np.float32)}
  before = list(tx.init(params).stats)
  monkeypatch.setattr(type(clipper), "__repr__", lambda self: "renamed")
  assert list(tx.init(params).stats) == before == [clipper.stats_key()]
  # Only what the statistics' shapes depend on: not the live quantile or
  # z-score, which a sweep changes (lw.set_threshold).
  assert before[0] in ("clip_quantile(window=4)",
                       "clip_zscore(alpha=0.97, warmup=3)")
