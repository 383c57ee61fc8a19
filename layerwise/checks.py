"""Known traps in how a layerwise transformation is placed in an optax chain.

Where a transformation sits in a chain decides what it does, and some
placements train wrongly without an error: a multiplier placed before an
adaptive optimizer is undone by it, a multiplier after a schedule-free
optimizer breaks its interpolation, a global norm measured before
:func:`layerwise.freeze` lets a NaN in a frozen gradient into every update.
:func:`check` finds these in a transformation and raises, listing each trap
with its fix; :func:`layerwise.describe` prints the same findings as warning
lines. Both call :func:`traps`, the one implementation.

Two ways of looking are used, each where it is reliable:

* **The state's types and order.** ``jax.eval_shape(tx.init, params)`` is
  the chain's state: an ``optax.chain``'s state is the tuple of its
  transformations' states in order, and optax's states have recognisable
  types (``ScaleByAdamState``, ``ScaleByRmsState``, ``ScheduleFreeState``,
  ...). This finds the order of layerwise states and optax optimizers with
  state, but not that of stateless transformations (``clip_by_global_norm``,
  ``scale_by_learning_rate`` with a constant, ``scale``: each is an
  ``EmptyState``), nor the order inside ``optax.named_chain``, whose state
  is a dict (flattened by key, not in order).
* **What the update computes.** For the leaves that ``lw.freeze`` or
  ``lw.partition`` freeze, the update is traced abstractly (``jax.make_jaxpr``,
  nothing is allocated) and its data flow is followed from each gradient to
  each update: a trainable update that depends on a frozen leaf's gradient
  means that something measures the frozen leaves too (a global norm, a
  finiteness test), whatever its type. Sub-computations this does not look
  into (loops, scans) count as depending on all their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from layerwise import _core, _diagnostics, _paths, _validate
from layerwise._resolve import paths_and_specs
from layerwise._types import PyTree

__all__ = ["check"]

#: The optax optimizers after which ``lw.scale_by_rules`` is exact: their
#: learning rate is their last scale (what follows it is linear and per
#: leaf), so ``chain(opt(lr), lw.scale_by_rules(r))`` updates each group as
#: ``opt(lr * r_g)`` would (tests/test_checks.py proves each against
#: ``optax.partition`` with one ``opt(lr * r_g)`` per group).
LEARNING_RATE_LAST = (
    "sgd", "sgd(momentum=...)", "sgd(nesterov=True)", "adam", "adamw",
    "nadam", "adamax", "amsgrad", "adabelief", "yogi", "rmsprop", "adagrad",
    "adadelta", "lion", "lamb", "lars", "novograd", "adan", "adafactor",
    "sm3", "optax.contrib.muon")

#: Optimizers after which a multiplier is not exact, and why.
NOT_LEARNING_RATE_LAST = {
    "optax.contrib.schedule_free_*": (
        "its update moves the params to an interpolation of its own "
        "sequences, which it recomputes from the params"),
    "fromage": "its weight decay after the learning rate depends on it",
    "optax.contrib.prodigy, dadapt_adamw": (
        "they estimate their step size from all leaves at once"),
}

# States of optax optimizers that normalise each leaf's update by a running
# magnitude of its own gradients (or take its sign): a constant multiplier
# of a leaf's gradient before them cancels (up to eps). By class name, as
# optax keeps most of them in private modules.
_ADAPTIVE = frozenset({
    "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByBeliefState",
    "ScaleByRmsState", "ScaleByRmsWithCountState", "ScaleByRStdDevState",
    "ScaleByRssState", "ScaleByLionState", "FactoredState",
    "ScaleByNovogradState", "ScaleByAdanState", "ScaleByAdaDeltaState",
    "ScaleBySM3State", "MuonState",
})


@dataclasses.dataclass(frozen=True)
class Trap:
  """One trap found in a transformation.

  Attributes:
    id: a short name (``"scale-before-adaptive"``, ...).
    message: what trains wrongly, why, and what to write instead.
  """
  id: str
  message: str


class _Node:
  """A state of interest and where it is in the chain: ``position`` is the
  steps from the root, each ``(index, in_chain)``, where ``in_chain`` says
  the step goes into an element of an ``optax.chain``'s state."""

  def __init__(self, state: Any, position: tuple[tuple[Any, bool], ...]):
    self.state, self.position = state, position

  def before(self, other: "_Node") -> bool:
    """Whether this state's transformation runs before ``other``'s, one
    after the other in a chain (not side by side, nor one inside the
    other)."""
    for (a, chained), (b, _) in zip(self.position, other.position):
      if a != b:
        return chained and a < b
    return False


def _kind(state: Any) -> str | None:
  name = type(state).__name__
  module = type(state).__module__ or ""
  if _core.is_ruled(state):
    return "lw:" + state.rules.kind
  if not module.startswith("optax"):
    return None
  if name in _ADAPTIVE:
    return "adaptive"
  if name in ("ScheduleFreeState", "ApplyIfFiniteState"):
    return name
  return None


def _walk(state: Any) -> list[_Node]:
  """The states of interest in ``state``, outer first, with positions."""
  found: list[_Node] = []

  def visit(node: Any, position: tuple[tuple[Any, bool], ...],
            parallel: bool) -> None:
    if _kind(node) is not None:
      found.append(_Node(node, position))
    if isinstance(node, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
      return
    # A plain tuple is the state of an optax.chain, unless it holds the
    # groups of lw.partition, which run side by side.
    chained = type(node) is tuple and not parallel
    children, _ = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][1] is node:
      return  # a leaf
    groups = _core.is_ruled(node) and node.rules.kind == "group"
    for i, (keys, child) in enumerate(children):
      name = getattr(keys[0], "name", None) if keys else None
      visit(child, position + ((i, chained),),
            groups and name == "inner_states")

  visit(state, (), False)
  return found


def _covered(state: Any, param_paths: set[str]) -> set[str]:
  """The param paths an optax state holds statistics for (its state leaves
  end with them)."""
  out: set[str] = set()
  state_paths = _paths.flatten_with_paths(state)[0]
  if "" in param_paths and state_paths:  # the params are one array
    return {""}
  for path in state_paths:
    segs = path.split("/")
    for k in range(len(segs)):
      tail = "/".join(segs[k:])
      if tail in param_paths:
        out.add(tail)
        break
  return out


def _is_neutral(value: Any) -> bool:
  """A multiplier that an adaptive optimizer after it keeps: 0 (nothing
  flows) and 1."""
  return not _validate.is_schedule(value) and float(value) in (0.0, 1.0)


_EXACT_AFTER = ("sgd, momentum, adam, adamw, rmsprop, adagrad, lion, "
                "adabelief, lamb, adafactor, ... (their learning rate is "
                "their last scale)")


def _scale_before_adaptive(nodes: Sequence[_Node],
                           params: set[str]) -> list[Trap]:
  out = []
  scales = [n for n in nodes if _kind(n.state) == "lw:scale"]
  adaptive = [n for n in nodes if _kind(n.state) == "adaptive"]
  for s in scales:
    plan = s.state.rules
    # (layer path, its param's path): the plan is of layer leaves, the
    # optimizer's state of the real (stacked) ones.
    scaled = [(p, plan.leaf_paths[j]) for p, j, v in
              zip(plan.paths, plan.owners(), plan.values)
              if not _is_neutral(v)]
    for a in adaptive:
      if not s.before(a):
        continue
      covered = _covered(a.state, params)
      undone = sorted(p for p, leaf in scaled if leaf in covered)
      if undone:
        out.append(Trap("scale-before-adaptive", (
            f"lw.scale_by_rules runs before an adaptive optimizer "
            f"({type(a.state).__name__}), which divides each update by a "
            "running magnitude of its own gradients: the multipliers of "
            f"{_diagnostics.few(undone, 3)} are no learning rates, "
            "they cancel out (up to eps: 0.01 trains like 1.0). Fix: put "
            "lw.scale_by_rules after the optimizer, "
            "optax.chain(optax.adam(lr), lw.scale_by_rules(rules)); after "
            f"{_EXACT_AFTER} it equals a learning rate of lr * multiplier.")))
        break
  return out


def _scale_after_schedule_free(nodes: Sequence[_Node]) -> list[Trap]:
  out = []
  for f in (n for n in nodes if _kind(n.state) == "ScheduleFreeState"):
    for s in nodes:
      if _kind(s.state) == "lw:scale" and f.before(s):
        out.append(Trap("scale-after-schedule-free", (
            "lw.scale_by_rules runs after a schedule-free optimizer "
            "(optax.contrib.schedule_free*), whose update is not a step "
            "times a learning rate: it moves the params to an interpolation "
            "of its sequences, which it recomputes from the params, so a "
            "multiplied update trains neither lr nor lr * multiplier. Fix: "
            "multiply the base optimizer's update, inside schedule_free: "
            "optax.contrib.schedule_free(optax.chain(optax.sgd(lr), "
            "lw.scale_by_rules(rules)), learning_rate=lr) equals one "
            "schedule_free_sgd(lr * multiplier) per group (for constant "
            "multipliers; with adamw's base, "
            "optax.chain(optax.scale_by_rms(b2, eps, eps_in_sqrt=False, "
            "bias_correction=True), optax.add_decayed_weights(wd), "
            "optax.scale_by_learning_rate(lr), lw.scale_by_rules(rules))), "
            "or use lw.partition with one schedule-free optimizer per "
            "group.")))
        break
  return out


def _frozen_in(state: Any) -> bool:
  return any(_kind(s) in ("lw:frozen", "lw:group") and any(
      g < 0 for g in s.rules.groups or ()) for s in _core.find_states(state))


def _finite_around_freeze(nodes: Sequence[_Node]) -> list[Trap]:
  for n in nodes:
    if _kind(n.state) == "ApplyIfFiniteState" and _frozen_in(
        n.state.inner_state):
      return [Trap("apply-if-finite-around-freeze", (
          "optax.apply_if_finite wraps lw.freeze (or an lw.partition with "
          "frozen groups), so it tests the gradients of the frozen leaves "
          "too: a NaN or inf there, which the frozen leaves would ignore, "
          "skips the whole step, and after max_consecutive_errors such "
          "steps the wrapper gives up and lets a later NaN of a trainable "
          "leaf reach the params. Fix: wrap apply_if_finite in the freeze, "
          "lw.freeze(optax.apply_if_finite(optimizer, "
          "max_consecutive_errors), frozen), so that it sees the trainable "
          "leaves only."))]
  return []


# ------------------------------------------------- data flow of the update


def _literal(v: Any) -> bool:
  return type(v).__name__ == "Literal"


_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat",
                    "checkpoint", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr"})


def _flow(jaxpr: Any, deps: Sequence[frozenset[int]],
          consts: Sequence[Any]) -> list[frozenset[int]]:
  """Which inputs each output of ``jaxpr`` may depend on, given those of its
  inputs (``deps``) and their values where known (``consts``: a scalar, or
  ``None``). A ``select_n`` with a known predicate depends on the case it
  picks (``lw.freeze``'s zeros select from the gradient); a call is
  followed inside; anything else depends on all its inputs."""
  known: dict[Any, frozenset[int]] = {}
  value: dict[Any, Any] = {}
  for v, d, c in zip(jaxpr.invars, deps, consts):
    known[v] = d
    if c is not None:
      value[v] = c
  for v in jaxpr.constvars:
    known[v] = frozenset()

  def dep(v: Any) -> frozenset[int]:
    return frozenset() if _literal(v) else known.get(v, frozenset())

  def val(v: Any) -> Any:
    if _literal(v):
      x = np.asarray(v.val)
      return x.item() if x.size == 1 else None
    return value.get(v)

  for eqn in jaxpr.eqns:
    ins, name = eqn.invars, eqn.primitive.name
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    out: list[frozenset[int]]
    if name == "select_n" and val(ins[0]) is not None:
      out = [dep(ins[1 + int(val(ins[0]))])]
    elif name in ("broadcast_in_dim", "convert_element_type", "copy") and (
        val(ins[0]) is not None):
      out = [frozenset()]
      value[eqn.outvars[0]] = val(ins[0])
    elif name in _CALLS and sub is not None:
      inner = getattr(sub, "jaxpr", sub)
      out = _flow(inner, [dep(v) for v in ins], [val(v) for v in ins])
    elif name == "cond" and "branches" in eqn.params:
      index = val(ins[0])
      branches = eqn.params["branches"]
      if index is not None:
        branches = [branches[int(index)]]
      outs = [_flow(getattr(b, "jaxpr", b), [dep(v) for v in ins[1:]],
                    [val(v) for v in ins[1:]]) for b in branches]
      out = [frozenset().union(dep(ins[0]), *column) for column in zip(*outs)]
    else:
      every = frozenset().union(*(dep(v) for v in ins))
      out = [every] * len(eqn.outvars)
    for v, d in zip(eqn.outvars, out):
      known[v] = d
  return [dep(v) for v in jaxpr.outvars]


def _frozen_paths(state: Any) -> set[str]:
  """The paths of the params that are frozen, all of them: a stacked param
  of which only some layers are frozen is not (its gradients flow, and its
  own update reads them)."""
  out: set[str] = set()
  for s in _core.find_states(state):
    if _kind(s) in ("lw:frozen", "lw:group"):
      plan = s.rules
      groups = plan.groups
      if not groups:
        continue
      out.update(plan.leaf_paths[j] for j in range(len(plan.leaf_paths))
                 if all(groups[k] < 0 for k in plan.span(j)))
  return out


def _frozen_leak(tx: Any, params: Any, state: Any,
                 param_paths: Sequence[str]) -> list[Trap]:
  frozen = _frozen_paths(state)
  index = [i for i, p in enumerate(param_paths) if p in frozen]
  if not index:
    return []
  specs = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  try:
    closed = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p)[0])(
        specs, state, specs)
  except Exception:  # pylint: disable=broad-except
    return []  # an update that needs more (extra arguments): not looked at
  jaxpr = closed.jaxpr
  n = len(param_paths)
  # Only the frozen gradients are followed: the sets stay small.
  frozen_index = set(index)
  deps = [frozenset([i]) if i in frozen_index else frozenset()
          for i in range(len(jaxpr.invars))]
  outs = _flow(jaxpr, deps, [None] * len(jaxpr.invars))
  if len(outs) != n:
    return []
  leaked = frozen_index
  hit = [param_paths[i] for i, d in enumerate(outs)
         if i not in leaked and d & leaked]
  if not hit:
    return []
  sources = sorted({param_paths[j] for i, d in enumerate(outs)
                    if i not in leaked for j in d & leaked})
  return [Trap("frozen-gradients-reach-updates", (
      f"the updates of trainable {_diagnostics.few(hit, 3)} depend on "
      f"the gradients of frozen {_diagnostics.few(sources, 3)}: a "
      "transformation before lw.freeze (or "
      "lw.partition) measures every leaf, frozen ones included, such as "
      "optax.clip_by_global_norm. Then a NaN in a frozen leaf's gradient "
      "makes the global norm NaN and every update NaN, an inf makes every "
      "update 0, and finite frozen gradients shrink the clipping of the "
      "trainable ones. Fix: put it inside the freeze, "
      "lw.freeze(optax.chain(optax.clip_by_global_norm(c), optimizer), "
      "frozen), which shows it the trainable leaves only."))]


# ------------------------------------------------------------------ entry


def traps(tx: Any, params: PyTree) -> list[Trap]:
  """Every known trap in ``tx``, for ``params`` (abstract params will do).

  The one implementation of the checks: :func:`check` raises what this
  finds, :func:`layerwise.describe` prints it as warnings.
  """
  state = jax.eval_shape(tx.init, params)
  param_paths = paths_and_specs(params)[0]
  nodes = _walk(state)
  found = _scale_before_adaptive(nodes, set(param_paths))
  found += _scale_after_schedule_free(nodes)
  finite = _finite_around_freeze(nodes)
  found += finite
  if not finite:  # apply_if_finite's test is that leak, said better above
    found += _frozen_leak(tx, params, state, param_paths)
  return found


def check(tx: optax.GradientTransformation, params: PyTree) -> None:
  """Raises if ``tx`` holds a known trap of placement in a chain.

  A transformation can be valid and still train wrongly because of where
  something sits in it. This finds, from ``jax.eval_shape(tx.init,
  params)`` and an abstract trace of ``tx.update`` (nothing is allocated):

  * ``lw.scale_by_rules`` before an adaptive optimizer (adam, adamw,
    rmsprop, adagrad, lion, adafactor, adabelief, ...), which undoes its
    multipliers: put it after;
  * ``lw.scale_by_rules`` after a schedule-free optimizer
    (``optax.contrib.schedule_free*``), whose update is no learning-rate
    step: multiply the base optimizer's update inside ``schedule_free``;
  * a transformation before ``lw.freeze`` (or ``lw.partition``'s frozen
    groups) that measures every leaf, as ``optax.clip_by_global_norm``
    does, so a NaN in a frozen gradient makes every update NaN: put it
    inside the freeze;
  * ``optax.apply_if_finite`` around ``lw.freeze``, which counts NaN in
    frozen gradients as failed steps: put the freeze outside.

  :func:`layerwise.describe` prints the same findings as warnings. What it
  cannot see: the order of stateless optax transformations among themselves
  (their states are all ``optax.EmptyState``), and order inside
  ``optax.named_chain`` (a dict state).

  Args:
    tx: an optax transformation (a chain, say).
    params: the parameters it is for; only shapes and dtypes are read.

  Raises:
    TypeError: if ``tx`` is not an optax transformation.
    ValueError: listing every trap found, each with its fix.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"encoder": {"w": jnp.ones((2, 2))}, "head": jnp.ones(2)}
    >>> lw.check(optax.chain(optax.adam(1e-3),
    ...                      lw.scale_by_rules({"encoder/**": 0.1, "**": 1.0})),
    ...          params)
    >>> lw.check(optax.chain(lw.scale_by_rules({"encoder/**": 0.1, "**": 1.0}),
    ...                      optax.adam(1e-3)), params)
    Traceback (most recent call last):
    ...
    ValueError: lw.check: 1 trap in how this optimizer is put together:
    1. [scale-before-adaptive] lw.scale_by_rules runs before ...
  """
  if not (callable(getattr(tx, "init", None))
          and callable(getattr(tx, "update", None))):
    raise TypeError(
        f"lw.check takes an optax transformation, got {type(tx).__name__}; "
        "call lw.check(tx, params) with the optimizer you train with.")
  found = traps(tx, params)
  if found:
    raise ValueError(
        f"lw.check: {len(found)} trap{'s' if len(found) > 1 else ''} in how "
        "this optimizer is put together:\n" + "\n".join(
            f"{i}. [{t.id}] {t.message}" for i, t in enumerate(found, 1)))
