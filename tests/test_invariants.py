"""Invariants of the diagonal posterior: positivity, sampling, determinism."""

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import WIDE, ids
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import blrax

finite_grads = hnp.arrays(
    np.float32, (4, 6),
    elements=st.floats(-1e3, 1e3, width=32, allow_nan=False))


@pytest.fixture(scope="module")
def ivon_step():
  """One jitted step with traced hyperparameters, compiled once."""

  def step(grads, hess_init, ess, b2, weight_decay, key):
    opt = blrax.scale_by_ivon(ess=ess, hess_init=hess_init, b2=b2,
                              weight_decay=weight_decay, key=key)
    params = jnp.zeros((6,))
    state = opt.init(params)
    hs = []
    for g in grads:  # several steps from the same draw sequence
      _, state = opt.update(g, state, params)
      hs.append(state.posterior.curvature)
    return jnp.stack(hs)

  return jax.jit(step)


@settings(max_examples=60, deadline=None)
@given(grads=finite_grads,
       hess_init=st.floats(1e-3, 10.0),
       ess=st.floats(1.0, 1e5),
       b2=st.floats(0.0, 0.99999),
       key=st.integers(0, 2**16))
def test_curvature_stays_positive_without_decay(ivon_step, grads, hess_init,
                                                ess, b2, key):
  h = ivon_step(grads, hess_init, ess, b2, 0.0, key)
  assert np.all(np.asarray(h) > 0), np.asarray(h).min()


@settings(max_examples=60, deadline=None)
@given(grads=finite_grads,
       hess_init=st.floats(1e-3, 10.0),
       ess=st.floats(1.0, 1e5),
       b2=st.floats(0.0, 0.99999),
       weight_decay=st.floats(1e-6, 1.0),
       key=st.integers(0, 2**16))
def test_precision_stays_positive_with_decay(ivon_step, grads, hess_init, ess,
                                             b2, weight_decay, key):
  # The correction guarantees h + delta >= (h_old + delta) / 2 > 0: the
  # posterior precision ess * (h + delta) stays positive.
  h = np.asarray(ivon_step(grads, hess_init, ess, b2, weight_decay, key))
  assert np.all(h + np.float32(weight_decay) > 0), (h + weight_decay).min()


def _trained_state(factory, kwargs, params, steps=5):
  opt = factory(**kwargs)
  loss = lambda p: jnp.sum(jnp.cos(3 * p) * p**2)
  mc = kwargs.get("mc_samples", 1)

  def step(carry, _):
    params, state = carry
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(cases.grads(factory, loss, theta, mc), state,
                                params, **cases.update_kwargs(factory, loss))
    return (optax.apply_updates(params, updates), state), None

  return jax.lax.scan(step, (params, opt.init(params)), length=steps)[0]


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_sample_posterior_moments_match_stddev(name, factory, kwargs):
  params, state = _trained_state(factory, dict(kwargs, b2=0.5),
                                 jnp.linspace(-1.0, 1.0, 8))
  std = np.asarray(blrax.posterior_stddev(state))
  assert np.ptp(std) > 0.05 * std.mean()  # the curvature moved: stds differ
  n = 20_000
  samples = np.asarray(blrax.sample_posterior(jax.random.key(7), params, state, n),
                       np.float64)
  # Standard errors: std/sqrt(n) for the mean, std/sqrt(2n) for the std.
  np.testing.assert_allclose(samples.mean(0), params, atol=5 * std.max() / np.sqrt(n))
  np.testing.assert_allclose(samples.std(0), std, rtol=5 / np.sqrt(2 * n))


def _replace_key(state, key):
  is_posterior = lambda x: isinstance(x, (blrax.DiagonalGaussian,
                                          blrax.FullGaussian,
                                          blrax.EigenbasisGaussian))

  def replace(x):
    if isinstance(x, blrax.FullGaussian):
      return x._replace(key=key)
    return x._replace(noise_state=x.noise_state._replace(key=key))

  return jax.tree.map(lambda x: replace(x) if is_posterior(x) else x,
                      state, is_leaf=is_posterior)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_sample_params_moments_match_stddev(name, factory, kwargs):
  """The per-step draws are N(m, sigma^2) too (over state keys).

  Flip noise stores the magnitudes |z| of its normal draw in the state and the
  key only flips signs (its marginals over steps are N(0, 1):
  tests/test_fast_noise.py), so over keys its draws are m +- sigma |z|."""
  params = jnp.linspace(-1.0, 1.0, 8)
  state = factory(**kwargs).init(params)
  draw = jax.jit(jax.vmap(
      lambda k: blrax.sample_params(params, _replace_key(state, k))))
  n = 20_000
  samples = np.asarray(draw(jax.random.split(jax.random.key(3), n)), np.float64)
  std = np.asarray(blrax.posterior_stddev(state))
  flip = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, blrax.noise.FlipNoiseState))
          if isinstance(x, blrax.noise.FlipNoiseState)]
  if flip:
    std = std * np.abs(np.asarray(flip[0].base_noise))
    np.testing.assert_allclose(np.abs(samples - np.asarray(params)),
                               np.broadcast_to(std, samples.shape), rtol=1e-5)
  np.testing.assert_allclose(samples.mean(0), params, atol=5 * std.max() / np.sqrt(n))
  np.testing.assert_allclose(samples.std(0), std, rtol=5 / np.sqrt(2 * n))


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_same_key_same_run_bitwise(name, factory, kwargs):
  params = jnp.linspace(-1.0, 1.0, 8)
  run = lambda key: _trained_state(factory, dict(kwargs, key=key), params, 4)
  (p1, s1), (p2, s2), (p3, _) = run(5), run(5), run(6)
  np.testing.assert_array_equal(p1, p2)
  np.testing.assert_array_equal(blrax.posterior_stddev(s1),
                                blrax.posterior_stddev(s2))
  assert not np.array_equal(p1, p3)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_bfloat16_params_float32_curvature(name, factory, kwargs):
  params = jnp.linspace(-1.0, 1.0, 8).astype(jnp.bfloat16)
  opt = factory(**dict(kwargs, b2=0.99999))
  state = opt.init(params)
  (posterior,) = blrax.find_posteriors(state)
  assert posterior.curvature.dtype == jnp.float32
  h0 = np.asarray(posterior.curvature).copy()
  loss = lambda t: jnp.sum(t.astype(jnp.float32) ** 2)
  step = jax.jit(lambda p, s: opt.update(
      cases.grads(factory, loss, blrax.sample_params(p, s),
                  kwargs.get("mc_samples", 1)), s, p,
      **cases.update_kwargs(factory, loss)))
  for _ in range(3):
    theta = blrax.sample_params(params, state)
    assert theta.dtype == jnp.bfloat16
    updates, state = step(params, state)
    assert updates.dtype == jnp.bfloat16
    params = optax.apply_updates(params, updates)
  assert params.dtype == jnp.bfloat16
  (posterior,) = blrax.find_posteriors(state)
  # A bf16 EMA with b2 = 0.99999 could not move (1 - 1e-5 rounds to 1).
  assert posterior.curvature.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(posterior.curvature) - h0)) > 0


@pytest.fixture(scope="module")
def von_full_step():
  def step(grads, hess_init, ess, b2, weight_decay, key):
    opt = blrax.scale_by_von(ess, covariance="full", hess_init=hess_init, b2=b2,
                             weight_decay=weight_decay, key=key)
    params = jnp.zeros((6,))
    state = opt.init(params)
    mats = []
    for g in grads:
      _, state = opt.update(g, state, params)
      mats.append(state.posterior.curvature)
    return jnp.stack(mats)

  return jax.jit(step)


@settings(max_examples=40, deadline=None)
@given(grads=hnp.arrays(np.float64, (4, 6),
                        elements=st.floats(-1e2, 1e2, allow_nan=False)),
       hess_init=st.floats(1e-2, 10.0),
       ess=st.floats(1.0, 1e3),
       b2=st.floats(0.9, 0.9999),
       weight_decay=st.floats(1e-3, 1.0),
       key=st.integers(0, 2**16))
def test_full_precision_stays_positive_definite(von_full_step, grads, hess_init,
                                                ess, b2, weight_decay, key):
  # Exact arithmetic guarantees S + dI >= (S_old + dI)/2 > 0. In floating
  # point an eigenvalue is only resolved to ~eps * |S|, so PD is checked
  # relative to the largest eigenvalue, and by a Cholesky factorisation (the
  # one the next update needs) succeeding.
  with jax.enable_x64(True):
    mats = np.asarray(von_full_step(grads, hess_init, ess, b2, weight_decay,
                                    key))
  for s in mats:
    precision = s + weight_decay * np.eye(6)
    eig = np.linalg.eigvalsh(precision)
    assert eig.min() > -1e-12 * eig.max(), eig
    np.linalg.cholesky(precision)
