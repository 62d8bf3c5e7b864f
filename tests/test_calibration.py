"""Post-hoc calibration (blrax.calibrate_posterior, blrax.tempered).

Oracles: the closed-form stddev of a tempered diagonal posterior, and a
brute-force grid that draws from each tempered posterior afresh
(``blrax.sample_posterior`` on ``blrax.tempered(state, tau)``) and reduces the
model-averaged NLL in float64 NumPy.
"""

import cases
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

KEY = 3
SAMPLES = 16


def _data(seed=0, n=48):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  w = np.array([[2.0, -1.0], [0.5, 1.5], [-1.0, 0.3]], np.float32)
  logits = x @ w
  y = (rng.random(n) < jax.nn.sigmoid(logits[:, 1] - logits[:, 0])).astype(
      np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def apply_fn(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"]


PARAMS = {
    "w1": jnp.array([[1.0, -0.5, 0.2, 0.7], [0.3, 0.8, -1.2, 0.1],
                     [-0.6, 0.4, 0.9, -0.3]]),
    "b1": jnp.array([0.1, -0.2, 0.05, 0.0]),
    "w2": jnp.array([[1.2, -0.7], [-0.4, 0.9], [0.5, 0.5], [-1.0, 1.1]]),
}


def _trained_state(opt, params=PARAMS, steps=30):
  """A state with a curvature the data set (a few steps at fixed params)."""
  x, y = _data(1)
  state = opt.init(params)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(p, x), y).mean()

  @jax.jit
  def step(state):
    theta = blrax.sample_params(params, state)
    _, state = opt.update(jax.grad(loss)(theta), state, params)
    return state

  for _ in range(steps):
    state = step(state)
  return state


def _brute_force_nll(params, state, x, y, tau, kappa=1.0):
  """NLL of the model average, the tempered posterior sampled afresh."""
  return float(-np.mean(_brute_force_logliks(params, state, x, y, tau,
                                             kappa)))


def _brute_force_logliks(params, state, x, y, tau, kappa=1.0):
  """Per-example log model average, the tempered posterior sampled afresh."""
  tempered = blrax.tempered(state, tau, kappa)
  draws = blrax.sample_posterior(jax.random.key(KEY), params, tempered,
                                 SAMPLES)
  logits = np.stack([np.asarray(apply_fn(jax.tree.map(lambda a: a[s], draws),
                                         x), np.float64)
                     for s in range(SAMPLES)])
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  picked = log_probs[:, np.arange(len(y)), np.asarray(y)]  # (S, n)
  return np.logaddexp.reduce(picked, axis=0) - np.log(SAMPLES)


@pytest.fixture(scope="module")
def ivon_state():
  opt = blrax.ivon(0.0, ess=40.0, hess_init=0.5, weight_decay=1e-2, key=0)
  return _trained_state(opt)


def test_tempered_stddev_closed_form(ivon_state):
  posterior = blrax.find_posteriors(ivon_state)[0]
  for tau, kappa in [(0.25, 1.0), (4.0, 1.0), (0.5, 3.0)]:
    stddev = blrax.posterior_stddev(blrax.tempered(ivon_state, tau, kappa))
    expected = jax.tree.map(
        lambda h: 1.0 / np.sqrt(posterior.ess / tau
                                * (np.asarray(h, np.float64) + kappa * 1e-2)),
        posterior.curvature)
    for a, b in zip(jax.tree.leaves(stddev), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  zero = blrax.posterior_stddev(blrax.tempered(ivon_state, 0.0))
  assert all(float(jnp.max(s)) == 0.0 for s in jax.tree.leaves(zero))
  # Same structure, shapes and dtypes: the state restores and steps as before.
  before = jax.tree.structure(ivon_state)
  assert jax.tree.structure(blrax.tempered(ivon_state, 2.0)) == before
  for a, b in zip(jax.tree.leaves(ivon_state),
                  jax.tree.leaves(blrax.tempered(ivon_state, 2.0, 2.0))):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("name,factory,kwargs", cases.WIDE, ids=cases.ids(
    cases.WIDE))
def test_tempered_scales_every_family(name, factory, kwargs):
  """sigma scales by sqrt(tau) for every posterior type (full, eigenbasis)."""
  del name
  state = factory(**kwargs).init(PARAMS)
  for tau in (0.3, 5.0):
    for a, b in zip(jax.tree.leaves(blrax.posterior_stddev(state)),
                    jax.tree.leaves(blrax.posterior_stddev(
                        blrax.tempered(state, tau)))):
      np.testing.assert_allclose(b, np.sqrt(tau) * np.asarray(a), rtol=2e-5,
                                 atol=1e-7)


def test_matches_brute_force_grid(ivon_state):
  x, y = _data(7)
  batches = [(x[:24], y[:24]), (x[24:], y[24:])]
  taus = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 8.0]
  result = blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, batches,
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=taus, refine=False,
                                     selection="minimum")
  brute = {tau: _brute_force_nll(PARAMS, ivon_state, x, y, tau) for tau in taus}
  for tau, nll in zip(result.temperatures, result.nlls):
    np.testing.assert_allclose(nll, brute[float(tau)], rtol=2e-5)
  best = min(brute, key=brute.get)
  assert result.temperature == best
  np.testing.assert_allclose(result.nll, brute[best], rtol=2e-5)
  np.testing.assert_allclose(result.mean_nll, brute[0.0], rtol=2e-5)
  np.testing.assert_allclose(result.uncalibrated_nll, brute[1.0], rtol=2e-5)
  # The returned state is the tempered one.
  for a, b in zip(jax.tree.leaves(blrax.posterior_stddev(result.opt_state)),
                  jax.tree.leaves(blrax.posterior_stddev(
                      blrax.tempered(ivon_state, best)))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _huge_ess_case(hess_scale=1.0):
  """ess = 1e15 on a 1x2 linear model, 20% of the labels class 1."""
  limit = float(np.sqrt(np.finfo(np.float32).max)) / 4
  ess = 1e15
  opt = blrax.ivon(0.1, ess=ess, hess_init=hess_scale * ess / limit / ess,
                   weight_decay=0.0)
  x = jnp.ones((40, 1))
  y = jnp.asarray((np.arange(40) % 5 == 0).astype(np.int32))
  return opt, ess / limit, x, y


def test_temperatures_past_the_state_range_become_its_edge():
  # ess = 1e15: tau = 1e-10 would give ess/tau = 1e25, past the float32
  # state's range (4.6e18), which tempered() refuses. It is evaluated (and
  # returned) as the smallest tau within it, ess / 4.6e18; h is set so that
  # there sigma is about 1, the best width for these labels.
  opt, floor, x, y = _huge_ess_case()
  limit = float(np.sqrt(np.finfo(np.float32).max)) / 4
  params = {"w": jnp.array([[2.0, -2.0]])}
  apply = lambda p, x: x @ p["w"]
  state = opt.init(params)
  result = blrax.calibrate_posterior(apply, params, state, [(x, y)], key=KEY,
                                     num_samples=SAMPLES,
                                     temperatures=(1e-10,), refine=False)
  np.testing.assert_allclose(result.temperature, floor, rtol=1e-6)
  np.testing.assert_allclose(sorted(result.temperatures), [0.0, floor, 1.0],
                             rtol=1e-6)
  assert float(blrax.find_posteriors(result.opt_state)[0].ess) <= limit
  sample = lambda p, s, n: blrax.sample_posterior(jax.random.key(KEY), p, s, n)
  draws = sample(params, blrax.tempered(state, floor), SAMPLES)
  probs = jax.nn.softmax(jax.vmap(lambda w: apply({"w": w}, x))(draws["w"]))
  brute = -np.mean(np.log(np.mean(np.asarray(probs, np.float64)[
      :, np.arange(40), np.asarray(y)], axis=0)))
  np.testing.assert_allclose(result.nll, brute, rtol=2e-5)
  assert result.nll < min(result.mean_nll, result.uncalibrated_nll)


def test_refining_stays_within_the_state_range():
  # sigma = 10 at the floor (h 100x smaller), so the floor is the best grid
  # point and the refinement searches around it: never below it.
  opt, floor, x, y = _huge_ess_case(hess_scale=1e-2)
  params = {"w": jnp.array([[2.0, -2.0]])}
  result = blrax.calibrate_posterior(lambda p, x: x @ p["w"], params,
                                     opt.init(params), [(x, y)], key=KEY,
                                     num_samples=SAMPLES,
                                     temperatures=(1e-10, 1e-3))
  taus = np.sort(result.temperatures)
  assert taus[0] == 0.0 and len(taus) > 4
  assert np.all(taus[1:] >= floor * (1 - 1e-6)), taus / floor


@pytest.mark.parametrize("other_ess", [float("inf"), 1e3])
def test_the_largest_finite_ess_sets_the_smallest_temperature(other_ess):
  # Two posteriors (optax.multi_transform): the floor is set by the larger
  # finite ess; an infinite one (a point mass) does not remove it. "b" does
  # not reach the outputs, so the NLL is the one-posterior brute force.
  opt, floor, x, y = _huge_ess_case()
  params = {"a": jnp.array([[2.0, -2.0]]), "b": jnp.array([[0.5, 0.1]])}
  apply = lambda p, x: x @ p["a"] + 0.0 * (x @ p["b"])
  tx = optax.multi_transform(
      {"a": opt, "b": blrax.ivon(0.1, ess=other_ess, hess_init=1.0)},
      {"a": "a", "b": "b"})
  result = blrax.calibrate_posterior(apply, params, tx.init(params), [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=(1e-10,), refine=False)
  np.testing.assert_allclose(result.temperature, floor, rtol=1e-6)
  assert result.nll < min(result.mean_nll, result.uncalibrated_nll)


def test_refined_search_reaches_dense_grid_minimum(ivon_state):
  """The default search (coarse grid, then refine) is within 1e-3 of the
  minimum over a dense brute-force grid, and never above the mean's NLL."""
  x, y = _data(7)
  result = blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     selection="minimum")
  dense = [0.0] + list(np.geomspace(1e-4, 10.0, 81))
  brute = min(_brute_force_nll(PARAMS, ivon_state, x, y, t) for t in dense)
  assert result.nll <= brute + 1e-3
  assert result.nll <= result.mean_nll
  assert result.nll == pytest.approx(
      _brute_force_nll(PARAMS, ivon_state, x, y, result.temperature), rel=2e-5)


def test_prior_scale_search_matches_brute_force(ivon_state):
  x, y = _data(11)
  taus, kappas = [0.0, 0.3, 1.0, 3.0], [0.1, 1.0, 10.0]
  result = blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=taus, prior_scales=kappas,
                                     refine=False, selection="minimum")
  brute = {(t, k): _brute_force_nll(PARAMS, ivon_state, x, y, t, k)
           for t in taus for k in kappas}
  for tau, kappa, nll in zip(result.temperatures, result.prior_scales,
                             result.nlls):
    np.testing.assert_allclose(nll, brute[(float(tau), float(kappa))],
                               rtol=2e-5)
  best = min(brute, key=lambda p: (brute[p], p[0]))
  assert (result.temperature, result.prior_scale) == best or np.isclose(
      brute[(result.temperature, result.prior_scale)], brute[best], rtol=1e-6)


def _one_standard_error_choice(logliks):
  """The rule written out: {tau: per-example log-likelihoods} -> tau."""
  nll = {t: -np.mean(v) for t, v in logliks.items()}
  best = min(nll, key=lambda t: (nll[t], t))
  for tau in sorted(nll):
    diff = logliks[best] - logliks[tau]
    stderr = np.std(diff, ddof=1) / np.sqrt(diff.size)
    if nll[tau] <= min(nll[best] + stderr, nll[0.0]):
      return tau
  return best


@pytest.mark.parametrize("n,seed,outcome", [(24, 1, "mean"),
                                             (48, 2, "between"),
                                             (200, 2, "minimum")])
def test_one_standard_error_rule_matches_brute_force(ivon_state, n, seed,
                                                     outcome):
  """selection="one_se": the smallest tau within one paired standard error
  of the brute-force grid's minimum. An overconfident mean (last layer x4),
  so that tempered draws help: with 24 examples the gain (0.72 -> 0.59) is
  within the noise and the mean is kept; with 48 a tau between 0 and the
  minimum is chosen; with 200 the minimum itself."""
  params = dict(PARAMS, w2=4 * PARAMS["w2"])
  x, y = _data(seed, n=n)
  taus = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 8.0]
  result = blrax.calibrate_posterior(apply_fn, params, ivon_state, [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=taus, refine=False,
                                     selection="one_se")
  logliks = {t: _brute_force_logliks(params, ivon_state, x, y, t)
             for t in taus}
  expected = _one_standard_error_choice(logliks)
  minimum = min(taus, key=lambda t: (-np.mean(logliks[t]), t))
  assert result.temperature == expected
  assert minimum > 0
  assert outcome == ("mean" if expected == 0 else
                     "minimum" if expected == minimum else "between")
  assert result.nll <= result.mean_nll
  np.testing.assert_allclose(result.nll, -np.mean(logliks[expected]),
                             rtol=2e-5)


def test_gaussian_likelihood_matches_numpy():
  """Regression: a linear model, Gaussian likelihood, brute force in NumPy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 2)), jnp.float32)
  y = jnp.asarray(x @ np.array([1.0, -2.0]) + 0.5 * rng.normal(size=40),
                  jnp.float32)
  params = {"w": jnp.array([0.8, -1.7])}
  linear = lambda p, inputs: inputs @ p["w"]
  state = blrax.ivon(0.1, ess=40.0, hess_init=1.0, weight_decay=0.0).init(
      params)
  noise = 0.3
  taus = [0.0, 0.1, 1.0, 10.0]
  result = blrax.calibrate_posterior(linear, params, state, [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=taus, refine=False,
                                     likelihood="gaussian",
                                     noise_variance=noise)
  for tau, nll in zip(result.temperatures, result.nlls):
    draws = blrax.sample_posterior(jax.random.key(KEY), params,
                                   blrax.tempered(state, tau), SAMPLES)
    mu = np.asarray(draws["w"], np.float64) @ np.asarray(x, np.float64).T
    log_p = -0.5 * ((np.asarray(y) - mu) ** 2 / noise
                    + np.log(2 * np.pi * noise))
    expected = -np.mean(np.logaddexp.reduce(log_p, 0) - np.log(SAMPLES))
    np.testing.assert_allclose(nll, expected, rtol=2e-5)


@pytest.mark.parametrize("name,factory,kwargs", cases.OPTIMIZERS[:1] + [
    c for c in cases.WIDE
    if c.id in ("von_full", "vogn", "evon", "vadam", "bsam")])
def test_every_optimizer(name, factory, kwargs):
  del name
  x, y = _data(2)
  state = factory(**kwargs).init(PARAMS)
  result = blrax.calibrate_posterior(apply_fn, PARAMS, state, [(x, y)],
                                     key=KEY, num_samples=4,
                                     temperatures=[0.0, 0.1, 1.0],
                                     refine=False)
  assert result.nll <= result.mean_nll
  # Every posterior function accepts the result.
  blrax.predictive.predictive_log_probs(apply_fn, 0, PARAMS, result.opt_state,
                                        x, num_samples=2)
  blrax.sample_params(PARAMS, result.opt_state)


def test_nnx_model():
  nnx = pytest.importorskip("flax.nnx")
  x, y = _data(4)
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0), wrt=nnx.Param)
  result = blrax.calibrate_posterior(None, model, optimizer, [(x, y)],
                                     key=KEY, num_samples=4,
                                     temperatures=[0.0, 1.0], refine=False)
  mean_nll = float(optax.softmax_cross_entropy_with_integer_labels(
      model(x), y).mean())
  np.testing.assert_allclose(result.mean_nll, mean_nll, rtol=1e-5)
  assert result.nll <= result.mean_nll
  log_probs = blrax.predictive.predictive_log_probs(
      None, 0, model, result.opt_state, x, num_samples=2)
  assert log_probs.shape == (48, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperatures=[-1.0]), "temperatures=-1.0"),
    (dict(temperatures=[]), "temperatures"),
    (dict(temperatures=[float("nan")]), "temperatures=nan"),
    (dict(prior_scales=[0.0]), "prior_scales=0.0"),
    (dict(likelihood="poisson"), "likelihood='poisson'"),
    (dict(likelihood="gaussian"), "noise_variance"),
    (dict(likelihood="gaussian", noise_variance=-1.0), "noise_variance=-1.0"),
    (dict(likelihood="gaussian", noise_variance=True), "noise_variance=True"),
    (dict(likelihood="gaussian", noise_variance="1"), "noise_variance='1'"),
    (dict(num_samples=0), "num_samples"),
    (dict(selection="best"), "selection='best'"),
])
def test_bad_arguments(ivon_state, kwargs, match):
  x, y = _data(0)
  with pytest.raises(ValueError, match=match):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [(x, y)], **kwargs)


def test_bad_state_and_batches(ivon_state):
  x, y = _data(0)
  with pytest.raises(ValueError, match="empty"):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [])
  with pytest.raises(ValueError, match="no blrax posterior"):
    blrax.calibrate_posterior(apply_fn, PARAMS, optax.adam(0.1).init(PARAMS),
                              [(x, y)])
  with pytest.raises(ValueError, match="temperature=-2"):
    blrax.tempered(ivon_state, -2)
  # Not numbers, or beyond the range every factory accepts for the state
  # (ess 40 / 1e-20 = 4e21 > 4.6e18; weight_decay 1e-2 * 1e30 = 1e28).
  for kwargs, match in [
      (dict(temperature="2"), "temperature='2'"),
      (dict(temperature=True), "temperature=True"),
      (dict(temperature=1.0, prior_scale=True), "prior_scale=True"),
      (dict(temperature=1e39), "temperature=1e"),
      (dict(temperature=1e-20), "temperature` takes ess"),
      (dict(temperature=1.0, prior_scale=1e30), "prior_scale` takes"),
  ]:
    with pytest.raises(ValueError, match=match):
      blrax.tempered(ivon_state, **kwargs)


def test_linearized_matches_explicit_jacobian(ivon_state):
  """linearized=True: f(m) + sqrt(tau) J (theta - m), J from jax.jacfwd of
  the flattened params, reduced in float64 NumPy, for the same draws."""
  x, y = _data(5)
  taus = [0.0, 0.05, 0.5, 1.0, 4.0]
  result = blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [(x, y)],
                                     key=KEY, num_samples=SAMPLES,
                                     temperatures=taus, refine=False,
                                     linearized=True)
  flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
  jac = np.asarray(jax.jacfwd(lambda v: apply_fn(unravel(v), x))(flat),
                   np.float64)                                # (n, 2, D)
  f0 = np.asarray(apply_fn(PARAMS, x), np.float64)
  draws = blrax.sample_posterior(jax.random.key(KEY), PARAMS, ivon_state,
                                 SAMPLES)
  offsets = np.stack([np.asarray(jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda a: a[s], draws))[0], np.float64) - np.asarray(flat)
                      for s in range(SAMPLES)])              # (S, D)
  for tau, nll in zip(result.temperatures, result.nlls):
    logits = f0[None] + np.sqrt(tau) * np.einsum("ncd,sd->snc", jac, offsets)
    log_probs = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    picked = log_probs[:, np.arange(len(y)), np.asarray(y)]
    expected = -np.mean(np.logaddexp.reduce(picked, 0) - np.log(SAMPLES))
    np.testing.assert_allclose(nll, expected, rtol=1e-5)
  assert result.nll <= result.mean_nll


def test_bad_batches_are_named(ivon_state):
  x, y = _data(0)
  with pytest.raises(ValueError, match="outside"):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [(x, y + 2)])
  with pytest.raises(ValueError, match="integer labels"):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state,
                              [(x, y.astype(jnp.float32))])
  with pytest.raises(ValueError, match="not finite"):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state,
                              [(x.at[0, 0].set(jnp.nan), y)])
  with pytest.raises(ValueError, match="pair"):
    blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [x])
  # Targets that do not fit apply_fn's (48, 2) outputs, and an empty batch.
  for batch, kwargs, match in [
      ((x, y[:, None]), {}, r"labels of shape \(48,\).*\(48, 1\)"),
      ((x, y[:5]), {}, r"labels of shape \(48,\).*\(5,\)"),
      ((x, jnp.zeros(5)), dict(likelihood="gaussian", noise_variance=1.0),
       r"targets of shape \(48, 2\).*\(5,\)"),
      ((x[:0], y[:0]), {}, "no rows"),
  ]:
    with pytest.raises(ValueError, match=match):
      blrax.calibrate_posterior(apply_fn, PARAMS, ivon_state, [batch],
                                **kwargs)
