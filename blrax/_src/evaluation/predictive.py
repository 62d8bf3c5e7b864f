r"""Prediction by Bayesian model averaging over the posterior.

For a classifier with class probabilities :math:`p(y\mid x,\theta)` the
posterior predictive is :math:`p(y\mid x) \approx \frac1S\sum_s p(y\mid x,
\theta_s)`, :math:`\theta_s\sim q`; in log space,
:math:`\log p(y\mid x) \approx \mathrm{logsumexp}_s \log p(y\mid x,\theta_s)
- \log S`. For regression with outputs :math:`f(x,\theta)` the predictive
mean and variance follow the law of total variance:
:math:`E[f]` and :math:`\mathrm{Var}[f] + \sigma^2_{\text{noise}}`.

Samples are drawn one key each (``jax.random.split(key, num_samples)``) and
evaluated ``chunk_size`` at a time with ``jax.lax.map``, so memory is bounded
by the chunk while the result does not depend on the chunk size.

Any model: ``apply_fn(params, inputs)`` with a params pytree, or a Flax NNX
model as ``params`` (called as ``apply_fn(model, inputs)``, or ``model(inputs)``
when ``apply_fn`` is None) with its ``nnx.Optimizer`` (or that optimizer's
``opt_state``) as ``opt_state``; an ``nnx.State`` of the whole model works too
(``apply_fn(state, inputs)``). Only the trained variables (``optimizer.wrt``,
else ``nnx.Param``) are drawn; batch-norm statistics and other state are held
at their current values, so call ``model.eval()`` first for BatchNorm and
Dropout.

Arguments are checked: ``key`` may be an int seed, a legacy
``jax.random.PRNGKey`` or a typed ``jax.random.key``; ``num_samples`` and
``chunk_size`` are Python or NumPy ints (they set shapes, so they cannot be
traced); a wrong type raises ``TypeError``, a wrong value ``ValueError``
naming the argument. A negative ``noise_variance`` raises when concrete and
gives a NaN variance under ``jit``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from blrax._src.evaluation import prediction_inputs
from blrax._src.functions import lookup


def _draws(key, params, opt_state, num_samples, chunk_size):
  """(keys reshaped to (chunks, chunk), a function key -> one draw, S)."""
  keys, num_samples = prediction_inputs.draw_keys(key, num_samples, chunk_size)
  draw = lambda k: jax.tree.map(
      lambda x: x[0], lookup.sample_posterior(k, params, opt_state, 1))
  return keys, draw, num_samples


def predictive_log_probs(
    apply_fn: Callable[[Any, Any], jax.Array],
    key: jax.Array,
    params: Any,
    opt_state: Any,
    inputs: Any,
    num_samples: int = 32,
    chunk_size: int | None = None,
    mean_only: bool = False,
) -> jax.Array:
  r"""Log of the model-averaged class probabilities.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits`` (last axis: classes); for
      an NNX model ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key for the posterior draws: an int seed, a legacy
      ``jax.random.PRNGKey`` or a typed ``jax.random.key``. Unused (may be
      ``None``) when ``mean_only``.
    params: the posterior mean: a params pytree, an ``nnx.Module`` or an
      ``nnx.State`` of the whole model.
    opt_state: the state of a blrax optimizer (possibly wrapped), or the
      ``nnx.Optimizer`` holding it.
    inputs: passed to ``apply_fn`` unchanged.
    num_samples: posterior draws :math:`S`, a Python or NumPy int ``>= 1``.
    chunk_size: draws evaluated together (a divisor of ``num_samples``);
      ``None`` evaluates all at once.
    mean_only: a bool; ignore the posterior and return ``log_softmax`` at the
      mean, for comparison.

  Returns:
    :math:`\log \frac1S \sum_s \mathrm{softmax}(f(x, \theta_s))`, shaped like
    the logits.

  Raises:
    TypeError: ``apply_fn`` is not callable, ``key`` is not a key,
      ``num_samples``/``chunk_size`` are not ints (bools, floats and traced
      values are refused) or ``mean_only`` is not a bool.
    ValueError: ``num_samples``/``chunk_size`` below 1, a ``chunk_size`` that
      does not divide ``num_samples``, a batch of keys, or logits with no
      class axis or a single class (whose softmax is identically 1).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> state = blrax.ivon(0.1, ess=10.0).init(params)
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> log_probs = blrax.predictive.predictive_log_probs(
    ...     apply_fn, 0, params, state, jnp.ones((4, 3)), num_samples=8)
    >>> log_probs.shape
    (4, 2)
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, mean_only)
  if mean_only:
    logits = apply_fn(params, inputs)
    prediction_inputs.check_logits(logits)
    return jax.nn.log_softmax(logits, axis=-1)
  keys, draw, num_samples = _draws(key, params, opt_state, num_samples,
                                   chunk_size)

  def log_softmax(k):
    logits = apply_fn(draw(k), inputs)
    prediction_inputs.check_logits(logits)
    return jax.nn.log_softmax(logits, axis=-1)

  def chunk(chunk_keys):
    return jax.nn.logsumexp(jax.vmap(log_softmax)(chunk_keys), axis=0)

  return jax.nn.logsumexp(jax.lax.map(chunk, keys), axis=0) - jnp.log(num_samples)


def predictive_probs(apply_fn, key, params, opt_state, inputs, num_samples=32,
                     chunk_size=None, mean_only=False) -> jax.Array:
  r"""Model-averaged class probabilities; see :func:`predictive_log_probs`.

  Args:
    apply_fn: as in :func:`predictive_log_probs`.
    key: as in :func:`predictive_log_probs`.
    params: as in :func:`predictive_log_probs` (an NNX model works).
    opt_state: as in :func:`predictive_log_probs`.
    inputs: as in :func:`predictive_log_probs`.
    num_samples: as in :func:`predictive_log_probs`.
    chunk_size: as in :func:`predictive_log_probs`.
    mean_only: as in :func:`predictive_log_probs`.

  Returns:
    :math:`\frac1S \sum_s \mathrm{softmax}(f(x, \theta_s))`, shaped like
    the logits; the same checks and errors as :func:`predictive_log_probs`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0),
    ...                           wrt=nnx.Param)
    >>> probs = blrax.predictive.predictive_probs(
    ...     None, 0, model, optimizer, jnp.ones((4, 3)), num_samples=8)
    >>> probs.shape
    (4, 2)
  """
  return jnp.exp(predictive_log_probs(apply_fn, key, params, opt_state, inputs,
                                      num_samples, chunk_size, mean_only))


def predictive_mean_variance(
    apply_fn: Callable[[Any, Any], jax.Array],
    key: jax.Array,
    params: Any,
    opt_state: Any,
    inputs: Any,
    num_samples: int = 32,
    chunk_size: int | None = None,
    noise_variance: Any = None,
    mean_only: bool = False,
) -> tuple[jax.Array, jax.Array]:
  r"""Predictive mean and variance of a regression output.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; for an NNX model
      ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key for the posterior draws (see :func:`predictive_log_probs`).
    params: the posterior mean: a params pytree, an ``nnx.Module`` or an
      ``nnx.State`` of the whole model.
    opt_state: the state of a blrax optimizer (possibly wrapped), or the
      ``nnx.Optimizer`` holding it.
    inputs: passed to ``apply_fn`` unchanged.
    num_samples: posterior draws :math:`S`, a Python or NumPy int ``>= 1``.
      With :math:`S = 1` the posterior part of the variance is 0.
    chunk_size: draws evaluated together (a divisor of ``num_samples``).
    noise_variance: observation noise :math:`\sigma^2 \ge 0` added to the
      variance: a scalar or an array broadcasting to the output shape
      (without enlarging it). Left out, it is 0 with a ``UserWarning``:
      without it the variance is the posterior's alone and predictive
      intervals of noisy targets are far too narrow; pass ``0.0`` for the
      epistemic variance on purpose.
    mean_only: a bool; the output at the mean with variance
      ``noise_variance``.

  Returns:
    ``(mean, variance)``, each shaped like the outputs. The variance is the
    sample variance over draws (divided by :math:`S`) plus the noise. Under
    ``jit`` a negative or NaN ``noise_variance`` gives a NaN variance.

  Raises:
    TypeError: as :func:`predictive_log_probs`, or a non-numeric
      ``noise_variance``.
    ValueError: as :func:`predictive_log_probs`, a concrete negative or NaN
      ``noise_variance``, or one whose shape does not broadcast to the
      outputs'.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.ones(3)}
    >>> state = blrax.ivon(0.1, ess=10.0).init(params)
    >>> mean, var = blrax.predictive.predictive_mean_variance(
    ...     lambda p, x: x @ p["w"], 0, params, state, jnp.ones((4, 3)),
    ...     num_samples=8, noise_variance=0.1)
    >>> mean.shape, bool((var > 0.1).all())
    ((4,), True)
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, mean_only)
  noise_variance, noise_ok = prediction_inputs.check_noise_variance(
      prediction_inputs.default_noise_variance(noise_variance,
                                               "predictive_mean_variance"))

  def finish(mean, variance):
    return prediction_inputs.add_noise_variance(mean, variance, noise_variance,
                                                noise_ok)

  if mean_only:
    out = apply_fn(params, inputs)
    return finish(out, jnp.zeros(jnp.shape(out), jnp.result_type(out, float)))
  keys, draw, num_samples = _draws(key, params, opt_state, num_samples,
                                   chunk_size)

  def chunk(chunk_keys):
    out = jax.vmap(lambda k: apply_fn(draw(k), inputs))(chunk_keys)
    mean = jnp.mean(out, axis=0)
    return mean, jnp.sum(jnp.square(out - mean), axis=0)

  # Chunks have equal sizes: combine their means and sums of squared
  # deviations exactly (Chan et al.), with no E[x^2] - E[x]^2 cancellation.
  means, deviations = jax.lax.map(chunk, keys)
  mean = jnp.mean(means, axis=0)
  total = (jnp.sum(deviations, axis=0)
           + keys.shape[1] * jnp.sum(jnp.square(means - mean), axis=0))
  return finish(mean, total / num_samples)
