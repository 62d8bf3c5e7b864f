r"""Classification metrics of predictive distributions: NLL, accuracy, Brier,
ECE (equal-width, equal-mass, classwise) and MCE.

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


def show(x: Any) -> str:
  """``x`` printed briefly (at most 12 entries, 4 digits), for error messages.

  Args:
    x: an array or anything ``np.asarray`` takes.

  Returns:
    The text.
  """
  return np.array2string(np.asarray(x), threshold=12, precision=4)


def as_array(name: str, value: Any) -> jax.Array:
  """``value`` as a JAX array; integers that JAX would wrap to int32 raise.

  Args:
    name: the argument's name, for error messages.
    value: an array, NumPy array, nested list or number.

  Returns:
    ``jnp.asarray(value)``.

  Raises:
    ArgumentTypeError: ``value`` is not numeric.
    ValueError: integers outside int32 while x64 is off.
  """
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
                         f"would wrap: got {name}={show(host)}.")
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise _TypeError(
        f"`{name}` must be an array of numbers, got {name}={value!r}."
    ) from e


def check_probs_labels(probs: Any,
                       labels: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks and converts; returns ``(probs, labels, valid)``.

  ``valid`` is a boolean scalar: True when concrete (bad concrete values
  raise), the value check itself when traced. The checks are those of the
  module docstring.

  Args:
    probs: class probabilities ``(n, k)``.
    labels: integer labels ``(n,)`` in ``[0, k)``.

  Returns:
    ``(probs, labels, valid)``: float probabilities, integer labels.
  """
  probs = as_array("probs", probs)
  labels = as_array("labels", labels)
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
        f"within {tol:g}); got probs[{i}]={show(probs[i])} with sum "
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


def nan_unless(valid: jax.Array, x: jax.Array) -> jax.Array:
  """NaN where ``valid`` is false. A product, not ``jnp.where``: so gradients
  are NaN too (``where`` would give them a plausible 0).

  Args:
    valid: a boolean array broadcasting with ``x``.
    x: the result.

  Returns:
    ``x``, NaN where ``valid`` is false.
  """
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

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import negative_log_likelihood
    >>> probs = jnp.array([[0.5, 0.5], [0.25, 0.75]])
    >>> round(float(negative_log_likelihood(probs, jnp.array([0, 1]))), 4)
    0.4904
  """
  probs, labels, valid = check_probs_labels(probs, labels)
  eps = as_array("eps", eps)
  if eps.shape != () or not (jnp.issubdtype(eps.dtype, jnp.floating)
                             or jnp.issubdtype(eps.dtype, jnp.integer)):
    raise _TypeError(f"`eps` must be a real scalar, got eps={eps!r}.")
  eps_ok = (eps >= 0) & (eps < 1)
  if _traced(eps):
    valid &= eps_ok
  elif not bool(eps_ok):
    raise ValueError(f"`eps` must be in [0, 1), got eps={float(eps)!r}.")
  picked = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
  return nan_unless(
      valid, -jnp.mean(jnp.log(jnp.maximum(picked, eps.astype(probs.dtype)))))


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose most probable class is the label.

  Ties go to the lowest class index.

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.

  Returns:
    A scalar in ``[0, 1]``; NaN under ``jit`` for invalid inputs (see the
    module docstring; concrete invalid inputs raise ``ValueError``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import accuracy
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4]])
    >>> float(accuracy(probs, jnp.array([0, 1])))
    0.5
  """
  probs, labels, valid = check_probs_labels(probs, labels)
  return nan_unless(valid, jnp.mean(jnp.argmax(probs, axis=1) == labels))


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  r""":math:`\frac1n \sum_i \sum_c (p_{ic} - [y_i = c])^2` (multi-class Brier).

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.

  Returns:
    A scalar in ``[0, 2]``; NaN under ``jit`` for invalid inputs (see the
    module docstring; concrete invalid inputs raise ``ValueError``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import brier_score
    >>> round(float(brier_score(jnp.array([[0.75, 0.25]]), jnp.array([0]))), 4)
    0.125
  """
  probs, labels, valid = check_probs_labels(probs, labels)
  onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
  return nan_unless(valid,
                     jnp.mean(jnp.sum(jnp.square(probs - onehot), axis=1)))


BINNINGS = ("equal_width", "equal_mass")
"""The binnings of :func:`calibration_bins`."""


def _binning(binning: Any) -> str:
  if not isinstance(binning, str) or binning not in BINNINGS:
    raise ValueError(f"`binning` must be one of {BINNINGS}, got "
                     f"binning={binning!r}.")
  return binning


def _bins(probs, labels, num_bins, binning):
  """(count, confidence sum, correct sum, valid); the sums are not NaN'd."""
  num_bins = _num_bins(num_bins)
  binning = _binning(binning)
  probs, labels, valid = check_probs_labels(probs, labels)
  confidence = jnp.max(probs, axis=1)
  correct = (jnp.argmax(probs, axis=1) == labels).astype(probs.dtype)
  if binning == "equal_width":
    index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1,
                     0, num_bins - 1)
  else:  # Rank r (stable ascending sort) goes to bin floor(r B / n).
    n = confidence.shape[0]
    order = jnp.argsort(confidence, stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    # floor(r B / n) >= b  <=>  r >= ceil(b n / B): exact integer edges.
    edges = jnp.array([-(-b * n // num_bins) for b in range(1, num_bins)],
                      jnp.int32)
    index = jnp.searchsorted(edges, rank, side="right")
  count = jnp.zeros(num_bins).at[index].add(1.0)
  conf_sum = jnp.zeros(num_bins).at[index].add(confidence)
  correct_sum = jnp.zeros(num_bins).at[index].add(correct)
  return count, conf_sum, correct_sum, valid


def calibration_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 15,
                     binning: str = "equal_width"):
  r"""Per confidence bin: (count, mean confidence, accuracy).

  The confidence of a row is its largest probability, its prediction the
  most probable class (ties to the lowest index). With
  ``binning="equal_width"`` bin ``b`` holds confidences in
  :math:`(b/B, (b+1)/B]` (the first bin also holds 0). With
  ``binning="equal_mass"`` the rows are sorted by confidence (a stable sort:
  ties keep their input order) and the row of rank :math:`r = 0, \dots,
  n-1` goes to bin :math:`\lfloor rB/n \rfloor`, so every bin holds
  :math:`\lfloor n/B \rfloor` or :math:`\lceil n/B \rceil` rows
  (Nixon et al., 2019).

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: a Python (or NumPy) int ``>= 1``; ``TypeError`` otherwise.
    binning: ``"equal_width"`` (default) or ``"equal_mass"``.

  Returns:
    Three arrays of shape ``(num_bins,)``; an empty bin has mean confidence
    and accuracy 0. All NaN under ``jit`` for invalid inputs (concrete
    invalid inputs raise ``ValueError``).

  Raises:
    ValueError: bad shapes or values (module docstring), ``num_bins < 1``
      or an unknown ``binning``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import calibration_bins
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> count, conf, acc = calibration_bins(probs, jnp.array([0, 1, 1]), 2)
    >>> count.tolist(), acc.tolist()
    ([0.0, 3.0], [0.0, 0.6666666865348816])
  """
  count, conf_sum, correct_sum, valid = _bins(probs, labels, num_bins, binning)
  safe = jnp.maximum(count, 1.0)
  return (nan_unless(valid, count), nan_unless(valid, conf_sum / safe),
          nan_unless(valid, correct_sum / safe))


def expected_calibration_error(probs: jax.Array, labels: jax.Array,
                               num_bins: int = 15,
                               binning: str = "equal_width") -> jax.Array:
  r"""ECE: :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`.

  Over the bins of :func:`calibration_bins`: equal-width (Guo et al., 2017;
  Naeini et al., 2015) by default, or ``binning="equal_mass"`` (adaptive
  bins, Nixon et al., 2019).

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: a Python (or NumPy) int ``>= 1``.
    binning: ``"equal_width"`` (default) or ``"equal_mass"``.

  Returns:
    A scalar in ``[0, 1]``. NaN under ``jit`` for invalid inputs (concrete
    invalid inputs raise ``ValueError``).

  Raises:
    ValueError: as :func:`calibration_bins`.

  References:
    Naeini, Cooper & Hauskrecht, `Obtaining Well Calibrated Probabilities
    Using Bayesian Binning <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_,
    AAAI 2015.
    Nixon et al., `Measuring Calibration in Deep Learning
    <https://arxiv.org/abs/1904.01685>`_, CVPR Workshops 2019.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import expected_calibration_error
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> round(float(expected_calibration_error(probs, jnp.array([0, 1, 1]),
    ...                                        num_bins=2)), 4)
    0.0667
  """
  count, conf_sum, correct_sum, valid = _bins(probs, labels, num_bins, binning)
  return nan_unless(valid,
                     jnp.sum(jnp.abs(correct_sum - conf_sum)) / np.shape(probs)[0])


def maximum_calibration_error(probs: jax.Array, labels: jax.Array,
                              num_bins: int = 15,
                              binning: str = "equal_width") -> jax.Array:
  r"""MCE: :math:`\max_{b:\,n_b > 0} |\mathrm{acc}_b - \mathrm{conf}_b|`.

  The worst gap over the non-empty bins of :func:`calibration_bins`
  (Naeini et al., 2015). Unlike the ECE it does not weight bins by their
  size, so a bin holding one row counts as much as a full one.

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: a Python (or NumPy) int ``>= 1``.
    binning: ``"equal_width"`` (default) or ``"equal_mass"``.

  Returns:
    A scalar in ``[0, 1]``; NaN under ``jit`` for invalid inputs.

  Raises:
    ValueError: as :func:`calibration_bins`.

  References:
    Naeini, Cooper & Hauskrecht, `Obtaining Well Calibrated Probabilities
    Using Bayesian Binning <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_,
    AAAI 2015.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import maximum_calibration_error
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> round(float(maximum_calibration_error(probs, jnp.array([0, 1, 1]),
    ...                                       num_bins=2)), 4)
    0.0667
  """
  count, conf_sum, correct_sum, valid = _bins(probs, labels, num_bins, binning)
  gaps = jnp.abs(correct_sum - conf_sum) / jnp.maximum(count, 1.0)
  return nan_unless(valid, jnp.max(jnp.where(count > 0, gaps, 0.0)))


def classwise_calibration_error(probs: jax.Array, labels: jax.Array,
                                num_bins: int = 15) -> jax.Array:
  r"""Classwise ECE: the ECE of every class's probability, averaged.

  For each class :math:`c` the probabilities :math:`p_{ic}` of all rows
  are put in equal-width bins :math:`(b/B, (b+1)/B]` (the first also holds
  0), and

  .. math::

     \mathrm{cwECE} = \frac1k \sum_{c=1}^k \sum_b \frac{n_{bc}}{n}
     \,\bigl|\bar y_{bc} - \bar p_{bc}\bigr|,

  with :math:`\bar p_{bc}` the mean probability of class :math:`c` in bin
  :math:`b` and :math:`\bar y_{bc}` the fraction of those rows labelled
  :math:`c`. This is the static calibration error (SCE) of Nixon et al.
  (2019) and the classwise-ECE of Kull et al. (2019); unlike the ECE it
  looks at every class, not only the predicted one.

  Args:
    probs: class probabilities ``(n, k)``; see the module docstring.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: a Python (or NumPy) int ``>= 1``.

  Returns:
    A scalar in ``[0, 1]``; NaN under ``jit`` for invalid inputs.

  Raises:
    ValueError: as :func:`calibration_bins` (``num_bins < 1``, bad shapes
      or values).

  References:
    Kull et al., `Beyond temperature scaling: Obtaining well-calibrated
    multiclass probabilities with Dirichlet calibration
    <https://arxiv.org/abs/1910.12656>`_, NeurIPS 2019.
    Nixon et al., `Measuring Calibration in Deep Learning
    <https://arxiv.org/abs/1904.01685>`_, CVPR Workshops 2019.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import classwise_calibration_error
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> round(float(classwise_calibration_error(probs, jnp.array([0, 1, 1]),
    ...                                         num_bins=2)), 4)
    0.2667
  """
  num_bins = _num_bins(num_bins)
  probs, labels, valid = check_probs_labels(probs, labels)
  k = probs.shape[1]
  index = jnp.clip(jnp.ceil(probs * num_bins).astype(jnp.int32) - 1, 0,
                   num_bins - 1) + num_bins * jnp.arange(k, dtype=jnp.int32)
  hits = jax.nn.one_hot(labels, k, dtype=probs.dtype)
  gap = jnp.zeros(k * num_bins).at[index.ravel()].add((hits - probs).ravel())
  return nan_unless(valid, jnp.sum(jnp.abs(gap)) / (probs.shape[0] * k))


def reliability_diagram(probs, labels, num_bins: int = 15, ax=None,
                        label: str | None = None):
  """Plots accuracy against confidence per equal-width bin (matplotlib).

  Bars show each non-empty bin's accuracy at its mean confidence; the
  diagonal is perfect calibration. Inputs are checked as in
  :func:`calibration_bins` (invalid ones raise).

  Args:
    probs: class probabilities ``(n, k)``.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    num_bins: equal-width bins, an int ``>= 1``.
    ax: a matplotlib ``Axes`` to draw in; a new figure's by default.
    label: the legend's name of the model.

  Returns:
    The matplotlib ``Axes``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.metrics import reliability_diagram
    >>> probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> ax = reliability_diagram(probs, jnp.array([0, 1, 1]), num_bins=5)
    >>> ax.get_xlabel()
    'confidence'
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
