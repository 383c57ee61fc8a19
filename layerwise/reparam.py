r"""Exact reparameterization, its equivalent multipliers, and muP scales.

Training ``theta = lam * phi`` (optimizing ``phi``) instead of ``theta``
changes how fast ``theta`` learns without touching the optimizer:
``reparameterize`` does exactly that for any optax optimizer, without
rewriting the model. For plain and momentum SGD it is the same as a
learning-rate multiplier ``lam ** 2``, for Adam-like optimizers ``lam``
(with epsilon divided by ``lam``); :func:`equivalent_multipliers` and
:func:`equivalent_scales` convert between the two forms, and
:func:`mup_scales` gives the per-layer multipliers of the maximal-update
parametrization (muP) from the shapes of a base and a target model.

The derivation, for a leaf ``theta = lam * phi`` and a loss ``L``: the
gradient in phi-space is ``dL/dphi = lam * g`` (``g = dL/dtheta``), and a
step ``u_phi`` of ``phi`` moves ``theta`` by ``lam * u_phi``.

* SGD: ``u_phi = -lr * lam * g``, so ``theta`` moves by
  ``-(lam**2 * lr) * g``. Momentum traces are linear in the gradient, so
  the same holds with momentum and Nesterov.
* Adam: the moments in phi-space are ``lam * m`` and ``lam**2 * v``, so
  ``u_phi = -lr * lam * m / (lam * sqrt(v) + eps)`` and ``theta`` moves by
  ``-(lam * lr) * m / (sqrt(v) + eps / lam)``: Adam with rate ``lam * lr``
  and epsilon ``eps / lam``, equal to ``adam(lam * lr, eps)`` up to
  epsilon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _core, _paths, _validate
from layerwise._resolve import (MISSING, Resolution, Rules, RuleSet,
                                layer_paths_and_specs)
from layerwise._selectors import Selector, of_paths
from layerwise._types import PyTree, Stacks

__all__ = ["ReparameterizeState", "equivalent_multipliers",
           "equivalent_scales", "mup_scales", "reparameterize"]


def _number(fn: str, name: str, value: Any) -> float:
  """A scale (or multiplier): a finite number > 0."""
  return _validate.bounded(
      fn, name, value, low=0.0, low_open=True,
      zero_advice=" (lam = 0 would make theta a constant; to freeze leaves, "
      "use lw.freeze)",
      schedule_hint=" A reparameterization scale is a constant of the "
      "model's parametrization; for a rate that changes over training, chain "
      "lw.scale_by_rules with a schedule.")


# ----------------------------------------------------------- reparameterize


class ReparameterizeState(NamedTuple):
  """State of :func:`reparameterize`.

  Attributes:
    inner_state: the inner optimizer's state, in phi-space (its moments are
      those of the gradients ``lam * g``).
    rules: static metadata: each leaf's path, rule and ``lam``.
  """
  inner_state: Any
  rules: _core.Plan


def reparameterize(
    inner: optax.GradientTransformation,
    scales: Rules[float],
    *,
    default: float = MISSING,
    strict: bool = True,
    stacks: Stacks = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Trains each parameter as if the model were written ``theta = lam * phi``.

  The wrapper runs ``inner`` on ``phi = theta / lam`` instead of ``theta``,
  for every leaf with its rule's ``lam``, without any change to the model,
  its initialisation or its checkpoints: it maps the gradients into
  phi-space (``lam * g``), and the params too (``theta / lam``, for
  optimizers that read them: decoupled weight decay, Adafactor, LAMB,
  LARS), runs ``inner`` there, and maps its update back (``lam * u_phi``).
  So ``theta`` follows the trajectory it would follow if the model computed
  ``lam * phi`` and ``inner`` optimized ``phi``.

  For some optimizers this equals a per-layer learning-rate multiplier
  (:func:`layerwise.scale_by_rules`); :func:`equivalent_multipliers` gives
  it. Exactly:

  * ``reparameterize(sgd(lr, momentum), lam)`` is ``sgd(lam**2 * lr,
    momentum)`` (Nesterov too); coupled weight decay ``wd`` before the
    optimizer becomes ``wd / lam**2``;
  * ``reparameterize(adam(lr, eps), lam)`` is ``adam(lam * lr, eps / lam)``
    (``eps_root / lam**2``), so ``adam(lam * lr, eps)`` up to epsilon; the
    same for rmsprop (``eps / lam**2`` where it sits inside the square
    root), adamw and lion, whose decoupled weight decay ``wd`` becomes
    ``wd / lam``: the decay of ``theta`` per step, ``lr * wd * theta``, is
    unchanged by the wrapper.

  For optimizers that read the scale of the parameters (Adafactor's
  relative step and update clipping, LAMB's and LARS's trust ratios) no
  multiplier is equivalent; the wrapper is the way to reparameterize them.

  Transformations outside the wrapper see ``theta``-space; inside, phi-space.
  A clipping threshold ``c`` inside the wrapper bounds ``lam * g``, so it is
  ``c / lam`` on ``g`` (and a group norm inside weighs each leaf by its
  ``lam``).

  The scales are constants of the compiled step: ``lam`` is part of the
  model's parametrization, and the inner state is kept in phi-space. To
  change a rate during training, chain :func:`layerwise.scale_by_rules`
  (schedules, :func:`layerwise.set_scale`) instead. Leaves with
  ``lam = 1`` pass through untouched, at no cost.

  Args:
    inner: the optimizer to run in phi-space; any optax transformation
      (a chain, ``optax.MultiSteps``, a transformation with extra args).
    scales: ``{selector: lam}``, positive finite numbers; see
      :func:`layerwise.resolve`.
    default: the ``lam`` of leaves no rule matches (``1.0`` leaves them as
      they are). Without it, unmatched leaves are an error.
    strict: as in :func:`layerwise.resolve`.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``
      (see :func:`layerwise.paths`; by default, those Flax's metadata marks
      with a ``"layers"`` axis): each layer of a stacked parameter takes
      its own rule (``"layers/3/**"``) and its own ``lam``, applied as one
      vector along the layer axis. ``inner`` still sees the stacked arrays:
      for elementwise optimizers (SGD, momentum, Adam, AdamW, RMSprop,
      Lion) the stacked model trains exactly as its unrolled twin, while
      statistics ``inner`` takes over a whole leaf (Adafactor's factored
      moments and relative step, LAMB's and LARS's trust ratios) run over
      all the layers of the stack, as they would without the wrapper.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of
    ``update`` are passed to ``inner``.

  Raises:
    TypeError, ValueError: for a scale that is not a finite number > 0, or
      an ``inner`` that is not a transformation; :class:`layerwise.RuleError`
      at ``init`` for rules that do not fit the params; ``TypeError`` at
      ``init`` for a ``lam`` other than 1 on an integer leaf; ``ValueError``
      at ``update`` for updates whose paths or shapes differ from the params
      at ``init``, params of another structure, or no params for an
      ``inner`` that needs them.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import layerwise as lw
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> grads = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> tx = lw.reparameterize(optax.sgd(0.1), {"body": 0.5, "head": 1.0})
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["body"], updates["head"]   # sgd at lam**2 * 0.1 for "body"
    (Array([-0.025, -0.025], dtype=float32), Array([-0.1, -0.1], dtype=float32))
    >>> print(lw.describe(tx, params))
    path  shape  dtype    size  lam  state_bytes
    ----  -----  -------  ----  ---  -----------
    body  (2,)   float32     2  0.5            0
    head  (2,)   float32     2  1.0            0
    <BLANKLINE>
    lam    leaves  params   share  state bytes
    0.5         1       2   50.0%            0
    1.0         1       2   50.0%            0
    total       2       4  100.0%            0
    (total state bytes include 0 not held by one parameter, such as step counts)

    With Adam, ``lam`` multiplies the step (and divides epsilon):

    >>> tx = lw.reparameterize(optax.adam(0.1), {"**": 0.5})
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["body"]
    Array([-0.05, -0.05], dtype=float32)

    Two layers stacked in one array, each with its own ``lam``:

    >>> stacked = {"layers": {"w": jnp.ones((2, 3))}}
    >>> tx = lw.reparameterize(optax.sgd(0.1),
    ...                        {"layers/0/**": 0.5, "layers/1/**": 2.0},
    ...                        stacks={"layers": 0})
    >>> updates, _ = tx.update(stacked, tx.init(stacked), stacked)
    >>> updates["layers"]["w"]   # sgd at lam**2 * 0.1, layer by layer
    Array([[-0.025, -0.025, -0.025],
           [-0.4  , -0.4  , -0.4  ]], dtype=float32)

  References:
    Yang et al., `Tensor Programs V: Tuning Large Neural Networks via
    Zero-Shot Hyperparameter Transfer <https://arxiv.org/abs/2203.03466>`_,
    2022 (the equivalences between parametrizations and learning rates).
  """
  fn = "lw.reparameterize"
  tx = _validate.transformation(fn, inner)
  rule_set = RuleSet(scales, what="scale").map_values(
      lambda v, text: _number(fn, f"the scale of rule {text}", v))
  if default is not MISSING:
    default = _number(fn, "default", default)

  def leaf_lams(plan: _core.Plan) -> list[Any]:
    """Each real leaf's ``lam``: a number, or for a stacked leaf whose
    layers differ, the layers' ``lam`` as a float64 numpy vector shaped to
    broadcast along its layer axis (cast once to the leaf's dtype, so each
    layer's ``lam`` rounds as the number would on an unrolled leaf)."""
    out: list[Any] = []
    for j in range(len(plan.leaf_paths)):
      values = [plan.values[k] for k in plan.span(j)]
      axis = plan.axis(j)
      if axis is None or len(set(values)) == 1:
        out.append(values[0])
        continue
      shape = [1] * len(plan.leaf_shapes[j])
      shape[axis] = -1
      out.append(np.asarray(values, np.float64).reshape(shape))
    return out

  def to_phi(leaves, lams, op):
    return [x if _is_one(lam) else op(x, lam)
            for x, lam in zip(leaves, lams)]

  def init(res: Resolution, params: list[Any]) -> ReparameterizeState:
    _validate.check_dtypes(
        fn, res.paths, res.specs, res.values,
        [res.rule_text(i) for i in range(len(res.paths))], what="scale",
        neutral=1.0, verb="be reparameterized")
    plan = _core.Plan.of("lam", res)
    phi = res.treedef.unflatten(to_phi(params, leaf_lams(plan), _divide))
    return ReparameterizeState(inner_state=tx.init(phi), rules=plan)

  def update(step: _core.Step, state: ReparameterizeState
             ) -> tuple[list[Any], ReparameterizeState]:
    lams = leaf_lams(step.plan)
    g_phi = step.treedef.unflatten(to_phi(step.updates, lams, _multiply))
    p_phi = (None if step.params is None else
             step.treedef.unflatten(to_phi(step.params, lams, _divide)))
    try:
      u_phi, inner_state = tx.update(g_phi, state.inner_state, p_phi,
                                     **step.extra)
    except ValueError as e:
      if step.params is not None or not _validate.is_missing_params(e):
        raise
      raise _validate.missing_params(
          fn, "the inner optimizer",
          "the wrapper gives it the params in phi-space, theta / lam") from e
    out = step.treedef.flatten_up_to(u_phi)
    return (to_phi(out, lams, _multiply),
            state._replace(inner_state=inner_state))

  return _core.ruled(fn, rule_set, default=default, strict=strict, init=init,
                     update=update,
                     stacks=stacks,
                     placeholder=lambda p: ReparameterizeState(
                         inner_state=tx.init(p), rules=p))


def _is_one(lam: Any) -> bool:
  """Whether ``lam`` is the number 1 (a per-layer vector never is: its
  layers' scales differ)."""
  return isinstance(lam, (int, float)) and lam == 1.0


def _divide(x: Any, lam: Any) -> Any:
  """``x / lam`` in ``x``'s dtype (abstract leaves stay abstract); ``lam``
  a number, or a per-layer vector shaped to broadcast along the layer axis."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return x / jnp.asarray(lam, jnp.result_type(x))


def _multiply(x: Any, lam: Any) -> Any:
  """``x * lam`` in ``x``'s dtype: a Python number is weakly typed, and a
  per-layer vector is cast to ``x``'s dtype first, so both round alike."""
  if isinstance(lam, (int, float)):
    return x * lam
  return x * jnp.asarray(lam, jnp.result_type(x))


# ------------------------------------------------ equivalent multipliers

#: For each optimizer, the power ``k`` with which a reparameterization scale
#: ``lam`` acts as a learning-rate multiplier ``lam ** k`` (how exact is in
#: :func:`equivalent_multipliers` and docs/reparameterization.md).
_FAMILIES: dict[str, int] = {
    "sgd": 2, "momentum": 2, "nesterov": 2,
    "adam": 1, "adamw": 1, "nadam": 1, "nadamw": 1, "amsgrad": 1,
    "adamax": 1, "adabelief": 1, "rmsprop": 1, "adagrad": 1, "yogi": 1,
    "lion": 1,
}

#: Optimizers for which no multiplier equals a reparameterization.
_NO_MULTIPLIER = {
    "adafactor": "its relative step size and update clipping read the scale "
                 "of the parameters",
    "lamb": "its trust ratio ||theta|| / ||update|| reads the scale of the "
            "parameters",
    "lars": "its trust ratio ||theta|| / ||update|| reads the scale of the "
            "parameters",
    "radam": "its first steps, before rectification, are momentum SGD (lam**2) "
             "and the later ones Adam (lam)",
}


def _power(fn: str, optimizer: Any) -> int:
  if not isinstance(optimizer, str):
    raise TypeError(
        f"{fn}: optimizer must be the name of an optax optimizer, such as "
        f"'sgd' or 'adam', got {type(optimizer).__name__} {optimizer!r}.")
  name = optimizer.lower()
  if name in _NO_MULTIPLIER:
    raise ValueError(
        f"{fn}: no per-layer multiplier equals a reparameterization for "
        f"{optimizer!r}: {_NO_MULTIPLIER[name]}. Use lw.reparameterize(inner, "
        "scales) itself.")
  if name not in _FAMILIES:
    raise ValueError(
        f"{fn}: unknown optimizer {optimizer!r}; known: "
        f"{', '.join(sorted(_FAMILIES))} (and, with no equivalent "
        f"multiplier, {', '.join(sorted(_NO_MULTIPLIER))}).")
  return _FAMILIES[name]


def _map_values(fn: str, rules: Any, what: str, f: Any) -> Any:
  """``rules`` (a number, a mapping or a list of pairs) with ``f`` applied
  to each value, checked to be a finite number > 0."""
  if not isinstance(rules, (Mapping, Sequence)) or isinstance(rules,
                                                              (str, bytes)):
    return f(_number(fn, what, rules))
  rule_set = RuleSet(rules, what=what).map_values(
      lambda v, text: f(_number(fn, f"the {what} of rule {text}", v)))
  if isinstance(rules, Mapping):
    return dict(zip(rules.keys(), rule_set.values))
  return [(c.source, v) for c, v in zip(rule_set.selectors, rule_set.values)]


def equivalent_multipliers(scales: float | Rules[float],
                           optimizer: str) -> float | Rules[float]:
  r"""The per-layer learning-rate multipliers that equal a reparameterization.

  For optimizer ``optimizer``, ``optax.chain(opt(lr),
  lw.scale_by_rules(equivalent_multipliers(scales, name)))`` trains like
  ``lw.reparameterize(opt(lr), scales)``: a scale ``lam`` is a multiplier
  ``lam ** 2`` for SGD (plain, momentum, Nesterov), and ``lam`` for
  Adam-like optimizers (adam, adamw, nadam, nadamw, amsgrad, adamax,
  adabelief, rmsprop, adagrad, yogi, lion). How exact:

  * sgd, momentum, nesterov, lion: exact. A coupled weight decay ``wd``
    (``add_decayed_weights`` before sgd) becomes ``wd / lam**2``, lion's
    decoupled ``weight_decay`` becomes ``weight_decay / lam``.
  * the others: exact once epsilon is divided by ``lam`` (by ``lam**2``
    where it sits inside a square root: ``eps_root``, rmsprop's ``eps``,
    initial accumulators), and decoupled weight decay by ``lam``; with the
    epsilon unchanged they differ only where ``sqrt(v)`` is as small as
    epsilon.

  Adafactor, LAMB, LARS and RAdam have no equivalent multiplier (they read
  the scale of the parameters, or switch between SGD-like and Adam-like
  steps): a ``ValueError`` says so, and :func:`reparameterize` is the way
  to reparameterize them.

  Args:
    scales: a reparameterization scale (a number > 0), or a rule set of
      them (``{selector: lam}`` or a list of pairs).
    optimizer: the optimizer's name, as in optax (``"sgd"``, ``"adam"``,
      ...).

  Returns:
    The multiplier, or a rule set of the same form with the same
    selectors.

  Raises:
    TypeError, ValueError: for a scale that is not a finite number > 0, an
      unknown optimizer, or one without an equivalent multiplier.

  Examples:
    >>> import layerwise as lw
    >>> lw.equivalent_multipliers({"body/**": 0.5, "**": 1.0}, "sgd")
    {'body/**': 0.25, '**': 1.0}
    >>> lw.equivalent_multipliers(0.5, "adam")
    0.5
  """
  fn = "lw.equivalent_multipliers"
  power = _power(fn, optimizer)
  return _map_values(fn, scales, "scale", lambda lam: lam**power)


def equivalent_scales(multipliers: float | Rules[float],
                      optimizer: str) -> float | Rules[float]:
  r"""The reparameterization that equals per-layer learning-rate multipliers.

  The inverse of :func:`equivalent_multipliers`: for SGD a multiplier ``m``
  is the scale ``lam = sqrt(m)``, for Adam-like optimizers ``lam = m``, so
  ``lw.reparameterize(opt(lr), equivalent_scales(rules, name))`` trains like
  ``optax.chain(opt(lr), lw.scale_by_rules(rules))`` (up to epsilon for
  Adam-like optimizers, as explained there). Use it to keep an optimizer's
  behaviour that depends on the parameters' scale while moving to a
  reparameterization.

  Args:
    multipliers: a multiplier (a number > 0), or a rule set of them.
    optimizer: the optimizer's name, as in optax.

  Returns:
    The scale, or a rule set of the same form with the same selectors.

  Raises:
    TypeError, ValueError: for a multiplier that is not a finite number > 0
      (a multiplier of 0, freezing, is no reparameterization: use
      :func:`layerwise.freeze`), an unknown optimizer, or one without an
      equivalent multiplier.

  Examples:
    >>> import layerwise as lw
    >>> lw.equivalent_scales([("body/**", 0.25), ("**", 1.0)], "sgd")
    [('body/**', 0.5), ('**', 1.0)]
    >>> lw.equivalent_scales(0.25, "adamw")
    0.25
  """
  fn = "lw.equivalent_scales"
  power = _power(fn, optimizer)
  return _map_values(fn, multipliers, "multiplier",
                     lambda m: m**(1.0 / power))


# ---------------------------------------------------------------- mup_scales

_MUP_OPTIMIZERS = {"adam": "adam", "adamw": "adam", "sgd": "sgd"}
_LAYOUTS = ("in_out", "out_in")


class _MupLeaf(NamedTuple):
  kind: str          # "hidden", "vector-like" or "fixed"
  multiplier: float
  width_mults: tuple[float, ...]  # of the infinite dimensions, in order


def _mup_leaf(fn: str, path: str, base: tuple[int, ...],
              shape: tuple[int, ...], optimizer: str,
              layout: str) -> _MupLeaf:
  if len(base) != len(shape):
    raise ValueError(
        f"{fn}: parameter {path!r} has shape {shape} but {base} in the base "
        "model; the base model must have the same parameters, with the same "
        "number of dimensions, and differ only in width.")
  mults = []
  for b, t in zip(base, shape):
    if b != t:
      if b == 0 or t == 0:
        raise ValueError(
            f"{fn}: parameter {path!r} has shape {shape} and {base} in the "
            "base model; a width multiplier needs non-zero sizes.")
      mults.append(t / b)
  if not mults:
    return _MupLeaf("fixed", 1.0, ())
  if len(mults) == 1:
    return _MupLeaf("vector-like", 1.0 if optimizer == "adam" else mults[0],
                    tuple(mults))
  if len(mults) == 2:
    fan_in, fan_out = mults if layout == "in_out" else mults[::-1]
    m = 1.0 / fan_in if optimizer == "adam" else fan_out / fan_in
    return _MupLeaf("hidden", m, tuple(mults))
  raise ValueError(
      f"{fn}: parameter {path!r} has shape {shape} and {base} in the base "
      f"model: {len(mults)} dimensions change with width, and muP is defined "
      "for at most 2 (a hidden matrix). Reshape it, or give its multiplier "
      f"with override={{{path!r}: multiplier}}.")


def mup_scales(
    base_params: PyTree,
    params: PyTree,
    optimizer: str = "adam",
    *,
    layout: str = "in_out",
    override: Rules[float] | None = None,
    stacks: Stacks = None,
) -> list[tuple[Selector, float]]:
  r"""Per-layer learning-rate multipliers of the maximal-update parametrization.

  muP (Yang et al., Tensor Programs V) lets the learning rate tuned on a
  small model transfer to a wider one. Its optimizer part is one
  multiplier per parameter, read here from the shapes of a small base model
  (``base_params``) and the target model (``params``), as microsoft's
  ``mup`` package does (``MuAdam``, ``MuSGD``): a dimension whose size
  differs between the two is a width dimension, with width multiplier
  ``target / base``, and

  * a **hidden** (matrix-like) weight has two width dimensions (a hidden
    dense kernel, a convolution between hidden channels). Adam:
    ``1 / fan_in_mult``; SGD: ``fan_out_mult / fan_in_mult``;
  * a **vector-like** parameter has one: input weights (fan-in fixed, such
    as the first kernel and embeddings), biases and norm scales of hidden
    layers, and output weights (fan-out fixed). Adam: ``1``; SGD: its
    width multiplier;
  * a **fixed** parameter has none (the output bias): ``1``.

  Use the result with a rate tuned on the base model:
  ``optax.chain(optax.adam(lr), lw.scale_by_rules(rules))``. With
  ``adamw``, the decoupled weight decay is scaled along with the rate (as
  ``MuAdamW`` does with ``decoupled_wd=True``).

  muP also changes the model, which this function cannot do:

  * **the output multiplier**: the logits are ``(h @ W_out) / width_mult``
    (``mup.MuReadout``), with ``width_mult`` the fan-in width multiplier of
    the output weights. Instead of changing the forward pass, train an
    ordinary head ``theta = W_out / width_mult`` with
    ``lw.reparameterize(inner, {"head/kernel": 1 / width_mult, "**": 1.0})``,
    and initialise it to ``W_out / width_mult`` (zeros, as ``mup``
    recommends, need no change): this is exactly ``MuReadout``;
  * **initialisation**: hidden and input weights with variance
    ``1 / fan_in`` (Flax's default ``lecun_normal``), the output weights
    zero or with variance ``1 / fan_in**2``.

  Which parameter is which is read from the shapes alone. Where that is not
  what you mean (tied embeddings, a layer that should count as fixed), give
  its multiplier in ``override``; for hidden weights in the PyTorch layout
  ``(out, in)`` (Equinox) pass ``layout="out_in"``.

  Args:
    base_params: the base model's parameters (arrays or
      ``jax.ShapeDtypeStruct``\ s, as from ``jax.eval_shape``; only shapes
      are read), with the same paths as ``params``.
    params: the target model's parameters.
    optimizer: ``"adam"`` (also ``"adamw"``) or ``"sgd"``.
    layout: which of a hidden weight's two width dimensions is its fan-in:
      the first (``"in_out"``, Flax and Haiku kernels ``(..., in, out)``) or
      the second (``"out_in"``, PyTorch and Equinox ``(out, in)``). It only
      matters where fan-in and fan-out grow by different factors.
    override: a rule set ``{selector: multiplier}`` whose multipliers (finite,
      > 0) replace muP's for the leaves it matches; its rules come first in
      the result. A selector that matches nothing is an error.
    stacks: the stacked (scanned) subtrees, ``{stack_path: layer_axis}``,
      of both models (see :func:`layerwise.paths`; by default, those Flax's
      metadata marks with a ``"layers"`` axis). Each layer of a stacked
      parameter is a parameter of its own, with the shape without the
      layer axis: a stacked ``(L, in, out)`` kernel is L hidden ``(in,
      out)`` matrices of fan-in ``in``, never ``L``. The rules then name
      layer paths (``layers/3/attn/kernel``), the same as for the unrolled
      model, and go to :func:`layerwise.scale_by_rules` with the same
      ``stacks``. The base model has the same number of layers.

  Returns:
    A rule set for :func:`layerwise.scale_by_rules`: the ``override``
    rules, then one ``(selector, multiplier)`` pair per kind of parameter
    and multiplier, named ``muP hidden (x0.25)`` and so on. It covers every
    leaf of ``params`` and passes strict resolution on it.

  Raises:
    ValueError: for trees with different paths, leaves whose number of
      dimensions differs, a leaf with more than two width dimensions that
      ``override`` does not cover, an unknown ``optimizer`` or ``layout``.
    TypeError: for an ``override`` that is not a rule set of numbers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import layerwise as lw
    >>> def mlp(width):
    ...   return {"in": {"kernel": jnp.ones((8, width)), "bias": jnp.ones(width)},
    ...           "hidden": {"kernel": jnp.ones((width, width))},
    ...           "out": {"kernel": jnp.ones((width, 2)), "bias": jnp.ones(2)}}
    >>> rules = lw.mup_scales(mlp(64), mlp(256), "adam")
    >>> rules
    [(muP hidden (x0.25), 0.25), (muP vector-like (x1), 1.0),
    (muP fixed (x1), 1.0)]
    >>> lw.resolve(rules, mlp(256))["hidden"]
    {'kernel': 0.25}
    >>> lw.resolve(lw.mup_scales(mlp(64), mlp(256), "sgd"), mlp(256))
    {'hidden': {'kernel': 1.0}, 'in': {'bias': 4.0, 'kernel': 4.0},
    'out': {'bias': 1.0, 'kernel': 4.0}}

    Three hidden layers stacked on axis 0: each is a ``(width, width)``
    matrix, and its rule names its layer path:

    >>> def stacked(width):
    ...   return {"layers": {"kernel": jnp.ones((3, width, width)),
    ...                      "bias": jnp.ones((3, width))}}
    >>> rules = lw.mup_scales(stacked(64), stacked(256), "adam",
    ...                       stacks={"layers": 0})
    >>> lw.resolve(rules, stacked(256), stacks={"layers": 0})
    {'layers': {'bias': (1.0, 1.0, 1.0), 'kernel': (0.25, 0.25, 0.25)}}

  References:
    Yang et al., `Tensor Programs V: Tuning Large Neural Networks via
    Zero-Shot Hyperparameter Transfer <https://arxiv.org/abs/2203.03466>`_,
    2022 (Table 3, and Table 8 for the output multiplier).

    microsoft/mup, ``mup/optim.py`` (``MuAdam``, ``MuSGD``) and
    ``mup/layer.py`` (``MuReadout``).
  """
  fn = "lw.mup_scales"
  if not isinstance(optimizer, str) or optimizer.lower() not in _MUP_OPTIMIZERS:
    raise ValueError(
        f"{fn}: optimizer must be 'adam', 'adamw' or 'sgd', got "
        f"{optimizer!r}. For another Adam-like optimizer pass 'adam'.")
  family = _MUP_OPTIMIZERS[optimizer.lower()]
  if layout not in _LAYOUTS:
    raise ValueError(f"{fn}: layout must be 'in_out' (Flax kernels) or "
                     f"'out_in' (PyTorch, Equinox), got {layout!r}.")
  key = _paths.normalize_stacks(fn, stacks)
  base_paths, base_specs, _, base_layers = layer_paths_and_specs(
      fn, base_params, key)
  paths, specs, _, layers = layer_paths_and_specs(fn, params, key)
  if base_paths != paths:
    missing = sorted(set(paths) - set(base_paths))
    extra = sorted(set(base_paths) - set(paths))
    raise ValueError(
        f"{fn}: base_params and params must have the same parameters. "
        + (f"Not in the base model: {missing[:5]}. " if missing else "")
        + (f"Only in the base model: {extra[:5]}. " if extra else "")
        + ("" if missing or extra else "They are in a different order. ")
        + "Build the base model from the same code with a smaller width"
        + (" and as many layers in each stack." if layers or base_layers
           else "."))

  rules: list[tuple[Any, float]] = []
  overridden = [False] * len(paths)
  if override is not None:
    checked = RuleSet(override, what="multiplier").map_values(
        lambda v, text: _number(fn, f"the override of rule {text}", v))
    res = checked.resolve(params, default=None, stacks=key, fn=fn)
    overridden = [r >= 0 for r in res.rule_index]
    rules += [(c.source, v) for c, v in zip(checked.selectors,
                                            checked.values)]

  groups: dict[tuple[str, float], list[str]] = {}
  for path, b, t, skip in zip(paths, base_specs, specs, overridden):
    if skip:
      continue
    leaf = _mup_leaf(fn, path, tuple(b.shape), tuple(t.shape), family,
                     layout)
    groups.setdefault((leaf.kind, leaf.multiplier), []).append(path)
  order = {"hidden": 0, "vector-like": 1, "fixed": 2}
  for kind, m in sorted(groups, key=lambda g: (order[g[0]], -g[1])):
    rules.append((of_paths(groups[kind, m], f"muP {kind} (x{m:.4g})"), m))
  return rules
