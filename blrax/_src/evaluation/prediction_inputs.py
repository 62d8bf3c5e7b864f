"""The arguments the predictive functions share, checked and converted in one
place.

The model-averaged predictive (``predictive.py``), the linearised one
(``linearized.py``), the predictors of the uncertainty report
(``uncertainty/``) and posterior calibration (``calibration.py``) take the
same ``apply_fn``, ``key``, ``params``/``opt_state`` (or a Flax NNX model and
optimizer), ``num_samples``/``chunk_size`` and ``noise_variance``, and check
the logits ``apply_fn`` returns the same way. The rules are those of the
:mod:`blrax.predictive` module docstring; wrong types raise
``validation.ArgumentTypeError`` (a ``TypeError`` that is also a
``ValueError``), wrong values ``ValueError``, each naming the argument.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import validation
from blrax._src.noise import generators as noise

# A TypeError that is also a ValueError, as blrax raises for wrong types.
_TypeError = validation.ArgumentTypeError


def functional(apply_fn: Callable[..., Any] | None, params: Any,
               opt_state: Any) -> tuple[Callable[..., Any], Any, Any]:
  """An NNX model (or its state) and ``nnx.Optimizer`` as a pure
  ``(apply_fn, params, opt_state)``; anything else unchanged.

  Args:
    apply_fn: ``apply_fn(params, inputs)``, or None for an NNX model called
      as ``model(inputs)``.
    params: a params pytree, an ``nnx.Module`` or an ``nnx.State``.
    opt_state: a blrax optimizer state, an ``nnx.Optimizer`` or None.

  Returns:
    ``(apply_fn, params, opt_state)`` of plain pytrees and a pure function.
  """
  nnx = sys.modules.get("flax.nnx")  # Only loaded if the caller uses flax.
  if nnx is not None and (isinstance(params, (nnx.Module, nnx.State))
                          or isinstance(opt_state, nnx.Optimizer)):
    from blrax._src.integrations import flax_nnx as flax_integration
    return flax_integration.functional(apply_fn, params, opt_state)
  return apply_fn, params, opt_state


def check_apply_fn(apply_fn: Any, returns: str = "outputs") -> None:
  """Raises unless ``apply_fn`` is callable (``returns`` names its output)."""
  if not callable(apply_fn):
    raise _TypeError(
        f"`apply_fn` must be a function (params, inputs) -> {returns}, got "
        f"apply_fn={apply_fn!r}.")


def check_apply_fn_and_key(apply_fn: Any, key: Any,
                           mean_only: Any) -> jax.Array | None:
  """Checks the arguments every predictive function shares.

  Args:
    apply_fn: must be callable.
    key: an int seed, a legacy uint32 key of shape ``(2,)`` or a typed key;
      ignored when ``mean_only``.
    mean_only: a bool: whether the posterior is ignored (no draws).

  Returns:
    The key as a typed PRNG key, or None when ``mean_only``.
  """
  check_apply_fn(apply_fn)
  if not isinstance(mean_only, (bool, np.bool_)):
    raise _TypeError(f"`mean_only` must be a bool, got mean_only={mean_only!r}.")
  if mean_only:
    return None
  if key is None:
    raise _TypeError("`key` is required unless mean_only=True, got key=None.")
  try:
    key = noise.canonicalize_key(key)
  except TypeError as e:
    raise _TypeError(
        "`key` must be an int seed, a legacy uint32 key of shape (2,) or a "
        f"typed PRNG key, got key={key!r}.") from e
  if key.shape != ():
    raise ValueError(
        f"`key` must be a single PRNG key, got key.shape={key.shape}.")
  return key


def check_draw_counts(num_samples: Any, chunk_size: Any) -> tuple[int, int]:
  """``(num_samples, chunk_size)`` as ints, ``chunk_size`` a divisor of
  ``num_samples`` (``None``: all draws at once).

  Args:
    num_samples: posterior draws, a Python or NumPy int ``>= 1`` (not a bool,
      float or traced value: it sets shapes).
    chunk_size: draws evaluated together, such an int or None.

  Returns:
    ``(num_samples, chunk_size)``, ``chunk_size = num_samples`` for None.
  """
  num_samples = validation.check_integer("num_samples", num_samples, low=1)
  chunk_size = (num_samples if chunk_size is None
                else validation.check_integer("chunk_size", chunk_size, low=1))
  if num_samples % chunk_size:
    raise ValueError(
        "`chunk_size` must be a positive divisor of num_samples="
        f"{num_samples}, got chunk_size={chunk_size!r}.")
  return num_samples, chunk_size


def draw_keys(key: jax.Array, num_samples: Any,
              chunk_size: Any) -> tuple[jax.Array, int]:
  """One key per posterior draw, ``jax.random.split(key, num_samples)``, in
  chunks.

  Args:
    key: a single typed PRNG key (from :func:`check_apply_fn_and_key`).
    num_samples: as in :func:`check_draw_counts`.
    chunk_size: as in :func:`check_draw_counts`.

  Returns:
    ``(keys, num_samples)``: the keys reshaped to ``(chunks, chunk_size)``
    (for ``jax.lax.map`` over chunks of ``jax.vmap``-ed draws), and the
    checked count.
  """
  num_samples, chunk_size = check_draw_counts(num_samples, chunk_size)
  keys = jax.random.split(key, num_samples).reshape(-1, chunk_size)
  return keys, num_samples


def default_noise_variance(value: Any, caller: str, stacklevel: int = 3):
  """``value``, or 0.0 with a ``UserWarning`` when it was left out (None).

  Args:
    value: the ``noise_variance`` argument.
    caller: the public function's name, for the warning.
    stacklevel: of the warning, so that it points at the user's call.

  Returns:
    ``value``, or 0.0 for None.
  """
  if value is not None:
    return value
  warnings.warn(
      f"{caller}: noise_variance not given, so the predictive variance is the "
      "posterior's (epistemic) alone, with no observation noise: intervals "
      "of noisy targets come out far too narrow. Pass noise_variance= (e.g. "
      "the mean squared residual on held-out data), or noise_variance=0.0 "
      "for the epistemic variance on purpose.", UserWarning,
      stacklevel=stacklevel)
  return 0.0


def check_noise_variance(value: Any) -> tuple[jax.Array, jax.Array]:
  """(``value`` as an array, whether it is >= 0); concrete negatives raise.

  Args:
    value: a number or an array of numbers (not bools).

  Returns:
    ``(noise_variance, ok)``, ``ok`` a boolean scalar, False for a traced
    negative or NaN value.
  """
  try:
    array = jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise _TypeError("`noise_variance` must be a number or an array of numbers,"
                    f" got noise_variance={value!r}.") from e
  if array.dtype == jnp.bool_ or not (jnp.issubdtype(array.dtype, jnp.floating)
                                      or jnp.issubdtype(array.dtype,
                                                        jnp.integer)):
    raise _TypeError("`noise_variance` must be real, got noise_variance="
                    f"{value!r} of dtype {array.dtype}.")
  ok = jnp.all(array >= 0)  # False for NaN.
  if not validation.is_traced(array) and not bool(ok):
    raise ValueError(
        f"`noise_variance` must be >= 0, got noise_variance={value!r}.")
  return array, ok


def add_noise_variance(mean: jax.Array, variance: jax.Array,
                       noise_variance: jax.Array,
                       ok: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(mean, variance + noise_variance)``, the variance NaN unless ``ok``.

  Args:
    mean: the predictive mean.
    variance: the posterior's predictive variance, shaped like ``mean``.
    noise_variance: from :func:`check_noise_variance`; it must broadcast to
      the shape of ``mean`` without enlarging it.
    ok: from :func:`check_noise_variance`.

  Returns:
    ``(mean, variance)`` with the observation noise added.
  """
  shape = jnp.shape(mean)
  try:
    ok_shape = jnp.broadcast_shapes(noise_variance.shape, shape) == shape
  except ValueError:
    ok_shape = False
  if not ok_shape:
    raise ValueError(
        "`noise_variance` must broadcast to the output shape "
        f"{shape}, got noise_variance.shape={noise_variance.shape}.")
  return mean, (variance + noise_variance) * jnp.where(ok, 1.0, jnp.nan)


def check_logits(logits: jax.Array) -> None:
  """Raises unless ``logits`` has a class axis (last) of at least 2 classes.

  Args:
    logits: what ``apply_fn`` returned.
  """
  if jnp.ndim(logits) < 1 or jnp.shape(logits)[-1] < 2:
    raise ValueError(
        "`apply_fn` must return logits with a last axis of >= 2 classes, got "
        f"shape {jnp.shape(logits)}; for a binary model with one logit z, "
        "return jnp.stack([jnp.zeros_like(z), z], -1).")
