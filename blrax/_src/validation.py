"""Argument checks shared by every blrax factory and public function.

A hyperparameter is checked for type (a real number, not a string, bool,
None or complex), shape (a scalar), finiteness and range, and a bad one raises
an error naming the argument and the value: ``ValueError`` for a bad value,
:class:`ArgumentTypeError` (both a ``TypeError`` and a ``ValueError``) for a
bad type.

Traced values (under ``optax.inject_hyperparams``) are not branched on:
Python cannot look at a tracer's value, and the factory was first called with
the concrete values it is built from. A bad traced value (``ess=-5``) can
therefore still give NaN; finite gradients with valid values cannot
(``curvature.py``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np

# Largest ess, hess_init, weight_decay, batch_size: a quarter of sqrt(float32
# max) (4.6e18), so that ess * (h + delta) cannot overflow a float32 state
# whose curvature is bounded by sqrt(max) (curvature.limits). Use ess=inf for
# the deterministic limit.
STATE_LIMIT = float(np.sqrt(np.finfo(np.float32).max)) / 4
# The smallest positive value of such a hyperparameter: float32's smallest
# normal number (subnormals are flushed to 0 on CPU).
STATE_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class ArgumentTypeError(TypeError, ValueError):
  """An argument of the wrong type (a ``TypeError`` and a ``ValueError``)."""


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def concrete_float(value: Any) -> float | None:
  """``value`` as a Python float, or None if it is traced, callable or not a
  real scalar."""
  if callable(value) or is_traced(value) or isinstance(value, (str, bytes)):
    return None
  try:
    array = np.asarray(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None
  if (array.shape != () or array.dtype == bool
      or not np.issubdtype(array.dtype, np.number)
      or np.iscomplexobj(array)):
    return None
  return float(array)


def real_scalar(name: str, value: Any) -> float | None:
  """``value`` as a float if it is a concrete real scalar; None if traced.

  Raises:
    ArgumentTypeError: for None, strings, bools, complex or non-numbers.
    ValueError: for arrays that are not scalars.
  """
  if is_traced(value):
    return None
  bad_type = (value is None or isinstance(value, (str, bytes, bool, np.bool_))
              or callable(value))
  if not bad_type:
    try:
      array = np.asarray(value)
    except (TypeError, ValueError):
      bad_type = True
    else:
      bad_type = (array.dtype == bool or np.iscomplexobj(array)
                  or not np.issubdtype(array.dtype, np.number))
  if bad_type:
    raise ArgumentTypeError(
        f"`{name}` must be a real number, got {name}={value!r} "
        f"({type(value).__name__}).")
  if array.shape != ():
    raise ValueError(
        f"`{name}` must be a scalar, got {name}={value!r} of shape "
        f"{array.shape}.")
  return float(array)


def check_range(name: str, value: Any, *, low: float = -math.inf,
                high: float = math.inf, low_open: bool = False,
                high_open: bool = False, allow_inf: bool = False) -> None:
  """Checks a real scalar hyperparameter: type, shape, NaN, inf and range."""
  number = real_scalar(name, value)
  if number is None:
    return
  if math.isnan(number):
    raise ValueError(f"`{name}` must not be NaN, got {name}={value!r}.")
  if math.isinf(number) and not allow_inf:
    raise ValueError(f"`{name}` must be finite, got {name}={value!r}.")
  if not math.isinf(number) and abs(number) > _FLOAT32_MAX:
    raise ValueError(f"`{name}` must be finite in float32 (|x| <= 3.4e38), "
                     f"got {name}={value!r}.")
  too_low = number <= low if low_open else number < low
  too_high = number >= high if high_open else number > high
  if too_low or too_high:
    interval = (("(" if low_open else "[") + f"{low:g}, {high:g}"
                + (")" if high_open else "]"))
    raise ValueError(f"`{name}` must be in {interval}, got {name}={value!r}.")


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> None:
  check_range(name, value, low=0.0, allow_inf=allow_inf)


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> None:
  check_range(name, value, low=0.0, low_open=True, allow_inf=allow_inf)


def check_unit_interval(name: str, value: Any, *,
                        include_one: bool = True) -> None:
  """In [0, 1], or [0, 1) where 1 would divide by zero (debiasing by
  :math:`1-\beta^t`): then also below 1 once rounded to float32."""
  check_range(name, value, low=0.0, high=1.0, high_open=not include_one)
  number = concrete_float(value)
  if not include_one and number is not None and np.float32(number) >= 1:
    raise ValueError(
        f"`{name}` must be < 1 in float32 (it debiases by 1 - {name}**t), got "
        f"{name}={value!r}, which rounds to 1.0.")


def check_integer(name: str, value: Any, *, low: int = 1,
                  high: int | None = None) -> int:
  """A concrete int (Python or NumPy) in ``[low, high)``, returned as int.

  Sizes and counts set array shapes, so they cannot be traced.
  """
  if is_traced(value):
    raise ValueError(
        f"`{name}` sets array shapes and cannot be traced; pass "
        f"static_args=('{name}',) to optax.inject_hyperparams.")
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral, np.ndarray, jax.Array)):
    raise ArgumentTypeError(
        f"`{name}` must be an int, got {name}={value!r} "
        f"({type(value).__name__}).")
  array = np.asarray(value)
  if array.shape != () or not np.issubdtype(array.dtype, np.integer):
    raise ArgumentTypeError(
        f"`{name}` must be an int, got {name}={value!r}.")
  number = int(array)
  if number < low or (high is not None and number >= high):
    bound = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ValueError(f"`{name}` must be an int {bound}, got {name}={value!r}.")
  return number


def check_mc_samples(mc_samples: Any) -> int:
  """``mc_samples`` sets array shapes, so it must be a concrete int >= 1."""
  return check_integer("mc_samples", mc_samples, low=1)


def check_flag(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ArgumentTypeError(
        f"`{name}` must be a bool, got {name}={value!r} "
        f"({type(value).__name__}).")
  return bool(value)


def check_learning_rate(learning_rate: Any) -> None:
  """A finite number >= 0 or a schedule (a callable of the step count)."""
  if callable(learning_rate):
    return
  check_nonnegative("learning_rate", learning_rate)


def check_state_scale(name: str, value: Any, *, positive: bool = False,
                      allow_inf: bool = False) -> None:
  """A hyperparameter stored in or multiplied into the float32 state:
  ``>= 0`` (``> 0`` if ``positive``) and at most :data:`STATE_LIMIT`."""
  check_range(name, value, low=0.0, low_open=positive, allow_inf=allow_inf)
  number = concrete_float(value)
  if number is not None and 0.0 < number < STATE_TINY:
    floor = "" if positive else "0 or "
    raise ValueError(
        f"`{name}` must be {floor}at least {STATE_TINY:.3g}, float32's smallest "
        "normal number (XLA on CPU flushes smaller ones to 0, and the state "
        f"would divide by it), got {name}={value!r}.")
  if number is not None and not math.isinf(number) and number > STATE_LIMIT:
    hint = " (ess=inf is the deterministic limit)" if name == "ess" else ""
    raise ValueError(
        f"`{name}` must be at most {STATE_LIMIT:.2g} so the float32 state "
        f"cannot overflow{hint}, got {name}={value!r}.")
