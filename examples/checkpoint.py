"""Save and restore a layerwise optimizer state with orbax-checkpoint.

Multipliers, AutoClip's norm history and ZClip's averages are arrays in the
state, saved with it: restored (against ``jax.eval_shape`` of the state)
after 6 of 12 steps, the run resumes bit for bit, and ``lw.describe`` and
``lw.set_scale`` work on the restored state.

Run:  python examples/checkpoint.py
"""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import layerwise as lw

rng = np.random.default_rng(0)
X = rng.normal(size=(12, 64, 16)).astype(np.float32)  # one batch per step
Y = np.tanh(X @ rng.normal(size=(16, 1))).astype(np.float32)
X[[3, 8]] *= 20.0  # two outlier batches, for the clippers
tx = optax.chain(
    lw.clip_by_rules({"encoder/**": lw.clip_quantile(0.5, window=8),
                      "**": lw.clip_zscore(z=2.0, warmup=3)}),
    optax.adamw(1e-2, weight_decay=1e-4),
    lw.scale_by_rules({"encoder/**": 0.3, "head/**": 1.0}))


@jax.jit
def train_step(params, opt_state, x, y):
  def loss_fn(p):
    h = jnp.tanh(x @ p["encoder"]["w"] + p["encoder"]["b"])
    return jnp.mean((h @ p["head"]["w"] - y) ** 2)

  updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train(params, opt_state, steps):
  for t in steps:
    params, opt_state = train_step(params, opt_state, X[t], Y[t])
  return {"params": params, "opt_state": opt_state}


def main():
  # On the devices as restored arrays are: one compiled train_step for all.
  # A sharding of a mesh (here replicated), not SingleDeviceSharding(
  # jax.devices()[0]), which on several hosts is process 0's device alone
  # (examples/multihost.py; docs/multihost.md restores a sharded state).
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put({
      "encoder": {"w": rng.normal(size=(16, 32)).astype(np.float32) / 4,
                  "b": np.zeros(32, np.float32)},
      "head": {"w": rng.normal(size=(32, 1)).astype(np.float32) / 6}}, device)
  init = jax.jit(tx.init, out_shardings=lw.state_shardings(tx, params))(params)
  full = train(params, init, range(12))
  checkpointer = ocp.StandardCheckpointer()
  with tempfile.TemporaryDirectory() as directory:
    checkpointer.save(f"{directory}/6", train(params, init, range(6)))
    checkpointer.wait_until_finished()  # saving is asynchronous
    # Shapes, dtypes, shardings; the target gives NamedTuples and rules back.
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        jax.eval_shape(lambda: dict(params=params, opt_state=tx.init(params))))
    restored = checkpointer.restore(f"{directory}/6", target)
  resumed = train(restored["params"], restored["opt_state"], range(6, 12))
  fresh = train(restored["params"], init, range(6, 12))
  equal = lambda a, b: jax.tree_util.tree_all(
      jax.tree_util.tree_map(np.array_equal, a, b))
  print("resumed run equals the uninterrupted one:", equal(resumed, full))
  print("the same from a fresh state:", equal(fresh["params"], full["params"]))
  print("\nThe restored state, with the norms of step 6:\n\n"
        f"{lw.describe(tx, params, opt_state=restored['opt_state'])}")
  opt_state = lw.set_scale(restored["opt_state"], "encoder/**", 0.1)
  scale = opt_state[2]  # the multipliers are one vector, in the order of the paths
  print("\nencoder multiplier now:",
        f'{dict(zip(scale.rules.paths, scale.multipliers.tolist()))["encoder/w"]:g}')


if __name__ == "__main__":
  main()
