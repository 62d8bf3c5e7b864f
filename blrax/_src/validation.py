"""Argument checks shared by every blrax optimizer.

Hyperparameters are checked when they are concrete (Python or NumPy numbers,
or JAX arrays outside a trace). Under ``optax.inject_hyperparams`` they arrive
as traced arrays and are left alone: branching on a tracer in Python would
fail, and the factory is called again with the same values it was built with.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or None if it is traced or callable."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    return None
  return float(array)


def check(name: str, value: Any, ok: Callable[[float], bool], want: str) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` fails ``ok``."""
  number = concrete_float(value)
  if number is not None and (math.isnan(number) or not ok(number)):
    raise ValueError(f"`{name}` must be {want}, got {name}={value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  check(name, value, lambda v: v >= 0, ">= 0")


def check_positive(name: str, value: Any) -> None:
  check(name, value, lambda v: v > 0, "> 0")


def check_unit_interval(name: str, value: Any) -> None:
  check(name, value, lambda v: 0 <= v <= 1, "in [0, 1]")


def check_mc_samples(mc_samples: Any) -> int:
  """``mc_samples`` sets array shapes, so it must be a concrete int >= 1."""
  if isinstance(mc_samples, jax.core.Tracer):
    raise ValueError(
        "`mc_samples` sets array shapes and cannot be traced; pass "
        "static_args=('mc_samples',) to optax.inject_hyperparams."
    )
  number = concrete_float(mc_samples)
  if number is None or number != int(number) or number < 1:
    raise ValueError(
        f"`mc_samples` must be an integer >= 1, got mc_samples={mc_samples!r}."
    )
  return int(number)


def check_learning_rate(learning_rate: Any) -> None:
  if not callable(learning_rate):
    check_nonnegative("learning_rate", learning_rate)
