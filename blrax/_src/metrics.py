r"""Classification metrics for predictive distributions: NLL, accuracy, ECE, Brier.

All take class probabilities ``probs`` of shape ``(n, k)`` (rows summing to 1)
and integer ``labels`` of shape ``(n,)``, and return a scalar mean.

References:
  Guo et al., `On Calibration of Modern Neural Networks
  <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  Brier, `Verification of forecasts expressed in terms of probability`,
  Monthly Weather Review, 1950.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(probs: jax.Array, labels: jax.Array) -> None:
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(
        "`probs` must be (n, k) and `labels` (n,); got probs.shape="
        f"{probs.shape}, labels.shape={labels.shape}."
    )


def negative_log_likelihood(probs: jax.Array, labels: jax.Array,
                            eps: float = 1e-12) -> jax.Array:
  r""":math:`-\frac1n\sum_i \log p_{i, y_i}` (probabilities floored at ``eps``)."""
  _check(probs, labels)
  picked = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
  return -jnp.mean(jnp.log(jnp.maximum(picked, eps)))


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose most probable class is the label."""
  _check(probs, labels)
  return jnp.mean(jnp.argmax(probs, axis=1) == labels)


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  r""":math:`\frac1n \sum_i \sum_c (p_{ic} - [y_i = c])^2` (multi-class Brier)."""
  _check(probs, labels)
  onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
  return jnp.mean(jnp.sum(jnp.square(probs - onehot), axis=1))


def calibration_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 15):
  """Per equal-width confidence bin: (count, mean confidence, accuracy).

  The confidence of a row is its largest probability; bin ``b`` holds
  confidences in ``((b)/B, (b+1)/B]`` (the first bin also holds 0).
  """
  _check(probs, labels)
  if num_bins < 1:
    raise ValueError(f"`num_bins` must be >= 1, got num_bins={num_bins}.")
  confidence = jnp.max(probs, axis=1)
  correct = (jnp.argmax(probs, axis=1) == labels).astype(probs.dtype)
  index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1,
                   0, num_bins - 1)
  count = jnp.zeros(num_bins).at[index].add(1.0)
  conf_sum = jnp.zeros(num_bins).at[index].add(confidence)
  correct_sum = jnp.zeros(num_bins).at[index].add(correct)
  safe = jnp.maximum(count, 1.0)
  return count, conf_sum / safe, correct_sum / safe


def expected_calibration_error(probs: jax.Array, labels: jax.Array,
                               num_bins: int = 15) -> jax.Array:
  r"""ECE with equal-width bins: :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b -
  \mathrm{conf}_b|`."""
  count, confidence, acc = calibration_bins(probs, labels, num_bins)
  return jnp.sum(count * jnp.abs(acc - confidence)) / probs.shape[0]


def reliability_diagram(probs, labels, num_bins: int = 15, ax=None,
                        label: str | None = None):
  """Plots accuracy against confidence per equal-width bin (matplotlib).

  Bars show each non-empty bin's accuracy at its mean confidence; the
  diagonal is perfect calibration. Returns the matplotlib ``Axes``.
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
