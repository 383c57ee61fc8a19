"""Where an optimizer state goes on a mesh: its shardings, from the params'."""

from __future__ import annotations

from typing import Any

import jax
import optax

from layerwise import _hosts, _paths
from layerwise._types import PyTree

__all__ = ["state_shardings"]


class _Leaf:
  """A state leaf with its path, as the map over the state sees it."""
  __slots__ = ("path", "shape")

  def __init__(self, path: str, shape: tuple[int, ...]):
    self.path, self.shape = path, shape


def _owner(path: str, shape: tuple[int, ...],
           params: dict[str, tuple[tuple[int, ...], Any]]) -> Any:
  """The sharding of the parameter a state leaf is a copy of: the one whose
  path ends the leaf's path (the longest such), if it has the leaf's shape;
  ``None`` for a leaf that is no parameter's."""
  segments = path.split("/")
  for k in range(len(segments)):
    found = params.get("/".join(segments[k:]))
    if found is not None:
      return found[1] if found[0] == shape else None
  return params[""][1] if "" in params and params[""][0] == shape else None


def state_shardings(tx: Any, params: PyTree) -> PyTree:
  """The shardings of ``tx``'s state for ``params``: each parameter's state
  placed like the parameter, everything else replicated.

  A tree of shardings with the structure of ``tx.init(params)``, for
  ``jax.jit(tx.init, out_shardings=...)``, for the ``out_shardings`` of a
  train step, and for the target of a checkpoint restore
  (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``). Nothing is
  allocated: the state is ``jax.eval_shape(tx.init, params)``.

  Which state leaves are copies of the parameters is what
  ``optax.tree_map_params`` finds (the moments of Adam, also inside
  :func:`layerwise.partition`, :func:`layerwise.freeze` and
  :func:`layerwise.reparameterize`): each gets the sharding of the parameter
  whose path ends its own, if it has that parameter's shape (a factored
  statistic of another shape is replicated). The rest, step counts and
  layerwise's own small vectors (multipliers, weight decays, clip
  thresholds and statistics, tracked norms), is replicated on the devices
  of the params' first sharding (its mesh, for a ``NamedSharding``). For a
  transformation ``optax.tree_map_params`` cannot map, every leaf shaped
  like the parameter its path ends with is placed like it.

  On several hosts (``jax.distributed``), ``jax.jit(tx.init,
  out_shardings=lw.state_shardings(tx, params))(params)`` is the way to
  make a state placed right: without ``out_shardings``, the zeros ``init``
  makes land on each process's first device.

  Args:
    tx: an optax transformation (a chain, say).
    params: the parameters, placed: arrays (their ``.sharding``) or
      ``jax.ShapeDtypeStruct``\\ s with a ``sharding``.

  Returns:
    A tree of ``jax.sharding.Sharding``\\ s, one per leaf of the state.

  Raises:
    ValueError: if a leaf of ``params`` has no sharding.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> import layerwise as lw
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> params = {"w": jax.device_put(jnp.ones((4, 2)),
    ...                               NamedSharding(mesh, P("data"))),
    ...           "b": jax.device_put(jnp.zeros(2), NamedSharding(mesh, P()))}
    >>> tx = optax.chain(optax.adam(1e-3), lw.scale_by_rules({"**": 1.0}))
    >>> shardings = lw.state_shardings(tx, params)
    >>> shardings[0][0].mu["w"].spec == P("data")
    True
    >>> shardings[1].multipliers.spec == P()   # replicated
    True
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> state[0][0].mu["w"].sharding == params["w"].sharding
    True
  """
  fn = "lw.state_shardings"
  param_paths, param_leaves, _ = _paths.flatten_with_paths(params)
  placed: dict[str, tuple[tuple[int, ...], Any]] = {}
  for path, leaf in zip(param_paths, param_leaves):
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      raise ValueError(
          f"{fn}: parameter {path!r} ({type(leaf).__name__}) has no "
          "sharding. Pass the params placed on their devices "
          "(jax.device_put(params, shardings)), or as "
          "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves.")
    placed[path] = (tuple(leaf.shape), sharding)
  if not placed:
    raise ValueError(f"{fn}: params has no array leaves; pass the params "
                     "the state is for, placed on their devices.")
  replicated = _hosts.replicated_like(next(iter(placed.values()))[1])
  abstract = jax.eval_shape(tx.init, params)
  state_paths, leaves, treedef = _paths.flatten_with_paths(abstract)
  tagged = treedef.unflatten([_Leaf(p, tuple(x.shape))
                              for p, x in zip(state_paths, leaves)])

  def like_param(leaf: _Leaf) -> Any:
    return _owner(leaf.path, leaf.shape, placed) or replicated

  def not_params(subtree: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: replicated, subtree)

  try:
    return optax.tree_map_params(tx, like_param, tagged,
                                 transform_non_params=not_params)
  except Exception:  # pylint: disable=broad-except  # a state it cannot map
    return treedef.unflatten([like_param(x) for x in
                              jax.tree_util.tree_leaves(tagged)])
