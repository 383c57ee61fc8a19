"""muP with layerwise: the best learning rate of a small MLP stays put as it widens.

Under the standard parametrization (SP), a wider network needs a smaller
Adam learning rate: the best rate found on a small model does not transfer.
Under the maximal-update parametrization (muP, Yang et al., Tensor Programs
V), it does. This script trains the same 3-layer MLP at two widths (4x
apart) under both, with no change to the model code:

* SP: ``optax.adam(lr)``.
* muP: ``lw.mup_scales`` gives the per-layer multipliers (1/width_mult for
  hidden matrices), and ``lw.reparameterize`` trains the output kernel as
  ``theta = W / width_mult``, which is exactly muP's output multiplier
  (``mup.MuReadout``) without touching the forward pass. The head starts at
  zero, as ``mup`` recommends.

It prints a coordinate check (how far each layer's activations move in the
first steps, per coordinate, at widths 32 to 512) and a learning-rate sweep
(the training loss after a fixed number of steps, averaged over seeds) with
the good rates per width: those whose loss is within 10% of the best, and
their centre in log2. Runs in about four minutes on a 2-core CPU.

    python examples/mup_transfer.py [--steps 50] [--seeds 2]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise as lw

D_IN, D_OUT, N, BASE = 16, 4, 8192, 32


def init(key, width, zero_head):
  keys = jax.random.split(key, 4)
  lecun = jax.nn.initializers.lecun_normal()
  head = (jnp.zeros((width, D_OUT)) if zero_head
          else lecun(keys[3], (width, D_OUT)))
  return {"in": {"kernel": lecun(keys[0], (D_IN, width)),
                 "bias": jnp.zeros(width)},
          "hidden": {"kernel": lecun(keys[1], (width, width)),
                     "bias": jnp.zeros(width)},
          "head": {"kernel": head, "bias": jnp.zeros(D_OUT)}}


def activations(params, x):
  h1 = jnp.tanh(x @ params["in"]["kernel"] + params["in"]["bias"])
  h2 = jnp.tanh(h1 @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h1, h2, h2 @ params["head"]["kernel"] + params["head"]["bias"]


def optimizer(kind, lr, params, width):
  if kind == "SP":
    return optax.adam(lr)
  base = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), BASE, True))
  inner = optax.chain(optax.adam(lr),
                      lw.scale_by_rules(lw.mup_scales(base, params, "adam")))
  return lw.reparameterize(inner, {"head/kernel": BASE / width, "**": 1.0})


def data(seed):
  kx = jax.random.PRNGKey(1000 + seed)
  x = jax.random.normal(kx, (N, D_IN))
  y = jnp.sin(2 * x[:, :D_OUT]) * jnp.cos(x[:, D_OUT:2 * D_OUT])
  return x, y


def train(kind, width, seed, lrs, steps):
  """The final training loss for each rate in ``lrs`` (vmapped)."""
  x, y = data(seed)
  params = init(jax.random.PRNGKey(seed), width, zero_head=kind == "muP")

  def loss(p):
    return jnp.mean((activations(p, x)[2] - y)**2)

  def final_loss(lr):
    tx = optimizer(kind, lr, params, width)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, steps)
    return loss(p)

  losses = np.asarray(jax.jit(jax.vmap(final_loss))(lrs))
  return np.where(np.isfinite(losses), losses, np.inf)


def coordinate_check(kind, width, lr=1e-3, steps=2):
  """RMS change of each layer's activations after ``steps`` steps."""
  x, y = data(0)
  params = init(jax.random.PRNGKey(0), width, zero_head=kind == "muP")
  tx = optimizer(kind, lr, params, width)
  p, s = params, tx.init(params)
  for _ in range(steps):
    grads = jax.grad(lambda q: jnp.mean((activations(q, x)[2] - y)**2))(p)
    u, s = tx.update(grads, s, p)
    p = optax.apply_updates(p, u)
  return [float(jnp.sqrt(jnp.mean((a - b)**2)))
          for a, b in zip(activations(params, x), activations(p, x))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--widths", type=int, nargs=2, default=[32, 128])
  args = parser.parse_args()

  params = init(jax.random.PRNGKey(0), 128, zero_head=True)
  print(f"muP multipliers for Adam, width {BASE} -> 128:")
  print(lw.describe(optimizer("muP", 1e-3, params, 128), params))

  print("\nCoordinate check: RMS change of the activations after 2 Adam "
        "steps (lr 1e-3)")
  print(f"{'':4} {'width':>6}  {'input layer':>11}  {'hidden':>8}  "
        f"{'logits':>8}")
  for kind in ("SP", "muP"):
    for width in (32, 128, 512):
      h1, h2, out = coordinate_check(kind, width)
      print(f"{kind:4} {width:6d}  {h1:11.4f}  {h2:8.4f}  {out:8.4f}")

  exponents = np.arange(-24, -3) / 2  # rates 2**-12 ... 2**-2
  lrs = jnp.asarray(2.0**exponents)
  print(f"\nLearning-rate sweep: training loss after {args.steps} Adam "
        f"steps, mean of {args.seeds} seeds")
  print("log2(lr): " + " ".join(f"{e:6.0f}" for e in exponents[::2]))
  centre = {}
  for kind in ("SP", "muP"):
    for width in args.widths:
      losses = np.mean([train(kind, width, s, lrs, args.steps)
                        for s in range(args.seeds)], axis=0)
      # The best rate is the centre of the good ones: a loss curve is flat
      # near its minimum, where the argmin alone is noise.
      good = exponents[losses <= 1.1 * losses.min()]
      centre[kind, width] = good.mean()
      curve = " ".join("   inf" if not np.isfinite(v) else f"{v:6.3f}"
                       for v in losses[::2])
      print(f"{kind:4} width {width:4d}  loss: {curve}")
      print(f"{'':15}within 10% of the best loss: lr 2^{good.min():.1f} .. "
            f"2^{good.max():.1f}, centre 2^{good.mean():.2f}")
  w0, w1 = args.widths
  for kind in ("SP", "muP"):
    shift = centre[kind, w1] - centre[kind, w0]
    print(f"{kind}: from width {w0} to {w1} the best rate moves by a factor "
          f"2^{shift:+.2f} = {2**shift:.2f}")


if __name__ == "__main__":
  main()
