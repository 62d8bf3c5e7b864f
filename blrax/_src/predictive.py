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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from blrax._src import lookup


def _draws(key, params, opt_state, num_samples, chunk_size):
  """(keys reshaped to (chunks, chunk), a function key -> one draw)."""
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(
        f"`num_samples` must be an int >= 1, got num_samples={num_samples!r}.")
  chunk_size = num_samples if chunk_size is None else chunk_size
  if (not isinstance(chunk_size, int) or chunk_size < 1
      or num_samples % chunk_size):
    raise ValueError(
        "`chunk_size` must be a positive divisor of num_samples="
        f"{num_samples}, got chunk_size={chunk_size!r}.")
  keys = jax.random.split(key, num_samples).reshape(-1, chunk_size)
  draw = lambda k: jax.tree.map(
      lambda x: x[0], lookup.sample_posterior(k, params, opt_state, 1))
  return keys, draw


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
    apply_fn: ``apply_fn(params, inputs) -> logits`` (last axis: classes).
    key: PRNG key for the posterior draws.
    params: the posterior mean.
    opt_state: the state of a blrax optimizer (possibly wrapped).
    inputs: passed to ``apply_fn`` unchanged.
    num_samples: posterior draws :math:`S`.
    chunk_size: draws evaluated together (a divisor of ``num_samples``);
      ``None`` evaluates all at once.
    mean_only: ignore the posterior and return ``log_softmax`` at the mean,
      for comparison.

  Returns:
    :math:`\log \frac1S \sum_s \mathrm{softmax}(f(x, \theta_s))`, shaped like
    the logits.
  """
  if mean_only:
    return jax.nn.log_softmax(apply_fn(params, inputs), axis=-1)
  keys, draw = _draws(key, params, opt_state, num_samples, chunk_size)

  def chunk(chunk_keys):
    log_probs = jax.vmap(
        lambda k: jax.nn.log_softmax(apply_fn(draw(k), inputs), axis=-1)
    )(chunk_keys)
    return jax.nn.logsumexp(log_probs, axis=0)

  return jax.nn.logsumexp(jax.lax.map(chunk, keys), axis=0) - jnp.log(num_samples)


def predictive_probs(apply_fn, key, params, opt_state, inputs, num_samples=32,
                     chunk_size=None, mean_only=False) -> jax.Array:
  """Model-averaged class probabilities; see :func:`predictive_log_probs`."""
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
    noise_variance: jax.typing.ArrayLike = 0.0,
    mean_only: bool = False,
) -> tuple[jax.Array, jax.Array]:
  r"""Predictive mean and variance of a regression output.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    key: PRNG key for the posterior draws.
    params: the posterior mean.
    opt_state: the state of a blrax optimizer (possibly wrapped).
    inputs: passed to ``apply_fn`` unchanged.
    num_samples: posterior draws :math:`S`.
    chunk_size: draws evaluated together (a divisor of ``num_samples``).
    noise_variance: observation noise :math:`\sigma^2` added to the variance.
    mean_only: the output at the mean with variance ``noise_variance``.

  Returns:
    ``(mean, variance)``, each shaped like the outputs. The variance is the
    sample variance over draws (divided by :math:`S`) plus the noise.
  """
  if mean_only:
    out = apply_fn(params, inputs)
    return out, jnp.full_like(out, noise_variance)
  keys, draw = _draws(key, params, opt_state, num_samples, chunk_size)

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
  return mean, total / num_samples + noise_variance
