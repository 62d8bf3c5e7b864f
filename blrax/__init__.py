"""blrax: variational-learning optimizers from the Bayesian Learning Rule.

Each optimizer is an ``optax.GradientTransformationExtraArgs`` whose state holds
a Gaussian posterior over the params: the params are its mean, the state its
precision and the PRNG key of the weight noise.
"""

from blrax._src import expfam
from blrax._src.full_gaussian import FullGaussian
from blrax._src.gaussian import DiagonalGaussian
from blrax._src.ivon import ScaleByIVONState, ivon, scale_by_ivon
from blrax._src.lookup import (
    find_posteriors,
    posterior_stddev,
    sample_params,
    sample_posterior,
)
from blrax._src.metrics import (
    accuracy,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    negative_log_likelihood,
)
from blrax._src.vadam import ScaleByVadamState, scale_by_vadam, vadam
from blrax._src.vogn import ScaleByVOGNState, per_example_grads, scale_by_vogn, vogn
from blrax._src.von import ScaleByVONState, scale_by_von, von

__version__ = "0.1.0"

__all__ = (
    "DiagonalGaussian",
    "FullGaussian",
    "ScaleByVONState",
    "ScaleByVOGNState",
    "ScaleByVadamState",
    "ScaleByIVONState",
    "accuracy",
    "expfam",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "negative_log_likelihood",
    "per_example_grads",
    "find_posteriors",
    "ivon",
    "posterior_stddev",
    "sample_params",
    "sample_posterior",
    "scale_by_ivon",
    "scale_by_vadam",
    "scale_by_vogn",
    "scale_by_von",
    "vadam",
    "vogn",
    "von",
)
