r"""Rule sets of per-layer multipliers: layer-wise decay and discriminative rates.

Both build a rule set ``{selector: multiplier}`` for
:func:`layerwise.scale_by_rules` from the model's own structure:
:func:`layer_decay` gives each parameter its depth in the network (the
layer-wise learning-rate decay of ELECTRA, BEiT and timm), and
:func:`discriminative` spaces multipliers geometrically over groups you name
(fastai's discriminative fine-tuning).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from layerwise import _diagnostics, _paths, _validate
from layerwise._resolve import layer_paths_and_specs
from layerwise._types import PyTree, Stacks
from layerwise._selectors import (Selector, SelectorLike, any_of,
                                  compile_selector, of_paths, trusted)

__all__ = ["DEFAULT_HEAD", "DEFAULT_STEM", "discriminative", "layer_decay"]

#: The default ``block`` of :func:`layer_decay`. It finds a block as a path
#: segment ``layers_3``, ``blocks_3``, ``layer_3``, ``block_3``, ``h_3`` or
#: ``stages_3`` (linen submodule names), or the same names followed by an
#: index segment, ``layers/3`` (NNX lists, Equinox, HF Flax ``h/3``): the
#: first capture group is the block index. In hierarchical models a stage
#: holds blocks of its own (Swin's ``layers/1/blocks/0``, ConvNeXt's
#: ``stages/1/blocks/0``): the second group is then the block within the
#: stage, and a stage's ``downsample`` belongs to its first block, as in
#: timm's group matchers.
DEFAULT_BLOCK = (r"(?:^|/)(?:layers|blocks|layer|block|h|stages)[_/](\d+)"
                 r"(?:/(?:blocks|layers)[_/](\d+)|/downsample)?(?:/|$)")

#: Module names that :data:`DEFAULT_HEAD` treats as the head, at any depth.
#: They are the modules timm's group matchers leave to the head's group.
HEAD_NAMES = ("head", "heads", "classifier", "pooler", "pre_logits",
              "fc_norm", "attn_pool", "lm_head", "head_dist", "head_drop")

#: The default ``head`` of :func:`layer_decay`: any parameter inside a module
#: named in :data:`HEAD_NAMES` (``head``, ``classifier``, ``fc_norm``, DeiT's
#: ``head_dist``, ...). It is a :class:`~layerwise.Selector`, so it extends
#: with ``|``: ``head=lw.DEFAULT_HEAD | "out_proj/**"``.
_HEAD_MODULES = frozenset(HEAD_NAMES)
# The selector any_of('**/head/**', ...) written as one set lookup per path
# segment (a module: not the last), as fast on 50,000 leaves as it reads.
DEFAULT_HEAD = trusted(
    lambda path, leaf: not _HEAD_MODULES.isdisjoint(path.split("/")[:-1]),
    any_of(*(f"**/{name}/**" for name in HEAD_NAMES)).text)

#: Names that :data:`DEFAULT_STEM` treats as the stem: modules and leaves
#: before the first block, as timm's group matchers name them (ViT's
#: ``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed``; ConvNeXt's
#: ``stem``; DeiT's ``dist_token``; BEiT's shared ``rel_pos_bias``) and as
#: Flax, Hugging Face and GPT-style models name their embeddings.
STEM_NAMES = ("stem", "embed", "embeds", "embedding", "embeddings",
              "embed_tokens", "embed_positions", "tok_embeddings",
              "token_embedding", "token_embeddings", "word_embeddings",
              "position_embedding", "position_embeddings",
              "positional_embedding", "token_type_embeddings", "wte", "wpe",
              "patch_embed", "patch_embedding", "pos_embed",
              "absolute_pos_embed", "cls_token", "reg_token", "dist_token",
              "mask_token", "class_embedding", "rel_pos_bias", "norm_pre")
_STEM_SEGMENTS = frozenset(STEM_NAMES)

#: The default ``stem`` of :func:`layer_decay`: any parameter named in
#: :data:`STEM_NAMES`, or inside a module so named. It is a
#: :class:`~layerwise.Selector`, so it extends with ``|``:
#: ``stem=lw.DEFAULT_STEM | "tok_emb/**"``; ``stem="**"`` counts everything
#: that is neither head, block nor after the blocks as the stem.
DEFAULT_STEM = trusted(
    lambda path, leaf: not _STEM_SEGMENTS.isdisjoint(path.split("/")),
    "lw.DEFAULT_STEM")

#: Module names that the default ``after`` of :func:`layer_decay` treats as a
#: final norm when they sit beside the blocks.
FINAL_NORM_NAMES = ("norm", "final_norm", "encoder_norm", "final_layer_norm",
                    "final_layernorm", "norm_f", "ln_f", "layernorm",
                    "post_layernorm", "post_norm")


class _FinalNorms:
  """The default ``after`` of :func:`layer_decay`: final norms by name."""

  def __repr__(self) -> str:
    return "<final norms beside the blocks>"


#: The default ``after`` of :func:`layer_decay`: a module named in
#: :data:`FINAL_NORM_NAMES` that sits beside the blocks' container (``norm``
#: beside ``blocks_*``, ``model/norm`` beside ``model/layers/*``).
FINAL_NORMS: Any = _FinalNorms()


def _pattern(regex: re.Pattern[str]) -> str:
  """A regex as the user would write it: r'...'."""
  p = regex.pattern
  return f"r'{p}'" if "'" not in p and not p.endswith("\\") else repr(p)


_BLOCK_ADVICE = (r"one capture group around the block index, as in "
                 r"r'(?:^|/)layers_(\d+)(?:/|$)', or two, around a stage "
                 r"index and the block's index within the stage, as in "
                 r"r'stages_(\d+)/blocks_(\d+)'")


def _block_regex(fn: str, block: Any) -> re.Pattern[str]:
  if isinstance(block, str):
    try:
      regex = re.compile(block)
    except re.error as e:
      raise ValueError(
          f"{fn}: block={block!r} is not a valid regular expression ({e}). "
          f"Pass a regex with {_BLOCK_ADVICE}.") from e
  elif isinstance(block, re.Pattern):
    regex = block
  else:
    raise TypeError(
        f"{fn}: block must be a regex (a string or re.compile(...)) with "
        f"{_BLOCK_ADVICE}; got {type(block).__name__} {block!r}.")
  if regex.groups not in (1, 2):
    raise ValueError(
        f"{fn}: the block pattern {_pattern(regex)} has {regex.groups} "
        f"capture groups; it needs {_BLOCK_ADVICE}. Write any other group "
        "as (?:...).")
  return regex


class _Block(NamedTuple):
  """Where a path's block is."""
  key: tuple[int, ...]  # (index,), or (stage, block within it)
  two_level: bool       # whether the pattern captured a block in a stage
  container: str        # the stack, its index as '*': 'encoder/layers_*'
  parent: str           # the path holding the stack: 'encoder', or ''
  label: str            # the block's own name: 'layers_3', 'layers/1/blocks/0'


def _find_block(fn: str, regex: re.Pattern[str], path: str,
                memo: dict[str, _Block]) -> _Block | None:
  m = regex.search(path)
  if m is None:
    return None
  start, end = m.span(1)
  seg_end = path.find("/", end)
  seg_end = len(path) if seg_end < 0 else seg_end
  # A block's leaves share what the pattern found up to the index's
  # segment: read it once per block.
  key_text = path[:max(seg_end, m.end())]
  if key_text in memo:
    return memo[key_text]
  indices = m.groups()
  for index in indices[:1] + tuple(i for i in indices[1:] if i is not None):
    if index is None or not (index.isascii() and index.isdigit()):
      raise ValueError(
          f"{fn}: the block pattern {_pattern(regex)} captured {index!r} "
          f"from {path!r}, which is not a block index. Its capture group "
          r"must match the index's digits only, as (\d+) does.")
  seg_start = path.rfind("/", 0, start) + 1
  if start == seg_start and end == seg_end and seg_start > 0:
    # The index is a segment of its own ('layers/3'): the stack is the
    # segment before it.
    owner = path.rfind("/", 0, seg_start - 1) + 1
  else:
    owner = seg_start
  two_level = len(indices) == 2 and indices[1] is not None
  # A stage's own parameters (its downsample) join its first block.
  key = (int(indices[0]),) if len(indices) == 1 else (
      int(indices[0]), int(indices[1] or 0))
  label_end = m.end(2) if two_level else seg_end
  block = _Block(key, two_level, path[:start] + "*" + path[end:seg_end],
                 path[:max(owner - 1, 0)], path[owner:label_end])
  memo[key_text] = block
  return block


def _names(paths: Sequence[str], n: int = 2) -> str:
  """The modules holding ``paths`` (a leaf's path without its last name)."""
  modules = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in paths))
  text = ", ".join(modules[:n])
  return text + (f" and {len(modules) - n} more" if len(modules) > n else "")


def _beside(parent: str, path: str) -> bool:
  """Whether ``path`` is a final norm beside a stack held by ``parent``."""
  if parent:
    if not path.startswith(parent + "/"):
      return False
    path = path[len(parent) + 1:]
  return path.split("/", 1)[0] in FINAL_NORM_NAMES


def _unclassified_error(fn: str, paths: Sequence[str]) -> ValueError:
  module = paths[0].split("/", 1)[0]
  glob = f"{module}/**" if "/" in paths[0] else module
  return ValueError(
      f"{fn}: {len(paths)} parameter(s) are in none of the stem, the blocks, "
      "the head and what follows the last block, so their depth is unknown: "
      f"{_diagnostics.few(paths)}. (timm's group matchers give what they do "
      "not name the head's rate; the depth of an unnamed module is not "
      f"guessed here.) Name them: head=lw.DEFAULT_HEAD | {glob!r} for the "
      f"head's rate, stem=lw.DEFAULT_STEM | {glob!r} for the embeddings', or "
      "stem='**' to count everything else as embeddings (depth 0).")


def _stacked_hint(paths: Sequence[str], specs: Sequence[Any]) -> str:
  """A hint for params whose blocks look stacked (scanned): a subtree
  named like a stack of blocks whose leaves all have 2 axes or more and
  one length on axis 0."""
  names = ("layers", "blocks", "layer", "block", "h", "stages")
  roots: dict[str, set[int]] = {}
  for path, spec in zip(paths, specs):
    segs = path.split("/")
    for k, seg in enumerate(segs[:-1]):
      if seg in names:
        root = "/".join(segs[:k + 1])
        shape = tuple(spec.shape)
        roots.setdefault(root, set()).add(shape[0] if len(shape) >= 2 else -1)
        break
  for root, lengths in roots.items():
    if len(lengths) == 1 and -1 not in lengths:
      return (f" If {root!r} holds the blocks stacked on one axis (nn.scan, "
              f"nnx.vmap, an Equinox stack), declare it: stacks={{{root!r}: "
              f"0}} (the layer axis), so that each layer is a leaf "
              f"'{root}/3/...', and pass the same stacks to "
              "lw.scale_by_rules.")
  return ""


def layer_decay(
    decay: float,
    params: PyTree,
    *,
    block: str | re.Pattern[str] = DEFAULT_BLOCK,
    head: SelectorLike | None = DEFAULT_HEAD,
    stem: SelectorLike = DEFAULT_STEM,
    after: SelectorLike | None = FINAL_NORMS,
    min_scale: float = 0.0,
    freeze_below: float | None = None,
    stacks: Stacks = None,
) -> list[tuple[Selector, float]]:
  r"""Layer-wise learning-rate decay: a rule set of multipliers per depth.

  Layer-wise learning-rate decay (LLRD) fine-tunes a pretrained transformer
  with rates that shrink geometrically from the head down to the embeddings,
  so the layers that hold the most general features move least (ELECTRA,
  BEiT, and timm's ``param_groups_layer_decay``). For a model of ``L``
  blocks each parameter gets a depth:

  * the head (``head``): ``L + 1``;
  * block ``i`` (its index found in the path by ``block``): ``i + 1``; in a
    hierarchical model (stages of blocks: Swin, ConvNeXt) the blocks are
    counted through the stages, ``1`` to ``L`` in (stage, block) order,
    and a stage's downsample joins its first block, as in timm;
  * parameters after the last block that are not the head, such as a final
    norm (``after``): ``L``, the last block's depth, as timm's ViT
    ``group_matcher`` puts ``norm`` with the last block;
  * the stem, the embeddings and whatever comes before the first block
    (``stem``): ``0``;

  and the multiplier ``max(min_scale, decay ** (L + 1 - depth))``: 1.0 for
  the head, ``decay`` for the last block, ``decay ** (L + 1)`` for the
  embeddings. These are timm's ``lr_scale``\ s; multiply by the base rate of
  the inner optimizer (``optax.chain(optax.adamw(lr), lw.scale_by_rules(
  rules))``) to get its per-group rates. With the defaults, the ViT, DeiT
  (distilled), BEiT, EVA-02, Swin and ConvNeXt families get timm's groups
  on timm's own parameter names (``tests/test_layer_rates.py`` checks them
  against timm).

  A parameter in none of these is an error that names it: its place in the
  forward pass cannot be read from its name (paths are ordered by name), so
  it is not guessed. Name it in ``head`` or ``stem``. Check the outcome with
  ``lw.describe(rules, params)``.

  Args:
    decay: the ratio between the rates of a layer and the layer above it, in
      ``(0, 1]``; 0.65 to 0.9 are usual, 1.0 gives every leaf 1.0.
    params: the parameters the rule set is for (arrays, an ``nnx.State`` or
      ``jax.ShapeDtypeStruct``\ s; only paths, shapes and dtypes are read).
      ``L`` is the largest block index found in them, plus one (in a
      hierarchical model, the number of blocks).
    block: a regex (a string or ``re.compile(...)``) searched in each path
      (``re.search``), whose capture group is the block index, or whose two
      groups are a stage's index and the block's index within it (an
      unmatched second group, such as a stage's downsample, counts as the
      stage's first block). The default, :data:`DEFAULT_BLOCK`, finds
      ``layers_3``, ``blocks_3``, ``layer_3``, ``block_3``, ``h_3``,
      ``stages_3`` and ``layers/3`` (an NNX list) as a whole path segment,
      and ``layers/1/blocks/0`` or ``stages_1/blocks_0`` as a block in a
      stage. Every block must belong to one stack (one ``encoder/layers_*``):
      to decay one stack of several, anchor the pattern to it
      (``r"^encoder/layers_(\d+)/"``).
    head: a selector (glob, compiled regex or callable ``(path, leaf) ->
      bool``) for the head, which gets multiplier 1.0; it takes precedence
      over everything else. The default, :data:`DEFAULT_HEAD`, is any
      parameter inside a module named ``head``, ``heads``, ``classifier``,
      ``pooler``, ``pre_logits``, ``fc_norm``, ``attn_pool``, ``lm_head``,
      ``head_dist`` or ``head_drop``, the modules timm leaves to the head's
      group. ``None``: the model has no head (the last block still gets
      ``decay``).
    stem: a selector for the stem and embeddings, depth 0. The default,
      :data:`DEFAULT_STEM`, is any parameter named (or inside a module
      named) ``embed``, ``embeddings``, ``patch_embed``, ``pos_embed``,
      ``cls_token``, ``stem``, ``wte``, ... (:data:`STEM_NAMES`). Blocks and
      ``after`` take precedence over it.
    after: a selector for the parameters after the last block that are not
      the head, which share the last block's depth ``L``. The default,
      :data:`FINAL_NORMS`, takes a module named in
      :data:`FINAL_NORM_NAMES` (``norm``, ``encoder_norm``, ``ln_f``,
      ``layernorm``, ...) that sits beside the blocks' stack: ``norm`` beside
      ``blocks_*``, ``model/norm`` beside ``model/layers/*``, but not
      ``patch_embed/norm``. ``None``: nothing comes after the blocks. To put
      a final norm with the head instead (as BEiT does), add it to ``head``.
    min_scale: a floor on every multiplier, in ``[0, 1]`` (timm's
      ``min_scale``: ``max(min_scale, decay ** k)``).
    freeze_below: if given, a depth whose multiplier (after ``min_scale``)
      is below it gets 0.0: its parameters are frozen (timm's
      ``no_opt_scale``). In ``[0, 1]``; the head is never frozen. A
      multiplier of 0.0 gives an update of exactly zero, NaN gradients
      included (weight decay included, when ``scale_by_rules`` comes last
      in the chain) but the inner optimizer still holds state for those
      leaves.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis). Each layer of a stacked parameter is then
      a leaf of its own, ``layers/3/attn/kernel``, which the default
      ``block`` finds as block 3: the rule set gives the stacked model the
      unrolled model's multipliers, layer by layer. Pass the same
      ``stacks`` to :func:`layerwise.scale_by_rules`, whose rules then
      resolve on the layer leaves.

  Returns:
    A rule set: a list of ``(selector, multiplier)`` pairs, one per depth
    that has parameters, from the head down, with Python float
    multipliers. Each selector is a :class:`~layerwise.Selector` named
    ``depth d (what)``, such as ``depth 3 (layers_2)``. The last rule also
    takes any leaf that the others do not, so the rule set covers every
    leaf, and it passes strict resolution on ``params``.

  Raises:
    ValueError: for ``decay``, ``min_scale`` or ``freeze_below`` out of
      range; a ``block`` pattern without one or two capture groups, one that
      captures something other than digits, one that matches no path, or
      one that matches blocks in two stacks; a ``head`` that matches no
      parameter (name it, or pass ``head=None``); an ``after`` selector that
      matches no parameter; parameters in none of head, blocks, after and
      stem.
    TypeError: for a value of the wrong type, or a ``head``, ``stem`` or
      ``after`` that is not a selector.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> params = {"embed": jnp.ones((10, 4)),
    ...           "layers_0": {"w": jnp.ones((4, 4))},
    ...           "layers_1": {"w": jnp.ones((4, 4))},
    ...           "norm": {"scale": jnp.ones(4)},
    ...           "head": {"w": jnp.ones((4, 2))}}
    >>> rules = lw.layer_decay(0.5, params)
    >>> rules
    [(depth 3 (head), 1.0), (depth 2 (layers_1, norm), 0.5),
    (depth 1 (layers_0), 0.25), (depth 0 (embeddings), 0.125)]
    >>> lw.resolve(rules, params)
    {'embed': 0.125, 'head': {'w': 1.0}, 'layers_0': {'w': 0.25},
    'layers_1': {'w': 0.5}, 'norm': {'scale': 0.5}}
    >>> lw.resolve(lw.layer_decay(0.5, params, min_scale=0.2,
    ...                           freeze_below=0.25), params)["embed"]
    0.0

    Stages of blocks count through: Swin's stage 1 starts at depth 3, its
    downsample with its first block.

    >>> swin = {"patch_embed": {"w": jnp.ones(2)},
    ...         "layers": [{"blocks": [{"w": jnp.ones(2)}] * 2},
    ...                    {"downsample": {"w": jnp.ones(2)},
    ...                     "blocks": [{"w": jnp.ones(2)}]}],
    ...         "head": {"fc": {"w": jnp.ones(2)}}}
    >>> lw.resolve(lw.layer_decay(0.5, swin), swin)["layers"]
    [{'blocks': [{'w': 0.125}, {'w': 0.25}]}, {'blocks': [{'w': 0.5}],
    'downsample': {'w': 0.5}}]

    A stacked (scanned) model, its blocks in one array per kind: each layer
    gets the unrolled model's multiplier.

    >>> stacked = {"embed": jnp.ones((10, 4)),
    ...            "layers": {"w": jnp.ones((2, 4, 4))},
    ...            "head": {"w": jnp.ones((4, 2))}}
    >>> rules = lw.layer_decay(0.5, stacked, stacks={"layers": 0})
    >>> lw.resolve(rules, stacked, stacks={"layers": 0})
    {'embed': 0.125, 'head': {'w': 1.0}, 'layers': {'w': (0.25, 0.5)}}

    A module that is neither stem, block nor head says so:

    >>> lw.layer_decay(0.5, {**params, "head_aux": {"w": jnp.ones(2)}})
    Traceback (most recent call last):
    ...
    ValueError: lw.layer_decay: 1 parameter(s) are in none of the stem, ...

  References:
    Clark et al., `ELECTRA: Pre-training Text Encoders as Discriminators
    Rather Than Generators <https://arxiv.org/abs/2003.10555>`_, 2020.

    Bao et al., `BEiT: BERT Pre-Training of Image Transformers
    <https://arxiv.org/abs/2106.08254>`_, 2021.

    timm, ``timm/optim/_param_groups.py`` (``param_groups_layer_decay``)
    and ``timm/models/_manipulate.py`` (``group_with_matcher``).
  """
  fn = "lw.layer_decay"
  decay = _validate.bounded(
      fn, "decay", decay, low=0.0, high=1.0, low_open=True,
      advice="Each layer learns at decay times the rate of the layer above "
      "it: 0.65 to 0.9 are usual, 1.0 turns the decay off.")
  min_scale = _validate.bounded(
      fn, "min_scale", min_scale, low=0.0, high=1.0,
      advice="It is a floor on the multipliers (0.0, the default, sets "
      "none).")
  if freeze_below is not None:
    freeze_below = _validate.bounded(
        fn, "freeze_below", freeze_below, low=0.0, high=1.0,
        advice="Depths whose multiplier is below it are frozen (multiplier "
        "0.0); None freezes none.")
  regex = _block_regex(fn, block)
  head_c = None if head is None else compile_selector(head)
  stem_c = compile_selector(stem)
  final_norms = after is FINAL_NORMS
  after_c = None if after is None or final_norms else compile_selector(after)

  paths, specs, _, layers = layer_paths_and_specs(
      fn, params, _paths.normalize_stacks(fn, stacks))
  in_head = [head_c is not None and head_c.match(p, s)
             for p, s in zip(paths, specs)]

  # The blocks: every leaf outside the head that the pattern finds.
  blocks: dict[int, _Block] = {}
  memo: dict[str, _Block] = {}
  for i, (path, h) in enumerate(zip(paths, in_head)):
    if not h and (b := _find_block(fn, regex, path, memo)) is not None:
      blocks[i] = b
  if not blocks:
    shown = ", ".join(repr(p) for p in paths[:4])
    more = ", ..." if len(paths) > 4 else ""
    raise ValueError(
        f"{fn} found no block: the block pattern {_pattern(regex)} "
        f"matches none of the {len(paths)} parameter paths "
        f"{'outside the head ' if any(in_head) else ''}({shown}{more}). Pass "
        "block=<regex> whose one capture group is the block index, e.g. "
        r"block=r'(?:^|/)encoderblock_(\d+)(?:/|$)' for paths like "
        "'Transformer/encoderblock_3/...' (lw.paths(params) lists the "
        "paths)." + ("" if layers is not None else _stacked_hint(paths, specs)))
  containers: dict[str, list[str]] = {}
  for i, b in blocks.items():
    containers.setdefault(b.container, []).append(paths[i])
  if len(containers) > 1:
    counts = {c: len({blocks[paths.index(p)].key for p in ps})
              for c, ps in containers.items()}
    listed = "; ".join(
        f"{c!r} ({k} block{'' if k == 1 else 's'}, e.g. {containers[c][0]!r})"
        for c, k in counts.items())
    raise ValueError(
        f"{fn} needs one stack of blocks, but the block pattern "
        f"{_pattern(regex)} finds {len(containers)}: {listed}. Anchor the "
        "pattern to the stack whose depth should decay (e.g. "
        r"block=r'^encoder/layers_(\d+)/'); name the others in stem=, head= "
        "or after=.")

  # Each block's depth: its index + 1, or its rank in (stage, block) order.
  if any(b.two_level for b in blocks.values()):
    order = {k: d for d, k in enumerate(sorted({b.key for b in
                                                blocks.values()}), 1)}
    block_depth = {i: order[b.key] for i, b in blocks.items()}
    num_blocks = len(order)
  else:
    block_depth = {i: b.key[0] + 1 for i, b in blocks.items()}
    num_blocks = max(block_depth.values())
  parent = next(iter(blocks.values())).parent

  depths: list[int] = []
  unclassified = []
  after_paths = []
  for i, (path, spec) in enumerate(zip(paths, specs)):
    if in_head[i]:
      depths.append(num_blocks + 1)
    elif i in block_depth:
      depths.append(block_depth[i])
    elif (after_c.match(path, spec) if after_c is not None
          else final_norms and _beside(parent, path)):
      depths.append(num_blocks)
      after_paths.append(path)
    elif stem_c.match(path, spec):
      depths.append(0)
    else:
      depths.append(-1)
      unclassified.append(path)
  if head_c is not None and not any(in_head):
    raise ValueError(
        f"{fn} found no head: no parameter matches head={head_c.text}. "
        "Name the head's parameters with any selector (e.g. "
        "head='classifier/**'; lw.paths(params) lists the paths), or pass "
        "head=None for a model without a head.")
  if after_c is not None and not after_paths:
    raise ValueError(
        f"{fn}: after={after_c.text} matches no parameter outside "
        "the head and the blocks. Fix the selector (lw.paths(params) lists "
        "the paths), or leave after at its default.")
  if unclassified:
    raise _unclassified_error(fn, unclassified)

  labels = {0: "embeddings", num_blocks + 1: "head"}
  for i in sorted(block_depth, key=lambda i: paths[i]):
    labels.setdefault(block_depth[i], blocks[i].label)
  if after_paths:
    labels[num_blocks] += ", " + _names(after_paths)

  def multiplier(depth: int) -> float:
    scale = max(min_scale, decay ** (num_blocks + 1 - depth))
    if freeze_below and scale < freeze_below:
      return 0.0
    return float(scale)

  members: dict[int, set[str]] = {}
  for path, d in zip(paths, depths):
    members.setdefault(d, set()).add(path)
  present = sorted(members, reverse=True)
  rules = []
  for k, d in enumerate(present):
    text = f"depth {d} ({labels[d]})"
    last = k == len(present) - 1  # the last rule takes every leaf left
    rules.append((of_paths(None if last else members[d], text),
                  multiplier(d)))
  return rules


def discriminative(groups: Sequence[SelectorLike], lo: float,
                   hi: float | None = None) -> list[tuple[Any, float]]:
  r"""Discriminative rates as in fastai: multipliers spaced evenly in log.

  fastai trains a model split into parameter groups (lowest layers first,
  head last) with ``lr=slice(lo, hi)``: the groups' rates are spaced
  geometrically from ``lo`` to ``hi`` (``even_mults``); with
  ``lr=slice(hi)`` the last group gets ``hi`` and every other group
  ``hi / 10``. ``discriminative(groups, lo, hi)`` and
  ``discriminative(groups, hi)`` give the same numbers, as multipliers for
  ``scale_by_rules``: group ``k`` of ``n`` gets ``lo * step ** k`` with
  ``step = (hi / lo) ** (1 / (n - 1))``, computed as fastai's
  ``even_mults`` does, so the values are fastai's to the last bit (a single
  group gets ``hi``).

  The name is ULMFiT's ("discriminative fine-tuning"); the single value
  means the top rate, as in ``slice(hi)`` and ``range(stop)``.

  The multipliers scale the inner optimizer's rate, so a group's rate is
  ``lr_base * multiplier``. To train with fastai's absolute rates, pass them
  here and give the inner optimizer a rate of 1.0 (its schedule, if any,
  then multiplies them as fastai's ``fit_one_cycle`` does); or pass ratios
  to a base rate, ``discriminative(groups, lo / lr, hi / lr)`` with the
  optimizer at ``lr`` (equal up to rounding).

  Args:
    groups: selectors (globs, compiled regexes or callables), one per
      group, lowest layers first. A leaf takes the first group that matches
      it, as in any rule set, so put a catch-all (``"**"``) last if the
      rest should get the top rate.
    lo: the first group's multiplier, or, when ``hi`` is not given, the
      last group's (the others get ``lo / 10``). Finite and > 0.
    hi: the last group's multiplier. Finite and > 0.

  Returns:
    A rule set: a list of ``(selector, multiplier)`` pairs in group order,
    with the selectors as given and Python float multipliers.

  Raises:
    ValueError: for no groups, or ``lo`` or ``hi`` not finite and > 0.
    TypeError: for ``groups`` that is not a sequence of selectors.

  Examples:
    >>> import jax.numpy as jnp
    >>> import layerwise as lw
    >>> lw.discriminative(["embed/**", "encoder/**", "**"], 0.01, 1.0)
    [('embed/**', 0.01), ('encoder/**', 0.1), ('**', 1.0)]
    >>> lw.discriminative(["embed/**", "encoder/**", "**"], 1.0)  # slice(1.0)
    [('embed/**', 0.1), ('encoder/**', 0.1), ('**', 1.0)]
    >>> params = {"embed": jnp.ones(3), "encoder": {"w": jnp.ones(3)},
    ...           "head": jnp.ones(3)}
    >>> lw.resolve(lw.discriminative(["embed", "encoder/**", "head"], 0.25, 1.0),
    ...            params)
    {'embed': 0.25, 'encoder': {'w': 0.5}, 'head': 1.0}

  References:
    Howard and Ruder, `Universal Language Model Fine-tuning for Text
    Classification <https://arxiv.org/abs/1801.06146>`_, 2018.

    fastai, ``fastai/optimizer.py`` (``_BaseOptimizer.set_hyper``) and
    fastcore, ``fastcore/basics.py`` (``even_mults``).
  """
  fn = "lw.discriminative"
  if (isinstance(groups, (str, bytes, re.Pattern, Mapping))
      or callable(groups) or not isinstance(groups, Sequence)):
    raise TypeError(
        f"{fn}: groups must be a list of selectors, one per group "
        f"(lowest layers first), got {type(groups).__name__} {groups!r}. "
        "For one group, write [selector].")
  groups = list(groups)
  if not groups:
    raise ValueError(
        f"{fn} needs at least one group: pass a list of selectors, "
        "lowest layers first, such as ['embed/**', 'encoder/**', '**'].")
  for selector in groups:
    compile_selector(selector)  # a TypeError for a non-selector
  positive = ("The multipliers are spaced geometrically, which needs "
              "positive ends; to freeze a group, give it multiplier 0.0 in a "
              "rule of its own.")
  lo = _validate.bounded(fn, "lo", lo, low=0.0, low_open=True,
                         advice=positive)
  if hi is not None:
    hi = _validate.bounded(fn, "hi", hi, low=0.0, low_open=True,
                           advice=positive)
  n = len(groups)
  if hi is None:  # fastai's slice(hi): the last group hi, the others hi / 10
    multipliers = [lo / 10] * (n - 1) + [lo]
  elif n == 1:  # fastcore's even_mults(lo, hi, 1) is hi
    multipliers = [hi]
  else:  # fastcore's even_mults(lo, hi, n), operation for operation
    step = (hi / lo)**(1 / (n - 1))
    multipliers = [lo * (step**k) for k in range(n)]
  return list(zip(groups, multipliers))
