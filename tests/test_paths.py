"""Tests for layerwise._paths: one naming scheme for every kind of pytree."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

import layerwise as lw
from layerwise import _paths


def leaf_paths(tree):
  return jax.tree_util.tree_leaves(lw.paths(tree))


def test_nested_dict_and_list_paths():
  tree = {"encoder": {"layers": [{"attn": {"kernel": jnp.ones((2, 2))}},
                                 {"attn": {"kernel": jnp.ones((2, 2))}}]},
          "head": jnp.zeros(3)}
  assert lw.paths(tree) == {
      "encoder": {"layers": [{"attn": {"kernel": "encoder/layers/0/attn/kernel"}},
                             {"attn": {"kernel": "encoder/layers/1/attn/kernel"}}]},
      "head": "head",
  }


def test_structure_is_the_trees():
  tree = {"a": [jnp.ones(2), (jnp.ones(1), None)], "b": {"c": jnp.ones(())}}
  assert (jax.tree_util.tree_structure(lw.paths(tree))
          == jax.tree_util.tree_structure(tree))


def test_frozendict_named_like_dict():
  tree = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  assert leaf_paths(FrozenDict(tree)) == leaf_paths(tree) == [
      "Dense_0/bias", "Dense_0/kernel"]


def test_linen_params_with_and_without_outer_params(linen_variables):
  expected = ["conv1/bias", "conv1/kernel", "conv2/bias", "conv2/kernel",
              "dense/bias", "dense/kernel", "head/bias", "head/kernel",
              "norm/bias", "norm/scale"]
  assert leaf_paths(linen_variables) == expected
  assert leaf_paths(linen_variables["params"]) == expected
  assert leaf_paths(FrozenDict(linen_variables)) == expected


def test_params_prefix_kept_when_other_collections_present():
  variables = {"params": {"w": jnp.ones(2)}, "batch_stats": {"mean": jnp.ones(2)}}
  assert leaf_paths(variables) == ["batch_stats/mean", "params/w"]


def test_nnx_state_named_like_linen(nnx_model):
  state = nnx.state(nnx_model, nnx.Param)
  assert leaf_paths(state) == [
      "head/bias", "head/kernel",
      "layers/0/bias", "layers/0/kernel",
      "layers/1/bias", "layers/1/kernel",
      "norm/bias", "norm/scale",
  ]
  # Gradients from nnx.grad are a State of the same shape: same names.
  grads = nnx.grad(lambda m: m(jnp.ones((1, 4))).sum())(nnx_model)
  assert leaf_paths(grads) == leaf_paths(state)


def test_linen_partitioned_boxes_are_transparent():

  class Sharded(nn.Module):

    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m"))
      return nn.Dense(3, kernel_init=init, name="dense")(x)

  variables = Sharded().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
  assert isinstance(variables["params"]["dense"]["kernel"], nn.Partitioned)
  assert leaf_paths(variables) == ["dense/bias", "dense/kernel"]


class Pair(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


@dataclasses.dataclass
class Block:
  """An equinox-style module: a registered dataclass with array fields."""
  attn: Pair
  scale: jax.Array


jax.tree_util.register_dataclass(Block, data_fields=["attn", "scale"],
                                 meta_fields=[])


def test_namedtuple_tuple_and_dataclass():
  tree = [Block(Pair(jnp.ones((2, 2)), jnp.ones(2)), jnp.ones(())),
          (jnp.ones(1), jnp.ones(1))]
  assert leaf_paths(tree) == ["0/attn/kernel", "0/attn/bias", "0/scale",
                              "1/0", "1/1"]


def test_none_and_masked_node_are_skipped():
  tree = {"a": None, "b": optax.MaskedNode(), "c": jnp.ones(2)}
  assert leaf_paths(tree) == ["c"]
  assert lw.paths(tree) == {"a": None, "b": optax.MaskedNode(), "c": "c"}


def test_masked_optimizer_state_names_only_real_leaves():
  params = {"w": jnp.ones(2), "b": jnp.ones(2)}
  tx = optax.masked(optax.adam(1.0), {"w": True, "b": False})
  state = tx.init(params)
  assert [p for p in leaf_paths(state) if p.endswith(("/b", "/w"))] == [
      "inner_state/0/mu/w", "inner_state/0/nu/w"]


def test_integer_dict_keys_and_root_leaf():
  assert leaf_paths({0: jnp.ones(1), 1: {"k": jnp.ones(1)}}) == ["0", "1/k"]
  assert lw.paths(jnp.ones(3)) == ""


def test_flatten_with_paths_matches_tree_flatten(nnx_model):
  state = nnx.state(nnx_model, nnx.Param)
  names, leaves, treedef = _paths.flatten_with_paths(state)
  ref_leaves, ref_treedef = jax.tree_util.tree_flatten(state)
  assert treedef == ref_treedef
  assert all(a is b for a, b in zip(leaves, ref_leaves))
  assert len(names) == len(leaves) == 8


@pytest.mark.parametrize("tree", [{}, [], None, (None, optax.MaskedNode())])
def test_empty_trees(tree):
  assert leaf_paths(tree) == []
