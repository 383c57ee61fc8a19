"""lw.transplant with stacked (scanned) layers, against hand-built trees.

An unrolled checkpoint (linen ``layers_0`` ... or NNX ``layers/0`` ...) into
a stacked model and back, and chosen layers of one stack into another. The
expected trees are written out with numpy (``np.stack`` of the layers, or
slices of the stack), never with transplant itself.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layerwise as lw
from conftest import flat

L = 4
STACKS = {"layers": 0}
TO_LINEN = lambda p: re.sub(r"^layers/(\d+)", r"layers_\1", p)  # noqa: E731
FROM_LINEN = lambda p: re.sub(r"^layers_(\d+)", r"layers/\1", p)  # noqa: E731


def linen_unrolled(seed, n=L, dtype=jnp.float32):
  """An unrolled linen checkpoint: ``layers_0`` ... ``layers_{n-1}``."""
  k = iter(jax.random.split(jax.random.PRNGKey(seed), 2 * n + 2))
  tree = {"embed": {"embedding": jax.random.normal(next(k), (7, 4), dtype)},
          "head": {"kernel": jax.random.normal(next(k), (4, 3), dtype)}}
  for i in range(n):
    tree[f"layers_{i}"] = {
        "attn": {"kernel": jax.random.normal(next(k), (4, 4), dtype)},
        "ln": {"scale": jax.random.normal(next(k), (4,), dtype)}}
  return tree


def stacked(seed, n=L, axis=0, dtype=jnp.float32):
  """A model whose layers are stacked (layer axis ``axis``)."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  kernel = (n, 4, 4) if axis == 0 else (4, n, 4)
  return {"embed": {"embedding": jax.random.normal(k[0], (7, 4), dtype)},
          "head": {"kernel": jax.random.normal(k[1], (4, 3), dtype)},
          "layers": {"attn": {"kernel": jax.random.normal(k[2], kernel,
                                                          dtype)},
                     "ln": {"scale": jax.random.normal(
                         k[3], (n, 4) if axis == 0 else (4, n), dtype)}}}


def stacked_from(unrolled, axis=0):
  """By hand: the layers of an unrolled tree stacked on ``axis``."""
  n = sum(k.startswith("layers_") for k in unrolled)
  layers = [unrolled[f"layers_{i}"] for i in range(n)]
  return {"embed": unrolled["embed"], "head": unrolled["head"],
          "layers": {"attn": {"kernel": np.stack(
              [np.asarray(x["attn"]["kernel"]) for x in layers], axis)},
                     "ln": {"scale": np.stack(
                         [np.asarray(x["ln"]["scale"]) for x in layers],
                         axis)}}}


def assert_same(got, want):
  """Equal trees, bit for bit, with the same paths and dtypes."""
  got_flat, want_flat = flat(got), flat(want)
  assert list(got_flat) == list(want_flat)
  for path, x in got_flat.items():
    assert x.dtype == want_flat[path].dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want_flat[path]),
                                  err_msg=path)


def layer_paths(n, start=0):
  return tuple(f"layers/{i}/attn/kernel" for i in range(start, n)) + tuple(
      f"layers/{i}/ln/scale" for i in range(start, n))


# ------------------------------------------------- unrolled <-> stacked


def test_linen_unrolled_checkpoint_into_a_stacked_model():
  source, target = linen_unrolled(0), stacked(1)
  out, report = lw.transplant(target, source, "**", rename=TO_LINEN,
                              stacks=STACKS)
  assert_same(out, stacked_from(source))
  assert jax.tree.structure(out) == jax.tree.structure(target)
  # The report lists layer paths, in the plan's order.
  assert report.copied == ("embed/embedding", "head/kernel") + layer_paths(L)
  assert report.new == () and report.skipped == ()
  assert report.count("copied") == 7 * 4 + 4 * 3 + L * (16 + 4)
  assert str(report).splitlines()[-3:] == [
      "layers/2/ln    copied       1       4",
      "layers/3/ln    copied       1       4",
      "copied 10 leaves (120 values), left 0 new (0), skipped 0 of the source "
      "(0)"]


def test_round_trip_unrolled_stacked_unrolled_is_bit_identical():
  for dtype in (jnp.float32, jnp.bfloat16):
    source = linen_unrolled(0, dtype=dtype)
    into, _ = lw.transplant(stacked(1, dtype=dtype), source, "**",
                            rename=TO_LINEN, stacks=STACKS)
    back, report = lw.transplant(linen_unrolled(2, dtype=dtype), into, "**",
                                 rename=FROM_LINEN, source_stacks=STACKS)
    assert_same(back, source)
    assert report.skipped == ()
    assert f"layers_{L - 1}/attn/kernel" in report.copied


def test_nnx_style_layer_paths_need_no_rename():
  # An NNX list of layers names them layers/0, layers/1, ...: the same paths
  # as the stack's layer leaves.
  source = {"layers": [{"w": jnp.full((2,), float(i))} for i in range(3)]}
  target = {"layers": {"w": jnp.zeros((3, 2))}}
  out, report = lw.transplant(target, source, "**", stacks=STACKS)
  np.testing.assert_array_equal(out["layers"]["w"],
                                np.array([[0, 0], [1, 1], [2, 2]], np.float32))
  assert report.copied == ("layers/0/w", "layers/1/w", "layers/2/w")
  back, _ = lw.transplant({"layers": [{"w": jnp.ones(2)}] * 3}, out, "**",
                          source_stacks=STACKS)
  assert_same(back, source)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class Stacked(nnx.Module):
  """Three blocks made by nnx.vmap: one Linear with (3, 4, 4) params."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.layers = create(rngs)


class Unrolled(nnx.Module):
  def __init__(self, rngs):
    layers = getattr(nnx, "List", list)  # nnx.List from flax 0.12 on
    self.layers = layers([Block(rngs) for _ in range(3)])


def test_nnx_unrolled_model_into_a_vmapped_stack_and_back():
  unrolled_model, stacked_model = Unrolled(nnx.Rngs(0)), Stacked(nnx.Rngs(1))
  source = nnx.state(unrolled_model, nnx.Param)
  out, report = lw.transplant(nnx.state(stacked_model, nnx.Param), source,
                              "**", stacks=STACKS)
  assert report.copied == tuple(f"layers/{i}/lin/bias" for i in range(3)) + (
      tuple(f"layers/{i}/lin/kernel" for i in range(3)))
  nnx.update(stacked_model, out)
  want = np.stack([np.asarray(b.lin.kernel[...])
                   for b in unrolled_model.layers])
  np.testing.assert_array_equal(stacked_model.layers.lin.kernel[...], want)
  # And back into a fresh unrolled model: every layer computes what it did.
  fresh = Unrolled(nnx.Rngs(2))
  back, _ = lw.transplant(nnx.state(fresh, nnx.Param),
                          nnx.state(stacked_model, nnx.Param), "**",
                          source_stacks=STACKS)
  nnx.update(fresh, back)
  x = jnp.ones((2, 4))
  for a, b in zip(fresh.layers, unrolled_model.layers):
    np.testing.assert_array_equal(a(x), b(x))


def test_layer_axis_one():
  source = linen_unrolled(0)
  out, _ = lw.transplant(stacked(1, axis=1), source, "**", rename=TO_LINEN,
                         stacks={"layers": 1})
  assert_same(out, stacked_from(source, axis=1))


def test_numpy_stacked_source():
  # A restored checkpoint: numpy arrays, no metadata, so source_stacks=.
  source = jax.tree.map(np.asarray, stacked(0))
  out, _ = lw.transplant(linen_unrolled(1), source, "**", rename=FROM_LINEN,
                         source_stacks=STACKS)
  for i in range(L):
    np.testing.assert_array_equal(out[f"layers_{i}"]["attn"]["kernel"],
                                  source["layers"]["attn"]["kernel"][i])
    assert isinstance(out[f"layers_{i}"]["ln"]["scale"], jax.Array)


def test_copies_are_fresh_arrays_with_the_target_placement():
  source, target = stacked(0), stacked(1)
  out, _ = lw.transplant(target, source, "**", stacks=STACKS,
                         source_stacks=STACKS)
  for a, b, t in zip(jax.tree.leaves(out), jax.tree.leaves(source),
                     jax.tree.leaves(target)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    assert a.sharding == t.sharding
  assert_same(out, source)


def test_abstract_stacked_target_copied_whole():
  source = linen_unrolled(0)
  abstract = jax.eval_shape(lambda: stacked(1))
  out, _ = lw.transplant(abstract, source, "**", rename=TO_LINEN,
                         stacks=STACKS)
  assert_same(out, stacked_from(source))


# --------------------------------------------------------- stack -> stack


def test_the_first_layers_of_a_deep_stack_into_a_shallow_one():
  source, target = stacked(0, n=12), stacked(1, n=6)
  out, report = lw.transplant(
      target, source, {"layers/[0-5]/**": True, "**": False}, stacks=STACKS,
      source_stacks=STACKS)
  # The same without source_stacks: the source has the target's stacks.
  again, _ = lw.transplant(
      target, source, {"layers/[0-5]/**": True, "**": False}, stacks=STACKS)
  assert_same(again, out)
  want = {"embed": target["embed"], "head": target["head"],
          "layers": {"attn": {"kernel": source["layers"]["attn"]["kernel"][:6]},
                     "ln": {"scale": source["layers"]["ln"]["scale"][:6]}}}
  assert_same(out, want)
  assert report.copied == layer_paths(6)
  assert report.new == ("embed/embedding", "head/kernel")
  assert report.skipped == ("embed/embedding", "head/kernel") + (
      layer_paths(12, start=6))


def test_chosen_layers_by_rename_and_the_rest_kept():
  # Layers 6..8 of a 12-layer stack into layers 0..2 of a 6-layer one;
  # layers 3..5 keep the target's values.
  source, target = stacked(0, n=12), stacked(1, n=6)
  shift = lambda p: re.sub(r"^layers/(\d+)",  # noqa: E731
                           lambda m: f"layers/{int(m[1]) + 6}", p)
  out, report = lw.transplant(target, source, lw.any_of("layers/[0-2]/**"),
                              rename=shift, stacks=STACKS,
                              source_stacks=STACKS)
  for name, leaf in (("attn", "kernel"), ("ln", "scale")):
    want = np.concatenate([np.asarray(source["layers"][name][leaf][6:9]),
                           np.asarray(target["layers"][name][leaf][3:])])
    np.testing.assert_array_equal(out["layers"][name][leaf], want)
  assert_same({k: out[k] for k in ("embed", "head")},
              {k: target[k] for k in ("embed", "head")})
  assert report.copied == tuple(f"layers/{i}/attn/kernel" for i in range(3)) + (
      tuple(f"layers/{i}/ln/scale" for i in range(3)))
  assert report.new[:2] == ("embed/embedding", "head/kernel")
  assert "layers/3/attn/kernel" in report.new
  assert "layers/0/attn/kernel" in report.skipped
  assert "layers/6/attn/kernel" not in report.skipped


# --------------------------------------------------------------- checks


def test_a_layer_index_past_the_target_stack_is_a_typo():
  with pytest.raises(lw.RuleError, match="'layers/\\[6-9\\]/\\*\\*'"):
    lw.transplant(stacked(1, n=6), stacked(0, n=12), "layers/[6-9]/**",
                  stacks=STACKS, source_stacks=STACKS)


def test_layers_missing_from_the_source_and_the_rename_hint():
  with pytest.raises(ValueError) as e:
    lw.transplant(stacked(1), linen_unrolled(0), "layers/**", stacks=STACKS)
  msg = str(e.value)
  assert "8 selected leaves are not in the source" in msg
  assert "'layers/0/attn/kernel'  (closest in source: 'layers_0/attn/kernel'" \
      in msg
  assert ('rename=lambda p: re.sub(r"^layers/(\\d+)", r"layers_\\1", p)'
          in msg)
  # The other way, from a stack whose source_stacks were not given: the
  # message says to give them (and the rename for linen's names).
  with pytest.raises(ValueError) as e:
    lw.transplant(linen_unrolled(1), stacked(0), "**")
  assert ("The source holds 'layers/attn/kernel', one leaf: if its layers "
          "are stacked in it, pass source_stacks={'layers': <layer axis>} and "
          'rename=lambda p: re.sub(r"^layers_(\\d+)", r"layers/\\1", p).'
          ) in str(e.value)
  # A deeper target than the source: the extra layers, by layer path.
  with pytest.raises(ValueError, match="'layers/4/attn/kernel'"):
    lw.transplant(stacked(1, n=6), stacked(0), "layers/**", stacks=STACKS,
                  source_stacks=STACKS)
  out, report = lw.transplant(stacked(1, n=6), stacked(0), "layers/**",
                              stacks=STACKS, source_stacks=STACKS,
                              strict=False)
  assert report.new[-2:] == ("layers/4/ln/scale", "layers/5/ln/scale")
  np.testing.assert_array_equal(out["layers"]["ln"]["scale"][5],
                                stacked(1, n=6)["layers"]["ln"]["scale"][5])


def test_shape_and_dtype_mismatches_name_the_layers():
  source = linen_unrolled(0)
  source["layers_2"]["attn"]["kernel"] = jnp.ones((4, 5))
  source["layers_1"]["ln"]["scale"] = jnp.ones(4, jnp.bfloat16)
  with pytest.raises(ValueError) as e:
    lw.transplant(stacked(1), source, "**", rename=TO_LINEN, stacks=STACKS)
  msg = str(e.value)
  assert ("'layers/2/attn/kernel <- layers_2/attn/kernel': target (4, 4), "
          "source (4, 5)") in msg
  assert ("'layers/1/ln/scale <- layers_1/ln/scale': target float32, "
          "source bfloat16") in msg
  # cast=True converts the one layer; the others are copied as they are.
  source["layers_2"]["attn"]["kernel"] = jnp.ones((4, 4))
  out, _ = lw.transplant(stacked(1), source, "**", rename=TO_LINEN,
                         stacks=STACKS, cast=True)
  assert out["layers"]["ln"]["scale"].dtype == jnp.float32
  np.testing.assert_array_equal(out["layers"]["ln"]["scale"][1], np.ones(4))


def test_abstract_target_partly_copied_is_an_error():
  abstract = jax.eval_shape(lambda: stacked(1))
  with pytest.raises(ValueError) as e:
    lw.transplant(abstract, linen_unrolled(0), {"layers/0/**": True,
                                                "**": False},
                  rename=TO_LINEN, stacks=STACKS, strict=False)
  msg = str(e.value)
  assert "2 selected leaves are abstract (a jax.ShapeDtypeStruct) but only " \
      "partly copied" in msg
  assert "'layers/attn/kernel': 1 of 4 layers copied, 'layers/1/attn/kernel'"\
      in msg
  assert "Give the target's values" in msg


def test_source_stacks_errors_say_source():
  with pytest.raises(ValueError, match=r"^lw.transplant: in the source "
                     r"\(source_stacks=\): stack 'layerz' names no subtree"):
    lw.transplant(stacked(1), stacked(0), "**", stacks=STACKS,
                  source_stacks={"layerz": 0})
  with pytest.raises(ValueError, match="^lw.transplant: stack 'layerz'"):
    lw.transplant(stacked(1), stacked(0), "**", stacks={"layerz": 0})
  with pytest.raises(TypeError, match="^lw.transplant: stacks must be"):
    lw.transplant(stacked(1), stacked(0), "**", source_stacks=[("layers", 0)])


def test_a_stacked_checkpoint_of_the_same_model_needs_no_source_stacks():
  # The source holds the target's stacked leaves (same paths, as many
  # dimensions): it is stacked as the target is, whatever its depth.
  source, target = stacked(0, n=12), stacked(1, n=6)
  out, report = lw.transplant(target, source, "layers/**", stacks=STACKS)
  np.testing.assert_array_equal(out["layers"]["attn"]["kernel"],
                                source["layers"]["attn"]["kernel"][:6])
  assert report.skipped[-1] == "layers/11/ln/scale"


def test_a_model_with_layers_metadata_and_a_plain_checkpoint():
  # A target whose metadata marks the layer axis (linen nn.Partitioned, as
  # nn.scan with metadata_params gives) is stacked by default; the restored
  # checkpoint (plain numpy, no metadata) is read as stacked alike, so the
  # copy is whole, as before stacks existed, and reported per layer.
  import flax.linen as nn

  def box(x):
    return nn.Partitioned(x, names=("layers",) + (None,) * (x.ndim - 1))

  fresh = stacked(1)
  target = {**fresh, "layers": jax.tree.map(box, fresh["layers"])}
  checkpoint = jax.tree.map(np.asarray, stacked(0))
  out, report = lw.transplant(target, checkpoint, "**")
  assert isinstance(out["layers"]["attn"]["kernel"], nn.Partitioned)
  unboxed = {**out, "layers": jax.tree.map(
      lambda b: b.value, out["layers"],
      is_leaf=lambda b: isinstance(b, nn.Partitioned))}
  assert_same(unboxed, jax.tree.map(jnp.asarray, checkpoint))
  assert report.copied == ("embed/embedding", "head/kernel") + layer_paths(L)


def test_consecutive_layers_on_axis_one_copy_as_one_slice():
  # Layers 2..3 of a 4-layer stack on axis 1 into a 2-layer one: the values
  # of source[:, 2:4], as a fresh array.
  source, target = stacked(0, axis=1), stacked(1, n=2, axis=1)
  shift = lambda p: re.sub(r"^layers/(\d+)",  # noqa: E731
                           lambda m: f"layers/{int(m[1]) + 2}", p)
  out, report = lw.transplant(target, source, "layers/**", rename=shift,
                              stacks={"layers": 1})
  want = {"embed": target["embed"], "head": target["head"],
          "layers": {"attn": {"kernel": source["layers"]["attn"]["kernel"][:, 2:]},
                     "ln": {"scale": source["layers"]["ln"]["scale"][:, 2:]}}}
  assert_same(out, want)
  assert report.skipped[2:] == ("layers/0/attn/kernel", "layers/1/attn/kernel",
                                "layers/0/ln/scale", "layers/1/ln/scale")
  assert (out["layers"]["attn"]["kernel"].unsafe_buffer_pointer()
          != source["layers"]["attn"]["kernel"].unsafe_buffer_pointer())
