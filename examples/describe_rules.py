"""Which rule does each parameter of a model get? Print it before training.

A small transformer-like Flax model (embedding, four blocks, a head) and a
rule set of per-layer learning-rate multipliers: the script prints every
parameter's path, the rule that matched it and its value, then shows the
error a typo in a pattern gives instead of a model that silently does not
train.

Run:  python examples/describe_rules.py [--blocks 4] [--width 64]
"""

import argparse

import jax
import jax.numpy as jnp
from flax import linen as nn

import layerwise as lw


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    h = nn.Dense(self.width, name="attn")(h)
    x = x + nn.Dense(self.width, name="mlp")(nn.gelu(h))
    return x


class Model(nn.Module):
  blocks: int
  width: int
  vocab: int = 100
  classes: int = 10

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    for i in range(self.blocks):
      x = Block(self.width, name=f"layers_{i}")(x)
    return nn.Dense(self.classes, name="head")(x.mean(axis=1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=4)
  parser.add_argument("--width", type=int, default=64)
  args = parser.parse_args()

  model = Model(args.blocks, args.width)
  # Shapes only: nothing is allocated to describe a model.
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))

  rules = {
      "embed/**": 0.1,                       # pretrained embeddings: slow
      "layers_[01]/**": 0.3,                 # lower blocks: slower
      lw.ndim_at_most(1): 1.0,               # norms and biases elsewhere
      "layers_*/**": 0.6,
      "head/**": 1.0,                        # the new head: full rate
  }
  print("Per-layer learning-rate multipliers:\n")
  print(lw.describe(rules, params))

  typo = dict(rules)
  typo["haed/**"] = typo.pop("head/**")
  print("\nThe same rules with a typo ('haed/**') fail at once, naming it:\n")
  try:
    lw.describe(typo, params)
  except lw.RuleError as e:
    print(e)


if __name__ == "__main__":
  main()
