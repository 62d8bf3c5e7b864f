"""Prediction by Bayesian model averaging over a blrax posterior, and the
linearised (GLM) predictive."""

from blrax._src.evaluation.linearized import (
    linearized_log_probs,
    linearized_mean_variance,
    linearized_probs,
)
from blrax._src.evaluation.predictive import (
    predictive_log_probs,
    predictive_mean_variance,
    predictive_probs,
)

__all__ = (
    "linearized_log_probs",
    "linearized_mean_variance",
    "linearized_probs",
    "predictive_log_probs",
    "predictive_mean_variance",
    "predictive_probs",
)
