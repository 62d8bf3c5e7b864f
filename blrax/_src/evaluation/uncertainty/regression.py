"""Regression: the Gaussian predictive of a blrax posterior, its CRPS, and
the streamed report of a Gaussian predictive."""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import validation
from blrax._src.evaluation import prediction_inputs, predictive
from blrax._src.evaluation.uncertainty import host_metrics, predictors
from blrax._src.evaluation.uncertainty.predictors import Predictor
from blrax._src.evaluation.uncertainty.reports import format_reports

_TypeError = validation.ArgumentTypeError


def regression_predictor(apply_fn: Callable[[Any, Any], jax.Array], key: Any,
                         params: Any, opt_state: Any, num_samples: int = 32,
                         chunk_size: int | None = None,
                         noise_variance: Any = None,
                         mean_only: bool = False) -> Predictor:
  r"""The Gaussian predictive :math:`(\mu, \sigma^2)` of a regression model
  under a blrax posterior.

  Wraps :func:`blrax.predictive.predictive_mean_variance`: mean and
  variance over ``num_samples`` draws (law of total variance) plus
  ``noise_variance``; with ``mean_only`` the output at the mean with
  variance ``noise_variance``. Any function ``inputs -> (mean, variance)``
  is a regression predictor too (an ensemble, a heteroscedastic net).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    key: PRNG key of the draws (may be ``None`` with ``mean_only``).
    params: the posterior mean, or an NNX model (see
      :mod:`blrax.predictive`).
    opt_state: the state of a blrax optimizer.
    num_samples: posterior draws, an int ``>= 1``.
    chunk_size: draws evaluated together (a divisor of ``num_samples``).
    noise_variance: observation noise :math:`\sigma^2_{\text{noise}} \ge 0`.
      Left out, it is 0 with a ``UserWarning`` (the intervals would cover
      the model's uncertainty only, not the targets' noise); pass ``0.0``
      to mean it.
    mean_only: a bool: ignore the posterior.

  Returns:
    A :class:`Predictor` of ``(mean, variance)``, each shaped like the
    outputs.

  Raises:
    TypeError, ValueError: as
      :func:`blrax.predictive.predictive_mean_variance`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import blrax
    >>> from blrax.uncertainty import regression_predictor
    >>> w = jnp.ones(3)
    >>> state = blrax.ivon(0.1, ess=100).init(w)
    >>> mean, var = regression_predictor(lambda w, x: x @ w, 0, w, state,
    ...                                  num_samples=8,
    ...                                  noise_variance=0.1)(jnp.ones((5, 3)))
    >>> mean.shape, bool((var > 0.1).all())
    ((5,), True)
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, mean_only)
  noise, _ = prediction_inputs.check_noise_variance(
      prediction_inputs.default_noise_variance(noise_variance,
                                               "regression_predictor"))
  if not mean_only:
    prediction_inputs.check_draw_counts(num_samples, chunk_size)

  def fn(args, inputs):
    key, params, opt_state, noise = args
    return predictive.predictive_mean_variance(
        apply_fn, key, params, opt_state, inputs, num_samples, chunk_size,
        noise, mean_only)

  return Predictor(fn, (key, params, opt_state, noise))


def gaussian_crps(mean: Any, variance: Any, targets: Any) -> jax.Array:
  r"""CRPS of a Gaussian predictive, elementwise (closed form).

  .. math::

     \mathrm{CRPS}(\mathcal N(\mu, \sigma^2), y) = \sigma\Bigl[z\bigl(2\Phi(z)
     - 1\bigr) + 2\varphi(z) - \tfrac{1}{\sqrt\pi}\Bigr],
     \qquad z = \frac{y - \mu}{\sigma},

  :math:`= \int (F(t) - [t \ge y])^2\,dt` for the predictive CDF :math:`F`;
  in the units of :math:`y`, lower is better, :math:`|y - \mu|` as
  :math:`\sigma \to 0`.

  Args:
    mean: predictive means.
    variance: predictive variances, ``> 0`` (broadcasting with ``mean``).
    targets: observations, broadcasting with ``mean``.

  Returns:
    The CRPS of every element; NaN where the variance is not positive.

  References:
    Gneiting & Raftery, `Strictly Proper Scoring Rules, Prediction, and
    Estimation <https://doi.org/10.1198/016214506000001437>`_, JASA 2007,
    eq. (21).

  Examples:
    >>> from blrax.uncertainty import gaussian_crps
    >>> round(float(gaussian_crps(0.0, 1.0, 0.0)), 4)  # (2 - sqrt 2)/sqrt(2 pi)
    0.2337
  """
  mean, variance, targets = (jnp.asarray(x, jnp.result_type(x, jnp.float32))
                             for x in (mean, variance, targets))
  return _crps(mean, variance, targets)


@jax.jit
def _crps(mean, variance, targets):
  std = jnp.sqrt(jnp.where(variance > 0, variance, jnp.nan))
  z = (targets - mean) / std
  return std * (z * (2 * jax.scipy.special.ndtr(z) - 1)
                + 2 * jax.scipy.stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


def _check_levels(levels: Any) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in levels)
  except (TypeError, ValueError) as e:
    raise _TypeError(f"`levels` must be a sequence of numbers in (0, 1), got "
                     f"levels={levels!r}.") from e
  if not values or not all(0 < v < 1 for v in values):
    raise ValueError(f"`levels` must be a non-empty sequence of numbers in "
                     f"(0, 1), got levels={levels!r}.")
  return values


def _regression_stats(out, targets, levels):
  try:
    mean, variance = out
  except (TypeError, ValueError) as e:
    raise ValueError("a regression predictor must return (mean, variance), "
                     f"got {type(out).__name__}.") from e
  mean, variance, targets = (jnp.asarray(x) for x in (mean, variance, targets))
  if not (mean.shape == variance.shape == targets.shape):
    raise ValueError(
        "the predictor's mean and variance must have the shape of the "
        f"targets, got mean {mean.shape}, variance {variance.shape}, targets "
        f"{targets.shape}.")
  dtype = jnp.result_type(mean, variance, targets, jnp.float32)
  mean, variance, targets = (x.astype(dtype) for x in (mean, variance, targets))
  ok = (variance > 0) & jnp.isfinite(variance) & jnp.isfinite(mean)
  bad = jnp.sum(~ok, dtype=jnp.int32) + jnp.sum(~jnp.isfinite(targets),
                                                dtype=jnp.int32)
  variance = jnp.where(ok, variance, 1.0)
  error = targets - mean
  std = jnp.sqrt(variance)
  stats = {
      "n": jnp.asarray(mean.size, jnp.int32),
      "bad_rows": bad,
      "nll": jnp.sum(0.5 * (jnp.log(2 * jnp.pi * variance)
                            + jnp.square(error) / variance)),
      "squared_error": jnp.sum(jnp.square(error)),
      "crps": jnp.sum(gaussian_crps(mean, variance, targets)),
      "std": jnp.sum(std),
  }
  for i, level in enumerate(levels):
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    stats[f"covered_{i}"] = jnp.sum(jnp.abs(error) <= z * std,
                                    dtype=jnp.int32)
  return stats


@functools.partial(jax.jit, static_argnames=("fn", "levels"))
def _regression_batch(fn, args, inputs, targets, levels):
  return _regression_stats(fn(args, inputs), targets, levels)


@dataclasses.dataclass(frozen=True)
class RegressionReport:
  """What :func:`regression_report` measures; ``str()`` is a markdown table.

  Attributes:
    num_examples: scalar targets (all output elements of all batches).
    nll: mean Gaussian negative log-likelihood (nats).
    rmse: root mean squared error of the predictive mean.
    crps: mean CRPS (:func:`gaussian_crps`).
    mean_std: mean predictive standard deviation (sharpness).
    coverage: ``{level: fraction}``: targets inside the central interval
      :math:`\\mu \\pm \\Phi^{-1}(\\tfrac{1 + \\text{level}}{2})\\,\\sigma`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> r = uncertainty.regression_report(lambda x: (x, jnp.ones_like(x)),
    ...                                   [(jnp.zeros(2), jnp.zeros(2))])
    >>> r.rmse, r.coverage[0.5]
    (0.0, 1.0)
  """

  num_examples: int
  nll: float
  rmse: float
  crps: float
  mean_std: float
  coverage: dict = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, float]:
    """The scalars, flat; coverages as ``coverage_<level>``."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.repr}
    out.update({f"coverage_{level:g}": v for level, v in self.coverage.items()})
    return out

  def __str__(self) -> str:
    return format_reports({"model": self})


def regression_report(predictor: Any, batches: Iterable, *,
                      levels: Any = (0.5, 0.9, 0.95),
                      jit: bool = True) -> RegressionReport:
  r"""Report of a Gaussian predictive :math:`\mathcal N(\mu, \sigma^2)`,
  streamed over ``(inputs, targets)`` batches.

  Every output element is one scalar target. Gaussian NLL
  :math:`\frac12\log(2\pi\sigma^2) + \frac{(y-\mu)^2}{2\sigma^2}`, RMSE,
  CRPS (:func:`gaussian_crps`; Gneiting & Raftery, 2007), mean predictive
  std and the coverage of central intervals at each level (a calibrated
  predictive covers a fraction ``level``). A mixture predictive (an
  ensemble, posterior draws) enters by its first two moments, as
  :func:`regression_predictor` gives them.

  Args:
    predictor: a :class:`Predictor` or function ``inputs -> (mean,
      variance)``, each shaped like the targets.
    batches: an iterable of ``(inputs, targets)`` pairs.
    levels: central-interval levels, numbers in ``(0, 1)``.
    jit: jit-compile the per-batch statistics.

  Returns:
    A :class:`RegressionReport`.

  Raises:
    TypeError: a predictor that is not callable, non-numeric levels.
    ValueError: empty stream, levels outside ``(0, 1)``, shapes that differ,
      a variance that is not positive and finite or non-finite means or
      targets (naming the batch).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = lambda x: (x, jnp.ones_like(x))  # N(x, 1)
    >>> r = uncertainty.regression_report(
    ...     predictor, [(jnp.zeros(4), jnp.array([0.0, 1.0, -1.0, 2.0]))])
    >>> round(r.rmse, 4), r.coverage[0.9]
    (1.2247, 0.75)
  """
  predictor = predictors.as_predictor(predictor)
  levels = _check_levels(levels)
  jit = validation.check_flag("jit", jit)
  fn, args = predictor.fn, predictor.args

  def one(i, batch):
    try:
      inputs, targets = batch
    except (TypeError, ValueError) as e:
      raise ValueError(f"`batches` must yield (inputs, targets) pairs; batch "
                       f"{i} is {type(batch).__name__}.") from e
    targets = jnp.asarray(targets)
    if jit:
      return _regression_batch(fn, args, inputs, targets, levels)
    return _regression_stats(fn(args, inputs), targets, levels)

  total = host_metrics.StatsSum("batches")
  for i, batch in enumerate(batches):
    stats = total.add(i, one(i, batch))
    if int(stats["bad_rows"]):
      raise ValueError(
          f"`batches`: batch {i} has {int(stats['bad_rows'])} element(s) "
          "with a variance that is not positive and finite, or a non-finite "
          "mean or target.")
  if total.total is None or total.total["n"] == 0:
    raise ValueError("`batches` yielded no examples; it must yield at least "
                     "one non-empty batch.")
  t = total.total
  n = int(t["n"])
  return RegressionReport(
      num_examples=n, nll=float(t["nll"] / n),
      rmse=float(np.sqrt(t["squared_error"] / n)), crps=float(t["crps"] / n),
      mean_std=float(t["std"] / n),
      coverage={level: float(t[f"covered_{i}"] / n)
                for i, level in enumerate(levels)})
