"""Quadratic surrogates as limits of the BLR (blrax.von, blrax.vadam).

With ess = inf there is no noise: VON with an exact Hessian and
alpha = rho = 1 is Newton's method; Vadam is Adam; IVON is a deterministic
diagonal Newton method with momentum. Oracles: linear solves, NumPy Newton
iterates, optax.adam, and steps computed by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

INF = float("inf")
RNG = np.random.default_rng(0)
M = RNG.normal(size=(5, 5))
A = M @ M.T + 5 * np.eye(5)  # SPD
B = RNG.normal(size=5)


def split(v):
  """A pytree view of a 5-vector (tests ravel_pytree order)."""
  return {"u": v[:2], "w": v[2:].reshape(3, 1)}


def quadratic(params):
  v = jnp.concatenate([params["u"], params["w"].ravel()])
  return 0.5 * v @ A @ v - B @ v


def flat(params):
  return np.concatenate([np.asarray(params["u"]), np.asarray(params["w"]).ravel()])


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_von_full_newton_solves_quadratic_in_one_step(weight_decay):
  with jax.enable_x64(True):
    params = split(jnp.asarray(RNG.normal(size=5)))
    opt = blrax.von(1.0, ess=INF, covariance="full", b2=0.0,
                    weight_decay=weight_decay)
    state = opt.init(params)
    hessian = jax.hessian(lambda v: quadratic(split(v)))(flat(params))
    updates, state = opt.update(jax.grad(quadratic)(params), state, params,
                                hessian=hessian)
    params = optax.apply_updates(params, updates)
    # Newton on the loss plus (delta/2)|m|^2: (A + delta I) m = b.
    want = np.linalg.solve(A + weight_decay * np.eye(5), B)
    np.testing.assert_allclose(flat(params), want, rtol=1e-10, atol=1e-12)
    # A point mass: no noise, zero stddev.
    np.testing.assert_array_equal(flat(blrax.sample_params(params, state)),
                                  flat(params))
    np.testing.assert_array_equal(flat(blrax.posterior_stddev(state)), 0.0)


def test_von_full_iterates_are_newton_iterates():
  """On a non-quadratic loss, k VON steps = k Newton steps (NumPy)."""
  with jax.enable_x64(True):
    c = RNG.normal(size=(5,))

    def loss_np_grad(v):
      return A @ v / 10 + np.sinh(v) - c

    def loss_np_hess(v):
      return A / 10 + np.diag(np.cosh(v))

    def loss(params):
      v = jnp.concatenate([params["u"], params["w"].ravel()])
      return 0.05 * v @ A @ v + jnp.sum(jnp.cosh(v)) - c @ v

    v = RNG.normal(size=5)
    params = split(jnp.asarray(v))
    opt = blrax.von(1.0, ess=INF, covariance="full", b2=0.0, weight_decay=0.0)
    state = opt.init(params)
    for _ in range(4):
      hessian = jax.hessian(lambda x: loss(split(x)))(flat(params))
      updates, state = opt.update(jax.grad(loss)(params), state, params,
                                  hessian=hessian)
      params = optax.apply_updates(params, updates)
      v = v - np.linalg.solve(loss_np_hess(v), loss_np_grad(v))
      np.testing.assert_allclose(flat(params), v, rtol=1e-10, atol=1e-12)


def test_von_diag_newton_on_separable_quadratic():
  with jax.enable_x64(True):
    a = jnp.array([1.0, 4.0, 0.5])
    b = jnp.array([2.0, -1.0, 3.0])
    loss = lambda p: 0.5 * jnp.sum(a * p**2) - b @ p
    params = jnp.array([10.0, -3.0, 7.0])
    opt = blrax.von(1.0, ess=INF, b2=0.0, weight_decay=0.0)
    state = opt.init(params)
    updates, state = opt.update(jax.grad(loss)(params), state, params,
                                hessian=a)
    np.testing.assert_allclose(params + updates, b / a, rtol=1e-12)


def test_von_diag_on_coupled_quadratic_is_jacobi_step():
  """Diagonal Newton on a coupled quadratic: m - diag(A)^-1 (A m - b)."""
  with jax.enable_x64(True):
    loss = lambda v: 0.5 * v @ A @ v - B @ v
    v = jnp.asarray(RNG.normal(size=5))
    opt = blrax.von(1.0, ess=INF, b2=0.0, weight_decay=0.0)
    updates, _ = opt.update(jax.grad(loss)(v), opt.init(v), v,
                            hessian=jnp.diag(A))
    want = np.asarray(v) - (A @ np.asarray(v) - B) / np.diag(A)
    np.testing.assert_allclose(v + updates, want, rtol=1e-12)


def test_von_without_hessian_at_infinite_ess_is_refused():
  opt = blrax.von(1.0, ess=INF)
  with pytest.raises(ValueError, match="hessian"):
    opt.update(jnp.ones(2), opt.init(jnp.zeros(2)), jnp.zeros(2))


def test_vadam_at_infinite_ess_without_decay_is_optax_adam():
  with jax.enable_x64(True):
    loss = lambda p: jnp.sum(jnp.cos(p) + 0.1 * p**4)
    params = jnp.asarray(RNG.normal(size=6))
    ours = blrax.vadam(0.05, ess=INF, b1=0.8, b2=0.95, weight_decay=0.0,
                       hess_init=0.0)
    adam = optax.adam(0.05, b1=0.8, b2=0.95, eps=0.0)
    s1, s2 = ours.init(params), adam.init(params)
    p1 = p2 = params
    sample, grad = jax.jit(blrax.sample_params), jax.jit(jax.grad(loss))
    ours_update, adam_update = jax.jit(ours.update), jax.jit(adam.update)
    for _ in range(20):
      np.testing.assert_array_equal(sample(p1, s1), p1)
      u1, s1 = ours_update(grad(sample(p1, s1)), s1, p1)
      u2, s2 = adam_update(grad(p2), s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(p1, p2, rtol=1e-12, atol=1e-14)


def test_vadam_at_infinite_ess_with_decay_by_hand():
  """Two steps written out: decay enters the momentum and the epsilon only."""
  with jax.enable_x64(True):
    lr, b1, b2, d = 0.1, 0.9, 0.99, 0.01
    m = np.array([1.0, -2.0])
    grad = lambda x: 2 * x + 1  # loss x^2 + x
    opt = blrax.vadam(lr, ess=INF, b1=b1, b2=b2, weight_decay=d,
                      hess_init=0.0)
    params = jnp.asarray(m)
    state = opt.init(params)
    g = s = np.zeros(2)
    for t in (1, 2):
      gb = grad(m)
      g = b1 * g + (1 - b1) * (gb + d * m)
      s = b2 * s + (1 - b2) * gb**2
      m = m - lr * (g / (1 - b1**t)) / (np.sqrt(s / (1 - b2**t)) + d)
      updates, state = opt.update(jnp.asarray(grad(np.asarray(params))), state,
                                  params)
      params = params + updates
      np.testing.assert_allclose(params, m, rtol=1e-12)


def test_ivon_at_infinite_ess_is_diagonal_newton_with_momentum():
  with jax.enable_x64(True):
    lr, b1, b2, h0, d = 0.5, 0.9, 0.8, 2.0, 0.01
    loss = lambda p: jnp.sum(p**4 / 4 + p**2)
    grad = lambda x: x**3 + 2 * x
    hess = lambda x: 3 * x**2 + 2
    m = np.array([1.5, -0.5, 0.2])
    opt = blrax.ivon(lr, ess=INF, hess_init=h0, b1=b1, b2=b2, weight_decay=d)
    params = jnp.asarray(m)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
      theta = blrax.sample_params(params, state)
      updates, state = opt.update(jax.grad(loss)(theta), state, params,
                                  hessian=jax.vmap(jax.grad(jax.grad(
                                      lambda x: x**4 / 4 + x**2)))(theta))
      return optax.apply_updates(params, updates), state, theta

    g, h = np.zeros(3), np.full(3, h0)
    for t in range(1, 6):
      hh = hess(m)
      g = b1 * g + (1 - b1) * grad(m)
      h = b2 * h + (1 - b2) * hh + 0.5 * (1 - b2) ** 2 * (h - hh) ** 2 / (h + d)
      m = m - lr * (h0 + d) * (g / (1 - b1**t) + d * m) / (h + d)
      new_params, state, theta = step(params, state)
      np.testing.assert_array_equal(theta, params)  # no noise
      params = new_params
      np.testing.assert_allclose(params, m, rtol=1e-12)
