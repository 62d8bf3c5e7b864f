"""Curvature estimators: the Price identity E[g(m + s e) e] / s = E_q[h]."""

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src.engine import estimators as curvature
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import full as full_gaussian


def test_diagonal_price_estimator_is_unbiased():
  with jax.enable_x64(True):
    _check_diagonal_price()


def _check_diagonal_price():
  # loss = sum(a t^4 / 4): Hessian 3 a t^2, E_q = 3 a (m^2 + s^2).
  a = jnp.array([1.0, 0.5, 2.0])
  m = jnp.array([0.5, -1.0, 0.2])
  h, ess, decay = jnp.array([1.0, 3.0, 0.5]), 10.0, 0.0
  sigma = np.asarray(gaussian.stddev(h, ess, decay))
  eps = jax.random.normal(jax.random.key(0), (400_000, 3))
  grads = a * (m + sigma * eps) ** 3
  estimates = np.asarray(grads * eps * jnp.sqrt(ess * (h + decay)))
  want = 3 * np.asarray(a) * (np.asarray(m) ** 2 + sigma**2)
  se = estimates.std(0) / np.sqrt(len(estimates))
  np.testing.assert_array_less(np.abs(estimates.mean(0) - want), 5 * se)
  # and the library function computes the same per-sample average
  np.testing.assert_allclose(
      curvature.price_curvature(grads, eps, h, ess, decay), estimates.mean(0),
      rtol=1e-10)


def test_full_price_estimator_is_unbiased():
  """E[sym(g (theta - m)^T P)] = E_q[Hessian] for a non-quadratic loss."""
  with jax.enable_x64(True):
    c = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    # loss = t'Ct/2 + sum(t^4)/4: Hessian C + 3 diag(t^2).
    loss = lambda t: 0.5 * t @ c @ t + jnp.sum(t**4) / 4
    m = jnp.array([0.4, -0.3])
    precision = jnp.array([[6.0, -1.0], [-1.0, 3.0]])
    cov = np.linalg.inv(np.asarray(precision))
    n = 400_000
    eps = jax.random.normal(jax.random.key(1), (n, 2), jnp.float64)
    chol = jnp.linalg.cholesky(precision)
    theta = m + jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T
    grads = jax.vmap(jax.grad(loss))(theta)
    # The estimator takes the factor of S + D = precision / ess, and ess.
    ess = 2.0
    factor = jnp.linalg.cholesky(precision / ess)
    got = np.asarray(full_gaussian.price_curvature(grads, eps, factor, ess))
    want = np.asarray(c) + 3 * np.diag(np.asarray(m) ** 2 + np.diag(cov))
    # standard errors of each entry, from per-sample estimates
    per_sample = jax.vmap(lambda g, e: full_gaussian.price_curvature(
        g[None], e[None], factor, ess))(grads[:20_000], eps[:20_000])
    se = np.asarray(per_sample).std(0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(got - want), 5 * se)
