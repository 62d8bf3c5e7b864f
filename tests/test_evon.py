"""EVON: IVON in SOAP's eigenbasis, a structured Gaussian posterior.

Oracles:
- the covariance of the posterior samples against the Kronecker formula
  (Q_R (x) Q_L) diag(sigma^2) (Q_R (x) Q_L)^T built with numpy.kron;
- linear regression: the closed-form posterior (ess (H + delta I))^-1, and
  ``blrax.von(covariance="full")``; logistic regression: full VON;
- ess = inf with ``hessian=``: three steps against a float64 NumPy
  transcription of the equations (eigenbases, the curvature carried into a
  new basis as the diagonal of the old Kronecker matrix, IVON's step).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax


def _train(opt, loss, params, steps, *args):
  """``steps`` jitted EVON/IVON/VON steps; returns (params, state)."""

  def body(carry, _):
    params, state = carry
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(jax.grad(loss)(theta, *args), state, params)
    return (optax.apply_updates(params, updates), state), None

  return jax.lax.scan(body, (params, opt.init(params)), None, steps)[0]


def _kron_covariance(left, right, sigma):
  """(Q_R (x) Q_L) diag(vec sigma^2) (Q_R (x) Q_L)^T, vec column-major."""
  rows, cols = sigma.shape
  left = np.eye(rows) if left.size == 0 else np.asarray(left, np.float64)
  right = np.eye(cols) if right.size == 0 else np.asarray(right, np.float64)
  k = np.kron(right, left)
  return k @ np.diag(np.asarray(sigma, np.float64).ravel(order="F") ** 2) @ k.T


# ---------------------------------------------------------------------------
# 1. Samples have the structured covariance.
# ---------------------------------------------------------------------------


def test_sample_covariance_matches_kronecker_formula():
  params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
  opt = blrax.evon(0.01, ess=50.0, weight_decay=0.1, b2=0.5,
                   precondition_frequency=2, precondition_1d=True, key=3)
  rng = np.random.default_rng(0)
  # Gradients with structure (a scaled random matrix), so the factors have
  # distinct eigenvalues and the Price curvature varies across entries.
  scales = {"w": rng.normal(size=(3, 4)) * np.array([3.0, 1.0, 0.3])[:, None],
            "b": rng.normal(size=3) * np.array([2.0, 0.5, 0.1])}

  @jax.jit
  def step(params, state, g):
    theta = blrax.sample_params(params, state)
    grads = jax.tree.map(lambda s, t: s + t, g, theta)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(opt.init)(params)
  for i in range(5):
    g = {k: (v * (1 + 0.3 * i)).astype(np.float32) for k, v in scales.items()}
    params, state = step(params, state, g)
  n = 40000

  @jax.jit
  def readout(params, state):
    post = blrax.find_posteriors(state)[0]
    return (post.left, post.right, post.rotated_stddev(),
            blrax.sample_posterior(jax.random.key(11), params, state, n),
            blrax.posterior_stddev(state))

  left, right, sigma, samples, stddev = readout(params, state)
  for name in ("w", "b"):
    shape = params[name].shape
    mat = (shape[0], 1) if len(shape) == 1 else shape
    want = _kron_covariance(left[name], right[name],
                            np.reshape(sigma[name], mat))
    x = (np.asarray(samples[name], np.float64)
         - np.asarray(params[name], np.float64)).reshape(n, *mat)
    x = x.transpose(0, 2, 1).reshape(n, -1)  # column-major vec
    got = x.T @ x / n
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    # Each normalised entry has sampling stddev <= sqrt(2/n) = 0.007.
    np.testing.assert_array_less(np.abs(got - want) / scale, 0.04)
    # The covariance is far from diagonal: the test can tell.
    offdiag = np.abs(want - np.diag(np.diag(want))) / scale
    assert offdiag.max() > 0.3, offdiag.max()
    # posterior_stddev: the marginal stddev in the original coordinates.
    np.testing.assert_allclose(
        np.asarray(stddev[name], np.float64).reshape(mat).ravel(order="F"),
        np.sqrt(np.diag(want)), rtol=1e-5)


# ---------------------------------------------------------------------------
# 2. Linear and logistic regression: EVON recovers the full posterior.
# ---------------------------------------------------------------------------

N, D, DELTA = 200, 3, 0.01
STEPS = 3000
HYPER = dict(ess=float(N), weight_decay=DELTA, b2=0.999)


def _glm_loss(w, x, y, logistic):
  """Mean loss of a linear (logistic = 0) or logistic (= 1) regression."""
  z = x @ w
  return jnp.mean(logistic * (jnp.logaddexp(0.0, z) - y * z)
                  + (1.0 - logistic) * 0.5 * jnp.square(z - y))


@functools.cache
def _glm_trainer(name):
  opt = {
      # A long memory for the factors: the basis of the posterior is the
      # eigenbasis of E[G G^T], estimated from the gradients at the draws.
      "evon": blrax.evon(0.1, shampoo_beta=0.999, precondition_frequency=10,
                         precondition_1d=True, **HYPER),
      "von": blrax.von(0.1, covariance="full", **HYPER),
  }[name]

  @jax.jit
  def train(x, y, logistic):
    params, state = _train(opt, _glm_loss, jnp.zeros(D), STEPS, x, y,
                           logistic)
    post = blrax.find_posteriors(state)[0]
    if name == "von":
      return params, post.covariance()
    return params, (post.left, post.right, post.rotated_stddev())

  return train


def _covariance(name, x, y, logistic):
  params, out = _glm_trainer(name)(
      np.asarray(x, np.float32), np.asarray(y, np.float32),
      np.float32(logistic))
  if name == "von":
    return np.asarray(params), np.asarray(out, np.float64)
  left, right, sigma = out
  return np.asarray(params), _kron_covariance(
      left, right, np.asarray(sigma).reshape(D, 1))


def _relative(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_linear_regression_recovers_full_posterior():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(N, D))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / N)).T  # whitened
  rotation = np.linalg.qr(rng.normal(size=(D, D)))[0]
  x = z @ np.diag(np.sqrt([0.5, 2.0, 8.0])) @ rotation.T  # H eigvals 0.5, 2, 8
  y = x @ np.array([1.0, -1.0, 2.0]) + rng.normal(size=N)
  hessian = x.T @ x / N  # of the mean loss
  precision = N * (hessian + DELTA * np.eye(D))
  closed_form = np.linalg.inv(precision)
  mean = np.linalg.solve(precision, x.T @ y)
  # Far from diagonal: a diagonal posterior could not match it.
  best_diagonal = np.diag(1.0 / np.diag(precision))
  assert _relative(best_diagonal, closed_form) > 0.5

  m_evon, cov_evon = _covariance("evon", x, y, 0.0)
  m_von, cov_von = _covariance("von", x, y, 0.0)
  np.testing.assert_allclose(m_evon, mean, atol=0.05)
  # Monte-Carlo error of the curvature EMA (b2 = 0.999) and of the basis:
  # measured 0.046 against the closed form, 0.035 against full VON (whose
  # own error is 0.039).
  assert _relative(cov_evon, closed_form) < 0.1
  assert _relative(cov_evon, cov_von) < 0.1
  assert _relative(cov_von, closed_form) < 0.1


def test_logistic_regression_matches_full_von():
  rng = np.random.default_rng(1)
  rotation = np.linalg.qr(rng.normal(size=(D, D)))[0]
  x = rng.normal(size=(N, D)) @ np.diag([0.5, 1.5, 4.0]) @ rotation.T
  logits = x @ np.array([0.5, -1.0, 0.3])
  y = (rng.uniform(size=N) < 1 / (1 + np.exp(-logits))).astype(np.float64)
  m_evon, cov_evon = _covariance("evon", x, y, 1.0)
  m_von, cov_von = _covariance("von", x, y, 1.0)
  correlation = cov_von / np.sqrt(np.outer(np.diag(cov_von), np.diag(cov_von)))
  assert np.abs(correlation - np.eye(D)).max() > 0.5  # far from diagonal
  np.testing.assert_allclose(m_evon, m_von, atol=0.1)  # posterior sd ~0.13
  # Measured 0.067 (both carry Monte-Carlo error of a few percent).
  assert _relative(cov_evon, cov_von) < 0.15


# ---------------------------------------------------------------------------
# 3. ess = inf with hessian=: a deterministic SOAP-like method, by hand.
# ---------------------------------------------------------------------------


def _positive_ema(h, target, rho, delta):
  return ((1 - rho) * h + rho * target
          + 0.5 * rho**2 * (h - target) ** 2 / (h + delta))


def _eigvecs(a):
  return np.linalg.eigh(a)[1]


@pytest.mark.parametrize("source,prior", [
    ("hessian", "scalar"), ("price", "scalar"), ("price", "per_leaf"),
    ("hessian", "mask"), ("price", "prior_mean")])
def test_steps_match_hand_computation(source, prior):
  """Three steps in float64 against NumPy. ``hessian``: ess = inf, the
  deterministic SOAP-like limit (Newton in the rotated basis with IVON's
  momentum); ``price``: ess finite, two MC samples, the Price estimate in
  the rotated basis with the noise recovered from the draws. ``prior``: one
  weight decay, one per leaf, a mask that switches it off for ``v``, or a
  prior mean :math:`M_0` (the pull is :math:`\\delta(M - M_0)`)."""
  lr, b1, b2, beta, h0 = 0.3, 0.8, 0.6, 0.7, 2.0
  decay_args, deltas = {
      "scalar": (dict(weight_decay=0.05), {"w": 0.05, "v": 0.05}),
      "per_leaf": (dict(weight_decay={"w": 0.05, "v": 0.4}),
                   {"w": 0.05, "v": 0.4}),
      "mask": (dict(weight_decay=0.05,
                    weight_decay_mask={"w": True, "v": False}),
               {"w": 0.05, "v": 0.0}),
      "prior_mean": (dict(weight_decay=0.3, prior_mean={
          "w": np.linspace(-1.0, 1.0, 6).reshape(3, 2),
          "v": np.array([0.5, -2.0])}), {"w": 0.3, "v": 0.3})}[prior]
  prior_means = decay_args.get("prior_mean", {"w": np.zeros((3, 2)),
                                              "v": np.zeros(2)})
  ess, samples = (np.inf, 1) if source == "hessian" else (30.0, 2)
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    opt = blrax.evon(lr, ess=ess, hess_init=h0, b1=b1, b2=b2,
                     **decay_args, shampoo_beta=beta,
                     precondition_frequency=2, mc_samples=samples,
                     precondition_1d=True)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))),
              "v": jnp.asarray(rng.normal(size=2))}
    state = opt.init(params)
    update = jax.jit(opt.update)
    draw = jax.jit(blrax.sample_params)
    # Oracle state, float64, per leaf as (rows, cols) matrices.
    mats = {"w": (3, 2), "v": (2, 1)}
    lead = () if samples == 1 else (samples,)
    m = {k: np.asarray(params[k]).reshape(mats[k]) for k in params}
    h = {k: np.full(mats[k], h0) for k in params}
    g = {k: np.zeros(mats[k]) for k in params}
    lf = {k: np.zeros((mats[k][0],) * 2) for k in params}
    rf = {k: np.zeros((mats[k][1],) * 2) for k in params}
    ql = {k: np.eye(mats[k][0]) for k in params}
    qr = {k: np.eye(mats[k][1]) for k in params}
    for t in (1, 2, 3):
      theta = draw(params, state)
      grads = {k: rng.normal(size=lead + mats[k]) for k in params}
      hess = {k: rng.uniform(0.5, 3.0, size=mats[k]) for k in params}
      updates, state = update(
          {k: jnp.asarray(grads[k].reshape(lead + params[k].shape))
           for k in params}, state, params,
          hessian=None if source == "price" else
          {k: jnp.asarray(hess[k].reshape(params[k].shape)) for k in params})
      params = optax.apply_updates(params, updates)
      for k in params:
        delta = deltas[k]
        if source == "price":
          sigma = 1 / np.sqrt(ess * (h[k] + delta))
          offset = np.asarray(theta[k]).reshape(lead + mats[k]) - m[k]
          noise = ql[k].T @ offset @ qr[k] / sigma
          target = np.mean(ql[k].T @ grads[k] @ qr[k] * noise / sigma, 0)
          grad = grads[k].mean(0)
        else:
          target, grad = hess[k], grads[k]
        h[k] = _positive_ema(h[k], target, 1 - b2, delta)
        g[k] = b1 * g[k] + (1 - b1) * grad
        lf[k] = beta * lf[k] + (1 - beta) * grad @ grad.T
        rf[k] = beta * rf[k] + (1 - beta) * grad.T @ grad
        if t in (1, 3):  # (t - 1) % 2 == 0: a new basis
          new_l = _eigvecs(lf[k]) if mats[k][0] > 1 else ql[k]
          new_r = _eigvecs(rf[k]) if mats[k][1] > 1 else qr[k]
          # The old curvature matrix, its diagonal in the new basis.
          old = np.kron(qr[k], ql[k])
          matrix = old @ np.diag(h[k].ravel(order="F")) @ old.T
          new = np.kron(new_r, new_l)
          h[k] = np.diag(new.T @ matrix @ new).reshape(mats[k], order="F")
          ql[k], qr[k] = new_l, new_r
        numerator = g[k] / (1 - b1**t) + delta * (
            m[k] - prior_means[k].reshape(mats[k]))
        step = ql[k].T @ numerator @ qr[k] / (h[k] + delta) * (h0 + delta)
        m[k] = m[k] - lr * ql[k] @ step @ qr[k].T
        np.testing.assert_allclose(
            np.asarray(params[k]).reshape(mats[k]), m[k], rtol=1e-10,
            atol=1e-12, err_msg=f"{k} at step {t}")
    post = blrax.find_posteriors(state)[0]
    for k in params:
      np.testing.assert_allclose(
          np.asarray(post.curvature[k]).reshape(mats[k]), h[k], rtol=1e-10)
      # The state's h' lives in the state's basis: compare the matrices.
      got = _kron_covariance(post.left[k], post.right[k], np.sqrt(
          np.asarray(post.curvature[k]).reshape(mats[k])))
      want = _kron_covariance(ql[k], qr[k], np.sqrt(h[k]))
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    if source == "price":
      return
    # A point mass: no spread, the draw is the mean.
    theta, stddev = jax.jit(lambda p, s: (blrax.sample_params(p, s),
                                          blrax.posterior_stddev(s)))(
        params, state)
    for k in params:
      np.testing.assert_array_equal(theta[k], params[k])
      np.testing.assert_array_equal(stddev[k], 0.0)


def test_bases_have_canonical_column_signs():
  """eigh's column signs are arbitrary (and differ across shardings, see
  tests/multidevice_script.py); each column's largest entry is positive."""
  opt = blrax.evon(0.1, ess=100.0, key=2)
  params = jnp.zeros((5, 4))
  grads = jax.random.normal(jax.random.key(0), (5, 4))
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  post = blrax.find_posteriors(state)[0]
  for basis in (post.left, post.right):
    basis = np.asarray(basis)
    np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-5)
    largest = basis[np.argmax(np.abs(basis), axis=0), np.arange(len(basis))]
    assert np.all(largest > 0), largest


def test_refresh_carries_the_curvature_matrix_through_a_permuted_basis():
  """A refresh to the same eigenspaces (eigh reorders its vectors as the
  eigenvalues cross, and may flip them) leaves the curvature matrix
  K diag(h') K^T exactly as the EMA made it in the old basis."""
  b2, delta = 0.5, 0.1
  with jax.enable_x64(True):
    opt = blrax.scale_by_evon(jnp.inf, b2=b2, shampoo_beta=0.0,
                              precondition_frequency=1, weight_decay=delta)
    params = jnp.zeros((3, 3))
    state = opt.init(params)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(2)
    # Fixed singular vectors, singular values that cross: the bases are
    # the same up to order and sign from step 2 on.
    u = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    v = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    orders = []
    for t in range(4):
      grads = u @ np.diag([1.0 + t, 2.5, 3.7 - 0.5 * t]) @ v.T
      hess = rng.uniform(0.5, 2.0, size=(3, 3))
      old = state.posterior
      want = _kron_covariance(old.left, old.right, np.sqrt(_positive_ema(
          np.asarray(old.curvature), hess, 1 - b2, delta)))
      _, state = update(jnp.asarray(grads), state, params,
                            hessian=jnp.asarray(hess))
      new = state.posterior
      orders.append(np.argmax(np.abs(np.asarray(new.left).T @ u), axis=1))
      if t > 0:
        got = _kron_covariance(new.left, new.right,
                               np.sqrt(np.asarray(new.curvature)))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert len({tuple(o) for o in orders}) > 1  # the basis was permuted


# ---------------------------------------------------------------------------
# 4. Bad inputs raise ValueError naming the argument; extreme grads stay finite.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(ess=-1.0), "ess"), (dict(ess=0.0), "ess"),
    (dict(ess=float("nan")), "ess"), (dict(hess_init=0.0), "hess_init"),
    (dict(b1=1.0), "b1"), (dict(b2=1.5), "b2"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(clip_radius=0.0), "clip_radius"),
    (dict(shampoo_beta=-0.1), "shampoo_beta"),
    (dict(shampoo_beta=1.5), "shampoo_beta"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=2.5), "precondition_frequency"),
    (dict(max_precond_dim=0), "max_precond_dim"),
    (dict(precondition_1d="yes"), "precondition_1d"),
    (dict(mc_samples=0), "mc_samples"), (dict(learning_rate=-0.1),
                                         "learning_rate"),
    (dict(noise="uniform"), "noise"), (dict(key=-1), "key"),
])
def test_bad_hyperparameters_raise(kwargs, name):
  kwargs = {"learning_rate": 0.1, "ess": 10.0, **kwargs}
  with pytest.raises(ValueError, match=f"{name}="):
    blrax.evon(**kwargs)


def test_per_element_or_bad_prior_raises():
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  # A per-element precision is not isotropic: not diagonal once rotated.
  opt = blrax.evon(0.1, ess=10.0, weight_decay={"w": jnp.ones((2, 3)),
                                                "b": 0.1})
  with pytest.raises(ValueError, match=r"one scalar per leaf.*\['w'\]"):
    opt.init(params)
  with pytest.raises(ValueError, match="weight_decay"):
    blrax.evon(0.1, ess=10.0, weight_decay={"w": -1.0, "b": 0.1})
  with pytest.raises(ValueError, match="weight_decay_mask"):
    blrax.evon(0.1, ess=10.0, weight_decay_mask={"w": 1.0, "b": 0.0})
  with pytest.raises(ValueError, match="structure"):
    blrax.evon(0.1, ess=10.0, weight_decay={"w": 0.1}).init(params)


def test_per_leaf_prior_equals_scalar_and_mask():
  """A pytree of equal decays is the scalar; a mask is the pytree with 0."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  grads = {"w": jnp.full((3, 2), 0.3), "b": jnp.full(2, -0.2)}

  def run(**kwargs):  # two steps: a refresh at the first, then rotated
    opt = blrax.evon(0.1, ess=20.0, key=1, precondition_frequency=2,
                     **kwargs)

    @jax.jit
    def steps(p):
      state = opt.init(p)
      for _ in range(2):
        updates, state = opt.update(grads, state, p)
        p = optax.apply_updates(p, updates)
      return p, blrax.posterior_stddev(state)
    return steps(params)

  scalar = run(weight_decay=0.3)
  chex.assert_trees_all_close(scalar, run(weight_decay={"w": 0.3, "b": 0.3}),
                              rtol=1e-6)
  masked = run(weight_decay=0.3, weight_decay_mask=lambda p: {
      "w": True, "b": False})
  chex.assert_trees_all_close(masked, run(weight_decay={"w": 0.3, "b": 0.0}),
                              rtol=1e-6)
  with pytest.raises(AssertionError):  # the mask does change the b leaf
    chex.assert_trees_all_close(masked, scalar, rtol=1e-6)


def test_bad_update_inputs_raise():
  params = {"w": jnp.zeros((2, 3))}
  opt = blrax.evon(0.1, ess=10.0)
  state = opt.init(params)
  with pytest.raises(ValueError, match="shape"):
    opt.update({"w": jnp.zeros((3, 2))}, state, params)
  with pytest.raises(ValueError, match="hessian"):
    opt.update(params, state, params, hessian={"w": jnp.zeros(6)})
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state, None)
  inf_opt = blrax.evon(0.1, ess=jnp.inf)
  with pytest.raises(ValueError, match="hessian"):
    inf_opt.update(params, inf_opt.init(params), params)


@pytest.mark.parametrize("ess, delta", [(1e4, 1e-4), (1e12, 0.0)])
def test_extreme_finite_gradients_keep_state_finite(ess, delta):
  params = {"w": np.zeros((8, 6), np.float32), "v": np.zeros(5, np.float32)}
  opt = blrax.evon(0.1, ess=ess, weight_decay=delta, precondition_frequency=1,
                   precondition_1d=True)

  @jax.jit
  def step(params, state, scale, phase):
    theta = blrax.sample_params(params, state)
    # Signs that change every step: generic bases, mixed-sign sums of huge
    # entries inside the rotations.
    grads = jax.tree.map(
        lambda t: scale * jnp.sign(jnp.sin(17.0 * jnp.arange(t.size) + phase)
                                   ).reshape(t.shape).astype(t.dtype), theta)
    updates, state = opt.update(grads, state, params)
    post = blrax.find_posteriors(state)[0]
    return (optax.apply_updates(params, updates), state, updates,
            blrax.posterior_stddev(state), post.curvature, post.left)

  state = opt.init(params)
  big = float(np.finfo(np.float32).max)
  for i, scale in enumerate((1e30, big, -big, big, 1e-38, 0.0, 3e20, -1e-30)):
    params, state, updates, stddev, curvature, left = step(
        params, state, np.float32(scale), np.float32(i))
    for tree in (params, updates, stddev, curvature, left, state[0].momentum,
                 state[0].left_factor, state[0].right_factor):
      for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(leaf)), (scale, tree)
    for leaf in jax.tree.leaves(curvature):
      assert np.all(np.asarray(leaf) + delta > 0)
    for q in jax.tree.leaves(left):  # still orthogonal
      np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)


# ---------------------------------------------------------------------------
# 5. Inside optax wrappers; abstract init.
# ---------------------------------------------------------------------------


def _run(opt, params, steps=3):
  """A few jitted steps of a quadratic loss; returns (params, state)."""
  loss = lambda p: sum(jnp.sum(jnp.square(x - 1.0) * (1.0 + jnp.arange(x.size)
                                                      ).reshape(x.shape))
                       for x in jax.tree.leaves(p))
  return jax.jit(functools.partial(_train, opt, loss, steps=steps))(params)


def test_inject_hyperparams_matches_chain():
  params = {"w": np.ones((3, 2), np.float32) * 0.5, "b": np.zeros(2, np.float32)}
  kw = dict(ess=100.0, precondition_frequency=2, max_precond_dim=8, key=4)
  chained = optax.chain(optax.clip_by_global_norm(1e9),
                        blrax.scale_by_evon(**kw), optax.scale(-0.1))
  want, _ = _run(chained, params)
  injected = optax.inject_hyperparams(
      blrax.evon, static_args=("mc_samples", "max_precond_dim"))(
          learning_rate=0.1, **kw)
  got, state = _run(injected, params)
  assert isinstance(blrax.find_posteriors(state)[0], blrax.EigenbasisGaussian)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert np.all(np.abs(np.asarray(got[k]) - params[k]) > 1e-3)  # it moved


def test_masked_params_get_no_noise_and_abstract_init():
  params = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}
  opt = optax.masked(blrax.evon(0.1, ess=10.0), {"w": True, "b": False})
  _, state = _run(opt, params, steps=2)
  theta = jax.jit(blrax.sample_params)(params, state)
  np.testing.assert_array_equal(theta["b"], params["b"])
  assert np.all(np.asarray(theta["w"]) != params["w"])
  stddev = jax.jit(blrax.posterior_stddev)(state, params)
  np.testing.assert_array_equal(stddev["b"], 0.0)
  assert np.all(np.asarray(stddev["w"]) > 0)
  # init only maps over the params: ShapeDtypeStructs give the same state.
  plain = blrax.evon(0.1, ess=10.0)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  state = plain.init(params)
  for a, b in zip(jax.tree.leaves(plain.init(abstract)),
                  jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # By default (as in SOAP) vectors stay diagonal: no basis stored.
  assert state[0].posterior.left["b"].shape == (0, 0)
  assert state[0].posterior.left["w"].shape == (3, 3)
