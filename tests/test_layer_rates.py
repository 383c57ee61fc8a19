"""Tests for layer_decay and discriminative (layerwise/layer_rates.py).

Values are compared exactly against references written here from the
sources (timm's layer-wise decay and fastai's discriminative rates), against
timm's own groups for one model of each family it decays, recorded in
tests/data/timm_layer_decay.json by tests/make_timm_fixture.py, and against
timm itself when it is installed.
"""

import collections
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

import layerwise as lw
from layerwise import _resolve, layer_rates

layer_decay, discriminative = lw.layer_decay, lw.discriminative

# ------------------------------------------------------------ timm reference
#
# timm's scales, transcribed from timm/optim/_param_groups.py
# (param_groups_layer_decay) and timm/models/_manipulate.py
# (group_with_matcher): parameters get ordinals from a group matcher
# {group: regex or [(regex, suffix)]} (re.match on the dotted name; unmatched
# names sort last, as the head); ordinals are renumbered in order, a suffix of
# 99999 (MATCH_PREV_GROUP) joining the previous layer; then
# layer_scales[i] = max(min_scale, layer_decay ** (layer_max - i)), and a
# scale below no_opt_scale freezes the parameter (requires_grad=False, which
# is multiplier 0.0 here).

MATCH_PREV_GROUP = 99999.0


def timm_layer_ids(names, group_matcher):
  matchers = []
  for ordinal, spec in enumerate(group_matcher.values()):
    specs = spec if isinstance(spec, list) else [(spec, None)]
    for regex, suffix in specs:
      matchers.append((re.compile(regex), ordinal, suffix or ()))

  def ordinal_of(name):
    for regex, ordinal, suffix in matchers:
      m = regex.match(name)
      if m:
        return tuple(float(x) for x in (ordinal, *m.groups(), *suffix))
    return (math.inf,)

  by_ordinal = collections.defaultdict(list)
  for name in names:
    by_ordinal[ordinal_of(name)].append(name)
  layer_ids, layer = {}, -1
  for key in sorted(by_ordinal):
    if layer < 0 or key[-1] != MATCH_PREV_GROUP:
      layer += 1
    for name in by_ordinal[key]:
      layer_ids[name] = layer
  return layer_ids


def timm_scales(names, group_matcher, decay, min_scale=0.0, no_opt_scale=None):
  layer_ids = timm_layer_ids(names, group_matcher)
  layer_max = max(layer_ids.values())
  scales = [max(min_scale, decay**(layer_max - i))
            for i in range(layer_max + 1)]
  out = {}
  for name in names:
    scale = scales[layer_ids[name]]
    out[name] = 0.0 if no_opt_scale and scale < no_opt_scale else scale
  return out


# timm's VisionTransformer.group_matcher (timm/models/vision_transformer.py).
VIT_MATCHER = {
    "stem": r"^cls_token|pos_embed|patch_embed",
    "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (MATCH_PREV_GROUP,))],
}
# The same shape of matcher for a BERT: the pooler and classifier are left
# unmatched, so they join the head's group, as timm does with a ViT's head.
BERT_MATCHER = {"embed": r"^embeddings", "blocks": r"^encoder\.layer\.(\d+)"}


def z(*shape):
  return np.zeros(shape, np.float32)


def vit_params(depth=12, final_norm="norm"):
  blocks = {
      f"blocks_{i}": {
          "norm1": {"scale": z(8), "bias": z(8)},
          "attn": {"qkv": {"kernel": z(8, 24), "bias": z(24)},
                   "proj": {"kernel": z(8, 8), "bias": z(8)}},
          "mlp": {"fc1": {"kernel": z(8, 16)}, "fc2": {"kernel": z(16, 8)}},
      } for i in range(depth)
  }
  return {
      "cls_token": z(1, 1, 8),
      "pos_embed": z(1, 5, 8),
      "patch_embed": {"proj": {"kernel": z(2, 2, 3, 8), "bias": z(8)}},
      **blocks,
      final_norm: {"scale": z(8), "bias": z(8)},
      "head": {"kernel": z(8, 10), "bias": z(10)},
  }


def bert_params(depth=12):
  return {
      "embeddings": {
          "word_embeddings": {"embedding": z(30, 8)},
          "position_embeddings": {"embedding": z(16, 8)},
          "LayerNorm": {"scale": z(8), "bias": z(8)},
      },
      "encoder": {
          f"layer_{i}": {
              "attention": {"query": {"kernel": z(8, 8)},
                            "output": {"LayerNorm": {"scale": z(8)}}},
              "intermediate": {"dense": {"kernel": z(8, 16)}},
          } for i in range(depth)
      },
      "pooler": {"dense": {"kernel": z(8, 8), "bias": z(8)}},
      "classifier": {"kernel": z(8, 2), "bias": z(2)},
  }


def timm_name(path):
  """Our path as timm's dotted parameter name (blocks_3 -> blocks.3)."""
  return re.sub(r"(blocks|layer)_(\d+)", r"\1.\2", path.replace("/", "."))


def resolved(rules, params):
  """{path: multiplier} from lw.resolve, leaf by leaf."""
  paths = jax.tree_util.tree_leaves(lw.paths(params))
  values = jax.tree_util.tree_leaves(lw.resolve(rules, params))
  assert len(paths) == len(values)
  return dict(zip(paths, values))


def timm_reference(params, matcher, decay, options):
  """timm's scales for our layer_decay ``options`` (min_scale, freeze_below
  is timm's no_opt_scale), as {path: multiplier}."""
  paths = jax.tree_util.tree_leaves(lw.paths(params))
  scales = timm_scales([timm_name(p) for p in paths], matcher, decay,
                       min_scale=options.get("min_scale", 0.0),
                       no_opt_scale=options.get("freeze_below"))
  return {p: scales[timm_name(p)] for p in paths}


SCALE_OPTIONS = [
    {},
    {"min_scale": 0.02},
    {"freeze_below": 0.01},
    {"min_scale": 0.02, "freeze_below": 0.05},
    {"min_scale": 0.1, "freeze_below": 0.05},   # the floor is above: none frozen
    {"freeze_below": 1.0},                      # all but the head frozen
]

# ------------------------------------------------- timm's own groups, recorded

TIMM = json.loads((pathlib.Path(__file__).parent / "data" /
                   "timm_layer_decay.json").read_text())
FAMILIES = sorted(TIMM["families"])


def timm_tree(params, style):
  """A tree of ShapeDtypeStructs named like timm's parameters, and each
  name's path in it. ``"nnx"``: an index is a segment of its own
  (``blocks/3/attn``, as NNX lists and Equinox name it); ``"linen"``: it is
  part of the module's name (``blocks_3/attn``, ``layers_1/blocks_0``)."""
  tree, path_of = {}, {}
  for name, shape, _, _ in params:
    path = name
    if style == "linen":
      path = re.sub(r"\b(blocks|layers|stages)\.(\d+)", r"\1_\2", path)
    path = path.replace(".", "/")
    node = tree
    *parents, leaf = path.split("/")
    for seg in parents:
      node = node.setdefault(seg, {})
    node[leaf] = jax.ShapeDtypeStruct(tuple(shape), np.float32)
    path_of[name] = path
  return tree, path_of


def check_against_timm(record, style, decay, options):
  """layer_decay on the model's names gives timm's scale to every one."""
  tree, path_of = timm_tree(record["params"], style)
  got = resolved(layer_decay(decay, tree, **options), tree)
  layer_max = record["num_layers"] - 1
  floor, below = options.get("min_scale", 0.0), options.get("freeze_below")
  wrong = {}
  for name, _, layer, recorded in record["params"]:
    want = max(floor, decay ** (layer_max - layer))  # timm's layer_scales
    if below and want < below:
      want = 0.0  # timm's no_opt_scale: requires_grad=False
    if decay == TIMM["decay"] and not options:
      assert want == recorded, name  # the recorded groups say the same
    if got[path_of[name]] != want:
      wrong[name] = (got[path_of[name]], want)
  assert not wrong, (f"{len(wrong)} of {len(got)} parameters differ from "
                     f"timm (ours, timm's): {dict(list(wrong.items())[:5])}")


@pytest.mark.parametrize("style", ["nnx", "linen"])
@pytest.mark.parametrize("decay, options", [
    (0.75, {}), (0.65, {"min_scale": 0.01}), (0.8, {"freeze_below": 0.1})])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_recorded_timm_groups(family, style, decay, options):
  check_against_timm(TIMM["families"][family], style, decay, options)


def test_recorded_families_cover_the_issue():
  assert set(FAMILIES) == {"vit", "vit_registers", "deit_distilled", "beit",
                           "eva02", "swin", "convnext"}
  swin = {n: layer for n, _, layer, _ in TIMM["families"]["swin"]["params"]}
  # Swin's depth runs over its 12 blocks; the stem is 13 steps below the
  # head (0.75 ** 13 = 0.0238), not 5 as per stage.
  assert swin["patch_embed.proj.weight"] == 0
  assert swin["layers.1.downsample.reduction.weight"] == swin[
      "layers.1.blocks.0.norm1.weight"] == 3
  assert TIMM["families"]["swin"]["num_layers"] == 14


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_timm_itself(family):
  pytest.importorskip("timm")
  import make_timm_fixture  # pylint: disable=import-outside-toplevel
  record = make_timm_fixture.record(make_timm_fixture.MODELS[family])
  check_against_timm(record, "nnx", 0.75, {})
  check_against_timm(record, "linen", 0.65, {"min_scale": 0.02})


def test_head_and_stem_extend_with_or():
  params = {"tok_emb": {"table": z(10, 4)}, "blocks_0": {"w": z(4, 4)},
            "out_proj": {"w": z(4, 2)}}
  with pytest.raises(ValueError, match=(
      r"2 parameter\(s\) are in none of the stem, the blocks, the head.*"
      r"'out_proj/w', 'tok_emb/table'.*head=lw.DEFAULT_HEAD \| "
      r"'out_proj/\*\*'")):
    layer_decay(0.5, params, head=None)
  got = resolved(layer_decay(0.5, params,
                             head=lw.DEFAULT_HEAD | "out_proj/**",
                             stem=lw.DEFAULT_STEM | "tok_emb/**"), params)
  assert got == {"blocks_0/w": 0.5, "out_proj/w": 1.0,
                 "tok_emb/table": 0.25}


def test_distilled_head_and_stage_depths_spelled_out():
  params = {"cls_token": z(1, 1, 4), "dist_token": z(1, 1, 4),
            "blocks": {str(i): {"w": z(4)} for i in range(2)},
            "norm": {"w": z(4)}, "head": {"w": z(4)}, "head_dist": {"w": z(4)}}
  got = resolved(layer_decay(0.5, params), params)
  # Both heads at 1.0 (timm: 1.0 for head_dist, not 0.5 ** 3 as depth 0).
  assert got["head_dist/w"] == got["head/w"] == 1.0
  assert got["dist_token"] == got["cls_token"] == 0.125
  assert got["norm/w"] == got["blocks/1/w"] == 0.5
  convnext = {"stem": {"0": {"w": z(4)}},
              "stages": {"0": {"blocks": {"0": {"w": z(4)}, "1": {"w": z(4)}}},
                         "1": {"downsample": {"1": {"w": z(4)}},
                               "blocks": {"0": {"w": z(4)}}}},
              "head": {"norm": {"w": z(4)}, "fc": {"w": z(4)}}}
  got = resolved(layer_decay(0.5, convnext), convnext)
  # A running index over (stage, block): 1, 2, then 3 with its downsample.
  assert got == {"head/fc/w": 1.0, "head/norm/w": 1.0,
                 "stages/1/blocks/0/w": 0.5, "stages/1/downsample/1/w": 0.5,
                 "stages/0/blocks/1/w": 0.25, "stages/0/blocks/0/w": 0.125,
                 "stem/0/w": 0.0625}


# ------------------------------------------------------------- layer_decay


@pytest.mark.parametrize("decay", [0.65, 0.75])
@pytest.mark.parametrize("options", SCALE_OPTIONS)
@pytest.mark.parametrize("block", [
    layer_rates.DEFAULT_BLOCK, r"^blocks_(\d+)/", re.compile(r"blocks_(\d+)")])
def test_vit_matches_timm(decay, options, block):
  params = vit_params()
  got = resolved(layer_decay(decay, params, block=block, **options), params)
  assert got == timm_reference(params, VIT_MATCHER, decay, options)
  assert all(type(v) is float for v in got.values())  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("decay", [0.65, 0.75])
@pytest.mark.parametrize("options", SCALE_OPTIONS)
@pytest.mark.parametrize("block", [
    layer_rates.DEFAULT_BLOCK, r"^encoder/layer_(\d+)/"])
def test_bert_matches_timm(decay, options, block):
  params = bert_params()
  got = resolved(layer_decay(decay, params, block=block, **options), params)
  assert got == timm_reference(params, BERT_MATCHER, decay, options)


def test_vit_values_spelled_out():
  got = resolved(layer_decay(0.75, vit_params()), vit_params())
  assert got["head/kernel"] == 1.0
  assert got["norm/scale"] == got["blocks_11/attn/qkv/kernel"] == 0.75
  assert got["blocks_0/mlp/fc1/kernel"] == 0.75**12
  assert got["cls_token"] == got["patch_embed/proj/kernel"] == 0.75**13
  frozen = resolved(layer_decay(0.75, vit_params(), freeze_below=0.05),
                    vit_params())
  # 0.75**10 = 0.056 stays, 0.75**11 = 0.042 is frozen.
  assert frozen["blocks_2/attn/qkv/kernel"] == 0.75**10
  assert frozen["blocks_1/attn/qkv/kernel"] == 0.0
  assert frozen["pos_embed"] == 0.0


def test_fc_norm_goes_with_the_head_as_in_timm():
  # A global-pool ViT has fc_norm, not norm; timm's matcher leaves it to the
  # head's group.
  params = vit_params(final_norm="fc_norm")
  got = resolved(layer_decay(0.65, params), params)
  assert got == timm_reference(params, VIT_MATCHER, 0.65, {})
  assert got["fc_norm/scale"] == 1.0


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_nnx_model_matches_timm(nnx_model, decay):
  state = nnx.state(nnx_model, nnx.Param)
  rules = layer_decay(decay, state)
  got = resolved(rules, state)
  matcher = {"blocks": [(r"^layers\.(\d+)", None),
                        (r"^norm", (MATCH_PREV_GROUP,))]}
  paths = list(got)
  names = [p.replace("/", ".") for p in paths]
  expected = dict(zip(paths, timm_scales(names, matcher, decay).values()))
  assert got == expected
  assert got["layers/0/kernel"] == decay**2
  assert got["layers/1/kernel"] == got["norm/scale"] == decay
  assert got["head/kernel"] == 1.0
  assert [s.text for s, _ in rules] == [
      "depth 3 (head)", "depth 2 (layers/1, norm)", "depth 1 (layers/0)"]


def test_nested_stack_and_final_norm_beside_it():
  # HF-style nesting: model/layers/i, model/norm beside the stack, lm_head.
  params = {"model": {"embed_tokens": {"embedding": z(10, 4)},
                      "layers": [{"w": z(4, 4)}, {"w": z(4, 4)}],
                      "norm": {"weight": z(4)}},
            "lm_head": {"kernel": z(4, 10)}}
  rules = layer_decay(0.5, params)
  assert resolved(rules, params) == {
      "lm_head/kernel": 1.0, "model/embed_tokens/embedding": 0.125,
      "model/layers/0/w": 0.25, "model/layers/1/w": 0.5,
      "model/norm/weight": 0.5}
  assert rules[1][0].text == "depth 2 (layers/1, model/norm)"


def test_norm_inside_the_stem_is_not_after():
  params = {"patch_embed": {"norm": {"scale": z(4)}, "proj": {"kernel": z(4)}},
            "layers_0": {"w": z(4)}, "head": {"w": z(4)}}
  assert resolved(layer_decay(0.5, params), params) == {
      "head/w": 1.0, "layers_0/w": 0.5, "patch_embed/norm/scale": 0.25,
      "patch_embed/proj/kernel": 0.25}


def test_head_and_after_overrides():
  params = vit_params(depth=2)
  # BEiT puts the final norm with the head: name it in head.
  got = resolved(layer_decay(0.5, params, head=lw.any_of("head/**", "norm/**")),
                 params)
  assert got["norm/scale"] == 1.0 and got["blocks_1/attn/qkv/kernel"] == 0.5
  # after=None: nothing after the blocks; the norm, named in the stem,
  # counts as embeddings. Unnamed, it is an error, not depth 0 in silence.
  got = resolved(layer_decay(0.5, params, after=None,
                             stem=lw.DEFAULT_STEM | "norm/**"), params)
  assert got["norm/scale"] == got["cls_token"] == 0.125
  with pytest.raises(ValueError, match="'norm/bias', 'norm/scale'"):
    layer_decay(0.5, params, after=None)
  # An explicit after, here a callable selector.
  got = resolved(layer_decay(
      0.5, params, after=lambda path, leaf: path.startswith("pos_"),
      stem="**"), params)
  assert got["pos_embed"] == 0.5 and got["norm/scale"] == 0.125
  # No head: the head's depth stays L + 1, so the last block keeps decay.
  no_head = {k: v for k, v in params.items() if k != "head"}
  got = resolved(layer_decay(0.5, no_head, head=None), no_head)
  assert got["blocks_1/attn/qkv/kernel"] == 0.5 and got["cls_token"] == 0.125


def test_head_takes_precedence_over_blocks():
  params = {"layers_0": {"w": z(2)}, "layers_1": {"w": z(2)},
            "head": {"layers_0": {"w": z(2)}}}
  assert resolved(layer_decay(0.5, params), params) == {
      "head/layers_0/w": 1.0, "layers_0/w": 0.25, "layers_1/w": 0.5}


def test_decay_one_gives_ones():
  got = resolved(layer_decay(1.0, vit_params(depth=3)), vit_params(depth=3))
  assert set(got.values()) == {1.0}


def test_rule_set_is_strict_and_one_rule_per_depth():
  params = vit_params()
  rules = layer_decay(0.65, params)
  assert isinstance(rules, list) and len(rules) == 14  # 12 blocks, stem, head
  assert all(isinstance(s, lw.Selector) and type(v) is float  # pylint: disable=unidiomatic-typecheck
             for s, v in rules)
  lw.resolve(rules, params, strict=True)  # no unused or shadowed rule
  lw.resolve(rules, jax.eval_shape(lambda: params))  # abstract params too
  # The last rule is a catch-all: it covers leaves the others do not.
  assert rules[-1][0]("anything/else", jax.ShapeDtypeStruct((), "float32"))


def test_rules_resolve_under_jit():
  params = vit_params(depth=2)
  rule_set = _resolve.RuleSet(layer_decay(0.5, params))

  @jax.jit
  def scaled(p):
    values = rule_set.resolve(p).tree()
    return jax.tree_util.tree_map(lambda v, x: v * (x + 1.0), values, p)

  out = scaled(params)
  np.testing.assert_array_equal(out["blocks_0"]["attn"]["qkv"]["kernel"],
                                np.full((8, 24), 0.25, np.float32))
  np.testing.assert_array_equal(out["head"]["bias"], np.ones(10, np.float32))


def test_describe_reads_one_rule_per_depth():
  params = vit_params()
  d = lw.describe(layer_decay(0.65, params), params)
  rows = {r["path"]: (r["rule"], r["value"]) for r in d.rows}
  assert rows["cls_token"] == ("depth 0 (embeddings)", 0.65**13)
  assert rows["pos_embed"] == ("depth 0 (embeddings)", 0.65**13)
  assert rows["patch_embed/proj/kernel"] == ("depth 0 (embeddings)",
                                             0.65**13)
  assert rows["blocks_0/attn/qkv/kernel"] == ("depth 1 (blocks_0)", 0.65**12)
  assert rows["blocks_2/mlp/fc2/kernel"] == ("depth 3 (blocks_2)", 0.65**10)
  assert rows["blocks_10/norm1/scale"] == ("depth 11 (blocks_10)", 0.65**2)
  assert rows["blocks_11/attn/proj/bias"] == ("depth 12 (blocks_11, norm)",
                                              0.65)
  assert rows["norm/bias"] == ("depth 12 (blocks_11, norm)", 0.65)
  assert rows["head/kernel"] == ("depth 13 (head)", 1.0)
  assert len({rule for rule, _ in rows.values()}) == 14
  table = str(d)
  assert "depth 12 (blocks_11, norm)  0.65" in table
  assert "depth 0 (embeddings)        0.003697" in table


# ----------------------------------------------------- layer_decay errors


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_decay_out_of_range(decay):
  with pytest.raises(ValueError, match=r"decay must be in \(0, 1\], got "
                     r".*0\.65 to 0\.9 are usual, 1\.0 turns the decay off"):
    layer_decay(decay, vit_params(depth=2))


@pytest.mark.parametrize("decay", [True, "0.7", None, np.ones(2)])
def test_decay_wrong_type(decay):
  with pytest.raises(TypeError, match="layer_decay: decay must be a"):
    layer_decay(decay, vit_params(depth=2))


def test_decay_accepts_numpy_and_jax_scalars():
  params = vit_params(depth=2)
  want = resolved(layer_decay(0.5, params), params)
  assert resolved(layer_decay(np.float32(0.5), params), params) == want
  assert resolved(layer_decay(jax.numpy.float32(0.5), params), params) == want


@pytest.mark.parametrize("kwargs, message", [
    ({"min_scale": -0.1}, r"min_scale must be in \[0, 1\], got -0\.1\. It is "
     "a floor on the multipliers"),
    ({"min_scale": 2.0}, r"min_scale must be in \[0, 1\], got 2\.0"),
    ({"freeze_below": 1.5}, r"freeze_below must be in \[0, 1\], got "
     r"1\.5\. Depths whose multiplier is below it are frozen"),
    ({"freeze_below": math.nan}, r"freeze_below must be in \[0, 1\]"),
])
def test_scale_options_out_of_range(kwargs, message):
  with pytest.raises(ValueError, match=message):
    layer_decay(0.65, vit_params(depth=2), **kwargs)


@pytest.mark.parametrize("block, message", [
    (r"blocks_\d+", r"the block pattern r'blocks_\\d\+' has 0 capture groups; "
     r"it needs one capture group around the block index.*or two, around a "
     r"stage index.*Write any other group as \(\?:\.\.\.\)"),
    (r"(b)(l)(ocks)_(\d+)", r"has 4 capture groups; it needs one capture "
     "group"),
    (r"blocks_(\d+", r"block='blocks_\(\\\\d\+' is not a valid regular "
     r"expression .*Pass a regex with one capture group"),
])
def test_bad_block_patterns(block, message):
  with pytest.raises(ValueError, match=message):
    layer_decay(0.65, vit_params(depth=2), block=block)


def test_block_must_be_a_regex():
  with pytest.raises(TypeError, match=r"block must be a regex \(a string or "
                     r"re\.compile\(\.\.\.\)\) with one capture group"):
    layer_decay(0.65, vit_params(depth=2), block=3)


@pytest.mark.parametrize("block, captured", [
    (r"(blocks)_\d+", "'blocks'"),
    (r"^(cls_token)", "'cls_token'"),
    (r"blocks_(\d+)|cls_token", "None"),
])
def test_block_capture_must_be_digits(block, captured):
  with pytest.raises(ValueError, match=(
      rf"captured {captured} from '.*', which is not a block index\. Its "
      r"capture group must match the index's digits only, as \(\\d\+\) does")):
    layer_decay(0.65, vit_params(depth=2), block=block)


def test_no_block_found():
  params = {"embed": z(4), "dense": {"kernel": z(4, 4)}, "head": {"w": z(4)}}
  with pytest.raises(ValueError) as info:
    layer_decay(0.65, params)
  msg = str(info.value)
  assert msg.startswith(
      "lw.layer_decay found no block: the block pattern "
      r"r'(?:^|/)(?:layers|blocks|layer|block|h|stages)[_/](\d+)"
      r"(?:/(?:blocks|layers)[_/](\d+)|/downsample)?(?:/|$)' ")
  assert ("matches none of the 3 parameter paths outside the head "
          "('dense/kernel', 'embed', 'head/w')") in msg
  assert "whose one capture group is the block index" in msg
  assert "lw.paths(params) lists the paths" in msg


def test_two_stacks_are_an_error():
  params = {"encoder": {"layers_0": {"w": z(2)}, "layers_1": {"w": z(2)}},
            "decoder": {"layers_0": {"w": z(2)}}, "head": {"w": z(2)}}
  with pytest.raises(ValueError) as info:
    layer_decay(0.65, params)
  msg = str(info.value)
  assert msg.startswith("lw.layer_decay needs one stack of blocks, but the "
                        "block pattern")
  assert ("finds 2: 'decoder/layers_*' (1 block, e.g. 'decoder/layers_0/w'); "
          "'encoder/layers_*' (2 blocks, e.g. 'encoder/layers_0/w')") in msg
  assert "Anchor the pattern to the stack whose depth should decay" in msg
  # Anchored, it works: the decoder, named in the stem, counts as
  # embeddings.
  got = resolved(layer_decay(0.5, params, block=r"^encoder/layers_(\d+)/",
                             stem="decoder/**"), params)
  assert got == {"decoder/layers_0/w": 0.125, "encoder/layers_0/w": 0.25,
                 "encoder/layers_1/w": 0.5, "head/w": 1.0}


def test_no_head_found():
  params = {"embed": z(4), "layers_0": {"w": z(4)}, "out": {"w": z(4)}}
  with pytest.raises(ValueError) as info:
    layer_decay(0.65, params)
  msg = str(info.value)
  assert msg.startswith("lw.layer_decay found no head: no parameter "
                        "matches head='**/head/**' | '**/heads/**' | ")
  assert "head='classifier/**'" in msg and "head=None" in msg
  with pytest.raises(ValueError, match=r"no parameter matches head='haed/\*\*'"):
    layer_decay(0.65, params, head="haed/**")
  got = resolved(layer_decay(0.5, params, head="out/**"), params)
  assert got == {"embed": 0.25, "layers_0/w": 0.5, "out/w": 1.0}


def test_explicit_after_must_match():
  with pytest.raises(ValueError, match=(
      r"layer_decay: after='nrom/\*\*' matches no parameter outside the head "
      r"and the blocks\. Fix the selector \(lw\.paths\(params\) lists the "
      r"paths\), or leave after at its default")):
    layer_decay(0.65, vit_params(depth=2), after="nrom/**")


def test_head_and_after_must_be_selectors():
  with pytest.raises(TypeError, match="is not a selector"):
    layer_decay(0.65, vit_params(depth=2), head=3)
  with pytest.raises(TypeError, match="is not a selector"):
    layer_decay(0.65, vit_params(depth=2), after=3.0)


# ---------------------------------------------------------- discriminative
#
# fastai's rule (fastai/optimizer.py, _BaseOptimizer.set_hyper): for
# lr=slice(lo, hi), fastcore's even_mults(lo, hi, n) (fastcore/basics.py:
# step = (hi/lo)**(1/(n-1)); [lo*step**i for i in range(n)]; hi alone for
# n == 1); for lr=slice(hi), [hi/10]*(n-1) + [hi].


def fastcore_even_mults(start, stop, n):
  if n == 1:
    return [stop]
  step = (stop / start)**(1 / (n - 1))
  return [start * step**i for i in range(n)]


GROUPS = ["g0/**", "g1/**", "g2/**", "g3/**", "g4/**"]


@pytest.mark.parametrize("n, lo, hi, by_hand", [
    (1, 1e-5, 1e-3, [1e-3]),
    (2, 1e-5, 1e-3, [1e-5, 1e-3]),
    (3, 1e-5, 1e-3, [1e-5, 1e-4, 1e-3]),
    (3, 0.01, 1.0, [0.01, 0.1, 1.0]),
    (4, 0.001, 1.0, [0.001, 0.01, 0.1, 1.0]),
    (5, 1 / 16, 1.0, [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]),
    (3, 1.0, 0.25, [1.0, 0.5, 0.25]),  # decreasing is allowed
])
def test_discriminative_slice_lo_hi(n, lo, hi, by_hand):
  rules = discriminative(GROUPS[:n], lo, hi)
  assert [s for s, _ in rules] == GROUPS[:n]
  values = [v for _, v in rules]
  assert values == pytest.approx(by_hand, rel=1e-12)
  assert values == fastcore_even_mults(lo, hi, n)  # bit for bit
  assert all(type(v) is float for v in values)  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("n, hi, by_hand", [
    (1, 1e-3, [1e-3]),
    (2, 1e-3, [1e-4, 1e-3]),
    (4, 1e-3, [1e-4, 1e-4, 1e-4, 1e-3]),
    (3, 1.0, [0.1, 0.1, 1.0]),
])
def test_discriminative_slice_hi(n, hi, by_hand):
  values = [v for _, v in discriminative(GROUPS[:n], hi)]
  assert values == pytest.approx(by_hand, rel=1e-15)
  assert values == [hi / 10] * (n - 1) + [hi]


def test_discriminative_resolves_with_a_catch_all_last():
  params = {"embed": z(2), "encoder": {"layers_0": {"w": z(2)}},
            "head": {"w": z(2)}, "norm": {"scale": z(2)}}
  rules = discriminative(["embed", "encoder/**", "**"], 0.01, 1.0)
  assert resolved(rules, params) == {
      "embed": 0.01, "encoder/layers_0/w": 0.01 * 10.0**1,
      "head/w": 1.0, "norm/scale": 1.0}
  # Callables and regexes are groups too.
  rules = discriminative([re.compile("embed"), lw.ndim_at_least(1)], 0.5, 1.0)
  assert resolved(rules, params)["head/w"] == 1.0


@pytest.mark.parametrize("lo, hi", [
    (0.0, 1.0), (-1e-3, 1.0), (math.nan, 1.0), (math.inf, 1.0),
    (0.1, 0.0), (0.1, -1.0), (0.1, math.inf), (0.0, None)])
def test_discriminative_needs_positive_finite_ends(lo, hi):
  bad = "lo" if not (math.isfinite(lo) and lo > 0) else "hi"
  with pytest.raises(ValueError, match=(
      rf"discriminative: {bad} must be finite and > 0, got .*The multipliers "
      "are spaced geometrically")):
    discriminative(GROUPS[:3], lo, hi)


def test_discriminative_needs_groups():
  with pytest.raises(ValueError, match=(
      r"discriminative needs at least one group: pass a list of selectors, "
      r"lowest layers first")):
    discriminative([], 0.1, 1.0)
  for groups in ["encoder/**", re.compile("a"), {"a/**": 1}, 3]:
    with pytest.raises(TypeError, match=(
        r"discriminative: groups must be a list of selectors, one per group "
        r".*For one group, write \[selector\]")):
      discriminative(groups, 0.1, 1.0)
  with pytest.raises(TypeError, match="is not a selector"):
    discriminative(["a/**", 3], 0.1, 1.0)
  with pytest.raises(TypeError, match="discriminative: lo must be a number"):
    discriminative(["a/**"], "0.1")


def test_references_against_hand_values():
  # The transcriptions above, checked against values worked out by hand.
  assert fastcore_even_mults(2.0, 32.0, 5) == [2.0, 4.0, 8.0, 16.0, 32.0]
  names = ["cls_token", "blocks.0.w", "blocks.1.w", "norm.w", "head.w"]
  assert timm_layer_ids(names, VIT_MATCHER) == {
      "cls_token": 0, "blocks.0.w": 1, "blocks.1.w": 2, "norm.w": 2,
      "head.w": 3}
  assert timm_scales(names, VIT_MATCHER, 0.5, no_opt_scale=0.2) == {
      "cls_token": 0.0, "blocks.0.w": 0.25, "blocks.1.w": 0.5, "norm.w": 0.5,
      "head.w": 1.0}


@pytest.mark.parametrize("kind", [float, np.float32, np.array,
                                  jax.numpy.float32],
                         ids=["float", "np.float32", "np-0d", "jnp.float32"])
def test_layer_decay_takes_any_concrete_real_scalar(kind):
  params = {"embed": np.ones(2), "layers_0": {"w": np.ones(2)},
            "layers_1": {"w": np.ones(2)}, "head": {"w": np.ones(2)}}
  expected = lw.resolve(lw.layer_decay(0.5, params, min_scale=0.2,
                                       freeze_below=0.25), params)
  rules = lw.layer_decay(kind(0.5), params, min_scale=kind(0.2),
                         freeze_below=kind(0.25))
  assert lw.resolve(rules, params) == expected
  assert expected["embed"] == 0.0 and expected["layers_0"]["w"] == 0.25
  assert all(type(v) is float for _, v in rules)
  with pytest.raises(TypeError, match="decay must be a concrete number, got "
                     "a traced value"):
    jax.jit(lambda d: lw.layer_decay(d, params))(0.5)
