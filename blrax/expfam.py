"""Exponential families and the natural-gradient BLR step (Bayes' rule as
addition of natural gradients). See ``blrax/_src/expfam.py``."""

from blrax._src.expfam import (
    ExponentialFamily,
    beta,
    blr_step,
    diagonal_gaussian,
    dirichlet,
    gamma,
    gaussian,
    natural_gradient,
)

__all__ = (
    "ExponentialFamily",
    "beta",
    "blr_step",
    "diagonal_gaussian",
    "dirichlet",
    "gamma",
    "gaussian",
    "natural_gradient",
)
