"""Metrics against values computed by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import blrax

PROBS = jnp.array([[0.7, 0.2, 0.1],   # correct, conf 0.7
                   [0.1, 0.6, 0.3],   # wrong (label 2), conf 0.6
                   [0.25, 0.25, 0.5],  # correct, conf 0.5
                   [0.05, 0.9, 0.05]])  # correct, conf 0.9
LABELS = jnp.array([0, 2, 2, 1])


def test_nll_by_hand():
  want = -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.9)) / 4
  np.testing.assert_allclose(
      blrax.metrics.negative_log_likelihood(PROBS, LABELS), want, rtol=1e-6)


def test_accuracy_by_hand():
  np.testing.assert_allclose(blrax.metrics.accuracy(PROBS, LABELS), 0.75)


def test_brier_by_hand():
  rows = [(0.3**2 + 0.2**2 + 0.1**2), (0.1**2 + 0.6**2 + 0.7**2),
          (0.25**2 + 0.25**2 + 0.5**2), (0.05**2 + 0.1**2 + 0.05**2)]
  np.testing.assert_allclose(blrax.metrics.brier_score(PROBS, LABELS),
                             np.mean(rows), rtol=1e-6)


def test_ece_by_hand():
  # Two bins: (0, 0.5] holds row 3 (conf 0.5, correct);
  # (0.5, 1] holds rows 1, 2, 4 (conf 0.7, 0.6, 0.9; 2 of 3 correct).
  want = (1 / 4) * abs(1.0 - 0.5) + (3 / 4) * abs(2 / 3 - (0.7 + 0.6 + 0.9) / 3)
  np.testing.assert_allclose(
      blrax.metrics.expected_calibration_error(PROBS, LABELS, num_bins=2), want,
      rtol=1e-6)


def test_perfectly_calibrated_has_zero_ece():
  probs = jnp.array([[1.0, 0.0]] * 3)
  np.testing.assert_allclose(
      blrax.metrics.expected_calibration_error(probs, jnp.zeros(3, jnp.int32)), 0.0)


def test_bad_shapes():
  with pytest.raises(ValueError, match="labels.shape"):
    blrax.metrics.accuracy(PROBS, LABELS[:3])
  with pytest.raises(ValueError, match="num_bins=0"):
    blrax.metrics.expected_calibration_error(PROBS, LABELS, num_bins=0)


def test_reliability_diagram_bars_are_bin_accuracies():
  import matplotlib
  matplotlib.use("Agg")
  ax = blrax.metrics.reliability_diagram(PROBS, LABELS, num_bins=2, label="m")
  heights = sorted(round(p.get_height(), 6) for p in ax.patches)
  assert heights == [round(2 / 3, 6), 1.0]
  assert "ECE" in ax.get_legend().get_texts()[0].get_text()
