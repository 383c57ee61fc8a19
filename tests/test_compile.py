"""Kernels are shared: a layerwise step compiles what the plain one compiles.

XLA compiles one kernel per distinct fused computation, and compile time
follows the number of distinct ones, not the number of fusions. Plain adamw
on a model with many leaves of few shapes has many fusions but few distinct
ones. Per-leaf hyperparameters read at constant offsets of a state vector
made every leaf's fusion distinct (800 kernels for 777 leaves, 2.6-3x the
compile time); read at runtime indices (``_core.factors``), leaves of one
shape share a kernel again. This counts distinct fused computations in the
compiled step, the invariant behind the compile-time ratios of
``benchmarks/groups.py`` (a timing is not a test).
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import layerwise as lw

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="the runtime-index reads are the CPU's; other backends slice")

# 24 blocks of the same three shapes, an embedding and a head: 75 leaves.
TREE = {
    "embed": jax.ShapeDtypeStruct((64, 16), jnp.float32),
    "blocks": [{"w": jax.ShapeDtypeStruct((16, 16), jnp.float32),
                "b": jax.ShapeDtypeStruct((16,), jnp.float32),
                "scale": jax.ShapeDtypeStruct((16,), jnp.float32)}
               for _ in range(24)],
    "head": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)},
}


def distinct_fusions(tx):
  """(fusions, distinct fused computations) of the compiled step; names
  and metadata removed, so fusions that differ only in them count once."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, TREE)
  return count_fusions(jax.jit(step, donate_argnums=(0, 1)).lower(
      TREE, state, TREE).compile().as_text())


def count_fusions(text):
  """(fusions, distinct fused computations) of compiled HLO ``text``."""
  bodies = re.findall(r"\n(%?fused_computation[^\n]*\{\n(?:  [^\n]*\n)*)\}",
                      text)
  distinct = set()
  for body in bodies:
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    body = re.sub(r"%[\w.\-]+", "%x", body)
    body = re.sub(r"\bparam_[\d.]+", "p", body)
    distinct.add(body.split("\n", 1)[1])
  return len(bodies), len(distinct)


def per_leaf_rates():
  """A different rule for every block: the case that made kernels distinct."""
  return {f"blocks/{i}/**": 0.5 + i / 48 for i in range(24)} | {"**": 1.0}


def test_the_count_sees_distinct_kernels():
  # The reference the other tests lean on: constants per leaf compiled in
  # (optax.partition with a learning rate per block) are distinct kernels.
  plain = distinct_fusions(optax.adamw(1e-3))
  labels = lw.labels({f"blocks/{i}/**": f"g{i}" for i in range(24)}
                     | {"**": "rest"})
  partitioned = distinct_fusions(optax.partition(
      {f"g{i}": optax.adamw(1e-3 * (1 + i)) for i in range(24)}
      | {"rest": optax.adamw(1e-3)}, labels))
  assert partitioned[1] >= plain[1] + 24


def test_per_leaf_multipliers_share_the_plain_kernels():
  fusions, plain = distinct_fusions(optax.adamw(1e-3))
  got = distinct_fusions(optax.chain(optax.adamw(1e-3),
                                     lw.scale_by_rules(per_leaf_rates())))
  assert got[0] >= fusions  # as many fusions, hardly more kernels
  assert got[1] <= plain + 3, (got, plain)


def test_a_fine_tuning_chain_compiles_few_more_kernels_than_its_twin():
  decay = lw.labels({lw.NO_DECAY: False, "**": True})
  twin = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-3, weight_decay=0.01, mask=decay))
  chain = lw.freeze(optax.chain(
      lw.clip_by_rules({f"blocks/{i}/**": lw.clip_group_norm(1.0 + i)
                        for i in range(24)} | {"**": lw.clip_norm(1.0)}),
      lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01}),
      optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3),
      lw.scale_by_rules(per_leaf_rates())), "embed")
  _, reference = distinct_fusions(twin)
  _, got = distinct_fusions(chain)
  assert got <= reference + 12, (got, reference)
