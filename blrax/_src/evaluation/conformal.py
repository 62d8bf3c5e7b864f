r"""Recalibration: temperature scaling and split-conformal prediction sets.

**Temperature scaling** (Guo et al., 2017) divides the logits (or the
log-probabilities of any predictive, e.g. a BMA: :math:`\log\mathrm{softmax}
(z/T) = \log\mathrm{softmax}(\log\mathrm{softmax}(z)/T)`) by one scalar
:math:`T > 0` fitted by minimising the NLL on held-out data. In
:math:`\beta = 1/T` the NLL
:math:`\ell(\beta) = \frac1n \sum_i [\mathrm{logsumexp}_c\,\beta z_{ic} -
\beta z_{iy_i}]` is convex (its second derivative is the mean variance of
:math:`z` under :math:`\mathrm{softmax}(\beta z)`), so its derivative
:math:`\ell'(\beta) = \frac1n\sum_i (E_{\mathrm{softmax}(\beta z_i)}[z_i] -
z_{iy_i})` is increasing, and :func:`fit_temperature` finds its root by
bisection in :math:`\log\beta`: jit-able, no step size.

**Split conformal prediction** turns any classifier into sets
:math:`C(x) \subseteq \{1..k\}` with :math:`P(Y \in C(X)) \ge 1 - \alpha`
for exchangeable calibration and test data, whatever the model. Adaptive
prediction sets (APS, Romano et al., 2020) score a label by the probability
mass of the classes ranked above it plus a uniform fraction :math:`U` of its
own:

.. math::

   s(x, y, U) = \sum_{c:\, o(c) < o(y)} \hat p_c + U \hat p_y
   + \lambda\,(o(y) - k_{\text{reg}})^+,

:math:`o(c) = 1, 2, \dots` the rank of class :math:`c` by decreasing
probability (ties by class index). :math:`\lambda = 0` is APS; RAPS
(Angelopoulos et al., 2021) adds the penalty to keep sets small. With
calibration scores :math:`s_1..s_n` the threshold is their
:math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest (:math:`+\infty` if that
exceeds :math:`n`), and :math:`C(x) = \{y : s(x, y, U) \le \hat q\}`.
Since :math:`Y \in C(X)` exactly when the test score is at most
:math:`\hat q`, exchangeability gives :math:`1 - \alpha \le P(Y \in C(X))`,
and with the randomised score (``randomized=True``: continuous :math:`U`, so
no ties a.s.) also :math:`P(Y \in C(X)) \le 1 - \alpha + 1/(n+1)`. The
deterministic version (:math:`U = 1`) keeps the lower bound only and gives
larger sets. Randomised sets may be empty (then :math:`U \hat p` of the top
class already exceeds :math:`\hat q`).

References:
  Guo et al., `On Calibration of Modern Neural Networks
  <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  Romano, Sesia & Candès, `Classification with Valid and Adaptive Coverage
  <https://arxiv.org/abs/2006.02544>`_, NeurIPS 2020.
  Angelopoulos, Bates, Malik & Jordan, `Uncertainty Sets for Image
  Classifiers using Conformal Prediction <https://arxiv.org/abs/2009.14193>`_,
  ICLR 2021.
  Vovk, Gammerman & Shafer, `Algorithmic Learning in a Random World`,
  Springer 2005.
"""

from __future__ import annotations

import fractions
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import validation
from blrax._src.evaluation import metrics
from blrax._src.evaluation.uncertainty import predictors
from blrax._src.evaluation.uncertainty.predictors import Predictor
from blrax._src.noise import generators as noise

_TypeError = validation.ArgumentTypeError

METHODS = ("aps", "raps")
"""Conformal scores of :func:`conformal_threshold`."""


def _logits(logits: Any) -> jax.Array:
  logits = metrics.as_array("logits", logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    if jnp.issubdtype(logits.dtype, jnp.integer):
      logits = logits.astype(jnp.float32)
    else:
      raise _TypeError(
          f"`logits` must hold real numbers, got logits.dtype={logits.dtype}.")
  if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
    raise ValueError(
        "`logits` must be (n, k) with n >= 1 and k >= 2 classes, got "
        f"logits.shape={logits.shape}.")
  if not validation.is_traced(logits):
    bad = jnp.isnan(logits) | (logits == jnp.inf)
    if bool(jnp.any(bad)):
      i = int(jnp.argmax(jnp.any(bad, axis=1)))
      raise ValueError(
          "`logits` must not hold NaN or +inf (-inf, a zero probability, is "
          f"fine); got logits[{i}]={metrics.show(logits[i])}.")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _labels_for(labels: Any, n: int, k: int) -> jax.Array:
  labels = metrics.as_array("labels", labels)
  if labels.dtype == jnp.bool_:
    labels = labels.astype(jnp.int32)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise _TypeError("`labels` must hold integer class indices, got "
                     f"labels.dtype={labels.dtype}.")
  if labels.shape != (n,):
    raise ValueError(f"`labels` must have shape ({n},), got "
                     f"labels.shape={labels.shape}.")
  if not validation.is_traced(labels):
    ok = (labels >= 0) & (labels < k)
    if not bool(jnp.all(ok)):
      i = int(jnp.argmin(ok))
      raise ValueError(f"`labels` must be in [0, {k}), got labels[{i}]="
                       f"{int(labels[i])}.")
  return labels


def _temperature(temperature: Any) -> None:
  validation.check_range("temperature", temperature, low=0.0, low_open=True)


def apply_temperature(logits: Any, temperature: Any) -> jax.Array:
  r""":math:`\log\mathrm{softmax}(z / T)` over the last axis.

  Args:
    logits: logits or log-probabilities, any shape with classes last.
    temperature: :math:`T > 0` (a scalar; traced values are not checked).

  Returns:
    Log-probabilities shaped like ``logits``.

  Raises:
    ValueError: a concrete temperature that is not a positive finite
      number.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import apply_temperature
    >>> jnp.exp(apply_temperature(jnp.log(jnp.array([0.8, 0.2])), 2.0))
    Array([0.6666667, 0.3333333], dtype=float32)
  """
  _temperature(temperature)
  return jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1)


def fit_temperature(logits: Any, labels: Any, *,
                    bounds: tuple[float, float] = (0.01, 100.0),
                    num_iterations: int = 60) -> jax.Array:
  r"""The temperature :math:`T` that minimises the NLL of
  :math:`\mathrm{softmax}(z/T)` on ``(logits, labels)``.

  Bisection on the increasing derivative :math:`\ell'(\beta)` of the convex
  NLL in :math:`\beta = 1/T` (module docstring), in :math:`\log\beta` over
  ``1 / bounds``: after ``num_iterations`` halvings the bracket is
  :math:`\log(T_{\max}/T_{\min}) / 2^{\text{iterations}}` wide. When the
  minimum lies outside the bounds the nearest bound is returned. Works under
  ``jax.jit``.

  When every example's label has the largest logit (ties included: a model
  that classifies all the held-out data right, common on small validation
  splits), the NLL keeps falling as :math:`T \to 0` and has no minimiser:
  the data cannot set :math:`T`, and the lower bound would make every later
  mistake cost :math:`\sim 1/T_{\min}` nats. Then :math:`T = 1` (no
  rescaling; clipped to ``bounds``) is returned, with a ``UserWarning``
  outside ``jit``.

  Args:
    logits: ``(n, k)`` logits, or log-probabilities of any predictive
      (shifts per row do not matter); ``-inf`` (zero probability) allowed.
    labels: integer labels ``(n,)`` in ``[0, k)``.
    bounds: ``(T_min, T_max)``, ``0 < T_min < T_max``.
    num_iterations: bisection steps, an int ``>= 1``.

  Returns:
    :math:`T`, a scalar array (NaN under ``jit`` for NaN or +inf logits or
    labels outside ``[0, k)``).

  Raises:
    ValueError: wrong shapes, NaN or +inf logits, labels outside
      ``[0, k)``, bad bounds or ``num_iterations`` (concrete values).
    TypeError: non-numeric logits, non-integer labels (also
      ``ValueError``).

  References:
    Guo et al., `On Calibration of Modern Neural Networks
    <https://arxiv.org/abs/1706.04599>`_, ICML 2017.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from blrax.uncertainty import fit_temperature
    >>> logits = jax.random.normal(jax.random.key(0), (500, 3))
    >>> labels = jax.random.categorical(jax.random.key(1), logits / 2.0)
    >>> t = fit_temperature(logits, labels)  # labels drawn at T = 2
    >>> 1.5 < float(t) < 2.7
    True
  """
  logits = _logits(logits)
  n, k = logits.shape
  labels = _labels_for(labels, n, k)
  try:
    low, high = (float(b) for b in bounds)
  except (TypeError, ValueError) as e:
    raise _TypeError("`bounds` must be two numbers (T_min, T_max), got "
                     f"bounds={bounds!r}.") from e
  if not (0 < low < high < math.inf):
    raise ValueError("`bounds` must satisfy 0 < T_min < T_max < inf, got "
                     f"bounds={bounds!r}.")
  num_iterations = validation.check_integer("num_iterations", num_iterations,
                                            low=1)
  temperature, separated = _fit(logits, labels, -math.log(high),
                                -math.log(low), num_iterations)
  if not validation.is_traced(separated) and bool(separated):
    t = float(temperature)
    warnings.warn(
        "fit_temperature: every example's label has the largest logit, so "
        "the NLL falls without bound as T -> 0 and these data cannot set T; "
        f"returning T = {t:g} ("
        + ("no rescaling" if t == 1.0 else "1 clipped to the bounds")
        + "). Fit it on a larger held-out set.", UserWarning, stacklevel=2)
  return temperature


def _separated(z: jax.Array, labels: jax.Array) -> jax.Array:
  """True when each row's label logit is (one of) its largest.

  Then the NLL's slope in 1/T is negative for every T (it tends to 0 from
  below), so there is no minimiser; one row whose label is below its maximum
  makes the slope's limit positive and the minimiser finite. ``z`` is shifted
  by each row's maximum, so a row of -inf logits (its label of probability
  0) is NaN and never counts as right.
  """
  z_label = jnp.take_along_axis(z, labels[:, None], 1)[:, 0]
  return jnp.all(z_label >= jnp.max(z, axis=1))


def _valid_labels(labels: jax.Array, k: int) -> jax.Array:
  """True when every label is in ``[0, k)`` (the jit-side check)."""
  return jnp.all((labels >= 0) & (labels < k))


@functools.partial(jax.jit, static_argnums=4)
def _fit(logits, labels, lo, hi, num_iterations):
  z = logits - jnp.max(logits, axis=1, keepdims=True)
  z_label = jnp.take_along_axis(z, labels[:, None], 1)[:, 0]

  def slope(log_beta):
    p = jax.nn.softmax(jnp.exp(log_beta) * z, axis=1)
    expected = jnp.sum(jnp.where(p > 0, p * z, 0.0), axis=1)
    return jnp.mean(expected - z_label)

  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    up = slope(mid) > 0  # Past the minimum: it lies below mid.
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  # Separated data: no minimiser (fit_temperature's docstring), so T = 1.
  unscaled = jnp.clip(1.0, jnp.exp(-hi), jnp.exp(-lo)).astype(z.dtype)
  lo, hi = jax.lax.fori_loop(0, num_iterations, halve,
                             (jnp.asarray(lo, z.dtype), jnp.asarray(hi, z.dtype)))
  separated = _separated(z, labels)
  fitted = jnp.where(separated, unscaled, jnp.exp(-0.5 * (lo + hi)))
  # Under jit the checks of fit_temperature cannot raise: NaN, not a bound.
  valid = (jnp.all(~jnp.isnan(logits) & (logits != jnp.inf))
           & _valid_labels(labels, logits.shape[1]))
  return metrics.nan_unless(valid, fitted), separated


def temperature_predictor(predictor: Any, temperature: Any) -> Predictor:
  r"""The predictive of ``predictor`` with its BMA log-probabilities divided
  by ``temperature``: one member, :math:`\log\mathrm{softmax}(\log\bar p /
  T)`.

  Temperature scaling acts on the predictive, not on each member, so the
  result has ``S = 1`` (its mutual information is 0).

  Args:
    predictor: a :class:`~blrax.uncertainty.Predictor` or a function
      ``inputs -> (S, n, k)`` of member log-probabilities.
    temperature: :math:`T > 0`, e.g. from :func:`fit_temperature`.

  Returns:
    A :class:`~blrax.uncertainty.Predictor` of log-probabilities
    ``(1, n, k)``.

  Raises:
    TypeError: a predictor that is not callable.
    ValueError: a concrete temperature that is not positive and finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import point_predictor, temperature_predictor
    >>> hot = temperature_predictor(point_predictor(lambda w, x: x @ w,
    ...                                             jnp.eye(2)), 100.0)
    >>> [round(float(p), 3) for p in jnp.exp(hot(jnp.array([[3.0, 0.0]])))[0, 0]]
    [0.507, 0.493]
  """
  inner = predictors.as_predictor(predictor)
  _temperature(temperature)
  fn = inner.fn

  def scaled(args, inputs):
    inner_args, t = args
    members = predictors.check_members(fn(inner_args, inputs))
    log_bma = (jax.nn.logsumexp(members, axis=0)
               - jnp.log(members.shape[0]))
    return jax.nn.log_softmax(log_bma / t, axis=-1)[None]

  return Predictor(scaled, (inner.args, jnp.asarray(temperature)))


# --------------------------------------------------------------------------
# Split conformal prediction.


def _probs(probs: Any) -> tuple[jax.Array, jax.Array]:
  shape = np.shape(probs)
  if len(shape) != 2:
    raise ValueError(f"`probs` must be (n, k), got probs.shape={shape}.")
  probs, _, valid = metrics.check_probs_labels(probs, np.zeros(shape[0], np.int32))
  return probs, valid


def _settings(method, randomized, key, lam, k_reg):
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got "
                     f"method={method!r}.")
  randomized = validation.check_flag("randomized", randomized)
  if method == "aps":
    if lam is not None or k_reg is not None:
      raise ValueError(
          "`lam` and `k_reg` set the RAPS penalty; pass method='raps' to "
          f"use them, got lam={lam!r}, k_reg={k_reg!r} with method='aps'.")
    lam, k_reg = 0.0, 0
  else:
    lam = 0.01 if lam is None else lam
    k_reg = 1 if k_reg is None else k_reg
    validation.check_nonnegative("lam", lam)
    k_reg = validation.check_integer("k_reg", k_reg, low=0)
  if randomized:
    if key is None:
      raise ValueError("`key` is required for randomized=True (the uniform "
                       "U of the score); pass randomized=False for the "
                       "deterministic, conservative sets.")
    key = noise.canonicalize_key(key)
  return randomized, key, lam, k_reg


@functools.partial(jax.jit, static_argnames=("randomized", "k_reg"))
def _scores(probs, randomized, key, lam, k_reg):
  """Score of every class: mass ranked above + U p + penalty, ``(n, k)``."""
  n, k = probs.shape
  order = jnp.argsort(-probs, axis=1, stable=True)
  ranked = jnp.take_along_axis(probs, order, axis=1)
  above = jnp.concatenate([jnp.zeros((n, 1), probs.dtype),
                           jnp.cumsum(ranked[:, :-1], axis=1)], axis=1)
  rank = jnp.argsort(order, axis=1)  # 0-based rank of each class.
  u = (jax.random.uniform(key, (n, 1), probs.dtype) if randomized
       else jnp.ones((n, 1), probs.dtype))
  penalty = lam * jnp.maximum(rank + 1 - k_reg, 0).astype(probs.dtype)
  return jnp.take_along_axis(above, rank, axis=1) + u * probs + penalty


def conformal_threshold(probs: Any, labels: Any, alpha: float, *,
                        method: str = "aps", randomized: bool = True,
                        key: Any = None, lam: float | None = None,
                        k_reg: int | None = None) -> jax.Array:
  r"""The split-conformal threshold :math:`\hat q` from a calibration set.

  :math:`\hat q` is the :math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest
  calibration score :math:`s(x_i, y_i, U_i)` (APS or RAPS, module
  docstring), or :math:`+\infty` when that rank exceeds :math:`n` (then every
  set is all classes). The rank is computed exactly from the decimal value
  of ``alpha`` (``0.1`` is 1/10).

  Args:
    probs: calibration class probabilities ``(n, k)`` (rows sum to 1; see
      :mod:`blrax.metrics`).
    labels: calibration labels ``(n,)`` in ``[0, k)``.
    alpha: miscoverage level, a number in ``(0, 1)``.
    method: ``"aps"`` or ``"raps"``.
    randomized: a bool; randomised scores (exact coverage, possibly empty
      sets) or ``U = 1`` (conservative).
    key: PRNG key of the calibration :math:`U_i` (required when
      ``randomized``); use a different key for :func:`conformal_sets`.
    lam: RAPS penalty :math:`\lambda \ge 0` (default 0.01); only with
      ``method="raps"``.
    k_reg: RAPS: ranks up to ``k_reg`` are not penalised, an int ``>= 0``
      (default 1); only with ``method="raps"``.

  Returns:
    :math:`\hat q`, a scalar array (NaN under ``jit`` for invalid
    probabilities or labels).

  Raises:
    ValueError: ``alpha`` outside ``(0, 1)``, an unknown ``method``, ``lam``
      or ``k_reg`` with APS, a missing ``key``, bad probabilities, labels or
      shapes (concrete values).

  References:
    Romano, Sesia & Candès, NeurIPS 2020; Angelopoulos et al., ICLR 2021
    (module docstring).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from blrax.uncertainty import conformal_sets, conformal_threshold
    >>> probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (200, 4)))
    >>> labels = jax.random.categorical(jax.random.key(1), jnp.log(probs))
    >>> q = conformal_threshold(probs[:100], labels[:100], 0.1,
    ...                         key=jax.random.key(2))
    >>> sets = conformal_sets(probs[100:], q, key=jax.random.key(3))
    >>> sets.shape, sets.dtype
    ((100, 4), dtype('bool'))
  """
  validation.check_range("alpha", alpha, low=0.0, high=1.0, low_open=True,
                         high_open=True)
  randomized, key, lam, k_reg = _settings(method, randomized, key, lam, k_reg)
  probs, valid = _probs(probs)
  n, k = probs.shape
  labels = _labels_for(labels, n, k)
  scores = _scores(probs, randomized, key, lam, k_reg)
  picked = jnp.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
  exact = fractions.Fraction(repr(float(alpha)))
  rank = math.ceil((n + 1) * (1 - exact))  # 1-based.
  if rank > n:
    q = jnp.asarray(jnp.inf, probs.dtype)
  else:
    q = jnp.sort(picked)[rank - 1]
  return metrics.nan_unless(valid & _valid_labels(labels, k), q)


def conformal_sets(probs: Any, threshold: Any, *, method: str = "aps",
                   randomized: bool = True, key: Any = None,
                   lam: float | None = None,
                   k_reg: int | None = None) -> jax.Array:
  r"""Prediction sets :math:`C(x) = \{y : s(x, y, U) \le \hat q\}`.

  Use the ``method``, ``randomized``, ``lam`` and ``k_reg`` given to
  :func:`conformal_threshold`, and a fresh ``key``. The coverage
  :math:`P(Y \in C(X)) \ge 1 - \alpha` holds on average over calibration
  and test draws; check it with ``sets[jnp.arange(n), labels].mean()``.

  Args:
    probs: class probabilities ``(n, k)``.
    threshold: :math:`\hat q` from :func:`conformal_threshold`.
    method: ``"aps"`` or ``"raps"``.
    randomized: a bool, as in :func:`conformal_threshold`.
    key: PRNG key of the test :math:`U` (required when ``randomized``).
    lam: RAPS penalty (``method="raps"`` only).
    k_reg: RAPS unpenalised ranks (``method="raps"`` only).

  Returns:
    A boolean mask ``(n, k)``: ``True`` for the classes in each set. Rows of
    invalid probabilities, and every row when a traced ``threshold`` is NaN
    (from invalid calibration data under ``jit``), are empty sets: check
    ``jnp.isnan(threshold)`` there.

  Raises:
    ValueError: as :func:`conformal_threshold`; a concrete NaN
      ``threshold`` (:func:`conformal_threshold` found invalid data).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import conformal_sets
    >>> probs = jnp.array([[0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
    >>> conformal_sets(probs, 0.85, randomized=False).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0]]
    >>> conformal_sets(probs, 0.95, randomized=False).astype(int).tolist()
    [[1, 1, 0], [1, 1, 0]]
  """
  randomized, key, lam, k_reg = _settings(method, randomized, key, lam, k_reg)
  probs, valid = _probs(probs)
  threshold = jnp.asarray(threshold)
  if threshold.shape != ():
    raise ValueError("`threshold` must be a scalar, got threshold.shape="
                     f"{threshold.shape}.")
  if not validation.is_traced(threshold) and bool(jnp.isnan(threshold)):
    raise ValueError(
        "`threshold` is NaN, got threshold=nan: conformal_threshold returns "
        "NaN under jit for invalid calibration probabilities or labels; "
        "check them (eagerly it raises naming the bad row).")
  scores = _scores(probs, randomized, key, lam, k_reg)
  return (scores <= threshold) & valid
