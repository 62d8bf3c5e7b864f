"""Exponential families: mean parameters, KL and sampling against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from blrax import expfam


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


CASES = [
    ("beta", expfam.beta(), (2.0, 5.0)),
    ("gamma", expfam.gamma(), (3.0, 2.0)),
    ("dirichlet", expfam.dirichlet(), (jnp.array([1.0, 2.0, 4.0]),)),
    ("diagonal_gaussian", expfam.diagonal_gaussian(2),
     (jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0]))),
    ("gaussian", expfam.gaussian(2),
     (jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))),
]


@pytest.mark.parametrize("name,family,params", CASES, ids=[c[0] for c in CASES])
def test_mean_params_are_expected_statistics(name, family, params):
  eta = family.to_natural(*params)
  draws = family.sample(jax.random.key(0), eta, (200_000,))
  stats = np.asarray(family.sufficient_statistics(draws))
  mu = np.asarray(family.mean_params(eta))
  se = stats.std(0) / np.sqrt(len(stats))
  np.testing.assert_array_less(np.abs(stats.mean(0) - mu), 5 * se + 1e-12)
  for got, want in zip(family.from_natural(eta), params):
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_beta_mean_params_closed_form():
  family = expfam.beta()
  mu = family.mean_params(family.to_natural(2.0, 5.0))
  np.testing.assert_allclose(mu, [special.digamma(2) - special.digamma(7),
                                  special.digamma(5) - special.digamma(7)])


def test_beta_kl_closed_form():
  family = expfam.beta()
  a1, b1, a2, b2 = 2.0, 5.0, 3.0, 1.5
  want = (special.betaln(a2, b2) - special.betaln(a1, b1)
          + (a1 - a2) * special.digamma(a1) + (b1 - b2) * special.digamma(b1)
          + (a2 - a1 + b2 - b1) * special.digamma(a1 + b1))
  got = family.kl(family.to_natural(a1, b1), family.to_natural(a2, b2))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_gaussian_kl_closed_form():
  family = expfam.gaussian(2)
  m1, s1 = np.array([1.0, -1.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
  m2, s2 = np.array([0.0, 2.0]), np.array([[2.0, -0.4], [-0.4, 1.0]])
  p2 = np.linalg.inv(s2)
  want = 0.5 * (np.trace(p2 @ s1) + (m2 - m1) @ p2 @ (m2 - m1) - 2
                + np.log(np.linalg.det(s2) / np.linalg.det(s1)))
  got = family.kl(family.to_natural(m1, s1), family.to_natural(m2, s2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  assert abs(float(family.kl(family.to_natural(m1, s1),
                             family.to_natural(m1, s1)))) < 1e-12


def test_gamma_kl_closed_form():
  family = expfam.gamma()
  a1, b1, a2, b2 = 3.0, 2.0, 1.5, 0.5
  want = ((a1 - a2) * special.digamma(a1) - special.gammaln(a1)
          + special.gammaln(a2) + a2 * (np.log(b1) - np.log(b2))
          + a1 * (b2 - b1) / b1)
  got = family.kl(family.to_natural(a1, b1), family.to_natural(a2, b2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
