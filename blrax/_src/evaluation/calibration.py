r"""Post-hoc calibration of the posterior: its temperature and prior precision.

A trained posterior :math:`q = N(m, \Sigma)` with :math:`\Sigma^{-1} =
\lambda(H + \delta)` (``ess`` :math:`\lambda`, curvature :math:`H`, prior
precision per example :math:`\delta`) is tempered by :math:`\tau \ge 0`:

.. math::

  q_\tau = N(m, \tau\Sigma), \qquad\text{i.e.}\quad \lambda \to \lambda/\tau,

and optionally its prior precision is rescaled, :math:`\delta \to \kappa\delta`.
:func:`calibrate_posterior` picks :math:`(\tau, \kappa)` that minimise the
model-averaged negative log-likelihood on held-out batches,

.. math::

  \mathrm{NLL}(\tau, \kappa) = -\frac1N \sum_{n} \log \frac1S \sum_{s=1}^S
    p(y_n \mid x_n, m + \sqrt{\tau}\,\Sigma_\kappa^{1/2}\epsilon_s),

with the same draws :math:`\epsilon_s` for every candidate (common random
numbers, so the objective is a smooth function of :math:`\tau` and one
candidate's advantage is not sampling noise). :math:`\tau = 0` is always a
candidate and is the posterior mean itself, so on the calibration data the
calibrated model average is never worse than the mean. No retraining: the
mean and curvature are unchanged; the returned state holds
:math:`\lambda/\tau` (and :math:`\kappa\delta`), which every posterior
function (sampling, stddev, the predictive functions, the uncertainty report)
reads. :math:`\tau < 1` is a *cold* posterior, the usual outcome for networks
trained with ``ess`` = data size (Wenzel et al., 2020).

The search is a log-spaced grid over :math:`\tau` (times the grid over
:math:`\kappa` when asked), each point one jit-compiled pass over the
batches, followed by a finer grid between the best point's neighbours.

A few hundred held-out examples measure these NLLs only to within a
standard error, and the minimum over a grid is biased low: a temperature
that wins on the calibration data by less than its noise may lose on new
data. ``selection="one_se"`` follows the **one-standard-error rule**
(Hastie et al., 2009, §7.10) instead: the smallest :math:`\tau` (the mean
first) whose NLL is within one standard error of the minimum, the standard
error of the per-example difference to the minimum (paired, so the common
draws cancel):

.. math::

  \tau^\star = \min\{\tau : \mathrm{NLL}(\tau) \le \mathrm{NLL}(\tau_{\min})
    + \mathrm{sd}_n(\ell_n(\tau_{\min}) - \ell_n(\tau))/\sqrt N,\
    \mathrm{NLL}(\tau) \le \mathrm{NLL}(0)\},

with :math:`\ell_n` the per-example log model average: the posterior is
used only where the calibration data show that it helps. It is the safer
choice; the default, ``"minimum"``, is the better one on average: over the
posterior benchmark's 6 classification tasks it gave the lower test NLL on 4
(``docs/posterior.md``).

References:
  Wenzel et al., `How Good is the Bayes Posterior in Deep Neural Networks
  Really? <https://arxiv.org/abs/2002.02405>`_, ICML 2020.
  Guo et al., `On Calibration of Modern Neural Networks
  <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  Immer, Korzepa & Bauer, `Improving predictions of Bayesian neural nets via
  local linearization <https://arxiv.org/abs/2008.08400>`_, AISTATS 2021.
  Hastie, Tibshirani & Friedman, `The Elements of Statistical Learning
  <https://hastie.su.domains/ElemStatLearn/>`_, 2nd ed., 2009, §7.10.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import base, validation
from blrax._src.evaluation import prediction_inputs
from blrax._src.functions import lookup
from blrax._src.noise import generators as noise


class Calibration(NamedTuple):
  """The result of :func:`calibrate_posterior`.

  Attributes:
    opt_state: the optimizer state with the calibrated posterior (``ess``
      divided by ``temperature``, ``weight_decay`` times ``prior_scale``); a
      pure optax state (an ``nnx.Optimizer`` given in comes back as its
      ``opt_state``).
    temperature: :math:`\\tau`; 0 means the posterior mean predicts best.
    prior_scale: :math:`\\kappa` (1.0 unless ``prior_scales`` were searched).
    nll: the calibration batches' model-averaged NLL at the chosen point
      (with ``selection="one_se"`` up to one standard error above the
      smallest NLL evaluated, never above ``mean_nll``).
    mean_nll: their NLL at the posterior mean (:math:`\\tau = 0`).
    uncalibrated_nll: their NLL of the posterior as trained
      (:math:`\\tau = \\kappa = 1`).
    temperatures: every :math:`\\tau` evaluated, in order of evaluation.
    prior_scales: the :math:`\\kappa` of each evaluation.
    nlls: the NLL of each evaluation.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.array([[3.0, -3.0]])}
    >>> state = blrax.ivon(0.1, ess=1.0, weight_decay=0.0).init(params)
    >>> x, y = jnp.ones((32, 1)), jnp.zeros(32, jnp.int32)
    >>> result = blrax.calibrate_posterior(lambda p, x: x @ p["w"], params,
    ...                                    state, [(x, y)])
    >>> result.temperature  # the mean is right on every example: no noise
    0.0
  """

  opt_state: Any
  temperature: float
  prior_scale: float
  nll: float
  mean_nll: float
  uncalibrated_nll: float
  temperatures: np.ndarray
  prior_scales: np.ndarray
  nlls: np.ndarray


def _is_posterior(x: Any) -> bool:
  return base.is_posterior(x)


def tempered(opt_state: Any, temperature: Any,
             prior_scale: Any = 1.0) -> Any:
  r"""``opt_state`` with every posterior tempered: :math:`\lambda \to
  \lambda/\tau`, :math:`\delta \to \kappa\delta`.

  The stddev scales by :math:`\sqrt\tau` (at :math:`\kappa = 1`); ``temperature
  = 0`` gives ``ess = inf``, a point mass at the mean. Works under ``jit``
  (``temperature`` may be traced).

  Args:
    opt_state: the state of a blrax optimizer, possibly wrapped (or an
      ``nnx.Optimizer``; its pure ``opt_state`` comes back).
    temperature: :math:`\tau \ge 0`.
    prior_scale: :math:`\kappa > 0`, multiplies the prior precision.

  Returns:
    The state with the same structure, shapes and dtypes.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.ivon(0.1, ess=100.0, weight_decay=0.0).init(jnp.zeros(2))
    >>> print(blrax.posterior_stddev(state))
    [0.1 0.1]
    >>> print(blrax.posterior_stddev(blrax.tempered(state, 4.0)))
    [0.2 0.2]
  """
  validation.check_nonnegative("temperature", temperature)
  validation.check_positive("prior_scale", prior_scale)
  opt_state = _pure_state(opt_state)

  def temper(x):
    if not _is_posterior(x):
      return x
    _check_tempered_state(x, temperature, prior_scale)
    ess = x.ess / jnp.asarray(temperature, x.ess.dtype)
    decay = jax.tree.map(
        lambda d: (d * jnp.asarray(prior_scale, d.dtype)).astype(d.dtype),
        x.weight_decay)
    return x._replace(ess=ess.astype(x.ess.dtype), weight_decay=decay)

  return jax.tree.map(temper, opt_state, is_leaf=_is_posterior)


def _check_tempered_state(posterior: Any, temperature: Any,
                          prior_scale: Any) -> None:
  """The tempered ``ess`` and weight decay within the range every factory
  accepts (where all are concrete): the state's guarantees hold for it."""
  tau = validation.concrete_float(temperature)
  kappa = validation.concrete_float(prior_scale)
  ess = validation.concrete_float(posterior.ess)
  if tau is not None and ess is not None and tau > 0 and math.isfinite(ess):
    new = ess / tau
    if not validation.STATE_TINY <= new <= validation.STATE_LIMIT:
      raise ValueError(
          f"`temperature` takes ess = {ess:.3g} to {new:.3g}, outside "
          f"[{validation.STATE_TINY:.3g}, {validation.STATE_LIMIT:.3g}] "
          f"(the float32 state's range), got temperature={temperature!r}.")
  decays = [np.asarray(d) for d in jax.tree.leaves(posterior.weight_decay)
            if not validation.is_traced(d) and np.size(d)]
  if kappa is not None and decays:
    largest = max(float(np.max(d)) for d in decays) * kappa
    if largest > validation.STATE_LIMIT:
      raise ValueError(
          f"`prior_scale` takes the largest weight_decay to {largest:.3g}, "
          f"above {validation.STATE_LIMIT:.3g} (the float32 state's range), "
          f"got prior_scale={prior_scale!r}.")


def _check_targets(outputs: tuple, targets: tuple, likelihood: str) -> None:
  """Targets shaped for apply_fn's outputs: (n, ...) labels for (n, ..., k)
  logits; for a Gaussian, n rows of as many values as the outputs."""
  if likelihood == "categorical":
    want, what = outputs[:-1], "integer labels"
    fits = targets == want
  else:
    want, what = outputs, "targets"  # reshaped to the outputs' shape
    fits = (math.prod(targets) == math.prod(outputs)
            and targets[:1] == outputs[:1])
  if not fits:
    raise ValueError(
        f"likelihood={likelihood!r} needs {what} of shape {want} for "
        f"apply_fn's outputs of shape {outputs}, got targets of shape "
        f"{targets}.")
  if not outputs or outputs[0] == 0:
    raise ValueError(f"a batch has no rows: apply_fn's outputs have shape "
                     f"{outputs}.")


def _pure_state(opt_state: Any) -> Any:
  """The optax state inside an ``nnx.Optimizer`` (else ``opt_state``)."""
  _, _, pure = prediction_inputs.functional(None, None, opt_state)
  return pure


def _check_nonnegative(name: str, value: Any, positive: bool = False) -> None:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"`{name}` must be a number, got {name}={value!r}.") from None
  if not math.isfinite(number) or number < 0 or (positive and number == 0):
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"`{name}` must be finite and {bound}, got "
                     f"{name}={value!r}.")


def _grid(name: str, values: Any, positive: bool) -> np.ndarray:
  array = np.asarray(values, np.float64).ravel()
  if array.size == 0:
    raise ValueError(f"`{name}` must hold at least one value, got {name}="
                     f"{values!r}.")
  for v in array:
    _check_nonnegative(name, float(v), positive=positive)
  return array


def _categorical_log_p(outputs, targets, noise_variance):
  """Per-example log-likelihood of integer labels under softmax(outputs)."""
  del noise_variance
  log_probs = jax.nn.log_softmax(outputs, axis=-1)
  return jnp.take_along_axis(
      log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _gaussian_log_p(outputs, targets, noise_variance):
  """Per-example Gaussian log-likelihood, summed over the output dims."""
  var = jnp.asarray(noise_variance, outputs.dtype)
  per = -0.5 * (jnp.square(outputs - targets.reshape(outputs.shape)) / var
                + jnp.log(2 * jnp.pi * var))
  return per.reshape(per.shape[0], -1).sum(-1)


_LIKELIHOODS = {"categorical": _categorical_log_p, "gaussian": _gaussian_log_p}


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


@functools.partial(jax.jit, static_argnames=("apply_fn", "log_p",
                                             "num_samples", "linearized"))
def _batch_log_likelihood(params, opt_state, taus, kappa, inputs, targets,
                          noise_variance, key, *, apply_fn, log_p,
                          num_samples, linearized):
  """Per-example log model average for each tau: (taus, batch)."""
  # One set of draws at tau = 1; tau scales their offsets (exactly the
  # draws of the tempered posterior with the same key).
  draws = lookup.sample_posterior(key, params, tempered(opt_state, 1.0, kappa),
                                  num_samples)
  if linearized:
    # f(m) + sqrt(tau) J (theta - m): one linearisation, one JVP per draw.
    at_mean, jvp = jax.linearize(lambda p: apply_fn(p, inputs), params)

    def one_linear_draw(draw):
      tangent = jax.tree.map(
          lambda p, d: (d - p).astype(p.dtype) if _is_float(p) else np.zeros(
              jnp.shape(p), jax.dtypes.float0), params, draw)
      change = jvp(tangent)
      return jax.vmap(lambda tau: log_p(
          at_mean + jnp.sqrt(tau).astype(change.dtype) * change, targets,
          noise_variance))(taus)

    per_draw = jax.lax.map(one_linear_draw, draws)
    total = jax.nn.logsumexp(per_draw, axis=0) - jnp.log(num_samples)
    return total, _bad_labels(log_p, at_mean, targets)

  def one_draw(draw):
    def at(tau):
      theta = jax.tree.map(
          lambda p, d: (p + jnp.sqrt(tau).astype(d.dtype) * (d - p)).astype(
              p.dtype) if jnp.issubdtype(jnp.asarray(p).dtype, jnp.inexact)
          else p, params, draw)
      return log_p(apply_fn(theta, inputs), targets, noise_variance)
    return jax.vmap(at)(taus)

  per_draw = jax.lax.map(one_draw, draws)  # (S, taus, batch)
  total = jax.nn.logsumexp(per_draw, axis=0) - jnp.log(num_samples)
  return total, _bad_labels(log_p, apply_fn(params, inputs), targets)


def _bad_labels(log_p, outputs, targets):
  """Whether a categorical label lies outside ``[0, classes)``."""
  if log_p is not _categorical_log_p:
    return jnp.zeros([], bool)
  return jnp.any((targets < 0) | (targets >= outputs.shape[-1]))


def calibrate_posterior(
    apply_fn: Callable[[Any, Any], jax.Array] | None,
    params: Any,
    opt_state: Any,
    batches: Iterable[tuple[Any, Any]],
    *,
    key: Any = 0,
    num_samples: int = 32,
    temperatures: Any = None,
    prior_scales: Any = (1.0,),
    likelihood: str = "categorical",
    noise_variance: Any = None,
    refine: bool = True,
    linearized: bool = False,
    selection: str = "minimum",
) -> Calibration:
  r"""Fits the posterior's temperature (and prior precision) on held-out data.

  Minimises the model-averaged NLL of ``batches`` over :math:`\tau` (and
  :math:`\kappa`), or, with ``selection="one_se"``, takes the smallest
  :math:`\tau` within one standard error of the minimum; see the module
  docstring for the objective and the rule. :math:`\tau=0` (the mean) is
  always evaluated, so ``result.nll <= result.mean_nll``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` (logits for
      ``"categorical"``, predicted means for ``"gaussian"``); for an NNX model,
      ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    params: the posterior mean: a params pytree or an ``nnx.Module``.
    opt_state: the trained blrax state (possibly wrapped) or the
      ``nnx.Optimizer``.
    batches: an iterable of ``(inputs, targets)`` held out from training
      (integer labels for ``"categorical"``); read once and kept as a list.
      All batches should have one shape (each new shape compiles once).
    key: PRNG key or int seed of the draws, shared by every candidate.
    num_samples: posterior draws :math:`S` per candidate.
    temperatures: the :math:`\tau` grid (values ``>= 0``); default 0 and 25
      log-spaced values from 1e-4 to 10. A :math:`\tau > 0` below
      ``ess``/4.6e18 (the largest finite ``ess`` of the state's posteriors;
      only a huge ``ess`` makes it matter) would take ``ess`` past the
      float32 state's range: it is evaluated, and reported in
      ``temperature`` and ``temperatures``, as ``ess``/4.6e18 instead.
    prior_scales: the :math:`\kappa` grid (values ``> 0``); default ``(1.0,)``
      (the prior as trained). E.g. ``np.logspace(-2, 2, 5)`` fits it too.
    likelihood: ``"categorical"`` (softmax over the last axis) or
      ``"gaussian"`` (requires ``noise_variance``).
    noise_variance: the observation noise variance for ``"gaussian"``.
    refine: after the grid, evaluate 8 more :math:`\tau` log-spaced between
      the best grid point's neighbours.
    linearized: fit the temperature of the linearised predictive
      (:func:`blrax.predictive.linearized_log_probs`) instead: each draw's
      outputs are :math:`f(x; m) + \sqrt\tau J(\theta - m)`, with one
      linearisation per batch and one JVP per draw (``apply_fn`` must return
      an array).
    selection: ``"minimum"`` (default): the smallest NLL evaluated;
      ``"one_se"``: the smallest :math:`\tau` within one standard error of
      it (the module docstring).

  Returns:
    A :class:`Calibration` with the calibrated ``opt_state``.

  Raises:
    ValueError: a bad grid value, likelihood, ``selection``,
      ``num_samples``, no batches, a batch that is not an ``(inputs,
      targets)`` pair, non-integer or out-of-range labels for
      ``"categorical"``, a mean whose NLL is not finite, or a state without a
      blrax posterior.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> params = {"w": jnp.array([[2.0, -2.0]])}
    >>> state = blrax.ivon(0.1, ess=1.0, weight_decay=0.0).init(params)
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> x = jnp.ones((64, 1)); y = jnp.zeros(64, jnp.int32)
    >>> result = blrax.calibrate_posterior(apply_fn, params, state, [(x, y)])
    >>> result.nll <= result.mean_nll
    True
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                      opt_state)
  prediction_inputs.check_apply_fn(apply_fn)
  posteriors = lookup.find_posteriors(opt_state)  # Raises if there is none.
  num_samples = validation.check_integer("num_samples", num_samples, low=1)
  if likelihood == "gaussian":
    if noise_variance is None:
      raise ValueError("likelihood='gaussian' needs the observation noise: "
                       "pass noise_variance=... (> 0).")
    validation.check_positive("noise_variance", noise_variance)
  validation.check_flag("linearized", linearized)
  if selection not in ("one_se", "minimum"):
    raise ValueError("`selection` must be 'one_se' or 'minimum', got "
                     f"selection={selection!r}.")
  if likelihood not in _LIKELIHOODS:
    raise ValueError("`likelihood` must be 'categorical' or 'gaussian', got "
                     f"likelihood={likelihood!r}.")
  log_p = _LIKELIHOODS[likelihood]
  noise_variance = 1.0 if noise_variance is None else noise_variance
  if temperatures is None:
    temperatures = np.concatenate([[0.0], np.logspace(-4, 1, 25)])
  taus = _grid("temperatures", temperatures, positive=False)
  # A tau that takes ess/tau past the state's range cannot be held by the
  # state: the smallest tau that can stands for it.
  tau_floor = _smallest_temperature(posteriors)
  taus = np.unique(np.where((taus > 0) & (taus < tau_floor), tau_floor, taus))
  kappas = _grid("prior_scales", prior_scales, positive=True)
  batches = list(batches)
  if not batches:
    raise ValueError("`batches` is empty: pass held-out (inputs, targets) "
                     "batches.")
  for batch in batches:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError("each batch must be an (inputs, targets) pair, got "
                       f"a {type(batch).__name__} of length "
                       f"{len(batch) if hasattr(batch, '__len__') else '?'}.")
    targets = jnp.asarray(batch[1])
    if likelihood == "categorical" and not jnp.issubdtype(targets.dtype,
                                                          jnp.integer):
      raise ValueError("likelihood='categorical' needs integer labels, got "
                       f"targets of dtype {targets.dtype}.")
    _check_targets(jax.eval_shape(apply_fn, params, batch[0]).shape,
                   targets.shape, likelihood)
  key = noise.canonicalize_key(key)

  # (tau, kappa) -> the NLL, and the per-example log-likelihoods that the
  # one-standard-error rule needs (kept only for it: N floats per point).
  cache: dict[tuple[float, float], float] = {}
  per_example: dict[tuple[float, float], np.ndarray] = {}

  def evaluate(tau_values, kappa: float) -> None:
    todo = [float(t) for t in tau_values if (float(t), float(kappa)) not in cache]
    if not todo:
      return
    # Padded to one length: one compilation per batch shape.
    padded = np.resize(np.asarray(todo), max(width, len(todo)))
    totals, count, parts = np.zeros(len(padded)), 0, []
    for inputs, targets in batches:
      values, bad = _batch_log_likelihood(
          params, opt_state, jnp.asarray(padded), float(kappa), inputs,
          targets, noise_variance, key, apply_fn=apply_fn, log_p=log_p,
          num_samples=num_samples, linearized=bool(linearized))
      if bool(bad):
        raise ValueError(
            "`batches` hold labels outside [0, classes) for "
            f"likelihood='categorical': targets={np.asarray(targets)!r}.")
      values = np.asarray(values, np.float64)
      totals += values.sum(axis=-1)
      count += values.shape[-1]
      if selection == "one_se":  # Else a stream: only the sums are kept.
        parts.append(values)
    logliks = np.concatenate(parts, axis=-1) if parts else None
    for i, t in enumerate(todo):
      nll = float(-totals[i] / count)
      if not math.isfinite(nll):
        if t == 0.0:
          raise ValueError(
              "the posterior mean's NLL on `batches` is not finite "
              f"({nll}): NaN or inf outputs of apply_fn, or NaN targets.")
        nll = math.inf  # a draw overflowed: never the chosen temperature
      cache[(t, float(kappa))] = nll
      if logliks is not None:
        per_example[(t, float(kappa))] = logliks[i]

  def nll(tau: float, kappa: float) -> float:
    evaluate([tau], kappa)
    return cache[(float(tau), float(kappa))]

  taus = np.unique(np.concatenate([taus, [0.0, 1.0]]))
  width = max(len(taus), 8)
  evaluate(taus, 1.0)
  for kappa in kappas:
    evaluate(taus, kappa)
  mean_nll, uncalibrated_nll = nll(0.0, 1.0), nll(1.0, 1.0)
  best = min(cache, key=lambda p: (cache[p], p[0]))
  if refine and best[0] > 0:
    grid_taus = taus
    index = int(np.searchsorted(grid_taus, best[0]))
    low = grid_taus[index - 1] if index > 0 else best[0] / 10
    high = grid_taus[index + 1] if index + 1 < len(grid_taus) else best[0] * 10
    low = max(low, best[0] / 10, tau_floor)  # 0 would not be log-spaced.
    evaluate(np.geomspace(low, high, 10)[1:-1], best[1])
  chosen = _select(cache, per_example, selection)
  points = list(cache)
  return Calibration(
      opt_state=tempered(opt_state, chosen[0], chosen[1]),
      temperature=chosen[0], prior_scale=chosen[1], nll=cache[chosen],
      mean_nll=mean_nll, uncalibrated_nll=uncalibrated_nll,
      temperatures=np.array([p[0] for p in points]),
      prior_scales=np.array([p[1] for p in points]),
      nlls=np.array([cache[p] for p in points]))


def _smallest_temperature(posteriors: list[Any]) -> float:
  """The smallest tau > 0 with every finite ``ess / tau`` within the state's
  range: set by the largest finite ``ess`` (0 if there is none; an infinite
  ``ess`` stays infinite at any tau)."""
  values = [validation.concrete_float(p.ess) for p in posteriors]
  finite = [e for e in values if e is not None and math.isfinite(e)]
  if not finite:
    return 0.0
  return max(finite) / validation.STATE_LIMIT * (1 + 1e-9)  # not past it


def _select(cache: dict, per_example: dict, selection: str) -> tuple:
  """The chosen (tau, kappa): the minimum, or the one-standard-error rule."""
  best = min(cache, key=lambda p: (cache[p], p[0]))
  if selection == "minimum":
    return best
  mean_nll = cache[(0.0, 1.0)]
  # Simplest first: the smallest tau (0 is the mean), then the prior as
  # trained (kappa closest to 1).
  for point in sorted(cache, key=lambda p: (p[0], abs(math.log(p[1])))):
    excess = per_example[best] - per_example[point]  # Paired, per example.
    count = excess.size
    stderr = (float(np.std(excess, ddof=1)) / math.sqrt(count)
              if count > 1 else 0.0)
    if cache[point] <= min(cache[best] + stderr, mean_nll):
      return point
  return best
