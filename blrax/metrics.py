"""Metrics of predictive distributions: NLL, accuracy, Brier score, ECE
(equal-width, equal-mass, classwise) and MCE."""

from blrax._src.evaluation.metrics import (
    accuracy,
    brier_score,
    calibration_bins,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
)

__all__ = (
    "accuracy",
    "brier_score",
    "calibration_bins",
    "classwise_calibration_error",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
)
