"""Stacked (scanned) models and their unrolled twins, for tests/test_stacks.py.

Each builder returns a :class:`Twins`: a model whose L layers are stacked in
one array per kind (linen ``nn.scan``, NNX ``nnx.vmap`` + ``nnx.scan``, an
Equinox ``filter_vmap`` stack, a plain dict with the layer axis at 1 as in
MaxText), and the same model unrolled, whose params are the slices of the
stacked ones and whose paths are ``layers/<i>/...``. Both losses compute the
same function (the twin applies its blocks in a Python loop), so their
gradients agree, and a rule set written for the twin must train the stacked
model identically.

The block is the same everywhere: a pre-norm residual MLP
``x + mlp(tanh(attn(ln(x))))`` (``ln``: LayerNorm scale and bias, ``attn``
and ``mlp``: dense kernels and biases), between an ``embed`` and a ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from layerwise import _paths

L = 4      # layers
D_IN = 3   # input features
D = 5      # width (not L: an unstacked leaf must not look stacked)
D_OUT = 2  # outputs
BATCH = 8


@dataclasses.dataclass(frozen=True)
class Twins:
  """A stacked model and its unrolled twin.

  Attributes:
    name: the model's kind, for test ids.
    stacked: the stacked model's params.
    stacked_loss: ``(params, (x, y)) -> scalar``.
    stacks: the ``stacks=`` that declares its stack(s).
    twin: the unrolled twin's params: the slices of ``stacked``.
    twin_loss: ``(params, (x, y)) -> scalar``, the same function.
    detected: whether the stacked params' Flax metadata declares the
      stacks, so that transformations are given no ``stacks=`` at all.
  """
  name: str
  stacked: Any
  stacked_loss: Callable[[Any, Any], jax.Array]
  stacks: dict[str, int]
  twin: Any
  twin_loss: Callable[[Any, Any], jax.Array]
  detected: bool = False


def batches(n: int, seed: int = 1) -> list[tuple[jax.Array, jax.Array]]:
  """``n`` regression batches ``(x, y)``, one per step."""
  out = []
  for k in jax.random.split(jax.random.key(seed), n):
    kx, ky = jax.random.split(k)
    out.append((jax.random.normal(kx, (BATCH, D_IN)),
                jax.random.normal(ky, (BATCH, D_OUT))))
  return out


# ------------------------------------------------ stacked <-> unrolled trees


def _layer_sources(stacked: Any, stacks: dict[str, int]
                   ) -> dict[str, tuple[jax.Array, int | None, int]]:
  """For each layer path of ``stacked`` (``layers/3/mlp/kernel``): the
  stacked array, its layer axis (``None``: not stacked) and the index."""
  paths, leaves, _ = _paths.flatten_with_paths(stacked)
  out: dict[str, tuple[jax.Array, int | None, int]] = {}
  for p, x in zip(paths, leaves):
    roots = [r for r in stacks if p == r or p.startswith(r + "/") or not r]
    if not roots:
      out[p] = (x, None, 0)
      continue
    root = roots[0]
    axis = stacks[root] % np.ndim(x)
    for i in range(np.shape(x)[axis]):
      out[_paths.layer_path(root, i, p)] = (x, axis, i)
  return out


def unroll(stacked: Any, template: Any, stacks: dict[str, int]) -> Any:
  """``template`` (a twin-shaped tree) holding the slices of ``stacked``:
  the leaf at ``layers/3/mlp/kernel`` is layer 3 of the stacked
  ``layers/mlp/kernel``. Works for params and for updates alike."""
  sources = _layer_sources(stacked, stacks)
  paths, leaves, treedef = _paths.flatten_with_paths(template)
  if sorted(paths) != sorted(sources):
    raise AssertionError(f"twin paths {sorted(paths)} are not the stacked "
                         f"model's layer paths {sorted(sources)}")
  out = []
  for p, t in zip(paths, leaves):
    x, axis, i = sources[p]
    piece = x if axis is None else jnp.take(x, i, axis=axis)
    if np.shape(piece) != np.shape(t):  # pragma: no cover - a bad builder
      raise AssertionError(f"{p}: slice {np.shape(piece)}, twin "
                           f"{np.shape(t)}")
    out.append(piece)
  return treedef.unflatten(out)


# ------------------------------------------------------------ linen nn.scan


def linen(metadata: str | None = None) -> Twins:
  """A linen model whose blocks are one ``nn.scan`` over axis 0.

  With ``metadata`` (an axis name), kernels are ``nn.with_partitioning``
  boxes and the scan names its axis ``metadata`` (``metadata_params``): the
  stack can be found from that, and the params keep their boxes.
  """
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  def kinit(names):
    init = nn.initializers.lecun_normal()
    return nn.with_partitioning(init, names) if metadata else init

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _=None):
      h = nn.LayerNorm(name="ln")(x)
      h = jnp.tanh(nn.Dense(D, kernel_init=kinit(("embed", "mlp")),
                            name="attn")(h))
      h = nn.Dense(D, kernel_init=kinit(("mlp", "embed")), name="mlp")(h)
      return x + h, None

  scan_kw = ({"metadata_params": {nn.PARTITION_NAME: metadata}}
             if metadata else {})

  class Stacked(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(D, kernel_init=kinit(("vocab", "embed")), name="embed")(x)
      x, _ = nn.scan(Block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=L,
                     **scan_kw)(name="layers")(x, None)
      return nn.Dense(D_OUT, kernel_init=kinit(("embed", "out")),
                      name="head")(x)

  x0 = jnp.ones((BATCH, D_IN))
  params = Stacked().init(jax.random.key(0), x0)["params"]

  def stacked_loss(p, batch):
    x, y = batch
    return jnp.mean((Stacked().apply({"params": p}, x) - y) ** 2)

  def twin_loss(p, batch):
    x, y = batch
    h = nn.Dense(D).apply({"params": p["embed"]}, x)
    for block in p["layers"]:
      h, _ = Block().apply({"params": block}, h)
    return jnp.mean((nn.Dense(D_OUT).apply({"params": p["head"]}, h) - y)
                    ** 2)

  plain = nn.unbox(params) if metadata else params
  template = {"embed": plain["embed"], "head": plain["head"],
              "layers": [jax.tree_util.tree_map(lambda a: a[0],
                                                plain["layers"])] * L}
  return Twins("linen-scan" + ("-metadata" if metadata else ""), params,
               stacked_loss, {"layers": 0},
               unroll(plain, template, {"layers": 0}), twin_loss,
               detected=metadata == "layers")


# --------------------------------------------------------- NNX vmap + scan


def nnx_models(metadata: str | None = None) -> tuple[Any, Any]:
  """NNX ``(Stacked, Unrolled)`` model classes. ``Stacked`` makes its blocks
  with ``nnx.vmap`` over split rngs and applies them with ``nnx.scan``; with
  ``metadata`` (an axis name), kernels carry sharding names and the vmap
  adds ``metadata`` to them (``transform_metadata``)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def kinit(names):
    init = nnx.initializers.lecun_normal()
    if not metadata:
      return init
    # eager_sharding=False: no mesh needed (flax >= 0.12 shards eagerly).
    return nnx.with_partitioning(init, names, eager_sharding=False)

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.ln = nnx.LayerNorm(D, rngs=rngs)
      self.attn = nnx.Linear(D, D, kernel_init=kinit(("embed", "mlp")),
                             rngs=rngs)
      self.mlp = nnx.Linear(D, D, kernel_init=kinit(("mlp", "embed")),
                            rngs=rngs)

    def __call__(self, x):
      return x + self.mlp(jnp.tanh(self.attn(self.ln(x))))

  vmap_kw = ({"transform_metadata": {nnx.PARTITION_NAME: metadata}}
             if metadata else {})

  class Stacked(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Linear(D_IN, D, rngs=rngs)

      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0, **vmap_kw)
      def make(rngs):
        return Block(rngs)

      self.layers = make(rngs)
      self.head = nnx.Linear(D, D_OUT, rngs=rngs)

    def __call__(self, x):
      x = self.embed(x)

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(h, block):
        return block(h)

      return self.head(forward(x, self.layers))

  listed = getattr(nnx, "List", list)  # flax >= 0.12 wants nnx.List

  class Unrolled(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Linear(D_IN, D, rngs=rngs)
      self.layers = listed([Block(rngs) for _ in range(L)])
      self.head = nnx.Linear(D, D_OUT, rngs=rngs)

    def __call__(self, x):
      x = self.embed(x)
      for block in self.layers:
        x = block(x)
      return self.head(x)

  return Stacked, Unrolled


def nnx_twins(metadata: str | None = None) -> Twins:
  """The NNX model: params are ``nnx.state(model, nnx.Param)``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  stacked_cls, unrolled_cls = nnx_models(metadata)
  model = stacked_cls(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  twin_model = unrolled_cls(nnx.Rngs(1))
  twin_graphdef, twin_template, twin_rest = nnx.split(twin_model, nnx.Param,
                                                      ...)

  def stacked_loss(p, batch):
    x, y = batch
    return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

  def twin_loss(p, batch):
    x, y = batch
    return jnp.mean((nnx.merge(twin_graphdef, p, twin_rest)(x) - y) ** 2)

  return Twins("nnx-vmap-scan" + ("-metadata" if metadata else ""), params,
               stacked_loss, {"layers": 0},
               unroll(params, twin_template, {"layers": 0}), twin_loss,
               detected=metadata == "layers")


# ------------------------------------------------------------ Equinox stack


def equinox_twins() -> Twins:
  """An Equinox model whose ``layers`` is one ``Block`` built by
  ``eqx.filter_vmap`` (every array with a leading layer axis), applied with
  ``lax.scan``."""
  import equinox as eqx  # pylint: disable=import-outside-toplevel

  class Block(eqx.Module):
    ln: eqx.nn.LayerNorm
    attn: eqx.nn.Linear
    mlp: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.ln = eqx.nn.LayerNorm(D)
      self.attn = eqx.nn.Linear(D, D, key=k1)
      self.mlp = eqx.nn.Linear(D, D, key=k2)

    def __call__(self, x):
      return x + self.mlp(jnp.tanh(self.attn(self.ln(x))))

  class Model(eqx.Module):
    embed: eqx.nn.Linear
    layers: Any  # one stacked Block, or a list of L Blocks
    head: eqx.nn.Linear

    def __call__(self, x):
      x = self.embed(x)
      if isinstance(self.layers, list):
        for block in self.layers:
          x = block(x)
      else:
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def body(h, layer):
          return eqx.combine(layer, static)(h), None

        x, _ = jax.lax.scan(body, x, dynamic)
      return self.head(x)

  k_embed, k_layers, k_head = jax.random.split(jax.random.key(0), 3)
  embed = eqx.nn.Linear(D_IN, D, key=k_embed)
  head = eqx.nn.Linear(D, D_OUT, key=k_head)
  keys = jax.random.split(k_layers, L)
  stacked_model = Model(embed, eqx.filter_vmap(Block)(keys), head)
  twin_model = Model(embed, [Block(k) for k in keys], head)
  params, static = eqx.partition(stacked_model, eqx.is_array)
  twin_template, twin_static = eqx.partition(twin_model, eqx.is_array)

  def loss_of(static_part):
    def loss(p, batch):
      x, y = batch
      model = eqx.combine(p, static_part)
      return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    return loss

  return Twins("equinox", params, loss_of(static), {"layers": 0},
               unroll(params, twin_template, {"layers": 0}),
               loss_of(twin_static))


# ------------------------------------------------ layer axis 1 (MaxText)


def _block(p: Any, x: jax.Array) -> jax.Array:
  """One block, by hand: LayerNorm, dense, tanh, dense, residual."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
  h = (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"][
      "bias"]
  h = jnp.tanh(h @ p["attn"]["kernel"] + p["attn"]["bias"])
  return x + h @ p["mlp"]["kernel"] + p["mlp"]["bias"]


def axis1_twins() -> Twins:
  """A plain dict whose stacked leaves hold the layers on axis 1, as
  MaxText's ``param_scan_axis: 1``: kernels ``(D, L, D)``, scales and
  biases ``(D, L)``."""
  ks = iter(jax.random.split(jax.random.key(0), 16))

  def normal(*shape):
    return jax.random.normal(next(ks), shape) / np.sqrt(shape[0])

  stacked = {
      "embed": {"kernel": normal(D_IN, D), "bias": 0.1 * normal(D)},
      "layers": {
          "ln": {"scale": 1.0 + 0.1 * normal(D, L), "bias": 0.1 * normal(D, L)},
          "attn": {"kernel": normal(D, L, D), "bias": 0.1 * normal(D, L)},
          "mlp": {"kernel": normal(D, L, D), "bias": 0.1 * normal(D, L)},
      },
      "head": {"kernel": normal(D, D_OUT), "bias": 0.1 * normal(D_OUT)},
  }

  def ends(p, x):
    return x @ p["embed"]["kernel"] + p["embed"]["bias"]

  def out(p, h, y):
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)

  def stacked_loss(p, batch):
    x, y = batch
    layers = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0),
                                    p["layers"])
    h, _ = jax.lax.scan(lambda h, layer: (_block(layer, h), None),
                        ends(p, x), layers)
    return out(p, h, y)

  def twin_loss(p, batch):
    x, y = batch
    h = ends(p, x)
    for layer in p["layers"]:
      h = _block(layer, h)
    return out(p, h, y)

  template = {"embed": stacked["embed"], "head": stacked["head"],
              "layers": [jax.tree_util.tree_map(lambda a: a[:, 0],
                                                stacked["layers"])] * L}
  return Twins("axis-1", stacked, stacked_loss, {"layers": 1},
               unroll(stacked, template, {"layers": 1}), twin_loss)
