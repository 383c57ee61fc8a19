"""Checks of the values users give: numbers, schedules, dtypes, transformations.

Every public function checks its arguments here, so that the same kind of
value follows the same rules everywhere and every message has one shape:
``"lw.<function>: <what> must be <requirement>, got <value>. <advice>"``.

* A *number* is a concrete real scalar: a Python ``int`` or ``float``, a NumPy
  scalar or a 0-d NumPy or JAX array (``jnp.float32(0.5)``), the same for every
  value a user gives (multipliers, weight decays, thresholds, the values of
  the setters). ``bool`` and complex numbers are not numbers, nor is a traced
  value (a hyperparameter must be known when the transformation is built).
* A *schedule* is a callable ``count -> number``, such as any optax schedule.
* Rules that change a leaf's update apply to inexact leaves (floating point
  and complex). An integer or bool leaf (a step counter, a mask) is refused
  unless its rule leaves it as it is.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise import _diagnostics, _hosts, _paths

__all__: list[str] = []

# ------------------------------------------------------------------ numbers


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _traced_error(fn: str, name: str) -> TypeError:
  return TypeError(
      f"{fn}: {name} must be a concrete number, got a traced value (inside "
      "jax.jit or a transformation). Give the number when the "
      "transformation is built; values that change between steps live in "
      "the optimizer state.")


def _real_problem(value: Any) -> str | None:
  """Why a concrete ``value`` is not a real number (``None`` if it is): the
  one definition of a number, for every check below."""
  if isinstance(value, (bool, np.bool_)):
    return "bool"
  if isinstance(value, (np.ndarray, jax.Array)):
    if value.shape != ():
      return "shape"
    dtype = value.dtype
  elif isinstance(value, (int, float, np.number)):
    dtype = np.result_type(value)
  else:
    return "type"
  if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype,
                                                           jnp.integer):
    return None
  return "dtype"


def real(fn: str, name: str, value: Any, *, schedule_hint: str = "") -> float:
  """``value`` as a Python float, or a ``TypeError`` that says why not.

  ``schedule_hint`` is added to the error for a callable (where a schedule
  is not allowed, it says what to use instead).
  """
  if _is_traced(value):
    raise _traced_error(fn, name)
  problem = _real_problem(value)
  if problem in ("bool", "type"):
    hint = schedule_hint if callable(value) else ""
    raise TypeError(f"{fn}: {name} must be a number, got {value!r} "
                    f"({type(value).__name__}).{hint}")
  if problem is not None and isinstance(value, (np.ndarray, jax.Array)):
    raise TypeError(
        f"{fn}: {name} must be a number (a real scalar), got an array of "
        f"shape {value.shape} and dtype {value.dtype}.")
  if problem is not None:
    raise TypeError(f"{fn}: {name} must be a real number, got {value!r}.")
  return float(value)


def _requirement(low: float | None, high: float | None, low_open: bool,
                 high_open: bool) -> str:
  if high is None:
    return f"finite and {'>' if low_open else '>='} {low:g}"
  return (f"in {'(' if low_open else '['}{low:g}, {high:g}"
          f"{')' if high_open else ']'}")


def bounded(fn: str, name: str, value: Any, *, low: float | None = 0.0,
            high: float | None = None, low_open: bool = False,
            high_open: bool = False, advice: str = "",
            zero_advice: str = "", schedule_hint: str = "") -> float:
  """``value`` as a float, checked finite and within the bounds.

  The error reads ``"<fn>: <name> must be finite and > 0, got -1.0."`` (or
  ``"must be in (0, 1]"`` with both bounds), then ``zero_advice`` for a 0
  and ``advice`` for anything out of range.
  """
  x = real(fn, name, value, schedule_hint=schedule_hint)
  ok = math.isfinite(x)
  if ok and low is not None:
    ok = x > low if low_open else x >= low
  if ok and high is not None:
    ok = x < high if high_open else x <= high
  if not ok:
    raise ValueError(
        f"{fn}: {name} must be {_requirement(low, high, low_open, high_open)}"
        f", got {x!r}" + (zero_advice if x == 0 else "") + "."
        + (f" {advice}" if advice else ""))
  return x


def integer(fn: str, name: str, value: Any, minimum: int) -> int:
  """``value`` as an int, checked ``>= minimum``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f"{fn}: {name} must be an int, got {value!r} "
                    f"({type(value).__name__}).")
  if value < minimum:
    raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}.")
  return int(value)


def choice(fn: str, name: str, value: Any, allowed: Sequence[Any],
           advice: str = "") -> Any:
  """``value``, checked to be one of ``allowed``."""
  if isinstance(value, bool) or value not in allowed:
    shown = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
    raise ValueError(f"{fn}: {name} must be {shown}, got {value!r}."
                     + (f" {advice}" if advice else ""))
  return value


# ---------------------------------------------------------------- callables


def check_arity(fn: Any, n: int, message: Callable[[], str]) -> None:
  """Raises ``TypeError(message())`` if ``fn`` cannot take ``n`` positional
  arguments (when its signature can be read: builtins pass unchecked)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*([None] * n))
  except TypeError:
    raise TypeError(message()) from None


def is_schedule(value: Any) -> bool:
  """Whether a rule value is a schedule (a callable that is not a class)."""
  return callable(value) and not isinstance(value, type)


def schedule(where: str, value: Any) -> Any:
  """``value``, checked to be callable as ``schedule(count)``."""
  check_arity(value, 1, lambda: (
      f"{where} {_diagnostics.text_of(value)}, which cannot be "
      "called as schedule(count); a schedule takes the number of updates "
      "made so far and returns a number, such as "
      "optax.linear_schedule(0.0, 1.0, 1000) or lambda count: 0.5."))
  return value


#: The setter of each kind of rate, for the messages.
SETTERS = {"multiplier": "lw.set_scale",
           "weight decay": "lw.set_weight_decay"}


def rate(fn: str, where: str, value: Any, what: str) -> Any:
  """A multiplier or a weight decay: a finite number >= 0 or a schedule.

  ``where`` names the value up to it (``"rule 'head/**' has multiplier"``).
  A number is any concrete real scalar (``0.5``, ``np.float32(0.5)``,
  ``jnp.float32(0.5)``); it is returned as a Python float. A traced value
  is refused: ``optax.inject_hyperparams`` turns number arguments into
  arrays, traced in a jitted step, and a rate given so would be frozen into
  the state at ``init`` while looking settable.
  """
  where = f"{fn}: {where}"
  if is_schedule(value):
    return schedule(where, value)
  problem = "traced" if _is_traced(value) else _real_problem(value)
  if problem is not None:
    hint = ""
    if getattr(value, "is_clipper", False):
      hint = " A clipper goes in lw.clip_by_rules."
    elif isinstance(value, optax.GradientTransformation):
      hint = " An optimizer per group goes in lw.partition."
    elif problem == "traced":
      hint = (f" It is a traced value (inside jax.jit or a transformation): "
              f"{what}s live in the optimizer state, as numbers given when "
              "the transformation is built; change them between steps with "
              f"{SETTERS[what]}. Under "
              "optax.inject_hyperparams, which turns number arguments into "
              "arrays, list them in static_args "
              "(static_args=('default',)).")
    elif problem == "shape":
      hint = (f" It is an array of shape {value.shape}: each rule's {what} "
              "is one number; write one rule per group for different "
              "values.")
    raise TypeError(
        f"{where} {value!r} ({type(value).__name__}); a "
        f"{what} is a number or a schedule (count -> number), such as "
        "optax.linear_schedule(0.0, 1.0, 1000)." + hint)
  x = float(value)
  shown = value if isinstance(value, (int, float)) else x
  if not math.isfinite(x) or x < 0:
    hint = (" (0 gives a zero update; to freeze leaves without optimizer "
            "state, use lw.freeze)" if what == "multiplier" else "")
    raise ValueError(f"{where} {shown!r}; a {what} must be finite and "
                     f">= 0{hint}.")
  return x


def live_array(fn: str, value: Any) -> None:
  """Raises for an array that cannot be a new value of a state vector's
  entries: only a real scalar can (traced or not)."""
  if isinstance(value, (jax.Array, np.ndarray)) and (
      value.shape != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                or jnp.issubdtype(value.dtype, jnp.integer))):
    raise TypeError(
        f"{fn}: value must be a number or a real scalar array, got an "
        f"array of shape {value.shape} and dtype {value.dtype}. Each "
        f"leaf's value is one number; call {fn.removeprefix('lw.')} once per "
        "group for different values.")


def live_value(fn: str, value: Any) -> Any:
  """A new value for a state vector's entries (a setter's ``value``): a
  traced real scalar as it is (a setter may run inside a jitted function),
  any other as a Python float, checked to be a real number, and, on several
  processes (``jax.distributed``), to be the same on every process."""
  live_array(fn, value)
  if _is_traced(value):
    return value
  out = real(fn, "value", value)
  _hosts.check_same_on_every_process(fn, out)
  return out


def schedule_value(fn: str, value: Any, count: jax.Array, text: str,
                   path: str) -> jax.Array:
  """``value(count)``, checked (at trace time) to be a real scalar."""
  raw = value(count)
  try:
    out = jnp.asarray(raw)
  except (TypeError, ValueError):
    out = None
  if out is None or not (jnp.issubdtype(out.dtype, jnp.floating)
                         or jnp.issubdtype(out.dtype, jnp.integer)
                         or out.dtype == jnp.bool_):
    shown = (f"dtype {out.dtype}" if out is not None
             else f"{raw!r} ({type(raw).__name__})")
    raise TypeError(
        f"{fn}: the schedule of rule {text} returned {shown} for parameter "
        f"{path!r}; a schedule in a rule must return a real number, as "
        "optax.linear_schedule(0.0, 1.0, 1000) or lambda count: "
        "(count >= 100).astype(jnp.float32) do.")
  if out.shape != ():
    raise ValueError(
        f"{fn}: the schedule of rule {text} returned shape {out.shape} for "
        f"parameter {path!r}; a schedule in a rule must return a scalar, one "
        "number for all the leaves of its rule. For values per leaf, write "
        "one rule per leaf.")
  return out


# ------------------------------------------------------------------- dtypes


_INEXACT: dict[Any, bool] = {}


def is_inexact(dtype: Any) -> bool:
  """Whether leaves of ``dtype`` (floating point or complex) can be changed
  by a rule; integers, bools and ``float0`` cannot."""
  try:
    return _INEXACT[dtype]
  except (KeyError, TypeError):
    pass
  inexact = bool(dtype != jax.dtypes.float0
                 and jnp.issubdtype(dtype, jnp.inexact))
  try:
    _INEXACT[dtype] = inexact
  except TypeError:  # an unhashable dtype-like: not cached
    pass
  return inexact


def check_dtypes(fn: str, paths: Sequence[str], specs: Sequence[Any],
                 values: Sequence[Any], rule_texts: Sequence[str], *,
                 what: str, neutral: Any, verb: str) -> None:
  """Raises for an integer or bool leaf whose rule would change it: only
  the ``neutral`` value (the one that leaves an update as it is: 1.0 for a
  multiplier, ``None`` for a clipper) passes them.

  ``verb`` says what cannot be done to them (``"be scaled"``).
  """
  for path, spec, v, text in zip(paths, specs, values, rule_texts):
    if is_inexact(spec.dtype):
      continue
    if v is neutral or (not is_schedule(v) and neutral is not None
                        and v == neutral):
      continue
    if what == "rule":
      raise TypeError(
          f"{fn}: parameter {path!r} has dtype {spec.dtype}; only floating "
          f"point and complex leaves can {verb}. Give it the rule None (or "
          "freeze it with lw.freeze).")
    shown = "a schedule" if is_schedule(v) else repr(v)
    raise TypeError(
        f"{fn}: parameter {path!r} has dtype {spec.dtype} and {what} "
        f"{shown} (rule {text}); only floating point and complex leaves can "
        f"{verb}. Give "
        f"it the {what} {neutral!r} (a rule {{{path!r}: {neutral!r}}} before "
        "the others) to leave it as it is, or keep it out of the params "
        "(lw.freeze and lw.partition with None also leave it alone).")


def arrays(fn: str, name: str, tree: Any, hint: str) -> None:
  """Raises for a leaf of ``tree`` that is not an array (a JAX or NumPy
  array or scalar); ``None`` subtrees are structure, not leaves."""
  for path, leaf in zip(*_paths.flatten_with_paths(tree)[:2]):
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      where = f"{name} {path!r}" if path else name
      raise TypeError(
          f"{fn}: {where} is a {type(leaf).__name__}, not an array. {hint}")


# ---------------------------------------------------------- transformations


def as_transformation(value: Any) -> optax.GradientTransformationExtraArgs | None:
  """An optax transformation with extra-args support, made from a
  transformation or from an object with its ``init`` and ``update``
  (``optax.MultiSteps``); ``None`` for anything else."""
  if isinstance(value, optax.GradientTransformation):
    return optax.with_extra_args_support(value)
  if callable(getattr(value, "init", None)) and callable(
      getattr(value, "update", None)) and not isinstance(value, type):
    return optax.GradientTransformationExtraArgs(value.init, value.update)
  return None


def transformation(fn: str, value: Any, *, what: str = "inner",
                   example: str = "optax.adam(1e-3)"
                   ) -> optax.GradientTransformationExtraArgs:
  """``value`` as a transformation, or a ``TypeError`` that says how to
  pass one."""
  tx = as_transformation(value)
  if tx is None:
    raise TypeError(
        f"{fn}: {what} must be an optax transformation (such as {example}), "
        f"got {type(value).__name__} {value!r}."
        + (f" Call the factory: {example}, not {value.__name__}."
           if callable(value) and hasattr(value, "__name__") else ""))
  return tx


# -------------------------------------------------------------- the params


class MissingParams(ValueError):
  """An ``update`` that needs the params was called without them."""


def missing_params(fn: str, who: str, why: str = "") -> MissingParams:
  """The one error for an ``update`` called without the params it needs;
  ``who`` is what needs them, ``why`` what it reads them for."""
  return MissingParams(
      f"{fn}: {who} needs the params{f' ({why})' if why else ''}: call "
      "tx.update(updates, state, params).")


def is_missing_params(error: Exception) -> bool:
  """Whether ``error`` says that params were needed and not given: ours, or
  optax's (every optax transformation that reads the params raises its
  ``NO_PARAMS_MSG``)."""
  if isinstance(error, MissingParams):
    return True
  base = getattr(getattr(optax, "_src", None), "base", None)
  message = getattr(base, "NO_PARAMS_MSG", None)
  return message is not None and str(error) == message
