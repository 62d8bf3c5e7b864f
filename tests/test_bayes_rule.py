"""Bayes' rule as addition of natural gradients (blrax.expfam).

For each conjugate pair, one BLR step with rho = 1 computed by autodiff must
equal the textbook posterior, and the posterior natural parameter must equal
the prior's plus the sum of per-datum natural gradients. Then VON(full)
reaches the linear-regression posterior in one step, and on logistic
regression its fixed point matches a direct ELBO maximisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from scipy.stats import norm

import blrax
from blrax import expfam

RNG = np.random.default_rng(1)


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def check_bayes_rule(family, prior_eta, per_datum_ell, data, want_eta):
  """One rho=1 step equals the posterior, and is prior + sum of parts."""
  total = lambda mu: sum(per_datum_ell(y, mu) for y in data)
  step = jax.jit(lambda eta: expfam.blr_step(family, eta, prior_eta, total))
  eta = step(prior_eta)
  np.testing.assert_allclose(eta, want_eta, rtol=1e-5, atol=1e-8)
  # One compiled natural gradient, called once per datum.
  part = jax.jit(lambda y: expfam.natural_gradient(
      family, prior_eta, lambda mu: per_datum_ell(y, mu)))
  parts = sum(part(y) for y in data)
  np.testing.assert_allclose(prior_eta + parts, want_eta, rtol=1e-5, atol=1e-8)
  # The step from any other starting point lands on the same posterior.
  eta_other = step(want_eta * 0.7 + prior_eta * 0.3)
  np.testing.assert_allclose(eta_other, want_eta, rtol=1e-5, atol=1e-8)


def test_beta_bernoulli():
  family = expfam.beta()
  y = RNG.integers(0, 2, size=25).astype(float)
  # log p(y|t) = y log t + (1-y) log(1-t): linear in mu = E[(log t, log 1-t)].
  ell = lambda yi, mu: yi * mu[0] + (1 - yi) * mu[1]
  check_bayes_rule(family, family.to_natural(2.0, 3.0), ell, y,
                   family.to_natural(2.0 + y.sum(), 3.0 + len(y) - y.sum()))


def test_gamma_poisson():
  family = expfam.gamma()
  y = RNG.poisson(3.0, size=20).astype(float)
  # log p(y|rate) = y log rate - rate + const: mu = E[(log rate, rate)].
  ell = lambda yi, mu: yi * mu[0] - mu[1]
  check_bayes_rule(family, family.to_natural(2.0, 0.5), ell, y,
                   family.to_natural(2.0 + y.sum(), 0.5 + len(y)))


def test_dirichlet_categorical():
  family = expfam.dirichlet()
  alpha = jnp.array([1.0, 2.0, 0.5, 3.0])
  y = RNG.integers(0, 4, size=30)
  ell = lambda yi, mu: mu[yi]  # log p(y|p) = log p_y
  counts = np.bincount(y, minlength=4)
  check_bayes_rule(family, family.to_natural(alpha), ell, y,
                   family.to_natural(alpha + counts))


def test_normal_normal_diagonal():
  family = expfam.diagonal_gaussian(2)
  noise_var = np.array([0.5, 2.0])
  y = RNG.normal(size=(15, 2)) + np.array([1.0, -2.0])
  m0, v0 = np.array([0.0, 1.0]), np.array([4.0, 0.25])
  # -(y - t)^2 / (2 s^2) = (y mu1 - mu2 / 2) / s^2 + const, per dimension.
  ell = lambda yi, mu: jnp.sum((yi * mu[:2] - 0.5 * mu[2:]) / noise_var)
  prec = 1 / v0 + len(y) / noise_var
  mean = (m0 / v0 + y.sum(0) / noise_var) / prec
  check_bayes_rule(family, family.to_natural(m0, v0), ell, y,
                   family.to_natural(mean, 1 / prec))


def linear_regression_data(n=40, d=3, noise=0.5):
  x = RNG.normal(size=(n, d))
  y = x @ np.array([1.0, -2.0, 0.5]) + noise * RNG.normal(size=n)
  return x, y


def linear_regression_posterior(x, y, noise, prior_prec):
  precision = prior_prec * np.eye(x.shape[1]) + x.T @ x / noise**2
  cov = np.linalg.inv(precision)
  return cov @ x.T @ y / noise**2, cov


def test_bayesian_linear_regression_full_gaussian():
  noise, prior_prec = 0.5, 2.0
  x, y = linear_regression_data(noise=noise)
  family = expfam.gaussian(3)
  # E_q[-(y - x't)^2 / 2s^2] = (y x'mu1 - x' Mu2 x / 2) / s^2 + const.
  ell = lambda data, mu: (data[1] * data[0] @ mu[:3]
                          - 0.5 * data[0] @ mu[3:].reshape(3, 3) @ data[0]
                          ) / noise**2
  prior = family.to_natural(jnp.zeros(3), jnp.eye(3) / prior_prec)
  mean, cov = linear_regression_posterior(x, y, noise, prior_prec)
  check_bayes_rule(family, prior, ell, list(zip(x, y)),
                   family.to_natural(jnp.asarray(mean), jnp.asarray(cov)))


def test_von_full_reaches_linear_regression_posterior_in_one_step():
  noise, prior_prec = 0.5, 2.0
  x, y = linear_regression_data(noise=noise)
  n = len(y)
  loss = lambda w: jnp.mean((y - x @ w) ** 2) / (2 * noise**2)
  # ess = N, weight_decay = prior precision / N; rho = alpha = 1.
  opt = blrax.von(1.0, ess=n, covariance="full", b2=0.0,
                  weight_decay=prior_prec / n, key=3)
  params = jnp.asarray(RNG.normal(size=3))
  state = opt.init(params)
  # The loss is quadratic: the expected gradient is the gradient at the mean
  # and the expected Hessian is the Hessian.
  updates, state = opt.update(jax.grad(loss)(params), state, params,
                              hessian=jax.hessian(loss)(params))
  params = optax.apply_updates(params, updates)
  mean, cov = linear_regression_posterior(x, y, noise, prior_prec)
  (posterior,) = blrax.find_posteriors(state)
  np.testing.assert_allclose(params, mean, rtol=1e-10)
  np.testing.assert_allclose(posterior.covariance(), cov, rtol=1e-10)
  np.testing.assert_allclose(blrax.posterior_stddev(state), np.sqrt(np.diag(cov)),
                             rtol=1e-10)
  # and its samples have that covariance
  draws = blrax.sample_posterior(jax.random.key(0), params, state, 40_000)
  np.testing.assert_allclose(np.cov(np.asarray(draws).T), cov,
                             atol=0.03 * np.max(np.abs(cov)))


# --- Non-conjugate: Bayesian logistic regression ---------------------------

GH_X, GH_W = np.polynomial.hermite_e.hermegauss(60)  # weight exp(-x^2/2)
GH_W = GH_W / GH_W.sum()


def logistic_data(n=30):
  x = np.concatenate([RNG.normal(size=(n, 2)), np.ones((n, 1))], axis=1)
  w = np.array([1.5, -1.0, 0.3])
  y = np.where(RNG.random(n) < 1 / (1 + np.exp(-x @ w)), 1.0, -1.0)
  return x, y


def expected_terms(x, y, mean, cov):
  """Gauss-Hermite E_q of log sigmoid(y a), its gradient and Hessian weights."""
  mu_a = x @ mean
  sd_a = np.sqrt(np.einsum("nd,de,ne->n", x, cov, x))
  a = mu_a[:, None] + sd_a[:, None] * GH_X[None, :]
  s = 1 / (1 + np.exp(-a))
  loglik = np.sum(np.log(1 / (1 + np.exp(-y[:, None] * a))) * GH_W, axis=1)
  dlog = np.sum((1 / (1 + np.exp(y[:, None] * a))) * GH_W, axis=1) * y
  curv = np.sum(s * (1 - s) * GH_W, axis=1)
  return loglik, dlog, curv


def test_logistic_regression_blr_fixed_point_is_the_elbo_optimum():
  x, y = logistic_data()
  n, d = x.shape
  prior_prec = 1.0

  # 1. VON(full) iterated with exact (quadrature) expected gradient and
  #    Hessian of the mean loss: the BLR fixed point.
  opt = blrax.von(1.0, ess=n, covariance="full", b2=0.0,
                  weight_decay=prior_prec / n)
  params = jnp.zeros(d)
  state = opt.init(params)

  @jax.jit
  def covariance(state):
    (posterior,) = blrax.find_posteriors(state)
    return posterior.covariance()

  @jax.jit
  def step(params, state, grad, hess):
    updates, state = opt.update(grad, state, params, hessian=hess)
    return optax.apply_updates(params, updates), state

  for _ in range(30):
    _, dlog, curv = expected_terms(x, y, np.asarray(params),
                                   np.asarray(covariance(state)))
    grad = -(x * dlog[:, None]).mean(0)
    hess = (x.T * curv) @ x / n
    params, state = step(params, state, jnp.asarray(grad), jnp.asarray(hess))
  (posterior,) = blrax.find_posteriors(state)
  blr_mean, blr_cov = np.asarray(params), np.asarray(posterior.covariance())

  # 2. Independent: maximise the ELBO directly over (m, Cholesky factor).
  tril = np.tril_indices(d)

  def unpack(z):
    chol = np.zeros((d, d))
    chol[tril] = z[d:]
    chol[np.diag_indices(d)] = np.exp(chol[np.diag_indices(d)])
    return z[:d], chol

  def negative_elbo(z):
    mean, chol = unpack(z)
    cov = chol @ chol.T
    loglik, _, _ = expected_terms(x, y, mean, cov)
    kl = 0.5 * (prior_prec * np.trace(cov) + prior_prec * mean @ mean - d
                - d * np.log(prior_prec) - 2 * np.sum(np.log(np.diag(chol))))
    return kl - loglik.sum()

  z0 = np.zeros(d + len(tril[0]))
  result = scipy.optimize.minimize(negative_elbo, z0, method="BFGS",
                                   options={"gtol": 1e-10, "maxiter": 5000})
  mean, chol = unpack(result.x)
  np.testing.assert_allclose(blr_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(blr_cov, chol @ chol.T, rtol=1e-3, atol=1e-5)
  # Sanity: the quadrature is right (compare one term with scipy).
  a = np.linspace(-6, 6, 20001)
  dens = norm.pdf(a, 0.3, 1.2)
  direct = np.trapezoid(np.log(1 / (1 + np.exp(-a))) * dens, a)
  gh = expected_terms(np.array([[1.0]]), np.array([1.0]), np.array([0.3]),
                      np.array([[1.44]]))[0][0]
  np.testing.assert_allclose(gh, direct, rtol=1e-6)
