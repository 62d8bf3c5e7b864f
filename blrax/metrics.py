"""Metrics of predictive distributions: NLL, accuracy, ECE, Brier score."""

from blrax._src.metrics import (
    accuracy,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
)

__all__ = (
    "accuracy",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
)
