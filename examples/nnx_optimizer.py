"""Layerwise rules with Flax NNX: nnx.Optimizer, per-layer rates, frozen layers.

The first layer of an NNX MLP counts as pretrained: an NNX filter leaves it
out of ``nnx.Optimizer(model, tx, wrt=trainable)`` and of the gradient
(``nnx.DiffState``), so it has no updates and no optimizer state, and the
layerwise rules name the paths of the trainable ``nnx.State``. The script
trains on synthetic data, slows a layer down with ``lw.set_scale`` on
``optimizer.opt_state``, and checks that the frozen layer did not move.
It runs with flax 0.10 and with flax >= 0.11 (see ``update`` below).

Run:  python examples/nnx_optimizer.py
"""

import inspect

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layerwise as lw


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(8, 32, rngs=rngs)  # pretrained: frozen
    self.hidden = nnx.Linear(32, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.hidden(nnx.relu(self.embed(x))))
    return self.head(self.norm(x))


def update(optimizer, model, grads):
  """flax >= 0.11 passes the model to ``update``; flax 0.10 does not."""
  if "model" in inspect.signature(optimizer.update).parameters:
    optimizer.update(model, grads)
  else:
    optimizer.update(grads)


def main():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 8)).astype(np.float32)
  y = np.sin(x @ rng.normal(size=(8, 1))).astype(np.float32)
  model = MLP(nnx.Rngs(0))
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))
  tx = optax.chain(
      lw.clip_by_rules({"**": lw.clip_group_norm(1.0)}),
      optax.adamw(3e-3, weight_decay=1e-4),
      lw.scale_by_rules({"hidden/**": 0.5, "**": 1.0}))
  optimizer = nnx.Optimizer(model, tx, wrt=trainable)
  print(lw.describe(tx, nnx.state(model, trainable)), "\n")

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    diff = nnx.DiffState(0, trainable)  # no gradient for the frozen layer
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
    update(optimizer, model, grads)
    return loss, lw.norms(optimizer.opt_state)["clip/**/norm"]

  embed = np.array(model.embed.kernel[...])
  for step in range(150):
    if step == 100:  # from now on, the hidden layer at 0.05 of the rate
      optimizer.opt_state = lw.set_scale(optimizer.opt_state, "hidden/**", .05)
      print("hidden/** multiplier: 0.5 -> 0.05")
    batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
    loss, norm = train_step(model, optimizer, x[batch], y[batch])
    if step % 25 == 0 or step == 149:  # the norm of the trainable gradients
      print(f"step {step:3d}  loss {loss:.4f}  grad norm {norm:.3f}")
  print("\nfrozen layers unchanged:",
        bool(np.array_equal(embed, model.embed.kernel[...])))


if __name__ == "__main__":
  main()
