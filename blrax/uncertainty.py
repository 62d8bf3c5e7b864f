"""Uncertainty of predictive distributions: one streamed report (calibration,
entropy split, selective prediction, OOD detection, regression), temperature
scaling and split-conformal prediction sets."""

from blrax._src.evaluation.conformal import (
    apply_temperature,
    conformal_sets,
    conformal_threshold,
    fit_temperature,
    temperature_predictor,
)
from blrax._src.evaluation.linearized import linearized_predictor
from blrax._src.evaluation.uncertainty import (
    SCORES,
    Detection,
    OODReport,
    Predictor,
    RegressionReport,
    ReliabilityBins,
    UncertaintyReport,
    ensemble_predictor,
    entropy_decomposition,
    format_reports,
    gaussian_crps,
    plot_report,
    point_predictor,
    posterior_predictor,
    regression_predictor,
    regression_report,
    report,
)

__all__ = (
    "SCORES",
    "Detection",
    "OODReport",
    "Predictor",
    "RegressionReport",
    "ReliabilityBins",
    "UncertaintyReport",
    "apply_temperature",
    "conformal_sets",
    "conformal_threshold",
    "ensemble_predictor",
    "entropy_decomposition",
    "fit_temperature",
    "format_reports",
    "gaussian_crps",
    "linearized_predictor",
    "plot_report",
    "point_predictor",
    "posterior_predictor",
    "regression_predictor",
    "regression_report",
    "report",
    "temperature_predictor",
)
