r"""The diagonal BLR engine and its parts: build a diagonal variant yourself.

Every diagonal optimizer of blrax (:func:`blrax.ivon`, :func:`blrax.von`,
:func:`blrax.vadam`, :func:`blrax.vogn`, :func:`blrax.bsam`) is
:func:`scale_by_blr` with one choice of each part:

- an **estimator** (:class:`Estimator`): the gradients at the draw to the
  mean gradient and a curvature target, :data:`PRICE`,
  :data:`PER_EXAMPLE_SQUARED`, :func:`squared_gradient`,
  :func:`gradient_magnitude`;
- a **precision update**: :func:`positive_ema` or :func:`ema`;
- a **step** (:class:`Step`): :func:`ivon_step`, :func:`newton_step`,
  :func:`adam_step`, :func:`vogn_step`;
- a **noise** generator (:mod:`blrax.noise`).

See docs/engine.md for the update in math and how to add a variant.
"""

from blrax._src.engine import estimators as _curvature
from blrax._src.engine.estimators import (
    Estimator,
    ema,
    gradient_magnitude,
    positive_ema,
    squared_gradient,
)
from blrax._src.engine.skeleton import scale_by_blr
from blrax._src.engine.steps import Step
from blrax._src.engine.steps import adam as adam_step
from blrax._src.engine.steps import ivon as ivon_step
from blrax._src.engine.steps import newton as newton_step
from blrax._src.engine.steps import vogn as vogn_step

PRICE = _curvature.PRICE
r"""The Price/Stein estimator of IVON and VON,
:math:`\hat h = \mathrm{mean}_s\,\hat g_s\epsilon_s/\sigma`, unbiased for
:math:`E_q[\mathrm{diag}\,\nabla^2\bar\ell]` under Gaussian noise."""

PER_EXAMPLE_SQUARED = _curvature.PER_EXAMPLE_SQUARED
r"""The estimator of VOGN, the mean squared per-example gradient
:math:`\mathrm{mean}_{s,i}\,g_{s,i}^2` (Gauss-Newton, empirical Fisher)."""

__all__ = (
    "Estimator",
    "PER_EXAMPLE_SQUARED",
    "PRICE",
    "Step",
    "adam_step",
    "ema",
    "gradient_magnitude",
    "ivon_step",
    "newton_step",
    "positive_ema",
    "scale_by_blr",
    "squared_gradient",
    "vogn_step",
)
