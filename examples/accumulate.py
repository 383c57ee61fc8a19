"""Gradient accumulation around a layerwise chain with optax.MultiSteps.

``optax.MultiSteps(chain, every_k_schedule=4)`` averages the gradients of 4
micro-batches and steps the whole chain (clipping by rules, AdamW, per-layer
rates) once on their mean, so the clippers see the mean gradient. The script
checks this against one step of the bare chain on the mean gradient, trains,
reads the wrapped state with ``lw.describe``, and stops a layer with
``lw.set_scale`` through the ``MultiStepsState``.

Run:  python examples/accumulate.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise as lw

K = 4  # micro-batches per step
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 16, 8)).astype(np.float32)  # 64 micro-batches
Y = np.sin(X @ rng.normal(size=(8, 1))).astype(np.float32)
chain = optax.chain(
    lw.clip_by_rules({"head/**": lw.clip_norm(0.5),
                      "**": lw.clip_group_norm(1.0)}),
    optax.adamw(1e-2, weight_decay=1e-4),
    lw.scale_by_rules({"encoder/**": 0.3, "head/**": 1.0}))
tx = optax.MultiSteps(chain, every_k_schedule=K)


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["encoder"]["w"] + params["encoder"]["b"])
  return jnp.mean((h @ params["head"]["w"] - y) ** 2)


@jax.jit
def micro_step(params, opt_state, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


def main():
  params = {"encoder": {"w": rng.normal(size=(8, 32)).astype(np.float32) / 3,
                        "b": np.zeros(32, np.float32)},
            "head": {"w": rng.normal(size=(32, 1)).astype(np.float32) / 6}}
  new, opt_state, grads = params, tx.init(params), []
  for i in range(K):
    new, opt_state, _, g = micro_step(new, opt_state, X[i], Y[i])
    grads.append(g)
  mean = jax.tree_util.tree_map(lambda *g: np.mean(g, axis=0), *grads)
  updates, _ = jax.jit(chain.update)(mean, chain.init(params), params)
  diff = max(np.max(np.abs(a - b)) for a, b in zip(
      jax.tree_util.tree_leaves(new),
      jax.tree_util.tree_leaves(optax.apply_updates(params, updates))))
  print(f"{K} micro-steps equal one step on the mean: {diff < 1e-6} "
        f"(largest difference {diff:.1e})\n")

  params = new
  for i in range(K, 48):
    params, opt_state, loss, _ = micro_step(params, opt_state, X[i], Y[i])
    if (i + 1) % (4 * K) == 0:
      print(f"step {(i + 1) // K:2d}  loss {loss:.4f}  clip scale "
            f"{lw.norms(opt_state)['clip/**/scale']:.2f}")
  print(f"\n{lw.describe(tx, params, opt_state=opt_state)}\n")

  opt_state = lw.set_scale(opt_state, "encoder/**", 0.0)  # MultiStepsState
  before = params["encoder"]["w"]
  for i in range(48, 48 + K):
    params, opt_state, _, _ = micro_step(params, opt_state, X[i], Y[i])
  print("encoder stopped through MultiSteps:",
        bool(np.array_equal(before, params["encoder"]["w"])))


if __name__ == "__main__":
  main()
