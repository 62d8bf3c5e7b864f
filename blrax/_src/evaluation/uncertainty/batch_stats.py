"""Per-batch statistics (jit-compiled): the sufficient statistics of one
batch of member log-probabilities, summed by the report on the host.

The scores and their log-uniform grid are described in the package
docstring (``__init__.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src.evaluation.metrics import ROW_SUM_TOLERANCE
from blrax._src.evaluation.uncertainty import predictors

SCORE_SPAN = 1e12
"""The score grid spans ``[u_max / SCORE_SPAN, u_max]`` (log-uniform cells)."""
_LOG_SPAN = math.log(SCORE_SPAN)

SCORES = ("msp", "entropy", "mutual_information")
"""OOD scores: ``1 - max prob`` (Hendrycks & Gimpel's maximum softmax
probability), predictive entropy, mutual information."""


def _entropy(log_probs: jax.Array) -> jax.Array:
  """:math:`-\\sum_c p_c \\log p_c` over the last axis, from log-probs."""
  terms = jnp.where(log_probs > -jnp.inf, jnp.exp(log_probs) * log_probs, 0.0)
  return jnp.maximum(-jnp.sum(terms, axis=-1), 0.0)


def entropy_decomposition(member_log_probs: jax.Array):
  r"""Total, aleatoric and epistemic uncertainty of each example.

  With members :math:`p_s` and their mean :math:`\bar p`:

  .. math::

     \underbrace{H[\bar p]}_{\text{total}} =
     \underbrace{\tfrac1S \textstyle\sum_s H[p_s]}_{\text{aleatoric}} +
     \underbrace{I(y; \theta)}_{\text{epistemic}},

  where the mutual information :math:`I = H[\bar p] - \frac1S\sum_s H[p_s]
  \ge 0` (Jensen) is 0 when all members agree, in particular for
  :math:`S = 1`. Computed from log-probabilities, with the mean in log space;
  the epistemic part is clipped at 0 against rounding.

  Args:
    member_log_probs: ``(S, n, k)`` member log-probabilities (``(n, k)`` is
      read as ``S = 1``).

  Returns:
    ``(total, aleatoric, epistemic)``, each of shape ``(n,)``, in nats.

  Raises:
    ValueError: an input with fewer than 2 or more than 3 axes.

  References:
    Depeweg et al., `Decomposition of Uncertainty in Bayesian Deep Learning
    for Efficient and Risk-sensitive Learning
    <https://arxiv.org/abs/1710.07283>`_, ICML 2018.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import entropy_decomposition
    >>> members = jnp.log(jnp.array([[[0.99, 0.01]], [[0.01, 0.99]]]))
    >>> total, aleatoric, epistemic = entropy_decomposition(members)
    >>> [round(float(x[0]), 4) for x in (total, aleatoric, epistemic)]
    [0.6931, 0.056, 0.6371]
  """
  return _decompose(predictors.check_members(member_log_probs))


@jax.jit
def _decompose(member_log_probs):
  scores = _scores(member_log_probs)
  return scores.total, scores.aleatoric, scores.epistemic


class _Scores(NamedTuple):
  log_probs: jax.Array   # (n, k) BMA
  top: jax.Array         # (n,) predicted class
  confidence: jax.Array  # (n,) max prob
  log_gap: jax.Array     # (n,) log(1 - max prob), from log-probs
  total: jax.Array
  aleatoric: jax.Array
  epistemic: jax.Array
  ok: jax.Array          # (n,) rows of valid log-probabilities


def _row_tolerance(dtype: Any) -> float:
  """How far exp of a row of log-probabilities of ``dtype`` may sum from 1:
  ``ROW_SUM_TOLERANCE``, or 4 machine epsilons of a 16-bit dtype (the
  rounding of an exact bf16 ``log_softmax`` reaches several 1e-3)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return ROW_SUM_TOLERANCE
  return max(ROW_SUM_TOLERANCE, 4 * float(jnp.finfo(dtype).eps))


def _scores(member_log_probs: jax.Array,
            tolerance: float = ROW_SUM_TOLERANCE) -> _Scores:
  s, _, k = member_log_probs.shape
  log_probs = jax.nn.logsumexp(member_log_probs, axis=0) - jnp.log(s)
  # Every member row is a distribution: exp sums to 1, no NaN, no +inf.
  row_sums = jax.nn.logsumexp(member_log_probs, axis=-1)
  ok = jnp.all(jnp.abs(jnp.expm1(row_sums)) <= tolerance, axis=0)
  top = jnp.argmax(log_probs, axis=-1)
  onehot = jax.nn.one_hot(top, k, dtype=bool)
  log_gap = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, log_probs), axis=-1)
  total = _entropy(log_probs)
  aleatoric = jnp.mean(_entropy(member_log_probs), axis=0)
  epistemic = jnp.maximum(total - aleatoric, 0.0)
  return _Scores(log_probs, top, jnp.exp(jnp.max(log_probs, axis=-1)),
                 log_gap, total, aleatoric, epistemic, ok)


def _cells(log_score: jax.Array, log_top: float, num_cells: int) -> jax.Array:
  """Cell of a score on the log grid over ``[top / SCORE_SPAN, top]``."""
  t = (log_score - (log_top - _LOG_SPAN)) * (num_cells / _LOG_SPAN)
  return jnp.floor(jnp.clip(t, 0.0, num_cells - 1.0)).astype(jnp.int32)


def _score_cells(scores: _Scores, k: int, num_cells: int):
  log_top = math.log(math.log(k))
  return {
      "msp": _cells(scores.log_gap, 0.0, num_cells),
      "entropy": _cells(jnp.log(scores.total), log_top, num_cells),
      "mutual_information": _cells(jnp.log(scores.epistemic), log_top,
                                   num_cells),
  }


def _hist(index, num, weights, dtype=jnp.int32):
  return jnp.zeros(num, dtype).at[index].add(weights.astype(dtype))


UNLABELLED = ("n", "shape_members", "shape_classes", "bad_rows",
               "confidence", "entropy", "aleatoric", "epistemic",
               "msp_count", "entropy_count", "mutual_information_count")
"""The statistics of an OOD batch (its labels are not used)."""


def statistics(member_log_probs, labels, mask, num_bins, num_score_bins):
  """Sufficient statistics of one batch; rows where ``mask`` is False (the
  padding of a short batch) count for nothing."""
  out_dtype = jnp.result_type(jnp.asarray(member_log_probs))
  member_log_probs = predictors.check_members(member_log_probs)
  scores = _scores(member_log_probs, _row_tolerance(out_dtype))
  n, k = scores.log_probs.shape
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(
        f"`labels` must have shape ({n},) to match the predictions "
        f"(S, n, k)={member_log_probs.shape}, got labels.shape={labels.shape}.")
  mask = jnp.ones(n, bool) if mask is None else mask
  weight = mask.astype(jnp.float32)
  labels_ok = (labels >= 0) & (labels < k)
  safe = jnp.clip(labels, 0, k - 1)
  log_probs = scores.log_probs
  probs = jnp.exp(log_probs)
  hits = jax.nn.one_hot(safe, k, dtype=probs.dtype)
  correct = (scores.top == safe) & mask
  conf = scores.confidence

  def total(x):  # masked sum; where() also drops NaN of padded rows
    return jnp.sum(jnp.where(mask, x, 0.0))

  index = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0,
                   num_bins - 1)
  cw_index = (jnp.clip(jnp.ceil(probs * num_bins).astype(jnp.int32) - 1, 0,
                       num_bins - 1)
              + num_bins * jnp.arange(k, dtype=jnp.int32))
  cells = _score_cells(scores, k, num_score_bins)
  stats = {
      "n": jnp.sum(mask, dtype=jnp.int32),
      "shape_members": jnp.asarray(member_log_probs.shape[0], jnp.int32),
      "shape_classes": jnp.asarray(k, jnp.int32),
      "bad_rows": jnp.sum(~scores.ok & mask, dtype=jnp.int32),
      "confidence": total(conf),
      "entropy": total(scores.total),
      "aleatoric": total(scores.aleatoric),
      "epistemic": total(scores.epistemic),
      "bad_labels": jnp.sum(~labels_ok & mask, dtype=jnp.int32),
      "correct": jnp.sum(correct, dtype=jnp.int32),
      "nll": -total(jnp.take_along_axis(log_probs, safe[:, None], 1)[:, 0]),
      "brier": total(jnp.sum(jnp.square(probs - hits), axis=1)),
      "bin_count": _hist(index, num_bins, mask),
      "bin_confidence": _hist(index, num_bins, conf * weight, jnp.float32),
      "bin_correct": _hist(index, num_bins, correct),
      "classwise_gap": _hist(cw_index.ravel(), k * num_bins,
                             ((hits - probs) * weight[:, None]).ravel(),
                             jnp.float32),
      "msp_correct": _hist(cells["msp"], num_score_bins, correct),
      "msp_confidence": _hist(cells["msp"], num_score_bins, conf * weight,
                              jnp.float32),
  }
  for name, cell in cells.items():
    stats[f"{name}_count"] = _hist(cell, num_score_bins, mask)
  return stats


@functools.partial(jax.jit, static_argnames=("fn", "num_bins",
                                             "num_score_bins"))
def jit_statistics(fn, args, inputs, labels, mask, num_bins, num_score_bins):
  """:func:`statistics` of ``fn(args, inputs)``, jit-compiled with ``fn``
  and the bin counts static: once per predictor and batch shape."""
  return statistics(fn(args, inputs), labels, mask, num_bins, num_score_bins)


def pad_batch(inputs, labels, size):
  """Pads a short batch to ``size`` rows by repeating its last example.

  So a stream whose last batch is smaller needs one compilation. Returns
  ``(inputs, labels, mask)``; inputs whose leaves do not all have the
  batch as leading axis are left alone (mask all True).
  """
  n = labels.shape[0]
  leaves = jax.tree.leaves(inputs)
  if (n == 0 or n >= size or not leaves
      or any(np.ndim(x) == 0 or np.shape(x)[0] != n for x in leaves)):
    return inputs, labels, jnp.ones(n, bool)
  extra = size - n
  pad = lambda x: jnp.concatenate(  # noqa: E731
      [jnp.asarray(x), jnp.repeat(jnp.asarray(x)[-1:], extra, axis=0)])
  return (jax.tree.map(pad, inputs), pad(labels),
          jnp.arange(size) < n)
