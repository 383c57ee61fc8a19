"""The types in layerwise's signatures.

``PyTree`` is any pytree (params, updates, optimizer states: dicts, Flax
``State``\\ s, Equinox modules, NamedTuples...), which Python's type system
cannot spell more precisely than ``Any``; the names say what is expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import jax

__all__ = ["ArrayLike", "PyTree", "Schedule", "ScalarOrSchedule", "Stacks"]

#: Any pytree: params, updates, gradients, optimizer states.
PyTree = Any

#: A JAX array or anything that converts to one (a number, a NumPy array).
ArrayLike = jax.typing.ArrayLike

#: A schedule: the number of updates made so far -> a number, as every optax
#: schedule (``optax.linear_schedule(0.0, 1.0, 1000)``).
Schedule = Callable[[jax.Array], ArrayLike]

#: A multiplier or a weight decay: a number, or a schedule of one.
ScalarOrSchedule = Union[float, Schedule]

#: Which subtrees hold stacked (scanned) layers: ``{stack_path: layer_axis}``,
#: the name of the layer axis in the model's Flax metadata, or ``None`` (look
#: for a ``"layers"`` axis there); ``{}`` stacks nothing.
Stacks = Union[Mapping[str, int], str, None]
