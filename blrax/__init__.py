"""blrax: variational-learning optimizers from the Bayesian Learning Rule.

Each optimizer is an ``optax.GradientTransformationExtraArgs`` whose state holds
a Gaussian posterior over the params: the params are its mean, the state its
precision and the PRNG key of the weight noise.
"""

from blrax._src.gaussian import DiagonalGaussian
from blrax._src.ivon import ScaleByIVONState, ivon, scale_by_ivon
from blrax._src.metrics import (
    accuracy,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    negative_log_likelihood,
)
from blrax._src.lookup import (
    find_posteriors,
    posterior_stddev,
    sample_params,
    sample_posterior,
)

__version__ = "0.1.0"

__all__ = (
    "DiagonalGaussian",
    "ScaleByIVONState",
    "accuracy",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "negative_log_likelihood",
    "find_posteriors",
    "ivon",
    "posterior_stddev",
    "sample_params",
    "sample_posterior",
    "scale_by_ivon",
)
