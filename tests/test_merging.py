"""Bayes' rule as arithmetic on posteriors: merging shards, posterior as prior.

Oracle: Bayesian linear regression, whose posterior is Gaussian in closed form
(float64 NumPy): precision X'X/s2 + L0, mean its inverse times
(X'y/s2 + L0 m0). A posterior trained on each shard with the BLR's exact
expectations (VON with the exact Hessian, rho = lr = 1, the gradient at the
mean, which for a quadratic is E_q[grad]) is the shard's closed-form posterior
after one step; merging the shards must give the joint posterior.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

S2 = 0.5  # noise variance of the regression
ALPHA = 2.0  # prior precision, the same for every shard


def closed_form(x, y, prior_precision, prior_mean):
  """Posterior (mean, precision) of linear regression, float64 NumPy."""
  d = x.shape[1]
  lam0 = np.broadcast_to(np.asarray(prior_precision, np.float64), (d,))
  precision = x.T @ x / S2 + np.diag(lam0)
  mean = np.linalg.solve(precision, x.T @ y / S2 + lam0 * prior_mean)
  return mean, precision


def shard_data(seed, sizes, d, orthogonal=False):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=d)
  xs, ys = [], []
  for n in sizes:
    x = rng.normal(size=(n, d))
    if orthogonal:  # orthogonal columns, distinct norms: X'X diagonal
      q, _ = np.linalg.qr(x)
      x = q * rng.uniform(1.0, 4.0, size=d)
    xs.append(x)
    ys.append(x @ w + np.sqrt(S2) * rng.normal(size=n))
  return xs, ys


def mean_loss(w, x, y):
  return 0.5 * jnp.mean((y - x @ w) ** 2) / S2


def fit_von(x, y, weight_decay, covariance, steps=1, prior_mean=None):
  """VON with exact expectations on a quadratic: exact posterior in 1 step."""
  n = x.shape[0]
  x, y = jnp.asarray(x), jnp.asarray(y)
  hess = x.T @ x / (S2 * n)
  kw = {} if prior_mean is None else {"prior_mean": prior_mean}
  opt = blrax.von(1.0, ess=float(n), covariance=covariance, b2=0.0,
                  weight_decay=weight_decay, hess_init=1.0, **kw)
  params = jnp.zeros(x.shape[1])
  state = opt.init(params)
  for _ in range(steps):
    grads = jax.grad(mean_loss)(params, x, y)
    updates, state = opt.update(
        grads, state, params,
        hessian=hess if covariance == "full" else jnp.diag(hess))
    params = optax.apply_updates(params, updates)
  return params, state


def mean_field_shard(x, y, m0):
  """A diagonal VON state holding the mean-field optimum for one shard: the
  exact posterior mean, precision diag(X'X/s2) + ALPHA, prior mean m0."""
  n, d = x.shape
  mean, _ = closed_form(x, y, ALPHA, m0)
  state = blrax.von(1.0, ess=float(n), weight_decay=ALPHA / n).init(
      jnp.zeros(d))
  post = blrax.find_posteriors(state)[0]._replace(
      curvature=jnp.asarray(np.sum(x * x, 0) / (S2 * n)),
      prior_mean=jnp.asarray(m0))
  return jnp.asarray(mean), (state[0]._replace(posterior=post),) + state[1:]


def full_precision(state):
  return np.asarray(blrax.find_posteriors(state)[0].precision(), np.float64)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_merged_equals_joint_linear_regression(covariance):
  """K=3 shards of sizes 7, 20, 13, one prior N(m0, 1/ALPHA) (prior_mean= in
  the optimizer); diag uses orthogonal designs per shard."""
  with jax.enable_x64(True):
    sizes, d = (7, 20, 13), 3
    m0 = np.array([0.3, -0.5, 1.0])
    xs, ys = shard_data(0, sizes, d, orthogonal=covariance == "diag")
    shards = [fit_von(x, y, ALPHA / len(x), covariance, prior_mean=m0)
              for x, y in zip(xs, ys)]
    params, state = blrax.merge_posteriors(*zip(*shards))
    x, y = np.concatenate(xs), np.concatenate(ys)
    mean, precision = closed_form(x, y, ALPHA, m0)
    np.testing.assert_allclose(params, mean, rtol=1e-6, atol=1e-9)
    std = np.sqrt(np.diag(np.linalg.inv(precision)))
    np.testing.assert_allclose(blrax.posterior_stddev(state), std, rtol=1e-6)
    post = blrax.find_posteriors(state)[0]
    np.testing.assert_allclose(post.ess, sum(sizes))
    np.testing.assert_allclose(post.weight_decay, ALPHA / sum(sizes))
    if covariance == "full":
      np.testing.assert_allclose(full_precision(state), precision, rtol=1e-6)
    # Joint training (ess = N, weight_decay = L0/N) lands on the same state.
    joint_params, joint_state = fit_von(x, y, ALPHA / len(x), covariance,
                                        prior_mean=m0)
    np.testing.assert_allclose(params, joint_params, rtol=1e-6, atol=1e-9)
    joint = blrax.find_posteriors(joint_state)[0]
    np.testing.assert_allclose(post.curvature, joint.curvature, rtol=1e-6)
    np.testing.assert_allclose(post.weight_decay, joint.weight_decay, rtol=1e-9)
    np.testing.assert_allclose(post.prior_mean, m0)


def test_diagonal_not_exact_without_orthogonal_design():
  """The diagonal merge is exact only for a diagonal Hessian: on a correlated
  design the shards' mean-field optima (exact mean, diagonal precision, what
  converged diagonal VON reaches on a Gaussian target) merge to a mean off
  the joint one, so the exact test above is not vacuous."""
  with jax.enable_x64(True):
    xs, ys = shard_data(1, (10, 10), 3)
    params, _ = blrax.merge_posteriors(*zip(*[
        mean_field_shard(x, y, np.zeros(3)) for x, y in zip(xs, ys)]))
    joint, _ = closed_form(np.concatenate(xs), np.concatenate(ys), ALPHA,
                           np.zeros(3))
    assert np.max(np.abs(params - joint)) > 1e-3


def test_shards_with_their_own_priors_merge_under_an_explicit_prior():
  """Shards trained with one weight_decay (so priors ess_k * delta differ):
  refused by default; with prior_precision each shard's prior is divided out
  and the given one multiplied in, exactly."""
  with jax.enable_x64(True):
    xs, ys = shard_data(2, (5, 15), 2)
    shards = [fit_von(x, y, 0.3, "full") for x, y in zip(xs, ys)]
    with pytest.raises(ValueError, match="prior precisions"):
      blrax.merge_posteriors(*zip(*shards))
    params, state = blrax.merge_posteriors(*zip(*shards), prior_precision=ALPHA)
    mean, precision = closed_form(np.concatenate(xs), np.concatenate(ys),
                                  ALPHA, np.zeros(2))
    np.testing.assert_allclose(params, mean, rtol=1e-6)
    np.testing.assert_allclose(full_precision(state), precision, rtol=1e-6)


def test_merge_with_prior_mean_in_the_state():
  """Diagonal shards whose states keep a prior mean m0: the merged mean is
  the joint posterior with that prior (hand-built shard posteriors)."""
  with jax.enable_x64(True):
    xs, ys = shard_data(3, (6, 9, 11), 4, orthogonal=True)
    m0 = np.array([0.5, -1.0, 2.0, 0.0])
    params_list, states = zip(*[mean_field_shard(x, y, m0)
                                for x, y in zip(xs, ys)])
    params, state = blrax.merge_posteriors(params_list, states)
    mean, precision = closed_form(np.concatenate(xs), np.concatenate(ys), ALPHA,
                                  m0)
    np.testing.assert_allclose(params, mean, rtol=1e-6)
    np.testing.assert_allclose(blrax.posterior_stddev(state),
                               np.diag(precision) ** -0.5, rtol=1e-6)
    np.testing.assert_allclose(blrax.find_posteriors(state)[0].prior_mean, m0)
    # The same, with the prior mean given instead of read from the states,
    # when the shards were trained at m0 = 0: here the states say m0, so
    # overriding it with 0 must move the mean (the prior is divided out).
    other, _ = blrax.merge_posteriors(params_list, states,
                                      prior_mean=np.zeros(4))
    assert np.max(np.abs(np.asarray(other) - mean)) > 1e-3


def test_merged_state_samples_and_keeps_structure():
  """Pytree params inside optax.chain: the merged state is a state of the
  same optimizer; its draws have the merged sigma; a masked-out leaf is
  averaged and gets no noise."""
  opt = lambda n: optax.chain(  # noqa: E731
      optax.clip(10.0),
      optax.masked(blrax.ivon(0.1, ess=n, hess_init=2.0, weight_decay=1.0 / n),
                   {"w": True, "frozen": False}))
  p1 = {"w": jnp.array([1.0, 2.0]), "frozen": jnp.array(4.0)}
  p2 = {"w": jnp.array([3.0, 0.0]), "frozen": jnp.array(6.0)}
  s1, s2 = opt(10.0).init(p1), opt(30.0).init(p2)
  params, state = blrax.merge_posteriors([p1, p2], [s1, s2])
  assert jax.tree.structure(state) == jax.tree.structure(s1)
  # precisions 10*(2+0.1)=21 and 30*(2+1/30)=61, prior 1: 21 + 61 - 1 = 81
  np.testing.assert_allclose(params["w"], (21 * np.array([1.0, 2.0]) +
                                           61 * np.array([3.0, 0.0])) / 81,
                             rtol=1e-6)
  np.testing.assert_allclose(params["frozen"], 5.0)
  std = blrax.posterior_stddev(state, params)
  np.testing.assert_allclose(std["w"], 81 ** -0.5, rtol=1e-6)
  assert std["frozen"] == 0.0
  samples = blrax.sample_posterior(jax.random.key(0), params, state, 4000)
  np.testing.assert_allclose(np.std(samples["w"], 0), 81 ** -0.5, rtol=0.06)
  assert np.all(samples["frozen"] == 5.0)
  theta = blrax.sample_params(params, state)
  assert theta["w"].shape == (2,)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_merged_mean_scales_with_huge_means(covariance):
  """The merged mean is linear in the shards' means (and prior means): means
  scaled by 2**110 (~1.3e33, where ess * h * m overflows float32) merge to
  the merged mean scaled by 2**110, bit for bit (powers of two are exact)."""
  opt = blrax.von(0.1, ess=1e6, covariance=covariance, hess_init=2.0,
                  weight_decay=1e-4, prior_mean=jnp.array([0.5, -1.0, 0.25]))
  means = [jnp.array([1.5, -2.0, 0.75]), jnp.array([1.0, -3.0, 0.5])]
  states = [opt.init(m) for m in means]
  factor = 2.0 ** 110
  opt_big = blrax.von(0.1, ess=1e6, covariance=covariance, hess_init=2.0,
                      weight_decay=1e-4,
                      prior_mean=factor * jnp.array([0.5, -1.0, 0.25]))
  big_states = [opt_big.init(m * factor) for m in means]
  merged, _ = blrax.merge_posteriors(means, states)
  merged_big, _ = blrax.merge_posteriors([m * factor for m in means],
                                         big_states)
  assert np.all(np.isfinite(merged_big))
  np.testing.assert_array_equal(merged_big, merged * factor)


def test_merge_errors():
  opt = blrax.ivon(0.1, ess=10.0, weight_decay=0.1)
  p = jnp.zeros(2)
  s = opt.init(p)
  with pytest.raises(ValueError, match="non-empty"):
    blrax.merge_posteriors([], [])
  with pytest.raises(ValueError, match="non-empty"):
    blrax.merge_posteriors([p, p], [s])
  with pytest.raises(ValueError, match="ess=inf"):
    inf = blrax.ivon(0.1, ess=jnp.inf).init(p)
    blrax.merge_posteriors([p, p], [inf, inf])
  with pytest.raises(ValueError, match="prior_precision"):
    blrax.merge_posteriors([p, p], [s, s], prior_precision=-1.0)
  with pytest.raises(ValueError, match="prior_mean"):
    blrax.merge_posteriors([p, p], [s, s], prior_mean={"a": 1.0})
  with pytest.raises(ValueError, match="opt_states\\[1\\]"):
    full = blrax.von(0.1, ess=10.0, covariance="full").init(p)
    blrax.merge_posteriors([p, p], [s, full])
  with pytest.raises(ValueError, match="scalar"):
    full = blrax.von(0.1, ess=10.0, covariance="full").init(p)
    blrax.merge_posteriors([p, p], [full, full],
                           prior_precision=jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="opt_states"):
    blrax.merge_posteriors([p, p], [s, blrax.ivon(0.1, ess=10.0).init(
        jnp.zeros(3))])
  evon = blrax.evon(0.1, ess=10.0).init({"w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match="EigenbasisGaussian"):
    blrax.merge_posteriors([{"w": jnp.zeros((3, 2))}] * 2, [evon, evon])


def test_posterior_as_prior_hand_computation():
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
  opt = blrax.ivon(0.1, ess=40.0, hess_init=0.5, weight_decay=0.25)
  state = opt.init(params)
  post = blrax.find_posteriors(state)[0]
  post = post._replace(curvature={"a": jnp.array([1.0, 3.0]),
                                  "b": jnp.array(0.0)})
  state = (state[0]._replace(posterior=post),) + state[1:]
  mean, decay = blrax.posterior_as_prior(params, state, ess=20.0)
  # delta' = 40 * (h + 0.25) / 20
  np.testing.assert_allclose(decay["a"], [2.5, 6.5])
  np.testing.assert_allclose(decay["b"], 0.5)
  np.testing.assert_allclose(mean["a"], params["a"])
  # Next prior precision ess' * delta' = this posterior's precision.
  np.testing.assert_allclose(
      20.0 * decay["a"], blrax.posterior_stddev(state)["a"] ** -2, rtol=1e-6)
  for bad in (0.0, -1.0, jnp.inf, "10"):
    with pytest.raises(ValueError, match="ess"):
      blrax.posterior_as_prior(params, state, ess=bad)
  with pytest.raises(ValueError, match="FullGaussian"):
    full = blrax.von(0.1, ess=10.0, covariance="full").init(params)
    blrax.posterior_as_prior(params, full, ess=10.0)


def test_posterior_as_prior_masked_leaf_gets_no_prior():
  params = {"w": jnp.ones(2), "frozen": jnp.array(4.0)}
  opt = optax.masked(blrax.ivon(0.1, ess=10.0, hess_init=1.0, weight_decay=0.0),
                     {"w": True, "frozen": False})
  mean, decay = blrax.posterior_as_prior(params, opt.init(params), ess=5.0)
  np.testing.assert_allclose(decay["w"], [2.0, 2.0])
  assert decay["frozen"] == 0.0 and mean["frozen"] == 4.0


def test_sequential_tasks_equal_the_joint_posterior():
  """Conjugate continual learning: three linear-regression tasks in sequence,
  each posterior the next prior (posterior_as_prior, then von with
  prior_mean= and per-element weight_decay=), end at the joint posterior;
  orthogonal designs so that the diagonal posterior is exact."""
  with jax.enable_x64(True):
    sizes, d = (8, 30, 12), 3
    xs, ys = shard_data(4, sizes, d, orthogonal=True)
    weight_decay, prior_mean, params = ALPHA / sizes[0], None, None
    for t, (x, y) in enumerate(zip(xs, ys)):
      n = len(x)
      opt = blrax.von(1.0, ess=float(n), b2=0.0, weight_decay=weight_decay,
                      prior_mean=prior_mean)
      params = jnp.zeros(d) if params is None else params
      state = opt.init(params)
      grads = jax.grad(mean_loss)(params, jnp.asarray(x), jnp.asarray(y))
      updates, state = opt.update(grads, state, params,
                                  hessian=jnp.sum(x * x, 0) / (S2 * n))
      params = optax.apply_updates(params, updates)
      # The next task's ess (after the last, 30 for the check below).
      next_ess = sizes[t + 1] if t + 1 < len(sizes) else 30
      prior_mean, weight_decay = blrax.posterior_as_prior(
          params, state, ess=float(next_ess))
    mean, precision = closed_form(np.concatenate(xs), np.concatenate(ys), ALPHA,
                                  np.zeros(d))
    np.testing.assert_allclose(params, mean, rtol=1e-6)
    np.testing.assert_allclose(blrax.posterior_stddev(state),
                               np.diag(precision) ** -0.5, rtol=1e-6)
    # The last prior, in the units of ess=30: the joint precision / 30.
    np.testing.assert_allclose(weight_decay, np.diag(precision) / 30, rtol=1e-6)


@pytest.mark.slow
def test_logistic_regression_merge_is_close_to_joint():
  """Non-conjugate: each shard's Gaussian approximates its likelihood, so the
  merge is approximate. Full-covariance VON with the exact Hessian at the
  draws; loose checks only (measured: |m - m_joint|/|m_joint| 0.012 for the
  merge vs 0.028 for averaging the weights, sigma ratio 0.956-0.993)."""
  rng = np.random.default_rng(0)
  n, d, steps = 600, 5, 120
  x = np.hstack([rng.normal(size=(n, d - 1)), np.ones((n, 1))]).astype(np.float32)
  w_true = np.array([1.5, -2.0, 0.5, 1.0, 0.3], np.float32)
  y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w_true))).astype(np.float32)

  def loss(w, x, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w, y))

  def fit(x, y, seed):
    opt = blrax.von(optax.cosine_decay_schedule(0.5, steps), ess=float(len(x)),
                    covariance="full", b2=0.9, weight_decay=1.0 / len(x),
                    mc_samples=4, key=seed)

    def step(carry, _):
      w, state = carry
      theta = blrax.sample_params(w, state)
      g = jax.vmap(jax.grad(loss), (0, None, None))(theta, x, y)
      h = jax.vmap(jax.hessian(loss), (0, None, None))(theta, x, y)
      u, state = opt.update(g, state, w, hessian=h)
      return (optax.apply_updates(w, u), state), None

    w = jnp.zeros(d)
    return jax.jit(lambda c: jax.lax.scan(step, c, None, steps)[0])(
        (w, opt.init(w)))

  joint_w, joint_state = fit(x, y, 9)
  shards = [fit(x[i::3], y[i::3], i) for i in range(3)]
  w, state = blrax.merge_posteriors(*zip(*shards))
  average = sum(s[0] for s in shards) / 3
  gap = np.linalg.norm(w - joint_w) / np.linalg.norm(joint_w)
  average_gap = np.linalg.norm(average - joint_w) / np.linalg.norm(joint_w)
  ratio = np.asarray(blrax.posterior_stddev(state)
                     / blrax.posterior_stddev(joint_state))
  print(f"mean gap {gap:.3f} (weight average {average_gap:.3f}), "
        f"sigma ratio {ratio.min():.3f}-{ratio.max():.3f}")
  assert gap < 0.5 * average_gap
  assert np.all((ratio > 0.8) & (ratio < 1.25))


@pytest.mark.slow
def test_continual_digits_example_runs():
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "examples", "continual_digits.py"),
       "--seeds", "0", "--epochs", "1", "--hidden", "8", "--tasks", "2"],
      capture_output=True, text=True, cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  for method in ("IVON, posterior as prior", "IVON, no carry-over", "AdamW"):
    row = next(line for line in result.stdout.splitlines()
               if line.startswith(f"| {method}"))
    numbers = [float(v) for v in row.replace("|", " ").split()[-5:]]
    assert all(0.0 <= v <= 1.0 for v in numbers[:-1])  # accuracies
