r"""Classification metrics for predictive distributions: NLL, accuracy, ECE, Brier.

All take class probabilities ``probs`` of shape ``(n, k)`` and integer
``labels`` of shape ``(n,)``, and return a scalar mean. Arrays, NumPy arrays
and nested Python lists are accepted (converted with ``jnp.asarray``).

What is checked:

- Always (static, raises): ``probs`` is 2-D with ``n >= 1`` rows and
  ``k >= 1`` columns of real numbers (integer or boolean ``probs`` are cast to
  float); ``labels`` is 1-D with ``n`` entries of an integer (or boolean) dtype.
  A wrong shape raises ``ValueError``, a wrong dtype or a non-numeric input
  ``TypeError``; the message names the argument and its value.
- Values: every entry of ``probs`` is ``>= 0`` and every row sums to 1 within
  :data:`ROW_SUM_TOLERANCE` (``1e-3``, or 4 machine epsilons of the dtype if
  larger, e.g. for ``bfloat16``); every label is in ``[0, k)``. Logits, log
  probabilities, NaN or infinite entries, and labels such as ``-1`` all fail.
  On concrete inputs a failure raises ``ValueError`` naming the first bad row
  or label. Under ``jax.jit`` (or ``vmap``) values cannot be inspected, and
  the metric returns NaN instead (every output of :func:`calibration_bins`),
  never a plausible-looking number.

References:
  Guo et al., `On Calibration of Modern Neural Networks
  <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  Brier, `Verification of forecasts expressed in terms of probability`,
  Monthly Weather Review, 1950.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import validation

# A TypeError that is also a ValueError, as blrax raises for wrong types.
_TypeError = validation.ArgumentTypeError

ROW_SUM_TOLERANCE = 1e-3
"""Rows of ``probs`` must sum to 1 within this (absolute) tolerance."""


def _traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _show(x: Any) -> str:
  return np.array2string(np.asarray(x), threshold=12, precision=4)


def _as_array(name: str, value: Any) -> jax.Array:
  if not isinstance(value, jax.Array):  # NumPy int64 would wrap to int32.
    try:
      host = np.asarray(value)
    except (TypeError, ValueError):
      host = None
    if (host is not None and np.issubdtype(host.dtype, np.integer)
        and host.size and not jax.config.jax_enable_x64):
      info = np.iinfo(np.int32)
      if host.min() < info.min or host.max() > info.max:
        raise ValueError(f"`{name}` holds values outside int32, which JAX "
                         f"would wrap: got {name}={_show(host)}.")
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise _TypeError(
        f"`{name}` must be an array of numbers, got {name}={value!r}."
    ) from e


def _inputs(probs: Any, labels: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks and converts; returns ``(probs, labels, valid)``.

  ``valid`` is a boolean scalar: True when concrete (bad concrete values
  raise), the value check itself when traced.
  """
  probs = _as_array("probs", probs)
  labels = _as_array("labels", labels)
  if probs.dtype == jnp.bool_ or jnp.issubdtype(probs.dtype, jnp.integer):
    probs = probs.astype(jnp.result_type(float))
  elif not jnp.issubdtype(probs.dtype, jnp.floating):
    raise _TypeError(
        f"`probs` must hold real probabilities, got probs.dtype={probs.dtype}.")
  if labels.dtype == jnp.bool_:
    labels = labels.astype(jnp.int32)
  elif not jnp.issubdtype(labels.dtype, jnp.integer):
    raise _TypeError(
        "`labels` must hold integer class indices, got labels.dtype="
        f"{labels.dtype}; convert with labels.astype(int).")
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(
        "`probs` must be (n, k) and `labels` (n,); got probs.shape="
        f"{probs.shape}, labels.shape={labels.shape}."
    )
  n, k = probs.shape
  if n == 0 or k == 0:
    raise ValueError(
        "`probs` needs at least one row and one class, got probs.shape="
        f"{probs.shape}.")

  tol = max(ROW_SUM_TOLERANCE, 4 * float(jnp.finfo(probs.dtype).eps))
  wide = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
  sums = jnp.sum(wide, axis=1)
  # NaN fails both comparisons, +-inf fails the sum.
  rows_ok = jnp.all(probs >= 0, axis=1) & (jnp.abs(sums - 1) <= tol)
  labels_ok = (labels >= 0) & (labels < k)

  valid = jnp.array(True)
  if _traced(probs):
    valid &= jnp.all(rows_ok)
  elif not bool(jnp.all(rows_ok)):
    i = int(jnp.argmin(rows_ok))
    raise ValueError(
        "`probs` must hold probabilities (entries >= 0, rows summing to 1 "
        f"within {tol:g}); got probs[{i}]={_show(probs[i])} with sum "
        f"{float(sums[i]):g}. Logits need jax.nn.softmax first.")
  if _traced(labels):
    valid &= jnp.all(labels_ok)
  elif not bool(jnp.all(labels_ok)):
    i = int(jnp.argmin(labels_ok))
    raise ValueError(
        f"`labels` must be class indices in [0, {k}) for probs with k={k} "
        f"columns; got labels[{i}]={int(labels[i])}.")
  return probs, labels, valid


def _num_bins(num_bins: Any) -> int:
  return validation.check_integer("num_bins", num_bins, low=1)


def _nan_unless(valid: jax.Array, x: jax.Array) -> jax.Array:
  """NaN where ``valid`` is false. A product, not ``jnp.where``: so gradients
  are NaN too (``where`` would give them a plausible 0)."""
  return x * jnp.where(valid, 1.0, jnp.nan)


def negative_log_likelihood(probs: jax.Array, labels: jax.Array,
                            eps: float = 1e-12) -> jax.Array:
  r""":math:`-\frac1n\sum_i \log p_{i, y_i}` (probabilities floored at ``eps``).

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring for the
      checks.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    eps: floor for the picked probability, in ``[0, 1)``; ``0`` gives an
      infinite NLL for a zero probability.

  Returns:
    The mean NLL; NaN under ``jit`` when ``probs``, ``labels`` or ``eps`` are
    invalid (concrete invalid inputs raise ``ValueError``).
  """
  probs, labels, valid = _inputs(probs, labels)
  eps = _as_array("eps", eps)
  if eps.shape != () or not (jnp.issubdtype(eps.dtype, jnp.floating)
                             or jnp.issubdtype(eps.dtype, jnp.integer)):
    raise _TypeError(f"`eps` must be a real scalar, got eps={eps!r}.")
  eps_ok = (eps >= 0) & (eps < 1)
  if _traced(eps):
    valid &= eps_ok
  elif not bool(eps_ok):
    raise ValueError(f"`eps` must be in [0, 1), got eps={float(eps)!r}.")
  picked = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
  return _nan_unless(
      valid, -jnp.mean(jnp.log(jnp.maximum(picked, eps.astype(probs.dtype)))))


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose most probable class is the label.

  Ties go to the lowest class index. NaN under ``jit`` for invalid inputs
  (see the module docstring; concrete invalid inputs raise ``ValueError``).
  """
  probs, labels, valid = _inputs(probs, labels)
  return _nan_unless(valid, jnp.mean(jnp.argmax(probs, axis=1) == labels))


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  r""":math:`\frac1n \sum_i \sum_c (p_{ic} - [y_i = c])^2` (multi-class Brier).

  Lies in ``[0, 2]``. NaN under ``jit`` for invalid inputs (see the module
  docstring; concrete invalid inputs raise ``ValueError``).
  """
  probs, labels, valid = _inputs(probs, labels)
  onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
  return _nan_unless(valid,
                     jnp.mean(jnp.sum(jnp.square(probs - onehot), axis=1)))


def calibration_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 15):
  """Per equal-width confidence bin: (count, mean confidence, accuracy).

  The confidence of a row is its largest probability; bin ``b`` holds
  confidences in ``((b)/B, (b+1)/B]`` (the first bin also holds 0).

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: a Python (or NumPy) int ``>= 1``; ``TypeError`` otherwise.

  Returns:
    Three arrays of shape ``(num_bins,)``; all NaN under ``jit`` for invalid
    inputs (concrete invalid inputs raise ``ValueError``).
  """
  num_bins = _num_bins(num_bins)
  probs, labels, valid = _inputs(probs, labels)
  confidence = jnp.max(probs, axis=1)
  correct = (jnp.argmax(probs, axis=1) == labels).astype(probs.dtype)
  index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1,
                   0, num_bins - 1)
  count = jnp.zeros(num_bins).at[index].add(1.0)
  conf_sum = jnp.zeros(num_bins).at[index].add(confidence)
  correct_sum = jnp.zeros(num_bins).at[index].add(correct)
  safe = jnp.maximum(count, 1.0)
  return (_nan_unless(valid, count), _nan_unless(valid, conf_sum / safe),
          _nan_unless(valid, correct_sum / safe))


def expected_calibration_error(probs: jax.Array, labels: jax.Array,
                               num_bins: int = 15) -> jax.Array:
  r"""ECE with equal-width bins: :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b -
  \mathrm{conf}_b|`.

  Lies in ``[0, 1]``. NaN under ``jit`` for invalid inputs (see
  :func:`calibration_bins`; concrete invalid inputs raise ``ValueError``).
  """
  count, confidence, acc = calibration_bins(probs, labels, num_bins)
  return jnp.sum(count * jnp.abs(acc - confidence)) / np.shape(probs)[0]


def reliability_diagram(probs, labels, num_bins: int = 15, ax=None,
                        label: str | None = None):
  """Plots accuracy against confidence per equal-width bin (matplotlib).

  Bars show each non-empty bin's accuracy at its mean confidence; the
  diagonal is perfect calibration. Returns the matplotlib ``Axes``. Inputs
  are checked as in :func:`calibration_bins` (invalid ones raise).
  """
  import matplotlib.pyplot as plt  # Imported lazily: plotting is optional.

  count, confidence, acc = (jnp.asarray(x) for x in
                            calibration_bins(probs, labels, num_bins))
  if ax is None:
    _, ax = plt.subplots(figsize=(4, 4))
  keep = count > 0
  ece = float(expected_calibration_error(probs, labels, num_bins))
  ax.bar(confidence[keep], acc[keep], width=1.0 / num_bins, alpha=0.6,
         edgecolor="k", label=f"{label or 'model'} (ECE {ece:.3f})")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ax.set_xlabel("confidence")
  ax.set_ylabel("accuracy")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.legend(loc="upper left")
  return ax
