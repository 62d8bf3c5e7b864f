"""`blrax.posterior_health` on runs where the answer is known."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

N = 64
SCALES = {"a": 0.5, "b": 1.0, "c": 2.0, "d": 3.0}   # diag(X^T X)/N = scale^2
W_TRUE = {"a": 1.0, "b": -1.0, "c": 0.5, "d": 2.0}
_Q = np.linalg.qr(np.random.default_rng(0).normal(size=(N, 4)))[0] * np.sqrt(N)
X = {k: jnp.asarray(_Q[:, i] * SCALES[k]) for i, k in enumerate(SCALES)}
Y = sum(X[k] * W_TRUE[k] for k in SCALES)


def sq(w):
  pred = sum(X[k] * w[k][0] for k in SCALES)
  return 0.5 * jnp.mean((pred - Y) ** 2)


ZEROS = {k: jnp.zeros(1) for k in SCALES}


def train(opt, steps, hessian=None):
  state = opt.init(ZEROS)

  def step(carry, _):
    w, state = carry
    _, g = blrax.value_and_grad(sq)(w, state)
    extra = {} if hessian is None else {"hessian": hessian}
    u, state = opt.update(g, state, w, **extra)
    return (optax.apply_updates(w, u), state), None

  (w, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (ZEROS, state))
  return w, state


def test_closed_form_shares_on_a_plain_ema():
  """VON with a fixed hessian=H: h_t = b2^t h0 + (1 - b2^t) H exactly."""
  h0, b2, steps, delta = 2.0, 0.995, 150, 1e-3
  hessian = {k: jnp.full(1, SCALES[k] ** 2) for k in SCALES}
  opt = blrax.von(0.1, ess=float(N), hess_init=h0, b2=b2, weight_decay=delta)
  w, state = train(opt, steps, hessian)
  health = blrax.posterior_health(w, state, hess_init=h0, b2=b2, warn=False)
  assert health.steps == steps
  decay = b2 ** steps
  for k, s in SCALES.items():
    h = decay * h0 + (1 - decay) * s ** 2
    row = health.leaves[k]
    np.testing.assert_allclose(row["init_share"], decay * h0 / h, rtol=1e-4)
    np.testing.assert_allclose(row["data_curvature"], (1 - decay) * s ** 2,
                               rtol=1e-3)
    np.testing.assert_allclose(row["prior_share"], delta / (h + delta), rtol=1e-4)
    sigma = 1 / np.sqrt(N * (h + delta))
    np.testing.assert_allclose(row["stddev"], sigma, rtol=1e-5)
    np.testing.assert_allclose(row["relative_stddev"],
                               sigma / abs(float(w[k][0])), rtol=1e-5)
  pooled = [decay * h0 / (decay * h0 + (1 - decay) * s ** 2)
            for s in SCALES.values()]
  np.testing.assert_allclose(health.overall["init_share"], np.median(pooled),
                             rtol=1e-4)


def test_short_run_with_slow_ema_is_flagged_as_initialisation():
  opt = blrax.ivon(0.05, ess=float(N), hess_init=1.0, b2=0.99999)
  w, state = train(opt, 300)
  with pytest.warns(UserWarning, match="still its initialisation"):
    health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99999)
  assert health.overall["init_share"] > 0.95
  assert not health.ok
  assert "b2 = 0.9667" in health.warnings[0]      # 1 - 10/300
  # The README's old advice (curvature moved from hess_init) is passed by the
  # decay alone; the share is not fooled by it.
  h = blrax.posterior_summary(state)["curvature/a"]["median"]
  assert abs(float(h) - 1.0) > 1e-3


def test_initialisation_warning_gives_the_data_width_against_the_weights():
  """The warning's sigma from the data alone, 1/sqrt(ess (h_data + delta)),
  and, when that exceeds the median |mean|, the clause saying so; a point
  mass (temperature 0) says what it is instead."""
  def data_width(health, ess, delta):  # debiased: h_data / (1 - b2^t)
    debiased = health.overall["data_curvature"] / (1 - 0.99999 ** 300)
    return 1 / np.sqrt(ess * (debiased + delta))

  opt = blrax.ivon(0.05, ess=float(N), hess_init=1.0, b2=0.99999)
  w, state = train(opt, 300)
  health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99999,
                                  warn=False)
  message = health.warnings[0]
  assert f"would give sigma ~ {data_width(health, N, 1e-4):.3g}." in message
  assert "wider than the weights" not in message   # sigma ~ 0.08, |w| ~ 1
  # ess = 0.1: the data alone would give sigma ~ 2, wider than |w| ~ 1.
  opt = blrax.ivon(0.05, ess=0.1, hess_init=1.0, b2=0.99999, clip_radius=1.0)
  w, state = train(opt, 300)
  health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99999,
                                  warn=False)
  message = health.warnings[0]
  magnitude = np.median(np.abs(np.concatenate(jax.tree.leaves(w))))
  assert data_width(health, 0.1, 1e-4) > magnitude
  assert (f"would give sigma ~ {data_width(health, 0.1, 1e-4):.3g}, wider "
          f"than the weights (median |mean| {magnitude:.3g})") in message
  assert "calibrate_posterior" in message
  # Debiased, the data's curvature is the closed form's median diag(X^T X)/N.
  stated = float(re.search(r"median ([0-9.e+-]+), debiased", message)[1])
  np.testing.assert_allclose(stated, np.median([s ** 2 for s in
                                                SCALES.values()]), rtol=0.1)
  point_mass = blrax.posterior_health(w, blrax.tempered(state, 0.0),
                                      hess_init=1.0, b2=0.99999, warn=False)
  assert "point mass" in point_mass.warnings[0]
  assert "would give" not in point_mass.warnings[0]


def test_negative_curvature_leaves_the_prior_all_of_the_precision():
  """VON with a fixed hessian of -delta/2 for one leaf: h -> -delta/2, so
  delta/(h + delta) = 2; the prior's share is capped at 1 there."""
  delta, b2 = 0.1, 0.9
  hessian = {k: jnp.full(1, -delta / 2 if k == "a" else SCALES[k] ** 2)
             for k in SCALES}
  opt = blrax.von(0.1, ess=float(N), hess_init=1.0, b2=b2, weight_decay=delta)
  w, state = train(opt, 300, hessian)
  health = blrax.posterior_health(w, state, hess_init=1.0, b2=b2, warn=False)
  np.testing.assert_allclose(
      blrax.find_posteriors(state)[0].curvature["a"], -delta / 2, rtol=1e-4)
  assert health.leaves["a"]["prior_share"] == 1.0
  for k in "bcd":
    np.testing.assert_allclose(health.leaves[k]["prior_share"],
                               delta / (SCALES[k] ** 2 + delta), rtol=1e-4)


def test_b2_zero_is_all_data_after_one_step():
  """b2 = 0 (which every factory accepts): h is the last estimate, so
  hess_init has no share after the first update."""
  hessian = {k: jnp.full(1, SCALES[k] ** 2) for k in SCALES}
  opt = blrax.von(0.1, ess=float(N), hess_init=5.0, b2=0.0, weight_decay=0.0)
  w, state = train(opt, 3, hessian)
  health = blrax.posterior_health(w, state, hess_init=5.0, b2=0.0, warn=False)
  assert health.overall["init_share"] == 0.0
  assert health.overall["data_share"] == 1.0
  with pytest.raises(ValueError, match="warn='no'"):
    blrax.posterior_health(w, state, hess_init=5.0, b2=0.0, warn="no")


def test_long_run_with_fast_ema_is_the_data():
  opt = blrax.ivon(0.05, ess=float(N), hess_init=1.0, b2=0.99, weight_decay=0.0)
  w, state = train(opt, 3000)
  with _no_warnings():
    health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99)
  assert health.ok, health.warnings
  assert health.overall["init_share"] < 1e-6
  for k, s in SCALES.items():   # the Price estimate averages to diag(X^T X)/N
    np.testing.assert_allclose(health.leaves[k]["data_curvature"], s ** 2,
                               rtol=0.3)
  assert "ok" in str(health)


def test_prior_and_width_warnings():
  # The exact hessian (not IVON's Price estimate, whose noise grows like
  # |m - w*|/sigma when a strong prior holds m far from w*): h -> s^2, so
  # the prior's share is delta/(s^2 + delta), 0.85 to 0.995.
  delta = 50.0
  hessian = {k: jnp.full(1, SCALES[k] ** 2) for k in SCALES}
  opt = blrax.von(0.05, ess=float(N), hess_init=1.0, b2=0.99,
                  weight_decay=delta)
  w, state = train(opt, 1000, hessian)
  health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99, warn=False)
  assert len(health.warnings) == 1 and "prior dominates" in health.warnings[0]
  np.testing.assert_allclose(
      health.overall["prior_share"],
      np.median([delta / (s ** 2 + delta) for s in SCALES.values()]),
      rtol=1e-3)
  opt = blrax.ivon(0.05, ess=0.01, hess_init=1.0, b2=0.99, weight_decay=1e-4,
                   clip_radius=1.0)
  w, state = train(opt, 1000)
  health = blrax.posterior_health(w, state, hess_init=1.0, b2=0.99, warn=False)
  assert any("wider than the weights" in m for m in health.warnings)
  assert health.overall["relative_stddev"] > 1


def test_no_update_yet_and_wrappers():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    blrax.ivon(0.1, ess=10.0, hess_init=0.5))
  state = opt.init(ZEROS)
  health = blrax.posterior_health(ZEROS, state, hess_init=0.5, b2=0.99999,
                                  warn=False)
  assert health.steps == 0 and "No update yet" in health.warnings[0]
  # Two posteriors (partition): one row per leaf, the second prefixed.
  labels = {"a": "x", "b": "x", "c": "y", "d": "y"}
  opt = optax.partition({"x": blrax.ivon(0.1, ess=10.0, key=1),
                         "y": blrax.von(0.1, ess=10.0, key=2)}, labels)
  state = opt.init(ZEROS)
  health = blrax.posterior_health(ZEROS, state, hess_init=1.0, b2=0.99999,
                                  warn=False)
  assert set(health.leaves) == {"a", "b", "posterior1/c", "posterior1/d"}


def test_full_covariance_uses_the_diagonal():
  opt = blrax.von(0.1, ess=10.0, hess_init=2.0, b2=0.9, covariance="full")
  params = jnp.zeros(3)
  state = opt.init(params)
  state = opt.update(jnp.zeros(3), state, params, hessian=jnp.eye(3) * 4.0)[1]
  health = blrax.posterior_health(params, state, hess_init=2.0, b2=0.9,
                                  warn=False)
  h = 0.9 * 2.0 + 0.1 * 4.0
  np.testing.assert_allclose(health.leaves["params"]["init_share"], 1.8 / h,
                             rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"hess_init": -1.0, "b2": 0.9}, "hess_init"),
    ({"hess_init": 1.0, "b2": -0.1}, "b2"),
    ({"hess_init": 1.0, "b2": 1.5}, "b2"),
    ({"hess_init": 1.0, "b2": float("nan")}, "b2"),
    ({"hess_init": 1.0, "b2": 0.9, "share_threshold": 1.0}, "share_threshold"),
])
def test_bad_arguments(kwargs, match):
  state = blrax.ivon(0.1, ess=10.0).init(ZEROS)
  with pytest.raises(ValueError, match=match):
    blrax.posterior_health(ZEROS, state, **kwargs)


def test_wrong_state_or_params():
  with pytest.raises(ValueError, match="no blrax posterior"):
    blrax.posterior_health(ZEROS, optax.adam(1e-3).init(ZEROS), hess_init=1.0,
                           b2=0.9)
  state = blrax.ivon(0.1, ess=10.0).init(ZEROS)
  with pytest.raises(ValueError):
    blrax.posterior_health({"a": jnp.zeros(2)}, state, hess_init=1.0, b2=0.9)


class _no_warnings:
  def __enter__(self):
    import warnings
    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error")

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def test_empty_leaves_jit_and_nnx():
  empty = {"z": jnp.zeros((0,))}
  health = blrax.posterior_health(empty, blrax.ivon(0.1, ess=10.0).init(empty),
                                  hess_init=1.0, b2=0.9, warn=False)
  assert health.leaves == {} and np.isnan(health.overall["init_share"])
  state = blrax.ivon(0.1, ess=10.0).init(ZEROS)
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda s: blrax.posterior_health(ZEROS, s, hess_init=1.0, b2=0.9,
                                             warn=False).steps)(state)
  from flax import nnx
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0, hess_init=0.5),
                      wrt=nnx.Param)
  want = blrax.posterior_health(nnx.as_pure(nnx.state(model, nnx.Param)),
                                opt.opt_state, hess_init=0.5, b2=0.9, warn=False)
  for params in (model, nnx.state(model)):
    got = blrax.posterior_health(params, opt, hess_init=0.5, b2=0.9, warn=False)
    assert got.leaves == want.leaves and set(got.leaves) == {"bias", "kernel"}


@pytest.mark.parametrize("make", [
    lambda: blrax.evon(0.1, ess=100.0, hess_init=4.0, weight_decay=0.0),
    lambda: blrax.bsam(0.1, ess=100.0, hess_init=4.0, weight_decay=0.0,
                       rho=0.05),
], ids=["evon", "bsam"])
def test_health_reads_evon_and_bsam_states(make):
  """Before any step the posterior is its initialisation: sigma = 1/sqrt(
  ess * hess_init) = 0.05, all of it from hess_init."""
  params = {"w": jnp.ones((3, 4))}
  health = blrax.posterior_health(params, make().init(params), hess_init=4.0,
                                  b2=0.99999, warn=False)
  assert health.overall["init_share"] == 1.0
  assert health.overall["stddev"] == pytest.approx(0.05, rel=1e-5)


def test_shares_follow_the_hess_init_steps_schedule():
  """hessian = c with the plain EMA and hess_init_steps = n0: after t steps
  h = (n0 h0 + t c)/(n0 + t) exactly (running mean; b2 = 1 keeps it one), so
  init_share = n0 h0 / (n0 h0 + t c) and data_share is the rest."""
  n0, h0, c, t = 3.0, 2.0, 0.5, 5
  params = {"w": jnp.ones(4)}
  opt = blrax.von(0.1, ess=100.0, hess_init=h0, b2=1.0, weight_decay=0.0,
                  hess_init_steps=n0)
  state = opt.init(params)
  for _ in range(t):
    theta = blrax.sample_params(params, state)
    _, state = opt.update(jax.tree.map(jnp.zeros_like, theta), state, params,
                          hessian={"w": jnp.full(4, c)})
  h = (n0 * h0 + t * c) / (n0 + t)
  np.testing.assert_allclose(state[0].posterior.curvature["w"], h, rtol=1e-6)
  health = blrax.posterior_health(params, state, hess_init=h0, b2=1.0,
                                  hess_init_steps=n0, warn=False)
  share = n0 * h0 / (n0 * h0 + t * c)
  assert health.overall["init_share"] == pytest.approx(share, rel=1e-6)
  assert health.overall["data_share"] == pytest.approx(1 - share, rel=1e-5)
  assert health.overall["data_curvature"] == pytest.approx(
      t * c / (n0 + t), rel=1e-5)
  # Without the schedule the report would call it all initialisation.
  reference = blrax.posterior_health(params, state, hess_init=h0, b2=1.0,
                                     warn=False)
  assert reference.overall["init_share"] == 1.0
  with pytest.raises(ValueError, match="hess_init_steps=-1"):
    blrax.posterior_health(params, state, hess_init=h0, b2=1.0,
                           hess_init_steps=-1, warn=False)


@pytest.mark.parametrize("b2,n0", [(0.9, 3.0), (0.99, 0.0), (0.5, 10.0),
                                   (0.999, None), (1.0, 2.0)])
def test_init_weight_is_the_product_of_the_steps(b2, n0):
  """The weight of hess_init after t updates, prod_s (1 - rho_s), against the
  product of the engine's own steps (both sides of the running-mean/EMA
  switch)."""
  from blrax._src.engine import estimators as curvature
  for t in (0, 1, 5, 40):
    product = 1.0
    for s in range(1, t + 1):
      product *= 1.0 - float(curvature.step_size(b2, s, n0))
    assert curvature.init_share(b2, t, n0) == pytest.approx(product, rel=1e-6,
                                                            abs=1e-12)
