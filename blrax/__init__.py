"""blrax: variational-learning optimizers from the Bayesian Learning Rule.

Each optimizer is an ``optax.GradientTransformationExtraArgs`` whose state holds
a Gaussian posterior over the params: the params are its mean, the state its
precision and the PRNG key of the weight noise.
"""

from blrax._src import expfam
from blrax._src.diagnostics import (
    export_posterior,
    posterior_summary,
    restore_checkpoint,
    save_checkpoint,
)
from blrax._src.fast_noise import flip_noise
from blrax._src.flax_integration import (
    VariationalTrainState,
    nnx_sample,
    nnx_value_and_grad,
)
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
    reliability_diagram,
)
from blrax._src.predictive import (
    predictive_log_probs,
    predictive_mean_variance,
    predictive_probs,
)
from blrax._src.vadam import ScaleByVadamState, scale_by_vadam, vadam
from blrax._src.vogn import ScaleByVOGNState, per_example_grads, scale_by_vogn, vogn
from blrax._src.von import ScaleByVONState, scale_by_von, von

__version__ = "0.1.0"

__all__ = (
    "DiagonalGaussian",
    "FullGaussian",
    "ScaleByIVONState",
    "ScaleByVadamState",
    "ScaleByVOGNState",
    "ScaleByVONState",
    "VariationalTrainState",
    "accuracy",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "expfam",
    "export_posterior",
    "find_posteriors",
    "flip_noise",
    "ivon",
    "negative_log_likelihood",
    "nnx_sample",
    "nnx_value_and_grad",
    "per_example_grads",
    "posterior_stddev",
    "posterior_summary",
    "predictive_log_probs",
    "predictive_mean_variance",
    "predictive_probs",
    "reliability_diagram",
    "restore_checkpoint",
    "sample_params",
    "sample_posterior",
    "save_checkpoint",
    "scale_by_ivon",
    "scale_by_vadam",
    "scale_by_vogn",
    "scale_by_von",
    "vadam",
    "vogn",
    "von",
)
