r"""Rule sets of per-layer multipliers: layer-wise decay and discriminative rates.

Both build a rule set ``{selector: multiplier}`` for
:func:`layerwise.scale_by_rules` from the model's own structure:
:func:`layer_decay` gives each parameter its depth in the network (the
layer-wise learning-rate decay of ELECTRA, BEiT and timm), and
:func:`discriminative` spaces multipliers geometrically over groups you name
(fastai's discriminative fine-tuning).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from layerwise import _validate
from layerwise._resolve import paths_and_specs
from layerwise._selectors import (Selector, SelectorLike, any_of,
                                  compile_selector)

__all__ = ["DEFAULT_HEAD", "discriminative", "layer_decay"]

#: The default ``block`` of :func:`layer_decay`: a path segment ``layers_3``,
#: ``blocks_3``, ``layer_3``, ``block_3``, ``h_3`` (linen submodule names), or
#: the same names followed by an index segment, ``layers/3`` (NNX lists,
#: Equinox, HF Flax ``h/3``). The capture group is the block index.
DEFAULT_BLOCK = r"(?:^|/)(?:layers|blocks|layer|block|h)[_/](\d+)(?:/|$)"

#: Module names that :data:`DEFAULT_HEAD` treats as the head, at any depth.
HEAD_NAMES = ("head", "heads", "classifier", "pooler", "pre_logits",
              "fc_norm", "attn_pool", "lm_head")

#: The default ``head`` of :func:`layer_decay`: any parameter inside a module
#: named in :data:`HEAD_NAMES`. It is a :class:`~layerwise.Selector`, so it
#: extends with ``|``: ``head=DEFAULT_HEAD | "out_proj/**"``.
DEFAULT_HEAD = any_of(*(f"**/{name}/**" for name in HEAD_NAMES))

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


def _block_regex(block: Any) -> re.Pattern[str]:
  if isinstance(block, str):
    try:
      regex = re.compile(block)
    except re.error as e:
      raise ValueError(
          f"lw.layer_decay: block={block!r} is not a valid regular expression "
          f"({e}). Pass a regex with one capture group around the block "
          r"index, such as r'(?:^|/)layers_(\d+)(?:/|$)'.") from e
  elif isinstance(block, re.Pattern):
    regex = block
  else:
    raise TypeError(
        f"lw.layer_decay: block must be a regex (a string or re.compile(...)) "
        f"with one capture group around the block index, got "
        f"{type(block).__name__} {block!r}.")
  if regex.groups != 1:
    raise ValueError(
        f"lw.layer_decay: the block pattern {_pattern(regex)} has "
        f"{regex.groups} capture groups; it needs exactly one, around the "
        r"block index, as in r'(?:^|/)layers_(\d+)(?:/|$)'. Write any other "
        "group as (?:...).")
  return regex


class _Block(NamedTuple):
  """Where a path's block is: its index, stack, parent and name."""
  index: int
  container: str  # the stack, with the index as '*': 'encoder/layers_*'
  parent: str     # the path holding the stack: 'encoder', or ''
  label: str      # the block's own name: 'layers_3', 'layers/3'


class _Depths:
  """Classifies a path into its depth: embeddings 0, block i i+1, head L+1."""

  def __init__(self, regex: re.Pattern[str], head: Any, after: Any,
               final_norms: bool):
    self.regex = regex
    self.head = head              # a compiled selector, or None
    self.after = after            # a compiled selector, or None
    self.final_norms = final_norms
    self.num_blocks = 0
    self.parent = ""
    self._memo: dict[Any, int] = {}

  def block(self, path: str) -> _Block | None:
    m = self.regex.search(path)
    if m is None:
      return None
    index = m.group(1)
    if index is None or not re.fullmatch("[0-9]+", index):
      raise ValueError(
          f"lw.layer_decay: the block pattern {_pattern(self.regex)} captured "
          f"{index!r} from {path!r}, which is not a block index. Its capture "
          r"group must match the index's digits only, as (\d+) does.")
    start, end = m.span(1)
    seg_start = path.rfind("/", 0, start) + 1
    seg_end = path.find("/", end)
    seg_end = len(path) if seg_end < 0 else seg_end
    if start == seg_start and end == seg_end and seg_start > 0:
      # The index is a segment of its own ('layers/3'): the stack is the
      # segment before it.
      owner = path.rfind("/", 0, seg_start - 1) + 1
    else:
      owner = seg_start
    return _Block(int(index), path[:start] + "*" + path[end:seg_end],
                  path[:max(owner - 1, 0)], path[owner:seg_end])

  def is_head(self, path: str, spec: Any) -> bool:
    return self.head is not None and self.head.match(path, spec)

  def is_after(self, path: str, spec: Any) -> bool:
    if self.after is not None:
      return self.after.match(path, spec)
    if not self.final_norms:
      return False
    if self.parent:
      if not path.startswith(self.parent + "/"):
        return False
      path = path[len(self.parent) + 1:]
    return path.split("/", 1)[0] in FINAL_NORM_NAMES

  def depth(self, path: str, spec: Any) -> int:
    key = (path, tuple(spec.shape), str(spec.dtype))
    depth = self._memo.get(key)
    if depth is None:
      if self.is_head(path, spec):
        depth = self.num_blocks + 1
      elif (b := self.block(path)) is not None:
        depth = b.index + 1
      elif self.is_after(path, spec):
        depth = self.num_blocks
      else:
        depth = 0
      self._memo[key] = depth
    return depth


def _names(paths: Sequence[str], n: int = 2) -> str:
  """The modules holding ``paths`` (a leaf's path without its last name)."""
  modules = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in paths))
  text = ", ".join(modules[:n])
  return text + (f" and {len(modules) - n} more" if len(modules) > n else "")


def layer_decay(
    decay: float,
    params: Any,
    *,
    block: str | re.Pattern[str] = DEFAULT_BLOCK,
    head: SelectorLike | None = DEFAULT_HEAD,
    after: SelectorLike | None = FINAL_NORMS,
    min_scale: float = 0.0,
    freeze_below: float | None = None,
) -> list[tuple[Selector, float]]:
  r"""Layer-wise learning-rate decay: a rule set of multipliers per depth.

  Layer-wise learning-rate decay (LLRD) fine-tunes a pretrained transformer
  with rates that shrink geometrically from the head down to the embeddings,
  so the layers that hold the most general features move least (ELECTRA,
  BEiT, and timm's ``param_groups_layer_decay``). For a model of ``L``
  blocks each parameter gets a depth:

  * the head (``head``): ``L + 1``;
  * block ``i`` (its index found in the path by ``block``): ``i + 1``;
  * parameters after the last block that are not the head, such as a final
    norm (``after``): ``L``, the last block's depth, as timm's ViT
    ``group_matcher`` puts ``norm`` with the last block;
  * everything else, the embeddings and whatever comes before the first
    block: ``0``;

  and the multiplier ``max(min_scale, decay ** (L + 1 - depth))``: 1.0 for
  the head, ``decay`` for the last block, ``decay ** (L + 1)`` for the
  embeddings. These are timm's ``lr_scale``\ s; multiply by the base rate of
  the inner optimizer (``optax.chain(optax.adamw(lr), lw.scale_by_rules(
  rules))``) to get its per-group rates.

  The head is found by name, not by position: paths are ordered by name, not
  by the order of the forward pass, so "after the last block" cannot be read
  from them. Check the outcome with ``lw.describe(rules, params)``.

  Args:
    decay: the ratio between the rates of a layer and the layer above it, in
      ``(0, 1]``; 0.65 to 0.9 are usual, 1.0 gives every leaf 1.0.
    params: the parameters the rule set is for (arrays, an ``nnx.State`` or
      ``jax.ShapeDtypeStruct``\ s; only paths, shapes and dtypes are read).
      ``L`` is the largest block index found in them, plus one.
    block: a regex (a string or ``re.compile(...)``) searched in each path
      (``re.search``), whose one capture group is the block index. The
      default, :data:`DEFAULT_BLOCK`, finds ``layers_3``, ``blocks_3``,
      ``layer_3``, ``block_3``, ``h_3`` and ``layers/3`` (an NNX list) as a
      whole path segment. Every block must belong to one stack (one
      ``encoder/layers_*``): to decay one stack of several, anchor the
      pattern to it (``r"^encoder/layers_(\d+)/"``).
    head: a selector (glob, compiled regex or callable ``(path, leaf) ->
      bool``) for the head, which gets multiplier 1.0; it takes precedence
      over ``block``. The default, :data:`DEFAULT_HEAD`, is any parameter
      inside a module named ``head``, ``heads``, ``classifier``, ``pooler``,
      ``pre_logits``, ``fc_norm``, ``attn_pool`` or ``lm_head``, the modules
      timm leaves to the head's group. ``None``: the model has no head (the
      last block still gets ``decay``).
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
      multiplier of 0.0 gives a zero update (weight decay included, when
      ``scale_by_rules`` comes last in the chain) but the inner optimizer
      still holds state for those leaves.

  Returns:
    A rule set: a list of ``(selector, multiplier)`` pairs, one per depth
    that has parameters, from the head down, with Python float
    multipliers. Each selector is a :class:`~layerwise.Selector` named
    ``depth d (what)``, such as ``depth 3 (layers_2)``. The last rule also
    takes any leaf that the others do not, so the rule set covers every
    leaf, and it passes strict resolution on ``params``.

  Raises:
    ValueError: for ``decay``, ``min_scale`` or ``freeze_below`` out of
      range; a ``block`` pattern without exactly one capture group, one that
      captures something other than digits, one that matches no path, or
      one that matches blocks in two stacks; a ``head`` that matches no
      parameter (name it, or pass ``head=None``); an ``after`` selector that
      matches no parameter.
    TypeError: for a value of the wrong type, or a ``head`` or ``after``
      that is not a selector.

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
  regex = _block_regex(block)
  head_c = None if head is None else compile_selector(head)
  explicit_after = after is not None and after is not FINAL_NORMS
  after_c = compile_selector(after) if explicit_after else None
  depths = _Depths(regex, head_c, after_c, final_norms=after is FINAL_NORMS)

  path_strs, specs, _ = paths_and_specs(params)

  # The blocks: every leaf outside the head that the pattern finds.
  in_head = [depths.is_head(p, s) for p, s in zip(path_strs, specs)]
  blocks: dict[str, _Block] = {}
  for p, h in zip(path_strs, in_head):
    if not h and (b := depths.block(p)) is not None:
      blocks[p] = b
  if not blocks:
    shown = ", ".join(repr(p) for p in path_strs[:4])
    more = ", ..." if len(path_strs) > 4 else ""
    raise ValueError(
        f"{fn} found no block: the block pattern {_pattern(regex)} "
        f"matches none of the {len(path_strs)} parameter paths "
        f"{'outside the head ' if any(in_head) else ''}({shown}{more}). Pass "
        "block=<regex> whose one capture group is the block index, e.g. "
        r"block=r'(?:^|/)encoderblock_(\d+)(?:/|$)' for paths like "
        "'Transformer/encoderblock_3/...' (lw.paths(params) lists the "
        "paths).")
  stacks: dict[str, list[str]] = {}
  for p, b in blocks.items():
    stacks.setdefault(b.container, []).append(p)
  if len(stacks) > 1:
    counts = {c: len({blocks[p].index for p in ps}) for c, ps in stacks.items()}
    listed = "; ".join(
        f"{c!r} ({k} block{'' if k == 1 else 's'}, e.g. {stacks[c][0]!r})"
        for c, k in counts.items())
    raise ValueError(
        f"{fn} needs one stack of blocks, but the block pattern "
        f"{_pattern(regex)} finds {len(stacks)}: {listed}. Anchor the "
        "pattern to the stack whose depth should decay (e.g. "
        r"block=r'^encoder/layers_(\d+)/'); the others then count as "
        "embeddings, or as head or after if you name them so.")
  first = next(iter(blocks.values()))
  depths.num_blocks = max(b.index for b in blocks.values()) + 1
  depths.parent = first.parent
  num_blocks = depths.num_blocks

  leaf_depths = [depths.depth(p, s) for p, s in zip(path_strs, specs)]
  if head_c is not None and not any(in_head):
    raise ValueError(
        f"{fn} found no head: no parameter matches head={head_c.text}. "
        "Name the head's parameters with any selector (e.g. "
        "head='classifier/**'; lw.paths(params) lists the paths), or pass "
        "head=None for a model without a head.")
  after_paths = [p for p, s, d in zip(path_strs, specs, leaf_depths)
                 if d == num_blocks and p not in blocks]
  if explicit_after and not after_paths:
    raise ValueError(
        f"{fn}: after={after_c.text} matches no parameter outside "
        "the head and the blocks. Fix the selector (lw.paths(params) lists "
        "the paths), or leave after at its default.")

  labels = {0: "embeddings", num_blocks + 1: "head"}
  for b in blocks.values():
    labels.setdefault(b.index + 1, b.label)
  if after_paths:
    labels[num_blocks] += ", " + _names(after_paths)

  def multiplier(depth: int) -> float:
    scale = max(min_scale, decay ** (num_blocks + 1 - depth))
    if freeze_below and scale < freeze_below:
      return 0.0
    return float(scale)

  present = sorted(set(leaf_depths), reverse=True)
  rules = []
  for k, d in enumerate(present):
    text = f"depth {d} ({labels[d]})"
    if k == len(present) - 1:  # the last rule takes every leaf left
      selector = Selector(lambda path, leaf: True, text)
    else:
      selector = Selector(
          lambda path, leaf, d=d: depths.depth(path, leaf) == d, text)
    rules.append((selector, multiplier(d)))
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
