"""Shared models for the tests (a Flax linen CNN and a Flax NNX MLP), and
the helpers several test modules use."""

import fnmatch
import inspect
import os

# test_sharding runs on a mesh of 8 CPU devices. XLA reads the flag when jax
# starts its CPU backend, so it is set before jax is imported; computations
# elsewhere still run on the first device. A device count given by the user
# is kept.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" {_FLAG}=8").strip()

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import layerwise as lw

# Scripts that write the recorded fixtures in tests/data (one needs timm):
# tests import them, pytest does not collect them.
collect_ignore_glob = ["make_*_fixture.py"]
# Type-checked by mypy in .ci/run, not a test module.
collect_ignore = ["typed_usage.py",
                  # One process of test_multihost's runs, not a test module.
                  "multihost_worker.py"]


def flat(tree):
  """``{path: leaf}`` of a tree, paths as ``lw.paths`` names them."""
  return dict(zip(jax.tree_util.tree_leaves(lw.paths(tree)),
                  jax.tree_util.tree_leaves(tree)))


def reference_glob(pattern, path):
  """The documented glob semantics, written independently of the library:
  fnmatch within a segment, '**' any number of whole segments, one leading
  '/' ignored."""
  pat = (pattern[1:] if pattern.startswith("/") else pattern).split("/")
  segs = path.split("/") if path else []

  def go(i, j):
    if i == len(pat):
      return j == len(segs)
    if pat[i] == "**":
      return any(go(i + 1, k) for k in range(j, len(segs) + 1))
    return (j < len(segs) and fnmatch.fnmatchcase(segs[j], pat[i])
            and go(i + 1, j + 1))

  return go(0, 0)


def optimizer_update(optimizer, model, grads):
  """``optimizer.update``: flax >= 0.11 takes the model, 0.10 does not."""
  if "model" in inspect.signature(optimizer.update).parameters:
    optimizer.update(model, grads)
  else:
    optimizer.update(grads)


class LinenCNN(nn.Module):
  """Two convolutions, a norm and two dense layers (the linen test model).

  ``widths``: the channels of conv1 and conv2 and the features of dense.
  """
  widths: tuple[int, int, int] = (8, 16, 32)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(self.widths[1], (3, 3), name="conv2")(x))
    x = nn.LayerNorm(name="norm")(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.widths[2], name="dense")(x))
    return nn.Dense(10, name="head")(x)


class NNXMLP(nnx.Module):
  """A list of hidden layers, a norm and a head (the NNX test model)."""

  def __init__(self, sizes, rngs):
    # nnx.List is required from flax 0.12 on; older releases take a list.
    self.layers = getattr(nnx, "List", list)([
        nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-2], sizes[1:-1])
    ])
    self.norm = nnx.LayerNorm(sizes[-2], rngs=rngs)
    self.head = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(self.norm(x))


@pytest.fixture(scope="session")
def linen_variables():
  """``{"params": ...}`` of the linen CNN on 8x8x1 inputs."""
  return jax.jit(LinenCNN().init)(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))


@pytest.fixture
def nnx_model():
  return NNXMLP((4, 16, 16, 3), nnx.Rngs(0))
