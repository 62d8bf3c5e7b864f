"""The cheap counter-based generator (noise="hash"): its statistics.

Oracles: the standard normal's moments (with their standard errors), zero
correlation across steps, leaves, neighbours and MC samples, a KS test, and
the Price identity E[g(m + s e) e] / s = E_q[Hessian] on a known function.
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import blrax
import blrax.checkpoint
from blrax._src.noise import fast as fast_noise
from blrax._src.noise import generators as noise

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
  later = posterior._replace(noise_state=noise.HashNoise().advance(
      posterior.noise_state, after=None)).noise()
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


# --- noise="flip": sign flips of a stored draw refreshed slice by slice ------


def flip_sequence(shape, steps, refresh_every, mc_samples=1, key=0):
  """The noise of ``steps`` consecutive updates at fixed curvature."""
  opt = blrax.ivon(0.1, ess=10.0, mc_samples=mc_samples, key=key,
                   noise=blrax.noise.flip_noise(refresh_every))
  (posterior,) = blrax.find_posteriors(opt.init(jnp.zeros(shape)))

  @jax.jit
  def run(posterior):
    def step(post, _):
      advanced = post._replace(noise_state=blrax.noise.flip_noise(refresh_every)
                               .advance(post.noise_state, post.curvature))
      return advanced, post.noise()
    return jax.lax.scan(step, posterior, None, length=steps)[1]

  return np.asarray(run(posterior), np.float64)


def check_standard_normal(x):
  x = np.ravel(x)
  n = x.size
  assert abs(x.mean()) < 5 / np.sqrt(n)
  assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
  assert abs(stats.skew(x)) < 5 * np.sqrt(6 / n)
  assert abs(stats.kurtosis(x)) < 5 * np.sqrt(24 / n)
  assert stats.kstest(x[:100_000], "norm").pvalue > 1e-3


def test_flip_noise_of_each_step_is_standard_normal():
  eps = flip_sequence((512, 512), steps=12, refresh_every=4)
  check_standard_normal(eps[0])    # the initial (threefry) draw, flipped
  check_standard_normal(eps[-1])   # every element redrawn since (hash)


def test_flip_noise_across_steps_uncorrelated_magnitudes_renewed():
  k = 8
  eps = flip_sequence((256, 256), steps=2 * k + 1, refresh_every=k)
  bound = 5 / np.sqrt(eps[0].size)
  for lag in (1, 2, k):
    assert abs(corr(eps[0], eps[lag])) < bound
  # The trade-off, as documented: magnitudes persist within a period...
  same = np.isclose(np.abs(eps[0]), np.abs(eps[1]))
  np.testing.assert_allclose(same.mean(), 1 - 1 / k, atol=1e-3)
  assert corr(eps[0] ** 2, eps[1] ** 2) > 0.8
  # ...and every element is redrawn within refresh_every steps, after which
  # the magnitudes are independent.
  assert not np.isclose(np.abs(eps[0]), np.abs(eps[k])).any()
  assert abs(corr(eps[0] ** 2, eps[k] ** 2)) < bound
  assert abs(corr(eps[3] ** 2, eps[k + 3] ** 2)) < bound
  # Rank-one sign patterns: still no correlation between neighbours.
  assert abs(corr(eps[0][:, :-1], eps[0][:, 1:])) < bound
  assert abs(corr(eps[0][:-1], eps[0][1:])) < bound


def test_flip_noise_samples_have_independent_signs():
  eps = flip_sequence((256, 256), steps=2, refresh_every=8, mc_samples=2)
  assert eps.shape == (2, 2, 256, 256)
  assert abs(corr(eps[0, 0], eps[0, 1])) < 5 / 256
  np.testing.assert_allclose(np.abs(eps[0, 0]), np.abs(eps[0, 1]))


def test_price_identity_holds_over_the_flip_sequence():
  # loss = sum(c t^4 / 4) per column; rows are independent replicates. The
  # Price estimate averaged over the generator's own sequence (two refresh
  # periods, magnitudes shared within each) is unbiased for E_q[Hessian].
  rows, k, steps = 40_000, 8, 16
  c = np.array([1.0, 0.5, 2.0])
  m = np.array([0.5, -1.0, 0.2])
  sigma = 0.3
  eps = flip_sequence((rows, 3), steps=steps, refresh_every=k, key=5)
  grads = c * (m + sigma * eps) ** 3
  per_row = (grads * eps / sigma).mean(0)          # (rows, 3), independent
  want = 3 * c * (m**2 + sigma**2)
  se = per_row.std(0) / np.sqrt(rows)
  np.testing.assert_array_less(np.abs(per_row.mean(0) - want), 5 * se)
  # The check resolves biases of a few percent.
  assert (se < 0.01 * want).all()


def test_flip_noise_is_zero_without_noise_and_type_is_stable():
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "s": jnp.zeros(())}
  opt = blrax.ivon(0.1, ess=float("inf"), noise="flip")
  state = opt.init(params)
  for leaf in jax.tree.leaves(blrax.sample_params(params, state)):
    np.testing.assert_array_equal(leaf, 0.0)
  opt = blrax.ivon(0.1, ess=10.0, noise="flip")
  state = opt.init(params)
  theta = blrax.sample_params(params, state)
  _, new_state = jax.jit(opt.update)(theta, state, params)
  assert type(new_state[0].posterior) is type(state[0].posterior)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert type(new_state[0].posterior.noise_state) is noise.FlipNoiseState


@pytest.mark.parametrize("generator", ["normal", "hash", blrax.noise.flip_noise(7)])
def test_state_pickles_and_resumes_identically(generator):
  # Plain data: no classes made at run time, whatever the generator.
  opt = blrax.ivon(0.1, ess=10.0, noise=generator, mc_samples=2)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  state = opt.init(params)
  step = jax.jit(lambda s: opt.update(
      jax.tree.map(lambda t: t ** 3, blrax.sample_params(params, s)), s,
      params)[1])
  state = step(state)
  copy = pickle.loads(pickle.dumps(state))
  assert jax.tree.structure(copy) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(step(copy)), jax.tree.leaves(step(state))):
    np.testing.assert_array_equal(raw(x), raw(y))


def test_flip_checkpoint_resumes_identically(tmp_path):
  opt = blrax.ivon(0.05, ess=50.0, noise=blrax.noise.flip_noise(4))
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  loss = lambda p: jnp.sum(p["w"] ** 4)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(jax.grad(loss)(blrax.sample_params(p, s)), s, p)))
  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)
  blrax.checkpoint.save_checkpoint(tmp_path / "ckpt", params, state)
  restored = blrax.checkpoint.restore_checkpoint(tmp_path / "ckpt", params, state)
  a, b = (params, state), restored
  for _ in range(6):
    a, b = step(*a), step(*b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(raw(x), raw(y))


def raw(x):
  """Key data of a typed PRNG key, the array otherwise."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


@pytest.mark.parametrize("refresh_every", [0, -3, 2.0, True, "8"])
def test_flip_noise_rejects_bad_refresh_every(refresh_every):
  with pytest.raises(ValueError, match="refresh_every"):
    blrax.noise.flip_noise(refresh_every)


def test_flip_noise_keeps_the_stored_draw_exact_in_float64():
  # The noise is the stored draw with signs flipped, bit for bit: no detour
  # through float32 (which would round a float64 draw).
  with jax.enable_x64(True):
    params = {"w": jnp.zeros((5, 7), jnp.float64), "b": jnp.zeros(3, jnp.float64)}
    state = blrax.ivon(0.1, ess=10.0, noise="flip", mc_samples=2).init(params)
    (posterior,) = blrax.find_posteriors(state)
    noise = posterior.noise()
    for name in params:
      assert noise[name].dtype == jnp.float64
      np.testing.assert_array_equal(
          np.abs(noise[name]),
          np.broadcast_to(np.abs(posterior.noise_state.base_noise[name]),
                          noise[name].shape))
