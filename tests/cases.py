"""The public transformations, as cases the reliability battery runs.

Every public name of ``layerwise`` is either a transformation case here
(``CASES``) or listed in ``NOT_TRANSFORMATIONS`` with the test that covers
it; ``test_battery.test_every_public_name_is_covered`` fails otherwise, so a
new transformation joins the battery by one entry in ``CASES``.

All cases run on the same tree (``params``): an embedding, two layers, a
head and a scalar, with distinct shapes so that a state leaf's shape tells
which parameter it belongs to (the sharding tests rely on this).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerwise as lw

SHAPES = {
    "embed/embedding": (16, 8),
    "layers/0/kernel": (8, 24),
    "layers/0/bias": (24,),
    "layers/1/kernel": (8, 24),
    "layers/1/bias": (24,),
    "head/kernel": (32, 3),
    "head/bias": (3,),
    "temperature": (),
}


def params(dtype: Any = jnp.float32, seed: int = 0, scale: float = 1.0,
           shapes: dict[str, tuple[int, ...]] = SHAPES) -> Any:
  """The battery's tree, with normal values times ``scale``, in ``dtype``."""
  rng = np.random.default_rng(seed)
  leaf = {path: jnp.asarray(rng.normal(size=shape) * scale, dtype)
          for path, shape in shapes.items()}
  return {
      "embed": {"embedding": leaf["embed/embedding"]},
      "layers": [{"kernel": leaf[f"layers/{i}/kernel"],
                  "bias": leaf[f"layers/{i}/bias"]} for i in range(2)],
      "head": {"kernel": leaf["head/kernel"], "bias": leaf["head/bias"]},
      "temperature": leaf["temperature"],
  }


class Case(NamedTuple):
  """A public transformation, built as ``factory(*args, **kwargs)``.

  ``covers`` names the public names the case exercises besides the factory
  (clippers, rule helpers, the state class). ``args`` is a function of the
  params, for factories whose rules are computed from them.
  """
  factory: Callable[..., Any]
  args: Callable[[Any], tuple[Any, ...]]
  kwargs: dict[str, Any]
  covers: tuple[str, ...]
  needs_params: bool = False
  static_args: tuple[str, ...] = ()

  def make(self, tree: Any = None) -> Any:
    return self.factory(*self.args(params() if tree is None else tree),
                        **self.kwargs)


def _clip(name: str, rules: dict[Any, Any]) -> Case:
  return Case(lw.clip_by_rules, lambda p: (rules,), {},
              (name, "clip_by_rules", "ClipByRulesState"),
              needs_params=name == "clip_adaptive")


def _double(u, p, path):
  del p, path
  return 2 * u


CASES: dict[str, Case] = {
    "scale_by_rules": Case(
        lw.scale_by_rules,
        lambda p: ({"embed/**": 0.1,
                    "layers/*/bias": optax.linear_schedule(0.0, 1.0, 4),
                    "**": 1.0},), {},
        ("ScaleByRulesState", "set_scale")),
    "layer_decay": Case(
        lw.scale_by_rules,
        lambda p: (lw.layer_decay(0.5, p, head="head/**",
                                  stem=lw.DEFAULT_STEM | "temperature"),),
        {"default": 1.0}, ("layer_decay", "DEFAULT_STEM")),
    "discriminative": Case(
        lw.scale_by_rules,
        lambda p: (lw.discriminative(["embed/**", "layers/**", "**"], 0.01,
                                     1.0),), {}, ("discriminative",)),
    "add_decayed_weights": Case(
        lw.add_decayed_weights,
        lambda p: ({lw.NO_DECAY: 0.0, "**": 0.1},), {},
        ("AddDecayedWeightsState", "NO_DECAY"), needs_params=True),
    "clip_value": _clip("clip_value", {"**": lw.clip_value(0.1)}),
    "clip_norm": _clip("clip_norm", {"embed/**": lw.clip_norm(0.5, ord=1),
                                     "**": lw.clip_norm(0.5)}),
    "clip_group_norm": _clip("clip_group_norm", {
        "layers/**": lw.clip_group_norm(0.5),
        "**": lw.clip_group_norm(1.0, ord="inf")}),
    "clip_adaptive": _clip("clip_adaptive", {
        lw.ndim_at_least(2): lw.clip_adaptive(0.01), "**": None}),
    "clip_quantile": _clip("clip_quantile",
                           {"**": lw.clip_quantile(0.5, window=4)}),
    "clip_zscore": _clip("clip_zscore", {"**": lw.clip_zscore(2.0, warmup=1)}),
    "track_norms": Case(
        lw.track_norms, lambda p: ({"embed/**": "embed", "**": "rest"},), {},
        ("TrackNormsState", "norms")),
    "map_updates": Case(
        lw.map_updates, lambda p: (), {"fn": _double, "where": "layers/**"},
        ("MapUpdatesState",), static_args=("fn",)),
    "partition": Case(
        lw.partition,
        lambda p: ({"embed/**": optax.adam(1e-2), "head/kernel": None,
                    "**": optax.sgd(0.1, momentum=0.9)},), {},
        ("PartitionState",)),
    "freeze": Case(
        lw.freeze, lambda p: (optax.adam(1e-2), "embed/**"), {},
        ("FreezeState",)),
    "reparameterize": Case(
        lw.reparameterize,
        lambda p: (optax.adam(1e-2), {"embed/**": 2.0, "**": 0.5}), {},
        ("ReparameterizeState",), needs_params=True),
}

# The other public names: not transformations, each with the tests that
# cover it (and it may also appear in the cases above).
NOT_TRANSFORMATIONS: dict[str, str] = {
    "Description": "test_inspect; test_battery describes every case",
    "describe": "test_inspect; test_battery describes every case",
    "check": "test_checks (each trap reproduced, found and fixed; no trap "
             "in any case after adam)",
    "RuleError": "test_rules, test_errors",
    "Selector": "test_rules, test_properties",
    "SelectorLike": "the type check in .ci/run (mypy); a type alias",
    "Rules": "the type check in .ci/run (mypy); a type alias",
    "Flags": "the type check in .ci/run (mypy); a type alias",
    "ScalarOrSchedule": "the type check in .ci/run (mypy); a type alias",
    "DEFAULT_HEAD": "test_layer_rates (extending the head with |)",
    "all_of": "test_rules",
    "any_of": "test_rules",
    "not_": "test_rules",
    "ndim_at_least": "test_rules; the clip_adaptive case",
    "ndim_at_most": "test_rules",
    "labels": "test_rules, test_properties",
    "resolve": "test_rules, test_properties",
    "paths": "test_paths, test_properties",
    "equivalent_multipliers": "test_reparam",
    "equivalent_scales": "test_reparam",
    "mup_scales": "test_reparam",
    "stop_gradient": "test_partition, test_sharding",
    "grad": "test_grad (bit for bit as stop_gradient, linen, NNX, Equinox)",
    "value_and_grad": "test_grad (bit for bit as stop_gradient, linen, NNX, "
                      "Equinox)",
    "set_weight_decay": "test_live (setters, no retrace, the sweep)",
    "set_threshold": "test_live (setters, no retrace, the sweep)",
    "hyperparams": "test_live (the values set, restored, under jit)",
    "transplant": "test_transfer",
    "restore_state": "test_state_format (states saved by 0.1.0.dev0 and now)",
    "TransplantReport": "test_transfer",
    "state_shardings": "test_sharding (every case, replicated and FSDP), "
                       "test_multihost (2 processes)",
}


def covered_names() -> set[str]:
  """The public names the cases exercise."""
  names = set()
  for case in CASES.values():
    names.add(case.factory.__name__)
    names.update(case.covers)
  return names


def grads_like(tree: Any, seed: int = 1, scale: float = 1.0) -> Any:
  """Normal values shaped and typed like ``tree``."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([
      jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype) for x in leaves])
