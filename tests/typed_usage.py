"""Typical calls of the public API, type-checked by mypy in .ci/run.

Not a test module (pytest does not collect it): it proves that the public
signatures accept what the docs show, so the types do not get in a user's
way. `mypy` checks it with the package (pyproject.toml, [tool.mypy]).
"""

import re

import jax
import jax.numpy as jnp
import optax

import layerwise as lw

params = {"embed": jnp.ones((4, 2)), "layers_0": {"w": jnp.ones((2, 2))},
          "head": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}}
rules: lw.Rules[lw.ScalarOrSchedule] = {
    "embed": 0.1, re.compile(r".*/w"): optax.linear_schedule(0.0, 1.0, 10),
    lw.ndim_at_most(1): 0.0}
selector: lw.SelectorLike = lw.any_of("embed", lw.not_("head/**"))
frozen: lw.Flags = {"embed": True, "**": False}

tx = optax.chain(
    lw.clip_by_rules({"embed": lw.clip_value(0.1), "head/**": None,
                      "**": lw.clip_group_norm(1.0)}),
    lw.track_norms({"**": "{parent}"}),
    lw.freeze(optax.adamw(1e-3), frozen),
    lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01}),
    lw.scale_by_rules(lw.layer_decay(0.75, params,
                                     head=lw.DEFAULT_HEAD | "out/**",
                                     stem=lw.DEFAULT_STEM)),
    lw.scale_by_rules(lw.discriminative(["embed", "**"], 0.1, 1.0)),
    lw.map_updates(lambda u, p, path: u, "head/**"),
    lw.partition({"head/**": optax.sgd(0.1), "**": None}),
    lw.reparameterize(optax.adam(1e-3), {"**": 2.0}),
)
state = tx.init(params)
state = lw.set_scale(state, selector, 0.5)
logged: dict[str, jax.Array] = lw.norms(state)
table: lw.Description = lw.describe(tx, params, opt_state=state)
text: str = str(lw.describe(rules, params))
labels = lw.labels({"head/**": "head", "**": "body"})(params)
values = lw.resolve(rules, params, default=1.0, strict=False)
named = lw.paths(params)
new, report = lw.transplant(params, params, "layers_0/**")
copied: tuple[str, ...] = report.copied
multipliers = lw.equivalent_multipliers({"**": 0.5}, "sgd")
mup = lw.mup_scales(params, params, "adam")
frozen_params = lw.stop_gradient(params, "embed")
# Stacked (scanned) layers: the rule-driven functions take stacks=.
stacked = {"embed": jnp.ones((4, 2)),
           "layers": {"w": jnp.ones((3, 2, 2)), "b": jnp.ones((3, 2))},
           "head": {"w": jnp.ones((2, 2))}}
layer_paths = lw.paths(stacked, stacks={"layers": 0})
by_metadata = lw.paths(stacked, stacks="layers")  # a Flax axis name: none here
stacked_tx = optax.chain(
    lw.add_decayed_weights({lw.NO_DECAY: 0.0, "**": 0.01},
                           stacks={"layers": 0}, toward="init"),
    lw.scale_by_rules(lw.layer_decay(0.75, stacked, stacks={"layers": 0}),
                      stacks={"layers": 0}),
    lw.map_updates(lambda u, p, path: u, "layers/[0-1]/**", stacks={"layers": 0}),
)
stacked_state = stacked_tx.init(stacked)
stacked_updates, stacked_state = stacked_tx.update(stacked, stacked_state, stacked)
