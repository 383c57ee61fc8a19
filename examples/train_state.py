"""Per-layer learning rates and clipping in a Flax linen TrainState.

A linen MLP learns a synthetic task in ``flax.training.train_state
.TrainState`` with a layerwise optimizer: layer-wise rate decay (each layer
at half the rate of the one above), the hidden layers clipped elementwise,
the head by its norm. The script prints every parameter's rules, trains with
the clipping norms as metrics, then stops the lowest layer and doubles the
head's rate with ``lw.set_scale`` between jitted steps, without recompiling.

Run:  python examples/train_state.py
"""

import jax
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import layerwise as lw


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name="layers_0")(x))
    x = nn.relu(nn.Dense(64, name="layers_1")(x))
    return nn.Dense(10, name="head")(x)


def main():
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(256, 64)).astype(np.float32)
  labels = (inputs @ rng.normal(size=(64, 10))).argmax(-1)
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), inputs[:1])["params"]
  tx = optax.chain(
      lw.clip_by_rules({"head/**": lw.clip_group_norm(0.5),
                        "**": lw.clip_value(0.05)}),
      optax.adam(3e-3),
      lw.scale_by_rules(lw.layer_decay(0.5, params)))  # 1.0, 0.5, 0.25
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)
  print(lw.describe(state.tx, state.params), "\n")
  traces = []

  @jax.jit
  def train_step(state, x, y):
    traces.append(None)
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    return state, loss, lw.norms(state.opt_state)

  for step in range(80):
    batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
    state, loss, norms = train_step(state, inputs[batch], labels[batch])
    if step % 20 == 0 or step == 79:
      norm, scale = norms["clip/head/**/norm"], norms["clip/head/**/scale"]
      print(f"step {step:2d}  loss {loss:.3f}  head: grad norm {norm:.3f}, "
            f"scaled by {scale:.2f}")

  # Between jitted steps: the multipliers are arrays in the state.
  opt_state = lw.set_scale(state.opt_state, "layers_0/**", 0.0)
  state = state.replace(opt_state=lw.set_scale(opt_state, "head/**", 2.0))
  lowest = state.params["layers_0"]["kernel"]
  state, loss, _ = train_step(state, inputs[:32], labels[:32])
  print("\nlayers_0 stopped:",
        bool(np.array_equal(lowest, state.params["layers_0"]["kernel"])))
  print(f"train_step traced {len(traces)} time(s):",
        "no recompilation" if len(traces) == 1 else "recompiled")
  print("\nThe latest norms next to each parameter:\n")
  print(lw.describe(state.tx, state.params, opt_state=state.opt_state))


if __name__ == "__main__":
  main()
