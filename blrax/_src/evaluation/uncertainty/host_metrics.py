"""From the summed statistics to metrics, on the host in float64: the
statistics' running sum, selective prediction (AURC, the risk–coverage
curve), equal-mass ECE and OOD detection from the score histograms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class StatsSum:
  """Adds per-batch statistics on the host, in float64 / int64.

  ``shape_*`` entries are not summed: every batch must agree on them.
  """

  def __init__(self, name):
    self.name = name
    self.total = None

  def add(self, i, stats):
    stats = {k: np.asarray(v) for k, v in jax.device_get(stats).items()}
    stats = {k: v.astype(np.int64 if np.issubdtype(v.dtype, np.integer)
                         else np.float64) for k, v in stats.items()}
    if self.total is None:
      self.total = dict(stats)
      return stats
    for k, v in stats.items():
      if not k.startswith("shape_"):
        self.total[k] = self.total[k] + v
      elif v != self.total[k]:
        raise ValueError(
            f"`{self.name}`: batch {i} has {k[6:]}={int(v)}, the first batch "
            f"had {int(self.total[k])}.")
    return stats


def _harmonic(m: np.ndarray) -> np.ndarray:
  r""":math:`H_m = \sum_{i=1}^m 1/i` for integer arrays ``m >= 0``."""
  m = np.asarray(m, np.float64)
  table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 65))])
  x = np.maximum(m, 1.0)
  inv2 = 1.0 / (x * x)
  big = (np.log(x) + np.euler_gamma + 0.5 / x
         - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252)))
  return np.where(m < 64, table[np.minimum(m, 64).astype(np.int64)], big)


def aurc(count: np.ndarray, errors: np.ndarray) -> float:
  r"""Area under the risk–coverage curve, cells in order of acceptance.

  With examples accepted one by one, :math:`\mathrm{AURC} = \frac1n
  \sum_{m=1}^n r_m`, :math:`r_m` the error rate of the first :math:`m`.
  Examples in one cell are accepted in a random order and :math:`r_m`
  replaced by its expectation: after :math:`i` of the :math:`c` examples of
  a cell holding :math:`e` errors, preceded by :math:`M` examples with
  :math:`E` errors, the expected error count is :math:`E + i e / c`, and
  :math:`\sum_{i=1}^{c} \frac{E + i a}{M + i} = a c + (E - a M)(H_{M+c} -
  H_M)` with :math:`a = e/c`.
  """
  count = np.asarray(count, np.float64)
  errors = np.asarray(errors, np.float64)
  before = np.cumsum(count) - count
  errors_before = np.cumsum(errors) - errors
  nz = count > 0
  c, e, m, eb = count[nz], errors[nz], before[nz], errors_before[nz]
  a = e / c
  terms = a * c + (eb - a * m) * (_harmonic(m + c) - _harmonic(m))
  return float(np.sum(terms) / np.sum(count))


def optimal_aurc(n: int, correct: int) -> float:
  """AURC of a ranking that accepts every correct example first."""
  errors = n - correct
  return float((errors - correct * (_harmonic(n) - _harmonic(correct))) / n)


def risk_coverage(count, errors):
  """``(coverage, risk)`` after each non-empty cell, cells in order of
  acceptance (``count`` examples, ``errors`` of them wrong, per cell)."""
  count = np.asarray(count, np.float64)
  nz = count > 0
  accepted = np.cumsum(count)[nz]
  return accepted / count.sum(), np.cumsum(errors)[nz] / accepted


def equal_mass_ece(count, correct, confidence, num_bins) -> float:
  """ECE over equal-mass bins from cells in ascending confidence order.

  A cell goes to the bin of its examples' mean rank, floor(r B / n) with
  r = (2 before + count - 1) / 2: the exact per-example bins whenever no
  cell straddles a bin edge.
  """
  count = np.asarray(count, np.int64)
  n = int(count.sum())
  before = np.cumsum(count) - count
  nz = count > 0
  index = np.minimum(((2 * before + count - 1) * num_bins) // (2 * n),
                     num_bins - 1)[nz]
  gap = (np.bincount(index, np.asarray(correct, np.float64)[nz], num_bins)
         - np.bincount(index, np.asarray(confidence, np.float64)[nz], num_bins))
  return float(np.sum(np.abs(gap)) / n)


class Detection(NamedTuple):
  """OOD detection by one score; OOD is the positive class.

  Attributes:
    auroc: area under the ROC curve, a tied (in, out) pair counting 1/2.
    aupr: average precision of detecting OOD inputs (scikit-learn's
      ``average_precision_score`` with OOD as positive).
    fpr95: the smallest false-positive rate (in-distribution inputs flagged)
      over the thresholds whose true-positive rate is at least 0.95 (no
      interpolation).

  Examples:
    >>> from blrax.uncertainty import Detection
    >>> Detection(auroc=0.9, aupr=0.8, fpr95=0.3).auroc
    0.9
  """

  auroc: float
  aupr: float
  fpr95: float


def roc(h_in, h_out):
  """(fpr, tpr) at the cell thresholds, from the highest score down."""
  tp = np.cumsum(np.asarray(h_out, np.float64)[::-1])
  fp = np.cumsum(np.asarray(h_in, np.float64)[::-1])
  return fp / fp[-1], tp / tp[-1], tp, fp


def detection(h_in, h_out) -> tuple[Detection, float]:
  """Detection metrics, and the AUROC's bound from ties within cells."""
  h_in = np.asarray(h_in, np.float64)
  h_out = np.asarray(h_out, np.float64)
  negatives, positives = h_in.sum(), h_out.sum()
  below = np.cumsum(h_in) - h_in
  auroc = np.sum(h_out * (below + 0.5 * h_in)) / (positives * negatives)
  fpr, tpr, tp, fp = roc(h_in, h_out)
  flagged = tp + fp
  precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
  aupr = np.sum(h_out[::-1] * precision) / positives
  fpr95 = fpr[np.argmax(tpr >= 0.95)]
  bound = 0.5 * np.sum(h_in * h_out) / (positives * negatives)
  return Detection(float(auroc), float(aupr), float(fpr95)), float(bound)
