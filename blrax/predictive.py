"""Prediction by Bayesian model averaging over a blrax posterior."""

from blrax._src.predictive import (
    predictive_log_probs,
    predictive_mean_variance,
    predictive_probs,
)

__all__ = (
    "predictive_log_probs",
    "predictive_mean_variance",
    "predictive_probs",
)
