"""Full-covariance VON with a diagonal prior, and under blrax.MultiSteps.

Oracles: a float64 NumPy transcription of the full-VON step (the Price
estimate with the positivity correction of Lin et al. 2020, or a given
Hessian; the Newton step) with a per-coordinate prior precision
diag(delta), a mask and a prior mean, over several steps, fed the noise the
state draws; the library's own mc_samples=k step for MultiSteps (sample i
sees micro-batch i, as tests/test_accumulation.py checks the diagonal
optimizers); Bayes' rule in closed form for merging.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import blrax

RNG = np.random.default_rng(0)
PARAMS = {"w": np.array([[0.3, -0.2, 0.1], [0.5, 0.2, -0.4]]),
          "b": np.array([0.2, -0.4])}
DIM = 8  # ravel_pytree order: b (2), then w (6)
A = RNG.normal(size=(12, DIM))
Y = RNG.normal(size=12)
DECAY = {"w": 0.3, "b": np.array([0.0, 2.0])}
MASK = {"w": np.array([[True, False, True], [True, True, False]]), "b": True}
FLAT_DECAY = np.array([0.0, 2.0, 0.3, 0.0, 0.3, 0.3, 0.3, 0.0])
PRIOR_MEAN = {"w": np.full((2, 3), 0.25), "b": np.array([-1.0, 1.0])}
HYPER = dict(ess=30.0, hess_init=0.5, b2=0.8)
LR = 0.1


def flat(tree):
  return ravel_pytree(tree)[0]


def loss(params):
  """sum_i log cosh(a_i . theta - y_i): coordinates coupled through A."""
  z = jnp.asarray(A) @ flat(params) - jnp.asarray(Y)
  return jnp.sum(jnp.logaddexp(z, -z) - jnp.log(2.0))


def np_grad(theta):
  return A.T @ np.tanh(A @ theta - Y)


def np_hessian(theta):
  return A.T @ (A * (1.0 - np.tanh(A @ theta - Y) ** 2)[:, None])


def full_von_oracle(m, decay, m0, noises, hessian, ess, hess_init, b2, lr):
  """Full VON in float64, one step per ``noises`` entry ((S, D) each)."""
  m, dim = np.asarray(m, np.float64), len(m)
  diag = np.diag(decay)
  s = hess_init * np.eye(dim)
  rho = 1.0 - b2
  for eps in noises:
    chol = np.linalg.cholesky(ess * (s + diag))
    thetas = m + np.linalg.solve(chol.T, eps.T).T  # m + L^-T eps
    grads = np.stack([np_grad(t) for t in thetas])
    if hessian:
      s = (1 - rho) * s + rho * np.mean([np_hessian(t) for t in thetas], 0)
    else:
      outer = grads.T @ (eps @ chol.T) / len(eps)  # mean_s g_s (L eps_s)^T
      h_hat = 0.5 * (outer + outer.T)
      a = s + diag
      c = (1 - rho) * a + rho * (h_hat + diag)
      s = 0.5 * (a + c.T @ np.linalg.solve(a, c)) - diag
    s = 0.5 * (s + s.T)
    m = m - lr * np.linalg.solve(s + diag, grads.mean(0) + decay * (m - m0))
  return m, s


def run(opt, params, steps, hessian, mc):
  """``steps`` jitted steps at the state's draws; the noise of each."""
  grad = jax.grad(loss)
  hess = jax.hessian(lambda v, unravel: loss(unravel(v)))

  @jax.jit
  def step(params, state):
    noise = blrax.find_posteriors(state)[0].noise()
    theta = blrax.sample_params(params, state)
    if mc == 1:
      grads = grad(theta)
    else:
      grads = jax.vmap(grad)(theta)
    extra = {}
    if hessian:
      _, unravel = ravel_pytree(params)
      one = lambda t: hess(flat(t), unravel)  # noqa: E731
      extra["hessian"] = one(theta) if mc == 1 else jax.vmap(one)(theta)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, noise

  state = opt.init(params)
  noises = []
  for _ in range(steps):
    params, state, eps = step(params, state)
    noises.append(np.asarray(eps, np.float64).reshape(-1, DIM))
  return params, state, noises


@pytest.mark.parametrize("mc", [1, 2])
@pytest.mark.parametrize("hessian", [False, True], ids=["price", "hessian"])
def test_per_leaf_decay_mask_and_prior_mean_match_the_numpy_oracle(hessian,
                                                                   mc):
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, PARAMS)
    opt = blrax.von(LR, covariance="full", weight_decay=DECAY,
                    weight_decay_mask=MASK, prior_mean=PRIOR_MEAN,
                    mc_samples=mc, **HYPER)
    params, state, noises = run(opt, params, 5, hessian, mc)
    m, s = full_von_oracle(flat(PARAMS), FLAT_DECAY, flat(PRIOR_MEAN),
                           noises, hessian, lr=LR, **HYPER)
    posterior = blrax.find_posteriors(state)[0]
    np.testing.assert_array_equal(posterior.weight_decay, FLAT_DECAY)
    np.testing.assert_allclose(flat(params), m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(posterior.curvature, s, rtol=1e-10,
                               atol=1e-12)
    precision = HYPER["ess"] * (s + np.diag(FLAT_DECAY))
    np.testing.assert_allclose(posterior.precision(), precision, rtol=1e-10)
    np.testing.assert_allclose(
        flat(blrax.posterior_stddev(state)),
        np.sqrt(np.diag(np.linalg.inv(precision))), rtol=1e-10)
    np.testing.assert_array_equal(flat(posterior.decays()), FLAT_DECAY)
    # The curvature moved: the oracle is not checking the initial state.
    assert np.abs(s - HYPER["hess_init"] * np.eye(DIM)).max() > 0.1


def test_per_leaf_equal_scalars_and_a_mask_are_the_scalar_case():
  """A pytree of equal scalars is the scalar decay; a mask is a per-leaf
  decay with zeros where False."""
  params = jax.tree.map(jnp.asarray, PARAMS)
  scalar, s_scalar, _ = run(blrax.von(LR, covariance="full", weight_decay=0.3,
                                      **HYPER), params, 4, False, 1)
  tree, s_tree, _ = run(blrax.von(LR, covariance="full",
                                  weight_decay={"w": 0.3, "b": 0.3}, **HYPER),
                        params, 4, False, 1)
  np.testing.assert_allclose(flat(tree), flat(scalar), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(flat(blrax.posterior_stddev(s_tree)),
                             flat(blrax.posterior_stddev(s_scalar)), rtol=1e-6)
  assert np.ndim(blrax.find_posteriors(s_scalar)[0].weight_decay) == 0
  masked, _, _ = run(blrax.von(LR, covariance="full", weight_decay=0.3,
                               weight_decay_mask={"w": True, "b": False},
                               **HYPER), params, 4, False, 1)
  by_leaf, _, _ = run(blrax.von(LR, covariance="full",
                                weight_decay={"w": 0.3, "b": 0.0}, **HYPER),
                      params, 4, False, 1)
  np.testing.assert_allclose(flat(masked), flat(by_leaf), rtol=1e-6,
                             atol=1e-7)


def test_bad_per_leaf_decay_and_mask_are_named():
  with pytest.raises(ValueError, match="weight_decay"):
    blrax.von(LR, covariance="full", weight_decay={"w": -1.0, "b": 0.0},
              **HYPER)
  with pytest.raises(ValueError, match="weight_decay_mask"):
    blrax.von(LR, covariance="full", weight_decay_mask={"w": 1.0, "b": 0.0},
              **HYPER)
  with pytest.raises(ValueError, match="structure of the params"):
    blrax.von(LR, covariance="full", weight_decay={"w": 0.1},
              **HYPER).init(PARAMS)


# --- blrax.MultiSteps --------------------------------------------------------

K = 3
X = RNG.normal(size=(K, DIM))


def micro_loss(params, i):
  """Micro-batch i's loss (its own targets)."""
  z = jnp.asarray(A) @ flat(params) - jnp.asarray(Y) * (1.0 + i)
  return jnp.sum(jnp.logaddexp(z, -z)) + jnp.dot(jnp.asarray(X[i]),
                                                 flat(params))


def _micro_hessian(params, i):
  _, unravel = ravel_pytree(params)
  return jax.hessian(lambda v: micro_loss(unravel(v), i))(flat(params))


def _with_keys(state, keys):
  def swap(x):
    if isinstance(x, blrax.FullGaussian):
      return x._replace(key=keys)
    return x
  return jax.tree.map(swap, state,
                      is_leaf=lambda x: isinstance(x, blrax.FullGaussian))


@pytest.mark.parametrize("hessian", [False, True], ids=["price", "hessian"])
def test_multisteps_equals_mc_samples_k_in_one_step(hessian):
  """Two updates of K micro-batches, each at its own draw, equal two
  mc_samples=K steps in which sample i sees micro-batch i (float64: equal
  up to the order of the sums)."""
  with jax.enable_x64(True):
    _multisteps_vs_mc_samples(hessian)


def _multisteps_vs_mc_samples(hessian):
  make = lambda mc: blrax.von(  # noqa: E731
      0.1, covariance="full", weight_decay=DECAY, weight_decay_mask=MASK,
      prior_mean=PRIOR_MEAN, mc_samples=mc, **HYPER)
  multi, single = blrax.MultiSteps(make(1), every_k_schedule=K), make(K)
  params = ref_params = jax.tree.map(jnp.asarray, PARAMS)
  state, ref_state = multi.init(params), single.init(params)
  multi_update, single_update = jax.jit(multi.update), jax.jit(single.update)
  grad = jax.grad(micro_loss)
  for _ in range(2):
    keys, draws = [], []
    for i in range(K):
      keys.append(blrax.find_posteriors(state)[0].key)
      theta = blrax.sample_params(params, state)
      draws.append(theta)
      extra = {"hessian": _micro_hessian(theta, i)} if hessian else {}
      updates, state = multi_update(grad(theta, i), state, params, **extra)
      if i < K - 1:
        assert all(np.all(np.asarray(u) == 0)
                   for u in jax.tree.leaves(updates))
        assert int(state.inner_state[0].accumulator.count) == i + 1
    assert int(state.inner_state[0].accumulator.count) == 0
    # Each micro-batch drew anew (its own key, its own draw).
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == K
    assert len({tuple(np.asarray(flat(d)).round(12)) for d in draws}) == K
    params = optax.apply_updates(params, updates)
    ref_state = _with_keys(ref_state, jnp.stack(keys))
    ref_draws = blrax.sample_params(ref_params, ref_state)
    stacked = jax.tree.map(lambda *t: jnp.stack(t), *draws)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                         atol=1e-14),
                 ref_draws, stacked)
    grads = jax.tree.map(lambda *g: jnp.stack(g),
                         *[grad(t, i) for i, t in enumerate(draws)])
    extra = ({"hessian": jnp.stack([_micro_hessian(t, i)
                                    for i, t in enumerate(draws)])}
             if hessian else {})
    ref_updates, ref_state = single_update(grads, ref_state, ref_params,
                                           **extra)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    np.testing.assert_allclose(flat(updates), flat(ref_updates), rtol=1e-11,
                               atol=1e-13)
    np.testing.assert_allclose(
        blrax.find_posteriors(state)[0].curvature,
        blrax.find_posteriors(ref_state)[0].curvature, rtol=1e-11,
        atol=1e-13)
  # Not the one-draw update: the statistics were averaged.
  one = make(1)
  u1, _ = one.update(grad(draws[-1], K - 1), one.init(PARAMS), PARAMS)
  assert not np.allclose(flat(u1), flat(updates), rtol=1e-3)


def test_multisteps_memory_and_reset():
  opt = blrax.MultiSteps(blrax.von(0.1, ess=10.0, covariance="full"),
                         every_k_schedule=2)
  state = opt.init(PARAMS)
  acc = state.inner_state[0].accumulator
  assert acc.gradient.shape == (DIM,) and acc.statistic.shape == (DIM, DIM)
  plain = blrax.von(0.1, ess=10.0, covariance="full")
  with pytest.raises(ValueError, match="MultiSteps"):
    plain.update(PARAMS, plain.init(PARAMS), PARAMS, blrax_accumulate=True)
  # A posterior state without an accumulator field is still refused.

  class Bare(NamedTuple):
    count: jax.Array
    posterior: blrax.FullGaussian

  inner = plain.init(PARAMS)[0]
  bare = optax.GradientTransformation(
      lambda p: Bare(inner.count, inner.posterior), lambda u, s, p=None: (u, s))
  with pytest.raises(ValueError, match="cannot accumulate Bare"):
    blrax.MultiSteps(bare, every_k_schedule=2).init(PARAMS)


# --- merging, health, tempering, the predictive ------------------------------

S2 = 0.25


def _fit(x, y, prior_precision, prior_mean):
  """One exact Newton step of full VON on Bayesian linear regression with
  the prior N(m0, diag(prior_precision)^-1): the exact posterior."""
  n, d = x.shape
  opt = blrax.von(1.0, ess=float(n), covariance="full", b2=0.0,
                  weight_decay={"a": prior_precision[:2] / n,
                                "b": prior_precision[2:] / n},
                  prior_mean={"a": prior_mean[:2], "b": prior_mean[2:]})
  params = {"a": jnp.zeros(2), "b": jnp.zeros(d - 2)}
  state = opt.init(params)
  mean_loss = lambda p: 0.5 * jnp.mean((y - x @ flat(p)) ** 2) / S2  # noqa: E731
  updates, state = opt.update(jax.grad(mean_loss)(params), state, params,
                              hessian=x.T @ x / (S2 * n))
  return optax.apply_updates(params, updates), state


def _joint(x, y, prior_precision, prior_mean):
  precision = np.diag(prior_precision) + x.T @ x / S2
  mean = np.linalg.solve(precision, prior_precision * prior_mean + x.T @ y / S2)
  return mean, precision


def test_merge_with_a_per_coordinate_prior_is_the_joint_posterior():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    lam0 = np.array([0.5, 4.0, 0.0, 2.0])  # one coordinate without a prior
    m0 = np.array([0.3, -0.5, 0.0, 1.0])
    xs = [rng.normal(size=(n, 4)) for n in (7, 20, 13)]
    ys = [x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.5 * rng.normal(size=len(x))
          for x in xs]
    shards = [_fit(jnp.asarray(x), jnp.asarray(y), lam0, m0)
              for x, y in zip(xs, ys)]
    params, state = blrax.merge_posteriors(*zip(*shards))
    mean, precision = _joint(np.concatenate(xs), np.concatenate(ys), lam0, m0)
    np.testing.assert_allclose(flat(params), mean, rtol=1e-9, atol=1e-12)
    post = blrax.find_posteriors(state)[0]
    np.testing.assert_allclose(post.precision(), precision, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(post.weight_decay, lam0 / 40.0, rtol=1e-12)
    # An explicit prior: a pytree like the params (scalars or arrays).
    params2, state2 = blrax.merge_posteriors(
        *zip(*shards), prior_precision={"a": jnp.asarray(lam0[:2]),
                                        "b": jnp.asarray(lam0[2:])},
        prior_mean={"a": m0[:2], "b": m0[2:]})
    np.testing.assert_allclose(flat(params2), mean, rtol=1e-9, atol=1e-12)
    # Another prior, divided out shard by shard and multiplied in once.
    other = np.array([1.0, 1.0, 3.0, 3.0])
    params3, state3 = blrax.merge_posteriors(
        *zip(*shards), prior_precision={"a": 1.0, "b": 3.0},
        prior_mean={"a": m0[:2], "b": m0[2:]})
    mean3, precision3 = _joint(np.concatenate(xs), np.concatenate(ys), other,
                               m0)
    np.testing.assert_allclose(flat(params3), mean3, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(blrax.find_posteriors(state3)[0].precision(),
                               precision3, rtol=1e-9, atol=1e-12)


def test_merge_keeps_a_scalar_decay_scalar_and_refuses_a_varying_one():
  params = jnp.zeros(2)
  opt = blrax.von(0.1, ess=10.0, covariance="full", weight_decay=0.1)
  s = opt.init(params)
  _, merged = blrax.merge_posteriors([params, params], [s, s],
                                     prior_precision=jnp.full(2, 3.0))
  decay = blrax.find_posteriors(merged)[0].weight_decay
  assert np.ndim(decay) == 0 and float(decay) == pytest.approx(3.0 / 20.0)
  with pytest.raises(ValueError, match="scalar weight_decay"):
    blrax.merge_posteriors([params, params], [s, s],
                           prior_precision=jnp.array([1.0, 2.0]))


def test_health_tempering_and_predictive_see_the_per_coordinate_prior():
  params = jax.tree.map(jnp.asarray, PARAMS)
  opt = blrax.von(LR, covariance="full", weight_decay=DECAY,
                  weight_decay_mask=MASK, hess_init=2.0, b2=0.9, ess=30.0)
  state = opt.init(params)
  health = blrax.posterior_health(params, state, hess_init=2.0, b2=0.9,
                                  warn=False)
  decays = {"b": FLAT_DECAY[:2], "w": FLAT_DECAY[2:]}
  for k in ("b", "w"):
    np.testing.assert_allclose(health.leaves[k]["prior_share"],
                               np.median(decays[k] / (2.0 + decays[k])),
                               rtol=1e-6)
  tempered = blrax.tempered(state, 4.0, prior_scale=2.0)
  post = blrax.find_posteriors(tempered)[0]
  np.testing.assert_allclose(post.weight_decay, 2.0 * FLAT_DECAY, rtol=1e-6)
  np.testing.assert_allclose(
      flat(blrax.posterior_stddev(tempered)),
      1 / np.sqrt(30.0 / 4.0 * (2.0 + 2.0 * FLAT_DECAY)), rtol=1e-6)
  # The linearised predictive of f(theta) = a . theta: variance a' P^-1 a.
  a = jnp.asarray(A[:3], jnp.float32)
  apply_fn = lambda p, x: x @ flat(p)  # noqa: E731
  _, var = blrax.predictive.linearized_mean_variance(
      apply_fn, None, params, state, a, noise_variance=0.0,
      method="closed_form")
  covariance = np.linalg.inv(30.0 * (2.0 * np.eye(DIM) + np.diag(FLAT_DECAY)))
  np.testing.assert_allclose(
      var, np.einsum("np,pq,nq->n", A[:3], covariance, A[:3]), rtol=1e-5)
  with pytest.raises(ValueError, match="FullGaussian.*not diagonal"):
    blrax.posterior_as_prior(params, state, ess=10.0)
