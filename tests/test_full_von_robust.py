"""Full-covariance VON with the Price estimator stays finite where float32
cannot factor the curvature (unscaled breast-cancer features, b2 = 0.9)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer

import blrax


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
