"""The checkpoint format of layerwise states: what a saved state is named.

A checkpoint (orbax, flax serialization) names each array of an optimizer
state by its key path: the state's fields, and the keys of the statistics of
``clip_by_rules``. ``tests/data/state_v0.npz`` holds a state of every
layerwise transformation as layerwise 0.1.0.dev0 saved it (written by
``tests/make_state_fixture.py``), and the updates it gave one step later.
Today's code must load it by those names and continue bit for bit; a test
that fails here means a checkpoint saved before no longer restores, which
needs a line in CHANGELOG.md's "What moved".
"""

import pathlib

import jax
import numpy as np
import pytest

import layerwise as lw
import make_state_fixture as fixture

SAVED = pathlib.Path(__file__).parent / "data" / "state_v0.npz"


def by_key_path(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(k): v for k, v in leaves}, treedef


def saved(prefix):
  data = np.load(SAVED)
  return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def test_a_state_saved_by_layerwise_0_1_restores_and_continues():
  tx = fixture.chain()
  target, treedef = by_key_path(jax.eval_shape(tx.init, fixture.params()))
  arrays = saved("state")
  only_saved = sorted(set(arrays) - set(target))
  only_now = sorted(set(target) - set(arrays))
  if only_saved or only_now:
    pytest.fail(
        "The checkpoint format changed: a state saved by layerwise 0.1 does "
        "not restore into today's target, because its arrays are named "
        f"otherwise. Only in the saved state: {only_saved}. Only in today's: "
        f"{only_now}. Keep the names (Clipper.stats_key, the states' fields), "
        "or say in CHANGELOG.md how to move a checkpoint over.")
  for key, spec in target.items():
    assert (arrays[key].shape, arrays[key].dtype) == (spec.shape, spec.dtype), key
  state = treedef.unflatten([arrays[k] for k in target])
  updates, _ = jax.jit(tx.update)(fixture.grads(3), state, fixture.params())
  expected = saved("updates")
  got, _ = by_key_path(updates)
  assert set(got) == set(expected)
  for key, value in got.items():
    # Bit for bit with the jax and backend that wrote them; others may fuse
    # the same arithmetic differently.
    if str(np.load(SAVED)["written_by"]).endswith(
        f"jax {jax.__version__}, {jax.default_backend()}"):
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


@pytest.mark.parametrize("clipper", [lw.clip_quantile(0.5, window=4),
                                     lw.clip_zscore(z=2.0, warmup=3)])
def test_statistics_keys_do_not_follow_repr(clipper, monkeypatch):
  tx = lw.clip_by_rules({"**": clipper})
  params = {"w": np.zeros(2, np.float32)}
  before = list(tx.init(params).stats)
  monkeypatch.setattr(type(clipper), "__repr__", lambda self: "renamed")
  assert list(tx.init(params).stats) == before == [clipper.stats_key()]
  assert before[0].startswith(("clip_quantile(0.5, window=4)",
                               "clip_zscore(z=2, alpha=0.97, warmup=3)"))
