"""Bayesian model averaging against closed forms and quadrature."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(40, 3)))
Y = X @ jnp.array([1.0, -2.0, 0.5]) + 0.5 * jnp.asarray(RNG.normal(size=40))


@pytest.fixture(scope="module")
def linear_posterior():
  """Exact linear-regression posterior held by a VON(full) state."""
  loss = lambda w: jnp.mean((Y - X @ w) ** 2) / (2 * 0.25)
  opt = blrax.von(1.0, ess=40, covariance="full", b2=0.0, weight_decay=1 / 40)
  w = jnp.zeros(3)
  state = opt.init(w)
  updates, state = opt.update(jax.grad(loss)(w), state, w,
                              hessian=jax.hessian(loss)(w))
  w = optax.apply_updates(w, updates)
  (posterior,) = blrax.find_posteriors(state)
  return w, state, np.asarray(posterior.covariance())


def test_regression_mean_and_variance(linear_posterior):
  w, state, cov = linear_posterior
  inputs = jnp.asarray(RNG.normal(size=(5, 3)))
  apply = lambda p, x: x @ p
  n = 20_000
  mean, var = blrax.predictive.predictive_mean_variance(
      apply, jax.random.key(1), w, state, inputs, num_samples=n,
      chunk_size=1000, noise_variance=0.25)
  want_var = np.einsum("nd,de,ne->n", inputs, cov, inputs)
  np.testing.assert_array_less(np.abs(mean - inputs @ w),
                               5 * np.sqrt(want_var / n))
  np.testing.assert_allclose(var - 0.25, want_var, rtol=5 * np.sqrt(2 / n))
  chunked = blrax.predictive.predictive_mean_variance(
      apply, jax.random.key(1), w, state, inputs, num_samples=n, chunk_size=250)
  unchunked = blrax.predictive.predictive_mean_variance(
      apply, jax.random.key(1), w, state, inputs, num_samples=n)
  np.testing.assert_allclose(chunked[0], unchunked[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked[1], unchunked[1], rtol=1e-4)
  m0, v0 = blrax.predictive.predictive_mean_variance(
      apply, None, w, state, inputs, noise_variance=0.25, mean_only=True)
  np.testing.assert_allclose(m0, inputs @ w)
  np.testing.assert_allclose(v0, 0.25)


def test_classification_bma_matches_quadrature(linear_posterior):
  """p(y=1|x) = E[sigmoid(x'w)], w ~ N(m, S): 1-D Gauss-Hermite oracle."""
  w, state, cov = linear_posterior
  inputs = jnp.asarray(RNG.normal(size=(6, 3))) * 0.5
  # Two-class logits (0, x'w): softmax class 1 = sigmoid(x'w).
  apply = lambda p, x: jnp.stack([jnp.zeros(x.shape[0]), x @ p], -1)
  n = 20_000
  probs = blrax.predictive.predictive_probs(apply, jax.random.key(2), w, state,
                                            inputs, num_samples=n,
                                            chunk_size=2000)
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  weights = weights / weights.sum()
  mu = np.asarray(inputs @ w)
  sd = np.sqrt(np.einsum("nd,de,ne->n", inputs, cov, inputs))
  want = (1 / (1 + np.exp(-(mu[:, None] + sd[:, None] * nodes))) * weights).sum(1)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_less(np.abs(np.asarray(probs)[:, 1] - want),
                               5 * 0.5 / np.sqrt(n))
  log_probs = blrax.predictive.predictive_log_probs(
      apply, jax.random.key(2), w, state, inputs, num_samples=n, chunk_size=500)
  np.testing.assert_allclose(jnp.exp(log_probs), probs, rtol=1e-4)
  at_mean = blrax.predictive.predictive_probs(apply, None, w, state, inputs,
                                              mean_only=True)
  np.testing.assert_allclose(at_mean[:, 1], 1 / (1 + np.exp(-mu)), rtol=1e-5)


def test_bad_chunk_size(linear_posterior):
  w, state, _ = linear_posterior
  with pytest.raises(ValueError, match="chunk_size"):
    blrax.predictive.predictive_probs(lambda p, x: x @ p, jax.random.key(0), w,
                                      state, X, num_samples=10, chunk_size=3)
