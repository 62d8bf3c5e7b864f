"""The prior per parameter: weight_decay as a pytree or a mask, and prior_mean.

Oracles: a NumPy transcription of IVON's step (blrax.ivon) with a per-leaf
delta and a prior mean; the scalar case; a quadratic whose MAP under the prior
is known in closed form; full VON's Newton step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

PARAMS = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5]]), "b": jnp.array([0.2, -0.4])}
TARGET = {"w": jnp.array([[1.0, 2.0], [-1.0, 0.5]]), "b": jnp.array([0.7, -0.1])}


def loss(params):
  return sum(jnp.sum(jnp.cosh(params[k] - TARGET[k])) for k in params)


def _ivon_oracle(params, decay, prior_mean, noise, lr, ess, hess_init, b1, b2,
                 steps):
  """IVON's update, step by step in float64, with a per-leaf delta."""
  h0 = hess_init
  m = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = {k: np.full(v.shape, h0) for k, v in m.items()}
  g = {k: np.zeros(v.shape) for k, v in m.items()}
  grad = jax.grad(loss)
  for t in range(1, steps + 1):
    eps = noise[t - 1]
    sigma = {k: 1 / np.sqrt(ess * (h[k] + decay[k])) for k in m}
    theta = {k: m[k] + sigma[k] * eps[k] for k in m}
    gs = {k: np.asarray(v, np.float64) for k, v in
          grad({k: jnp.asarray(v, jnp.float32) for k, v in theta.items()}).items()}
    for k in m:
      d = decay[k]
      h_hat = gs[k] * eps[k] / sigma[k]
      g[k] = b1 * g[k] + (1 - b1) * gs[k]
      h[k] = (b2 * h[k] + (1 - b2) * h_hat
              + 0.5 * (1 - b2) ** 2 * (h[k] - h_hat) ** 2 / (h[k] + d))
      direction = (g[k] / (1 - b1 ** t) + d * (m[k] - prior_mean[k])) / (h[k] + d)
      m[k] = m[k] - lr * (h0 + d) * direction
  return m, h


def _run(opt, params, steps):
  """``steps`` jitted steps at the draws; the noise of each, in float64."""
  @jax.jit
  def step(params, state):
    noise = blrax.find_posteriors(state)[0].noise()
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(jax.grad(loss)(theta), state, params)
    return optax.apply_updates(params, updates), state, noise

  state = jax.jit(opt.init)(params)
  noise = []
  for _ in range(steps):
    params, state, eps = step(params, state)
    noise.append({k: np.asarray(v, np.float64) for k, v in eps.items()})
  return params, state, noise


HYPER = dict(ess=30.0, hess_init=0.5, b1=0.9, b2=0.9)


def test_per_leaf_decay_and_prior_mean_match_the_numpy_oracle():
  decay = {"w": 0.3, "b": jnp.array([0.0, 2.0])}  # a scalar and an array
  prior_mean = {"w": jnp.full((2, 2), 0.25), "b": jnp.array([-1.0, 1.0])}
  opt = blrax.ivon(0.05, weight_decay=decay, prior_mean=prior_mean, **HYPER)
  params, state, noise = _run(opt, PARAMS, 5)
  decay_np = {"w": np.full((2, 2), 0.3), "b": np.array([0.0, 2.0])}
  m, h = _ivon_oracle(PARAMS, decay_np, {k: np.asarray(v) for k, v in
                                         prior_mean.items()}, noise, 0.05,
                      steps=5, **HYPER)
  posterior = blrax.find_posteriors(state)[0]
  for k in m:
    np.testing.assert_allclose(params[k], m[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(posterior.curvature[k], h[k], rtol=2e-5)
    np.testing.assert_allclose(  # sigma uses the leaf's own delta
        blrax.posterior_stddev(state)[k],
        1 / np.sqrt(HYPER["ess"] * (h[k] + decay_np[k])), rtol=2e-5)


def test_pytree_of_equal_scalars_is_the_scalar_case():
  tree = {"w": 0.3, "b": 0.3}
  a, sa, _ = _run(blrax.ivon(0.05, weight_decay=0.3, **HYPER), PARAMS, 4)
  b, sb, _ = _run(blrax.ivon(0.05, weight_decay=tree, **HYPER), PARAMS, 4)
  for k in PARAMS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(blrax.posterior_stddev(sa)[k],
                               blrax.posterior_stddev(sb)[k], rtol=1e-6)


@pytest.mark.parametrize("mask", [
    {"w": True, "b": False},
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),  # as optax.adamw(mask=)
])
def test_mask_zeroes_the_decay_where_false(mask):
  masked, sm, _ = _run(
      blrax.ivon(0.05, weight_decay=0.3, weight_decay_mask=mask, **HYPER),
      PARAMS, 4)
  tree, st, _ = _run(
      blrax.ivon(0.05, weight_decay={"w": 0.3, "b": 0.0}, **HYPER), PARAMS, 4)
  for k in PARAMS:
    np.testing.assert_allclose(masked[k], tree[k], rtol=1e-6, atol=1e-7)
  decays = blrax.find_posteriors(sm)[0].weight_decay
  assert float(decays["b"]) == 0.0 and float(decays["w"]) == pytest.approx(0.3)


@pytest.mark.parametrize("make", [
    lambda **kw: blrax.von(1.0, ess=jnp.inf, b2=0.0, **kw),
    lambda **kw: blrax.von(1.0, ess=jnp.inf, b2=0.0, covariance="full", **kw),
], ids=["diag", "full"])
def test_newton_limit_reaches_the_map_under_the_prior(make):
  """Quadratic 0.5 H (x - a)^2 and prior delta (x - m0)^2 / 2: one Newton
  step lands on (H a + delta m0) / (H + delta)."""
  hess_diag, a, m0, delta = jnp.array([2.0, 0.5]), jnp.array([1.0, -3.0]), \
      jnp.array([4.0, 2.0]), 0.7
  opt = make(weight_decay=delta, prior_mean=m0)
  x = jnp.zeros(2)
  state = opt.init(x)
  grads = hess_diag * (x - a)
  hessian = jnp.diag(hess_diag) if "full" in str(
      type(blrax.find_posteriors(state)[0])).lower() else hess_diag
  updates, state = opt.update(grads, state, x, hessian=hessian)
  np.testing.assert_allclose(x + updates,
                             (hess_diag * a + delta * m0) / (hess_diag + delta),
                             rtol=1e-6)


def test_vogn_hessian_keyword_equals_per_example_grads():
  """VOGN's update from (mean grads, hessian=mean squared per-example grads)
  is its update from per-example grads."""
  x = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
  example_loss = lambda w, xi: jnp.tanh(xi @ w) ** 2
  w = jnp.array([0.3, -0.4])
  opt = blrax.vogn(0.1, ess=100.0, hess_init=0.5)
  state = opt.init(w)
  theta = blrax.sample_params(w, state)
  per_example = blrax.per_example_grads(example_loss, theta, x)
  a, sa = opt.update(per_example, state, w)
  b, sb = opt.update(per_example.mean(0), state, w,
                     hessian=jnp.mean(per_example ** 2, 0))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(blrax.find_posteriors(sa)[0].curvature,
                             blrax.find_posteriors(sb)[0].curvature, rtol=1e-6)


def test_prior_under_masked_and_inject_hyperparams():
  """A per-leaf decay works inside optax.masked (holes) and with a scalar
  decay injected as a hyperparameter."""
  opt = optax.masked(blrax.ivon(0.05, weight_decay={"w": 0.3, "b": 0.0},
                                ess=30.0),
                     {"w": True, "b": False})
  state = opt.init(PARAMS)
  updates, state = opt.update(jax.grad(loss)(PARAMS), state, PARAMS)
  assert set(blrax.posterior_stddev(state, PARAMS)) == {"w", "b"}
  injected = optax.inject_hyperparams(blrax.ivon)(
      learning_rate=0.05, ess=30.0, weight_decay=0.3,
      prior_mean=jax.tree.map(jnp.zeros_like, PARAMS))
  s = injected.init(PARAMS)
  u, s = injected.update(jax.grad(loss)(PARAMS), s, PARAMS)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(u))


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_decay={"w": -1.0, "b": 0.0}), "weight_decay"),
    (dict(weight_decay={"w": jnp.nan, "b": 0.0}), "weight_decay"),
    (dict(weight_decay={"w": 0.1}), "structure"),
    (dict(weight_decay={"w": jnp.ones(3), "b": 0.0}), "broadcast"),
    (dict(weight_decay_mask={"w": 1.0, "b": True}), "weight_decay_mask"),
    (dict(weight_decay_mask={"w": True}), "structure"),
    (dict(prior_mean={"w": jnp.zeros((2, 2)), "b": jnp.array([jnp.inf, 0.0])}),
     "prior_mean"),
    (dict(prior_mean={"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}), "broadcast"),
])
def test_bad_prior_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    blrax.ivon(0.1, ess=10.0, **kwargs).init(PARAMS)


def test_full_von_keeps_a_per_leaf_decay_per_coordinate():
  """Its prior precision is ess * diag(delta); tests/test_full_von.py has the
  step's oracle."""
  opt = blrax.von(0.1, ess=10.0, covariance="full",
                  weight_decay={"w": 0.1, "b": jnp.array([0.0, 2.0])},
                  weight_decay_mask={"w": jnp.array([[True, False]] * 2),
                                     "b": True})
  posterior = blrax.find_posteriors(opt.init(PARAMS))[0]
  np.testing.assert_allclose(posterior.weight_decay,  # ravel order: b, w
                             [0.0, 2.0, 0.1, 0.0, 0.1, 0.0], rtol=1e-6)
