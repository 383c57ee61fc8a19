"""Cached features of a frozen prefix (docs/recipes.md, examples/finetune.py).

When the lower layers of a model are frozen and hold no randomness or batch
statistics, their output for an example never changes: computing it once and
training the upper layers on the cache is the same computation as running
the whole model in every step with the prefix frozen.

Reference: the whole model trained with ``lw.freeze`` and ``lw.stop_gradient``
on the same batches, with the same optimizer. Bit for bit on CPU: the prefix
computes each example's features alone (so the cache, built in batches of
another size, holds the numbers the step computes), and what the step
computes from them is the same program. On other backends a batch of
another size may select another kernel: float32 matmuls there, and the runs
agree to float32 rounding. The counter-case: with dropout
active in the prefix, the features differ from step to step, and the cache
does not train the same parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import layerwise as lw

PREFIX = "block_[01]/**"       # frozen; block_2 and the head train
BATCH, STEPS = 8, 12
ON_CPU = jax.default_backend() == "cpu"


class Model(nn.Module):
  """Two frozen blocks (``features``), a trainable block and a head
  (``classify``); ``dropout`` > 0 puts a dropout layer in the prefix."""
  dropout: float = 0.0

  def setup(self):
    self.block_0 = nn.Dense(16)
    self.block_1 = nn.Dense(16)
    self.block_2 = nn.Dense(16)
    self.head = nn.Dense(3)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, x, train=False):
    return self.classify(self.features(x, train))

  def features(self, x, train=False):
    x = nn.relu(self.block_0(x))
    x = self.drop(x, deterministic=not train or self.dropout == 0.0)
    return nn.relu(self.block_1(x))

  def classify(self, h):
    return self.head(nn.relu(self.block_2(h)))


def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=40)
  return x, y


def tx():
  # Something with state and a global statistic inside freeze: the clip
  # measures the trainable leaves only, in both runs.
  return lw.freeze(optax.chain(optax.clip_by_global_norm(0.5),
                               optax.adamw(1e-2, weight_decay=1e-2)), PREFIX)


def batch_indices():
  rng = np.random.default_rng(1)
  return [rng.permutation(40)[:BATCH] for _ in range(STEPS)]


def train(model, params, inputs, y, method, train_mode=False):
  """``STEPS`` steps of ``tx()`` on ``model.apply(params, inputs[b],
  method=method)``, the prefix frozen and its gradient stopped."""
  opt = tx()

  def loss_fn(params, x, y, key):
    params = lw.stop_gradient(params, PREFIX)
    kwargs = {"train": train_mode} if method is None else {}
    logits = model.apply(params, x, method=method, rngs={"dropout": key},
                         **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x, y, key):
    grads = jax.grad(loss_fn)(params, x, y, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i, b in enumerate(batch_indices()):
    params, opt_state = step(params, opt_state, inputs[b], y[b],
                             jax.random.PRNGKey(i))
  return params


def cache(model, params, x, batch_size):
  """The prefix's output for every example, in batches of ``batch_size``."""
  features = jax.jit(lambda p, x: model.apply(p, x, method=Model.features))
  return np.concatenate([np.asarray(features(params, x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def init(model, x):
  return model.init(jax.random.PRNGKey(0), x[:1])


def test_cached_features_train_the_same_params_bit_for_bit():
  model = Model()
  x, y = data()
  params = init(model, x)
  with jax.default_matmul_precision("float32"):
    reference = train(model, params, x, y, method=None)
    # A batch size that divides neither the data set nor the training batch.
    features = cache(model, params, x, batch_size=7)
    cached = train(model, params, features, y, method=Model.classify)
  for got, want in zip(jax.tree.leaves(cached), jax.tree.leaves(reference)):
    if ON_CPU:
      np.testing.assert_array_equal(got, want)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The frozen prefix did not move; what trains did.
  np.testing.assert_array_equal(cached["params"]["block_0"]["kernel"],
                                params["params"]["block_0"]["kernel"])
  assert not np.array_equal(cached["params"]["head"]["kernel"],
                            params["params"]["head"]["kernel"])


def test_cached_features_are_not_the_same_with_dropout_in_the_prefix():
  # Dropout in train mode draws a new mask in every step; the cache has
  # none (or one mask for good): the runs part ways.
  model = Model(dropout=0.5)
  x, y = data()
  params = init(model, x)
  reference = train(model, params, x, y, method=None, train_mode=True)
  features = cache(model, params, x, batch_size=7)
  cached = train(model, params, features, y, method=Model.classify)
  head = cached["params"]["head"]["kernel"]
  assert np.abs(head - reference["params"]["head"]["kernel"]).max() > 1e-3
