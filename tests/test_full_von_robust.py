"""Full-covariance VON with the Price estimator stays finite where float32
cannot factor the curvature (unscaled breast-cancer features, b2 = 0.9), and
its Price estimate saturates where the products overflow float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_breast_cancer

import blrax
from blrax._src.posteriors import full as full_gaussian


def test_price_path_never_turns_nan_on_ill_conditioned_logistic_regression():
  x, y = load_breast_cancer(return_X_y=True)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(p, xb, yb):
    return optax.sigmoid_binary_cross_entropy(xb @ p["w"] + p["b"], yb).mean()

  opt = blrax.von(0.1, ess=float(len(x)), covariance="full", b2=0.9)
  params = {"w": jnp.zeros(30), "b": jnp.zeros(())}

  def step(carry, key):
    p, s = carry
    idx = jax.random.randint(key, (64,), 0, len(x))
    grads = jax.grad(loss)(blrax.sample_params(p, s), x[idx], y[idx])
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  keys = jax.random.split(jax.random.key(0), 300)
  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))(
      (params, opt.init(params)))
  for leaf in jax.tree.leaves((params, state, blrax.posterior_stddev(state))):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))
  # The curvature did move (the guard keeps the last good S, not the first).
  curvature = np.asarray(state[0].posterior.curvature)
  assert np.abs(curvature - np.eye(31)).max() > 1.0


_price = jax.jit(full_gaussian.price_curvature)


def _price_float64(grads, noise, precision):
  """The Price estimate in float64 NumPy (the oracle): mean over samples of
  sym(g_s (theta_s - m)^T P), with theta_s - m = C^-T eps_s, C C^T = P."""
  grads, noise = np.float64(grads), np.float64(noise)
  chol = np.linalg.cholesky(np.float64(precision))
  offsets = np.linalg.solve(chol.T, noise.T).T
  outer = grads.T @ (offsets @ precision) / len(grads)
  return 0.5 * (outer + outer.T)


@pytest.mark.parametrize("samples", [1, 2])
def test_price_estimate_of_huge_gradients_saturates_instead_of_nan(samples):
  """Gradients of 3e38 with alternating signs: each product overflows
  float32, and an unscaled outer product adds +inf to -inf, which gives NaN
  or inf depending on how XLA orders the sums. The estimate is the float64
  one saturated at float32's largest value, entry by entry."""
  dim, ess = 5, 7.0
  signs = np.where(np.arange(dim) % 2, 1.0, -1.0)
  grads = np.stack([signs * 3e38, -signs * 2e38][:samples]).astype(np.float32)
  noise = np.asarray(jax.random.normal(jax.random.key(1), (samples, dim)))
  curvature = 3.0 * np.eye(dim) + 0.5  # S + D
  got = np.asarray(_price(grads, noise, np.linalg.cholesky(curvature), ess))
  big = float(np.finfo(np.float32).max)
  want = np.clip(_price_float64(grads, noise, ess * curvature), -big, big)
  assert np.all(np.isfinite(got))
  # float32 rounding of sums of terms up to ~1e38 (cancellations in the
  # off-diagonal entries of two samples).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * big)


def test_price_estimate_of_ordinary_gradients_is_the_plain_formula():
  """The power-of-two scaling is exact: the same bits as the unscaled
  product, and the float64 estimate to float32 rounding."""
  rng = np.random.default_rng(0)
  grads = rng.standard_normal((3, 6)).astype(np.float32) * 7.0
  noise = rng.standard_normal((3, 6)).astype(np.float32)
  curvature = np.float32(rng.standard_normal((6, 6)))
  curvature = curvature @ curvature.T + 6.0 * np.eye(6, dtype=np.float32)
  factor, ess = np.linalg.cholesky(curvature), np.float32(30.0)

  @jax.jit
  def plain(grads, noise, factor, ess):
    outer = grads.T @ (noise @ factor.T * jnp.sqrt(ess)) / len(grads)
    return 0.5 * (outer + outer.T)

  got = _price(grads, noise, factor, ess)
  np.testing.assert_array_equal(got, plain(grads, noise, factor, ess))
  np.testing.assert_allclose(
      got, _price_float64(grads, noise, ess * np.float64(curvature)),
      rtol=1e-5, atol=1e-4)
