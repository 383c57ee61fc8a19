"""Norms of update leaves, in float32, for real and complex leaves alike.

Clipping and norm tracking measure updates with these, so a norm means the
same everywhere: the magnitude of each entry (``|x|``, the modulus for a
complex entry), accumulated in float32 whatever the leaf's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__: list[str] = []

F32 = jnp.float32


def magnitude(x: jax.Array) -> jax.Array:
  """``x`` in float32, as the modulus of each entry for a complex leaf (a
  real leaf keeps its sign: squares and absolute values follow)."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(F32)
  return x.astype(F32)


def sq_sum(x: jax.Array) -> jax.Array:
  """The sum of the squared magnitudes of ``x``'s entries."""
  return jnp.sum(jnp.square(magnitude(x)))


def l2(leaves: Sequence[jax.Array]) -> jax.Array:
  """The L2 norm of several leaves jointly."""
  return jnp.sqrt(sum((sq_sum(x) for x in leaves), jnp.zeros([], F32)))


def norm(leaves: Sequence[jax.Array], ord: float) -> jax.Array:
  """The ``ord`` norm (1, 2 or inf) of several leaves jointly."""
  if ord == 2:
    return l2(leaves)
  if ord == 1:
    return sum((jnp.sum(jnp.abs(magnitude(x))) for x in leaves),
               jnp.zeros([], F32))
  assert ord == math.inf, ord
  return jnp.max(jnp.stack([jnp.max(jnp.abs(magnitude(x)), initial=0.0)
                            for x in leaves]))
