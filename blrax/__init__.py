"""blrax: variational-learning optimizers from the Bayesian Learning Rule.

Each optimizer is an ``optax.GradientTransformationExtraArgs`` whose state holds
a Gaussian posterior over the params: the params are its mean, the state its
precision and the PRNG key of the weight noise.

Top level: the optimizers (and their ``scale_by_*`` transforms), the posterior
functions and the posterior types. Topical modules: ``blrax.noise`` (weight
noise generators), ``blrax.predictive`` (model averaging), ``blrax.metrics``,
``blrax.uncertainty`` (a streaming uncertainty report, temperature scaling,
conformal sets),
``blrax.expfam`` (exponential families, Bayes' rule as natural gradients),
``blrax.flax`` (NNX/Linen helpers; the ``flax`` extra) and
``blrax.checkpoint`` (orbax; the ``checkpoint`` extra).
"""

import importlib as _importlib
import warnings as _warnings

from blrax import engine, expfam, metrics, noise, predictive, uncertainty
from blrax._src.engine.skeleton import ScaleByBLRState
from blrax._src.evaluation.calibration import Calibration, calibrate_posterior, tempered
from blrax._src.functions.diagnostics import export_posterior, posterior_summary
from blrax._src.functions.gradients import check_gradients, value_and_grad
from blrax._src.functions.health import PosteriorHealth, posterior_health
from blrax._src.functions.lookup import (
  find_posteriors,
  posterior_stddev,
  sample_params,
  sample_posterior,
)
from blrax._src.functions.merging import merge_posteriors, posterior_as_prior
from blrax._src.functions.squared_grads import value_grads_and_squares
from blrax._src.optimizers.bsam import (
  ScaleByBSAMState,
  bsam,
  bsam_adversarial_params,
  scale_by_bsam,
)
from blrax._src.optimizers.evon import ScaleByEVONState, evon, scale_by_evon
from blrax._src.optimizers.ivon import ivon, scale_by_ivon
from blrax._src.optimizers.vadam import scale_by_vadam, vadam
from blrax._src.optimizers.vogn import per_example_grads, scale_by_vogn, vogn
from blrax._src.optimizers.von import (
  ScaleByFullVONState,
  scale_by_full_von,
  scale_by_von,
  von,
)
from blrax._src.posteriors.diagonal import DiagonalGaussian
from blrax._src.posteriors.eigenbasis import EigenbasisGaussian
from blrax._src.posteriors.full import FullGaussian
from blrax._src.wrappers.accumulation import MultiSteps, MultiStepsState
from blrax._src.wrappers.ensembles import ensemble_init, fold_in_keys
from blrax._src.wrappers.finite import apply_if_finite

__version__ = "0.3.0.dev0"

__all__ = (
    "DiagonalGaussian",
    "EigenbasisGaussian",
    "FullGaussian",
    "MultiSteps",
    "MultiStepsState",
    "PosteriorHealth",
    "ScaleByBLRState",
    "ScaleByEVONState",
    "ScaleByBSAMState",
    "ScaleByFullVONState",
    "Calibration",
    "apply_if_finite",
    "calibrate_posterior",
    "check_gradients",
    "ensemble_init",
    "engine",
    "evon",
    "bsam",
    "bsam_adversarial_params",
    "expfam",
    "export_posterior",
    "find_posteriors",
    "fold_in_keys",
    "ivon",
    "merge_posteriors",
    "metrics",
    "noise",
    "per_example_grads",
    "posterior_as_prior",
    "posterior_health",
    "posterior_stddev",
    "posterior_summary",
    "predictive",
    "sample_params",
    "sample_posterior",
    "tempered",
    "scale_by_evon",
    "scale_by_bsam",
    "scale_by_full_von",
    "scale_by_ivon",
    "scale_by_vadam",
    "scale_by_vogn",
    "scale_by_von",
    "uncertainty",
    "vadam",
    "value_and_grad",
    "value_grads_and_squares",
    "vogn",
    "von",
)

# The metrics that lived at the top level in 0.1 (later ones never did).
_METRICS_01 = ("accuracy", "brier_score", "calibration_bins",
               "expected_calibration_error", "negative_log_likelihood",
               "reliability_diagram")

# Names that moved to a topical module in 0.2: still importable from the top
# level for now, with a DeprecationWarning naming the new home.
_MOVED = {
    **dict.fromkeys(_METRICS_01, "blrax.metrics"),
    # The predictive functions of 0.1 (later ones never lived here).
    **dict.fromkeys(("predictive_log_probs", "predictive_mean_variance",
                     "predictive_probs"), "blrax.predictive"),
    **dict.fromkeys(("nnx_sample", "nnx_value_and_grad",
                     "VariationalTrainState"), "blrax.flax"),
    **dict.fromkeys(("save_checkpoint", "restore_checkpoint"),
                    "blrax.checkpoint"),
}
# Names that moved in 0.3, so that each public name has one home.
_MOVED_03 = {"flip_noise": "blrax.noise", "scale_by_blr": "blrax.engine"}
_MOVED.update(_MOVED_03)

# The diagonal optimizers share one state type; their 0.2 aliases are
# deprecated in favour of it.
_RENAMED = dict.fromkeys(("ScaleByIVONState", "ScaleByVONState",
                          "ScaleByVadamState", "ScaleByVOGNState"),
                         "ScaleByBLRState")


def __getattr__(name):
  if name in _MOVED:
    home = _MOVED[name]
    _warnings.warn(f"blrax.{name} moved to {home}.{name}; the old name will be "
                   "removed in a future release.", DeprecationWarning,
                   stacklevel=2)
    return getattr(_importlib.import_module(home), name)
  if name in _RENAMED:
    new = _RENAMED[name]
    _warnings.warn(f"blrax.{name} is blrax.{new} (every diagonal optimizer's "
                   "state); the old name will be removed in a future release.",
                   DeprecationWarning, stacklevel=2)
    return globals()[new]
  if name in ("flax", "checkpoint"):
    return _importlib.import_module(f"blrax.{name}")
  raise AttributeError(f"module 'blrax' has no attribute {name!r}")
