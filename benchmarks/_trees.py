"""Parameter trees shared by the benchmarks, as jax.ShapeDtypeStruct (no memory).

``bert_base()``: BERT-base shapes (12 blocks, hidden 768, ~110M parameters,
201 leaves). ``deep_narrow()``: 48 blocks of width 256 (~38M parameters, 777
leaves). ``many_leaves()``: 312 blocks of width 64 (~10M parameters, 5,001
leaves). All name blocks ``encoder/layer_{i}/<module>/<leaf>`` so that
module directories never nest.
"""

import jax
import jax.numpy as jnp


def _block(d, ff, dtype):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  dense = lambda i, o: {"kernel": s(i, o), "bias": s(o)}
  norm = lambda: {"scale": s(d), "bias": s(d)}
  return {
      "query": dense(d, d), "key": dense(d, d), "value": dense(d, d),
      "attn_out": dense(d, d), "attn_norm": norm(),
      "ffn_in": dense(d, ff), "ffn_out": dense(ff, d), "ffn_norm": norm(),
  }


def transformer(blocks, d, ff, vocab, positions=512, classes=2,
                dtype=jnp.float32):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      "embeddings": {
          "word": {"embedding": s(vocab, d)},
          "position": {"embedding": s(positions, d)},
          "token_type": {"embedding": s(2, d)},
          "norm": {"scale": s(d), "bias": s(d)},
      },
      "encoder": {f"layer_{i}": _block(d, ff, dtype) for i in range(blocks)},
      "pooler": {"kernel": s(d, d), "bias": s(d)},
      "head": {"kernel": s(d, classes), "bias": s(classes)},
  }


def bert_base(dtype=jnp.float32):
  return transformer(12, 768, 3072, 30522, dtype=dtype)


def deep_narrow(dtype=jnp.float32):
  return transformer(48, 256, 1024, 8192, dtype=dtype)


def many_leaves(dtype=jnp.float32):
  return transformer(312, 64, 128, 1024, dtype=dtype)


def group_selectors(tree, groups):
  """``groups`` glob rules that split ``tree`` into that many groups.

  The last rule is the catch-all ``'**'``; the others select module
  directories (``encoder/layer_3/query/**``) in path order, then single
  leaves once there are more groups than modules.
  """
  from layerwise import _paths  # pylint: disable=import-outside-toplevel
  paths = _paths.flatten_with_paths(tree)[0]
  modules = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in paths))
  if groups - 1 <= len(modules):
    selectors = [m + "/**" for m in modules[:groups - 1]]
  else:
    selectors = paths[:groups - 1]
  return selectors + ["**"]
