"""Writes tests/data/state_v<N>.npz: a layerwise optimizer state as a
checkpoint holds it, for tests/test_state_format.py.

The chain below holds one state of every layerwise transformation. After
three updates its arrays are saved by key path (``jax.tree_util.keystr``),
as orbax and flax name them, with the updates of a fourth step. In the
repository, with jax 0.10.2 on CPU:

* state_v0.npz was written by layerwise 0.1.0.dev0 (commit 3f6ca3e, before
  the state protocol of issue 17);
* state_v1.npz by the commit that moved the weight decays and clip
  thresholds into the state (issue 22).

  python tests/make_state_fixture.py tests/data/state_v1.npz

Only public names of 0.1.0.dev0 are used, so the script runs on any release.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise as lw


def params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"embed": normal(6, 4),
          "encoder": {"w": normal(4, 4), "b": normal(4)},
          "head": {"w": normal(4, 3), "b": normal(3)}}


def grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * (1 + 5 * (step == 2)),
                            jnp.float32), params())


def chain():
  inner = optax.chain(
      lw.add_decayed_weights({"embed": 0.0, "**": 0.01}),
      optax.adam(1e-2),
      lw.scale_by_rules({"embed": 0.1, "**": 1.0}))
  return optax.chain(
      lw.track_norms({"**": "{parent}"}),
      lw.clip_by_rules({"embed": lw.clip_norm(1.0),
                        "encoder/**": lw.clip_quantile(0.5, window=4),
                        "**": lw.clip_zscore(z=2.0, alpha=0.9, warmup=2)}),
      lw.map_updates(lambda u, p, path: 0.5 * u, "head/**"),
      lw.partition({"head/b": None,
                    "head/**": optax.sgd(0.1, momentum=0.9),
                    "**": lw.freeze(lw.reparameterize(inner, {"encoder/**": 2.0,
                                                              "**": 1.0}),
                                    "encoder/b")}))


def run(tx, state, steps):
  p = params()
  update = jax.jit(tx.update)
  for t in steps:
    updates, state = update(grads(t), state, p)
  return state, updates


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main(path):
  tx = chain()
  state, _ = run(tx, tx.init(params()), range(3))
  _, updates = run(tx, state, [3])
  arrays = {"state" + k: v for k, v in flat(state).items()}
  arrays.update({"updates" + k: v for k, v in flat(updates).items()})
  arrays["written_by"] = np.array(f"layerwise {lw.__version__}, jax "
                                  f"{jax.__version__}, {jax.default_backend()}")
  np.savez(path, **arrays)
  print(f"wrote {len(arrays)} arrays to {path}")


if __name__ == "__main__":
  main(sys.argv[1])
