r"""Numerical safety: every blrax state stays finite for any finite input.

Estimates are saturated at the dtype's largest finite value (:func:`finite`)
instead of overflowing to inf, and curvatures are clipped to a range in which
:math:`\sigma = 1/\sqrt{\lambda(h+\delta)}` and the products it enters stay
finite (:func:`limits`, :func:`bounded`). Every family uses these: the
engine's estimators and precision updates, the eigenbasis rotations, the full
covariance's solves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def finite(x: jax.Array, dtype=None) -> jax.Array:
  """``x`` with overflow (``+-inf``) saturated at the largest finite value of
  ``dtype`` (default: ``x``'s); NaN stays NaN (it comes from NaN inputs,
  which must show)."""
  big = float(jnp.finfo(x.dtype if dtype is None else dtype).max)
  return jnp.clip(x, -big, big)


def limits(dtype) -> tuple[float, float]:
  r"""(floor of :math:`h+\delta`, ceiling of :math:`h`) for a state dtype.

  :math:`\sqrt{\text{tiny}}` and :math:`\sqrt{\text{max}}` of the dtype
  (about 1e-19 and 2e19 in float32): :math:`\sigma` stays finite for any
  ``ess`` and the products :math:`\lambda(h+\delta)` and
  :math:`\hat g\epsilon\sqrt{\lambda(h+\delta)}` cannot overflow for
  :math:`\lambda` below :math:`\sqrt{\text{max}}`.
  """
  info = jnp.finfo(dtype)
  return float(info.tiny) ** 0.5, float(info.max) ** 0.5


def bounded(curvature: jax.Array, weight_decay) -> jax.Array:
  r"""Keeps :math:`h+\delta \ge \max(\text{floor}, 4\,\text{eps}\,\delta)`
  and :math:`h \le` ceiling (:func:`limits`).

  An identity in every realistic run. It is what makes the update safe for
  any finite gradients: a dead unit (zero gradients, :math:`\delta = 0`)
  no longer decays to :math:`h = 0` and :math:`\sigma = \infty`, and a
  gradient of 1e30 saturates :math:`h` instead of overflowing to inf.
  """
  floor, ceiling = limits(curvature.dtype)
  # floor - delta rounds to -delta when delta >> floor: then keep h + delta
  # a few ulps of delta above 0 instead.
  lowest = jnp.maximum(floor - weight_decay, -weight_decay
                       * (1.0 - 4.0 * jnp.finfo(curvature.dtype).eps))
  return jnp.clip(curvature, lowest, ceiling)


def power_of_two_normalised(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x / c, c)``, ``c`` the power of two that takes ``max|x|`` below 4.

  ``c`` is at least 1 (only overflow matters) and at most ``2**(maxexp-2)``,
  so that the ``1/c`` XLA may multiply by is a normal number (CPUs flush
  subnormals to zero).
  """
  largest = jnp.max(jnp.abs(x))
  _, exponent = jnp.frexp(largest)  # largest = f 2^exponent, f in [0.5, 1)
  exponent = jnp.where(jnp.isfinite(largest), exponent - 1, 0)
  exponent = jnp.clip(exponent, 0, jnp.finfo(x.dtype).maxexp - 2)
  scale = jnp.ldexp(jnp.ones((), x.dtype), exponent)
  return x / scale, scale
