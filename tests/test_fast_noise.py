"""The cheap counter-based generator (noise="hash"): its statistics.

Oracles: the standard normal's moments (with their standard errors), zero
correlation across steps, leaves, neighbours and MC samples, a KS test, and
the Price identity E[g(m + s e) e] / s = E_q[Hessian] on a known function.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import blrax
from blrax._src import fast_noise

N = 1 << 20


def draw(key, tree):
  return fast_noise.hash_normal_like(key, tree)


def test_moments_and_ks():
  x = np.asarray(draw(jax.random.key(0), jnp.zeros(N)), np.float64)
  assert abs(x.mean()) < 5 / np.sqrt(N)
  assert abs(x.var() - 1) < 5 * np.sqrt(2 / N)
  assert abs(stats.skew(x)) < 5 * np.sqrt(6 / N)
  assert abs(stats.kurtosis(x)) < 5 * np.sqrt(24 / N)
  assert stats.kstest(x[:100_000], "norm").pvalue > 1e-3
  # tails exist but are finite (23-bit uniforms: |x| < 5.6)
  assert 4.0 < np.abs(x).max() < 6.0


def corr(a, b):
  return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_no_correlation_across_steps_leaves_neighbours_and_samples():
  opt = blrax.ivon(0.1, ess=10.0, noise="hash", mc_samples=2)
  params = {"a": jnp.zeros(N // 4), "b": jnp.zeros(N // 4)}
  state = opt.init(params)
  (posterior,) = blrax.find_posteriors(state)
  now = posterior.noise()
  later = posterior._replace(key=posterior.next_key()).noise()
  bound = 5 / np.sqrt(N // 4)
  a0, a1 = np.asarray(now["a"][0]), np.asarray(now["a"][1])
  assert abs(corr(a0, np.asarray(later["a"][0]))) < bound   # across steps
  assert abs(corr(a0, np.asarray(now["b"][0]))) < bound     # across leaves
  assert abs(corr(a0, a1)) < bound                          # across samples
  assert abs(corr(a0[:-1], a0[1:])) < bound                 # neighbours
  assert abs(corr(a0[:-1] ** 2, a0[1:] ** 2)) < bound       # not just linear


def test_price_identity_holds_with_hash_noise():
  # loss = sum(c t^4 / 4): E_q[Hessian] = 3 c (m^2 + s^2).
  c = jnp.array([1.0, 0.5, 2.0])
  m = jnp.array([0.5, -1.0, 0.2])
  sigma = 0.3
  keys = jax.random.split(jax.random.key(3), 200_000)
  eps = jax.vmap(lambda k: draw(k, jnp.zeros(3)))(keys)
  grads = c * (m + sigma * eps) ** 3
  estimates = np.asarray(grads * eps / sigma, np.float64)
  want = 3 * np.asarray(c) * (np.asarray(m) ** 2 + sigma**2)
  se = estimates.std(0) / np.sqrt(len(estimates))
  np.testing.assert_array_less(np.abs(estimates.mean(0) - want), 5 * se)


def test_hash_posterior_type_is_stable_and_found():
  opt = blrax.ivon(0.1, ess=10.0, noise="hash")
  params = jnp.zeros(4)
  state = opt.init(params)
  theta = blrax.sample_params(params, state)
  _, new_state = jax.jit(opt.update)(theta, state, params)
  assert type(new_state[0].posterior) is type(state[0].posterior)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert not np.allclose(blrax.sample_params(params, new_state), theta)
