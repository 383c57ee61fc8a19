"""layerwise: per-parameter optimizer rules for JAX, as pure Optax transformations.

Rules are ordered mappings ``{selector: value}`` over parameter paths
(``"encoder/layers/3/attn/kernel"``); see :mod:`layerwise._resolve` for the
rule language and :func:`describe` to see which rule each parameter got.

Examples:
  >>> import jax.numpy as jnp
  >>> import layerwise as lw
  >>> params = {"encoder": {"kernel": jnp.ones((4, 4))}, "head": {"bias": jnp.zeros(2)}}
  >>> lw.resolve({"encoder/**": 0.1, "**": 1.0}, params)
  {'encoder': {'kernel': 0.1}, 'head': {'bias': 1.0}}
"""

from layerwise._diagnostics import RuleError
from layerwise._paths import paths
from layerwise._resolve import Flags, Rules, labels, resolve
from layerwise._selectors import (
    Selector,
    SelectorLike,
    all_of,
    any_of,
    ndim_at_least,
    ndim_at_most,
    not_,
)
from layerwise._types import ScalarOrSchedule
from layerwise.checkpoint import restore_state
from layerwise.checks import check
from layerwise.clipping import (
    ClipByRulesState,
    clip_adaptive,
    clip_by_rules,
    clip_group_norm,
    clip_norm,
    clip_quantile,
    clip_value,
    clip_zscore,
    set_threshold,
)
from layerwise.inspect import Description, describe, hyperparams, norms
from layerwise.layer_rates import (
    DEFAULT_HEAD,
    DEFAULT_STEM,
    discriminative,
    layer_decay,
)
from layerwise.mapping import MapUpdatesState, map_updates
from layerwise.partition import (
    FreezeState,
    PartitionState,
    freeze,
    grad,
    partition,
    stop_gradient,
    value_and_grad,
)
from layerwise.reparam import (
    ReparameterizeState,
    equivalent_multipliers,
    equivalent_scales,
    mup_scales,
    reparameterize,
)
from layerwise.scaling import (
    NO_DECAY,
    AddDecayedWeightsState,
    ScaleByRulesState,
    add_decayed_weights,
    scale_by_rules,
    set_scale,
    set_weight_decay,
)
from layerwise.sharding import state_shardings
from layerwise.tracking import TrackNormsState, track_norms
from layerwise.transfer import TransplantReport, transplant

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_HEAD",
    "DEFAULT_STEM",
    "NO_DECAY",
    "AddDecayedWeightsState",
    "ClipByRulesState",
    "Description",
    "Flags",
    "FreezeState",
    "MapUpdatesState",
    "PartitionState",
    "ReparameterizeState",
    "RuleError",
    "Rules",
    "ScalarOrSchedule",
    "ScaleByRulesState",
    "Selector",
    "SelectorLike",
    "TrackNormsState",
    "TransplantReport",
    "add_decayed_weights",
    "all_of",
    "any_of",
    "check",
    "clip_adaptive",
    "clip_by_rules",
    "clip_group_norm",
    "clip_norm",
    "clip_quantile",
    "clip_value",
    "clip_zscore",
    "describe",
    "discriminative",
    "equivalent_multipliers",
    "equivalent_scales",
    "freeze",
    "grad",
    "hyperparams",
    "labels",
    "layer_decay",
    "map_updates",
    "mup_scales",
    "ndim_at_least",
    "ndim_at_most",
    "norms",
    "not_",
    "partition",
    "paths",
    "reparameterize",
    "resolve",
    "restore_state",
    "scale_by_rules",
    "set_scale",
    "set_threshold",
    "set_weight_decay",
    "state_shardings",
    "stop_gradient",
    "track_norms",
    "transplant",
    "value_and_grad",
]
