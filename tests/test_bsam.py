"""bSAM (Möllenhoff & Khan, 2023): oracles, limits, robustness, wrappers."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

# An elementwise loss with a closed-form gradient, so the NumPy oracle needs
# no autodiff: l(w) = sum(c w^4 / 4 + b w), grad = c w^3 + b.
C = {"a": np.array([0.5, 1.0, 2.0]), "b": np.array([[1.5, 0.25], [1.0, 3.0]])}
B = {"a": np.array([0.3, -0.2, 0.1]), "b": np.array([[-0.5, 0.4], [0.0, 0.2]])}
M0 = {"a": np.array([0.5, -1.0, 0.8]), "b": np.array([[0.2, -0.3], [1.1, -0.6]])}


def loss(w):
  return sum(jnp.sum(C[k] * w[k] ** 4 / 4 + B[k] * w[k]) for k in w)


grad = jax.grad(loss)


def np_grad(w):
  return {k: C[k] * w[k] ** 3 + B[k] for k in w}


def as_np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def params0():
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), M0)


def inner(state):
  """The ScaleByBSAMState of bsam's chain (state[1] is the lr's)."""
  return state[0]


def bsam_state(state):
  """The ScaleByBSAMState anywhere in a nested state."""
  is_bsam = lambda x: isinstance(x, blrax.ScaleByBSAMState)  # noqa: E731
  return [x for x in jax.tree.leaves(state, is_leaf=is_bsam) if is_bsam(x)][0]


def hand_steps(theta_offsets, *, lr, ess, rho, b1, b2, damping, delta, h0,
               n0=None):
  """Algorithm 1 of the paper, transcribed in NumPy (float64), in s; with
  n0 (hess_init_steps) the precision step is max(1 - b2, 1/(n0 + t))."""
  m = as_np(M0)
  s = {k: np.full_like(v, h0 + delta) for k, v in m.items()}
  gm = {k: np.zeros_like(v) for k, v in m.items()}
  history = []
  for t, offsets in enumerate(theta_offsets, 1):  # the state's draw
    g = np_grad({k: m[k] + offsets[k] for k in m})
    eps = {k: rho * g[k] / s[k] for k in m}
    g_eps = np_grad({k: m[k] + eps[k] for k in m})
    gm = {k: b1 * gm[k] + (1 - b1) * (g_eps[k] + delta * m[k]) for k in m}
    r = 1 - b2 if n0 is None else max(1 - b2, 1 / (n0 + t))
    s = {k: (1 - r) * s[k] + r * (np.sqrt(s[k]) * np.abs(g[k]) + delta
                                  + damping) for k in m}
    m = {k: m[k] - lr * gm[k] / s[k] for k in m}
    history.append((m, s, gm))
  return history


HYPER = dict(lr=0.2, ess=50.0, rho=0.3, b1=0.8, b2=0.9, damping=0.1,
             delta=0.05, h0=0.7)


def make_bsam(lr, ess, rho, b1, b2, damping, delta, h0, **kw):
  return blrax.bsam(lr, ess=ess, rho=rho, b1=b1, b2=b2, damping=damping,
                    weight_decay=delta, hess_init=h0, key=3, **kw)


@pytest.fixture(scope="module")
def step_fns():
  """Jitted steps (compiled once per module): grad_fn and explicit paths."""

  def with_grad_fn(opt):
    @jax.jit
    def step(params, state):
      theta = blrax.sample_params(params, state)
      updates, state = opt.update(grad(theta), state, params, grad_fn=grad)
      return optax.apply_updates(params, updates), state, theta
    return step

  def explicit(opt):
    @jax.jit
    def step(params, state):
      theta = blrax.sample_params(params, state)
      g = grad(theta)
      point = blrax.bsam_adversarial_params(params, state, g)
      updates, state = opt.update(g, state, params,
                                  adversarial_grads=grad(point))
      return optax.apply_updates(params, updates), state, theta
    return step

  return with_grad_fn, explicit


def run(step, opt, n):
  params, state = params0(), opt.init(params0())
  out = []
  for _ in range(n):
    old = params
    params, state, theta = step(params, state)
    out.append((params, state, jax.tree.map(lambda t, p: t - p, theta, old)))
  return out


def check_against_hand(trace, opt, n0=None):
  """Each step of ``trace`` (from ``run``) against the NumPy Algorithm 1."""
  # The draw is the posterior's: theta - m = eps / sqrt(ess s), eps the
  # state's standard normals (checked before each step).
  state = opt.init(params0())
  for _, new_state, offset in trace:
    post = blrax.find_posteriors(state)[0]
    s = jax.tree.map(lambda h: h + post.weight_decay, post.curvature)
    expect = jax.tree.map(lambda e, s: e / jnp.sqrt(post.ess * s),
                          post.noise(), s)
    for k in offset:
      np.testing.assert_allclose(offset[k], expect[k], rtol=1e-5, atol=1e-7)
    state = new_state
  hand = hand_steps([as_np(o) for _, _, o in trace], **HYPER, n0=n0)
  for (params, state, _), (m, s, gm) in zip(trace, hand):
    st = bsam_state(state)
    h_plus_delta = jax.tree.map(lambda h: h + st.posterior.weight_decay,
                                st.posterior.curvature)
    for k in m:
      np.testing.assert_allclose(params[k], m[k], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(h_plus_delta[k], s[k], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(st.momentum[k], gm[k], rtol=1e-6, atol=1e-6)
  return hand


def test_matches_hand_computed_steps(step_fns):
  opt = make_bsam(**HYPER)
  trace = run(step_fns[0](opt), opt, 3)
  hand = check_against_hand(trace, opt)
  # The posterior is N(m, 1/(N s)), read by the generic posterior functions.
  std = blrax.posterior_stddev(trace[-1][1])
  for k in M0:
    np.testing.assert_allclose(
        std[k], 1 / np.sqrt(HYPER["ess"] * hand[-1][1][k]), rtol=1e-6)
  samples = blrax.sample_posterior(jax.random.key(0), trace[-1][0],
                                   trace[-1][1], 4)
  assert samples["b"].shape == (4, 2, 2)
  assert int(inner(trace[-1][1]).count) == 3


def test_hess_init_steps_matches_hand_computed_steps(step_fns):
  # n0 = 2: precision steps 1/3, 1/4, 1/5 before 1 - b2 = 0.1 takes over.
  opt = make_bsam(**HYPER, hess_init_steps=2.0)
  check_against_hand(run(step_fns[0](opt), opt, 3), opt, n0=2.0)
  with pytest.raises(ValueError, match="hess_init_steps=-1"):
    make_bsam(**HYPER, hess_init_steps=-1.0)


def test_no_noise_fixed_preconditioner_is_sam(step_fns):
  """ess=inf, b2=1: SAM (ascent rho g / s0) with momentum, preconditioned by
  1/s0, as optax.contrib.sam with matching outer and adversarial optimizers."""
  lr, rho, b1, delta, s0 = 0.1, 0.4, 0.7, 0.02, 2.5
  opt = blrax.bsam(lr, ess=jnp.inf, rho=rho, b1=b1, b2=1.0, damping=0.3,
                   weight_decay=delta, hess_init=s0 - delta)
  trace = run(step_fns[0](opt), opt, 4)
  outer = optax.chain(optax.add_decayed_weights(delta),
                      optax.ema(b1, debias=False), optax.scale(-lr / s0))
  sam = optax.contrib.sam(outer, optax.sgd(rho / s0), sync_period=2,
                          opaque_mode=True)
  params, state = params0(), sam.init(params0())
  for got, _, offset in trace:
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(offset))
    updates, state = sam.update(grad(params), state, params,
                                grad_fn=lambda p, _: grad(p))
    params = optax.apply_updates(params, updates)
    for k in params:
      np.testing.assert_allclose(got[k], params[k], rtol=1e-6, atol=1e-7)


def test_rho_zero_no_momentum_no_noise_is_diagonal_von():
  """rho=0, b1=0, ess=inf: the mean moves along the gradient at the mean, and
  the step is diagonal VON given the curvature target sqrt(s)|g| + gamma."""
  lr, b2, damping, delta, h0 = 0.3, 0.8, 0.2, 0.05, 1.5
  opt = blrax.bsam(lr, ess=jnp.inf, rho=0.0, b1=0.0, b2=b2, damping=damping,
                   weight_decay=delta, hess_init=h0)
  von = blrax.von(lr, ess=jnp.inf, b2=b2, weight_decay=delta, hess_init=h0)
  params = von_params = params0()
  state, von_state = opt.init(params), von.init(params)
  points = []

  def grad_fn(p):
    points.append(p)
    return grad(p)

  for _ in range(3):
    g = grad(params)
    updates, state = opt.update(g, state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    vg = grad(von_params)
    h = blrax.find_posteriors(von_state)[0].curvature
    target = jax.tree.map(lambda h, g: jnp.sqrt(h + delta) * jnp.abs(g)
                          + damping, h, vg)
    von_updates, von_state = von.update(vg, von_state, von_params,
                                        hessian=target)
    von_params = optax.apply_updates(von_params, von_updates)
    for k in params:
      np.testing.assert_allclose(params[k], von_params[k], rtol=1e-6)
  # rho = 0: the adversarial point is the mean itself.
  for k in M0:
    np.testing.assert_array_equal(points[0][k], params0()[k])


@pytest.mark.parametrize("scale", [3e38, 1e30, 1e-30, 0.0])
def test_precision_positive_and_finite_for_extreme_grads(scale):
  opt = blrax.bsam(1.0, ess=1e4, rho=1.0, b1=0.5, b2=0.0, damping=0.0,
                   weight_decay=0.0, hess_init=1e-3)
  params = jnp.array([1.0, -2.0, 0.0])
  state = opt.init(params)
  sign = jnp.array([1.0, -1.0, 1.0])
  for _ in range(3):
    g = scale * sign
    updates, state = opt.update(g, state, params, grad_fn=lambda p: -g)
    params = optax.apply_updates(params, updates)
    h = inner(state).posterior.curvature
    assert jnp.all(jnp.isfinite(h)) and jnp.all(h > 0)
    for leaf in jax.tree.leaves((updates, inner(state).momentum, params)):
      assert jnp.all(jnp.isfinite(leaf))
    std = blrax.posterior_stddev(state)
    assert jnp.all(jnp.isfinite(std)) and jnp.all(std > 0)
    point = blrax.bsam_adversarial_params(params, state, g)
    assert jnp.all(jnp.isfinite(point))


@pytest.mark.parametrize("kwargs, name, value", [
    (dict(ess=0.0), "ess", "0.0"),
    (dict(ess=-1.0), "ess", "-1.0"),
    (dict(ess=math.nan), "ess", "nan"),
    (dict(rho=-0.1), "rho", "-0.1"),
    (dict(rho=math.inf), "rho", "inf"),
    (dict(rho=math.nan), "rho", "nan"),
    (dict(b1=1.0), "b1", "1.0"),
    (dict(b1=-0.1), "b1", "-0.1"),
    (dict(b2=1.5), "b2", "1.5"),
    (dict(damping=-1.0), "damping", "-1.0"),
    (dict(weight_decay=-1e-3), "weight_decay", "-0.001"),
    (dict(hess_init=-2.0), "hess_init", "-2.0"),
    (dict(hess_init=0.0, weight_decay=0.0), "hess_init", "0.0"),
    (dict(learning_rate=-0.1), "learning_rate", "-0.1"),
    (dict(rho="0.1"), "rho", "'0.1'"),
    (dict(key=-1), "key", "-1"),
])
def test_bad_hyperparameters_raise(kwargs, name, value):
  args = dict(learning_rate=0.1, ess=100.0, rho=0.01) | kwargs
  with pytest.raises(ValueError, match=f"`{name}`.*{name}={value}"):
    blrax.bsam(args.pop("learning_rate"), **args)


def test_bad_update_arguments_raise():
  opt = blrax.bsam(0.1, ess=100.0, rho=0.01)
  params = jnp.zeros(3)
  state = opt.init(params)
  g = jnp.ones(3)
  with pytest.raises(ValueError, match="exactly one of `grad_fn`"):
    opt.update(g, state, params)
  with pytest.raises(ValueError, match="exactly one of `grad_fn`"):
    opt.update(g, state, params, grad_fn=grad, adversarial_grads=g)
  with pytest.raises(ValueError, match="`grad_fn` must be callable"):
    opt.update(g, state, params, grad_fn=3)
  with pytest.raises(ValueError, match="`adversarial_grads` leaf has shape"):
    opt.update(g, state, params, adversarial_grads=jnp.ones(2))
  with pytest.raises(ValueError, match="`grads` leaf has shape"):
    opt.update(jnp.ones(4), state, params, adversarial_grads=g)
  with pytest.raises(ValueError, match="exactly one bSAM state"):
    blrax.bsam_adversarial_params(params, blrax.ivon(0.1, ess=1.0).init(params),
                                  g)


def test_inside_chain_and_inject_hyperparams(step_fns):
  """Wrapped, the same steps as the hand oracle: extra args reach bSAM, its
  state is found by type, injected hyperparameters act like the closure's.
  The chain takes the explicit path, inject_hyperparams grad_fn."""
  chained = optax.chain(optax.clip_by_global_norm(1e6), make_bsam(**HYPER))
  check_against_hand(run(step_fns[1](chained), chained, 2), chained)
  injected = optax.inject_hyperparams(blrax.bsam, static_args=("mc_samples",))(
      learning_rate=HYPER["lr"], ess=HYPER["ess"], rho=HYPER["rho"],
      b1=HYPER["b1"], b2=HYPER["b2"], damping=HYPER["damping"],
      weight_decay=HYPER["delta"], hess_init=HYPER["h0"], key=3)
  check_against_hand(run(step_fns[0](injected), injected, 2), injected)
  # A new rho injected into the state moves the adversarial point.
  state = injected.init(params0())
  state.hyperparams["rho"] = jnp.asarray(0.0)
  _, state = injected.update(grad(params0()), state, params0(),
                             adversarial_grads=grad(params0()))
  point = blrax.bsam_adversarial_params(params0(), state, grad(params0()))
  for k in M0:
    np.testing.assert_array_equal(point[k], params0()[k])


def test_masked_params_stay_put():
  opt = optax.masked(blrax.bsam(0.1, ess=100.0, rho=0.5),
                     {"a": True, "b": False})
  params = params0()
  state = opt.init(params)
  g = grad(params)
  point = blrax.bsam_adversarial_params(params, state, g)
  np.testing.assert_array_equal(point["b"], params["b"])
  assert not np.allclose(point["a"], params["a"])
  theta = blrax.sample_params(params, state)
  np.testing.assert_array_equal(theta["b"], params["b"])


def _load_example():
  path = pathlib.Path(__file__).parents[1] / "examples" / "bsam_digits.py"
  spec = importlib.util.spec_from_file_location("bsam_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_example_smoke():
  example = _load_example()
  rows = example.main(["--seeds", "0", "--epochs", "2", "--lrs", "0.01",
                       "--samples", "4", "--methods", "SAM (Adam)", "bSAM"])
  assert {row["method"] for row in rows} == {"SAM (Adam)", "bSAM (mean)",
                                             "bSAM (BMA)"}
  for row in rows:
    assert 0.0 <= row["acc"] <= 1.0 and np.isfinite(row["nll"])


# --- The engine's features, each against a float64 NumPy transcription. ---

DECAY = {"a": np.array([0.05, 0.2, 0.1]), "b": 0.3}
MASK = {"a": True, "b": np.array([[True, False], [False, True]])}
PRIOR = {"a": np.array([0.2, -0.1, 0.4]), "b": np.array([[0.5, 0.0],
                                                         [0.0, -0.5]])}
FEATURES = dict(lr=0.2, ess=50.0, rho=0.3, b1=0.8, b2=0.9, damping=0.1,
                h0=0.7)


def np_decays(decay, mask):
  """delta per leaf, full-shaped, with the mask's zeros."""
  return {k: np.where(np.broadcast_to(np.asarray(mask[k]), M0[k].shape),
                      np.broadcast_to(np.asarray(decay[k], np.float64),
                                      M0[k].shape), 0.0) for k in M0}


def np_bsam_step(m, h, gm, draws, grad_fn, *, lr, rho, b1, b2, damping,
                 delta, m0, grads_at=None):
  """One bSAM update from the docstring's math, in float64: ``draws`` are
  the S points theta_s; ``grads_at`` (default ``np_grad``) their gradient."""
  grads_at = grads_at or np_grad
  gs = [grads_at(theta) for theta in draws]
  g_bar = {k: np.mean([g[k] for g in gs], axis=0) for k in m}
  c = {k: np.mean([np.abs(g[k]) for g in gs], axis=0) for k in m}
  s = {k: h[k] + delta[k] for k in m}
  g_eps = grad_fn({k: m[k] + rho * g_bar[k] / s[k] for k in m})
  gm = {k: b1 * gm[k] + (1 - b1) * (g_eps[k] + delta[k] * (m[k] - m0[k]))
        for k in m}
  h = {k: b2 * h[k] + (1 - b2) * (np.sqrt(s[k]) * c[k] + damping) for k in m}
  m = {k: m[k] - lr * gm[k] / (h[k] + delta[k]) for k in m}
  return m, h, gm


def _close(got, want, rtol=2e-5, atol=2e-6):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k],
                               rtol=rtol, atol=atol, err_msg=k)


def _mc_step(opt, explicit):
  @jax.jit
  def step(params, state):
    theta = blrax.sample_params(params, state)  # (2, ...) per leaf
    g = jax.vmap(grad)(theta)
    if explicit:
      point = blrax.bsam_adversarial_params(params, state, g)
      kwargs = dict(adversarial_grads=grad(point))
    else:
      kwargs = dict(grad_fn=grad)
    updates, state = opt.update(g, state, params, **kwargs)
    return optax.apply_updates(params, updates), state, theta
  return step


@pytest.mark.parametrize("explicit", [False, True],
                         ids=["grad_fn", "adversarial_grads"])
def test_mc_samples_per_leaf_decay_mask_prior_mean_match_numpy(explicit):
  """mc_samples=2, a per-leaf (broadcast) weight_decay, an elementwise mask
  and a prior mean, four steps: the draws' spread, h, momentum and mean."""
  hp = FEATURES
  opt = blrax.bsam(hp["lr"], ess=hp["ess"], rho=hp["rho"], b1=hp["b1"],
                   b2=hp["b2"], damping=hp["damping"], hess_init=hp["h0"],
                   weight_decay=DECAY, weight_decay_mask=MASK,
                   prior_mean=PRIOR, mc_samples=2, key=5)
  step = _mc_step(opt, explicit)
  delta = np_decays(DECAY, MASK)
  m, gm = as_np(M0), {k: np.zeros_like(v) for k, v in M0.items()}
  h = {k: np.full_like(v, hp["h0"]) for k, v in M0.items()}
  params, state = params0(), opt.init(params0())
  for _ in range(4):
    noise = blrax.find_posteriors(state)[0].noise()
    params, state, theta = step(params, state)
    draws = [{k: as_np(theta[k])[i] for k in m} for i in range(2)]
    # The draws: m + eps / sqrt(ess (h + delta)), eps the state's normals.
    for i in range(2):
      _close({k: draws[i][k] - m[k] for k in m},
             {k: np.asarray(noise[k][i], np.float64)
              / np.sqrt(hp["ess"] * (h[k] + delta[k])) for k in m})
    m, h, gm = np_bsam_step(m, h, gm, draws, np_grad, lr=hp["lr"],
                            rho=hp["rho"], b1=hp["b1"], b2=hp["b2"],
                            damping=hp["damping"], delta=delta, m0=PRIOR)
    st = bsam_state(state)
    _close(params, m)
    _close(st.posterior.curvature, h)
    _close(st.momentum, gm)
  np.testing.assert_array_equal(
      np.broadcast_to(st.posterior.weight_decay["b"], (2, 2)),
      np.float32(delta["b"]))


def test_multisteps_each_micro_batch_has_its_own_adversary():
  """blrax.MultiSteps(bsam, k=3): zero updates for two micro-batches, then
  one step with g_eps and |g| averaged over the three, each micro-batch's
  adversary at m + rho g_i / s with its own loss (m-sharpness)."""
  hp, k = FEATURES, 3
  shifts = [{key: (i + 1) * 0.3 * np.ones_like(v) for key, v in M0.items()}
            for i in range(2 * k)]
  grads_i = [lambda w, t=t: {key: C[key] * w[key] ** 3 + B[key] + t[key]
                             for key in w} for t in shifts]
  jgrads_i = [lambda w, t=t: jax.tree.map(jnp.add, grad(w), t)
              for t in shifts]
  opt = blrax.MultiSteps(
      blrax.bsam(hp["lr"], ess=hp["ess"], rho=hp["rho"], b1=hp["b1"],
                 b2=hp["b2"], damping=hp["damping"], hess_init=hp["h0"],
                 weight_decay=0.05, key=2), every_k_schedule=k)
  delta = {key: 0.05 for key in M0}
  m, gm = as_np(M0), {key: np.zeros_like(v) for key, v in M0.items()}
  h = {key: np.full_like(v, hp["h0"]) for key, v in M0.items()}
  params, state = params0(), opt.init(params0())
  for step in range(2):
    draws, adversaries = [], []
    for i in range(step * k, (step + 1) * k):
      theta = blrax.sample_params(params, state)
      updates, state = opt.update(jgrads_i[i](theta), state, params,
                                  grad_fn=jgrads_i[i])
      draw = as_np(theta)
      draws.append(draw)
      g = grads_i[i](draw)
      s = {key: h[key] + delta[key] for key in m}
      adversaries.append(grads_i[i](
          {key: m[key] + hp["rho"] * g[key] / s[key] for key in m}))
      if i < (step + 1) * k - 1:
        assert all(np.all(np.asarray(u) == 0)
                   for u in jax.tree.leaves(updates))
      params = optax.apply_updates(params, updates)
    # The accumulated step: means over the k micro-batches.
    gs = [grads_i[i](d) for i, d in zip(range(step * k, (step + 1) * k),
                                        draws)]
    g_eps = {key: np.mean([a[key] for a in adversaries], axis=0) for key in m}
    c = {key: np.mean([np.abs(g[key]) for g in gs], axis=0) for key in m}
    s = {key: h[key] + delta[key] for key in m}
    gm = {key: hp["b1"] * gm[key] + (1 - hp["b1"]) * (
        g_eps[key] + delta[key] * m[key]) for key in m}
    h = {key: hp["b2"] * h[key] + (1 - hp["b2"]) * (
        np.sqrt(s[key]) * c[key] + hp["damping"]) for key in m}
    m = {key: m[key] - hp["lr"] * gm[key] / (h[key] + delta[key])
         for key in m}
    st = bsam_state(state)
    _close(params, m)
    _close(st.posterior.curvature, h)
    _close(st.momentum, gm)
    assert int(st.count) == step + 1
  # The draws of one step differ: each micro-batch has its own.
  assert not np.allclose(draws[0]["a"], draws[1]["a"])


def test_apply_if_finite_with_grad_fn_steps_and_skips():
  """blrax.apply_if_finite(bsam) takes grad_fn: finite steps are bsam's;
  NaN grads, and a NaN gradient at the adversarial point, are skipped."""
  make = lambda: blrax.bsam(0.1, ess=50.0, rho=0.3, key=1)  # noqa: E731
  plain, wrapped = make(), blrax.apply_if_finite(make(), 3)
  params = params0()
  state, wstate = plain.init(params), wrapped.init(params)
  g = grad(params)
  nan_grad = lambda p: jax.tree.map(lambda x: x * jnp.nan, grad(p))  # noqa: E731

  @jax.jit
  def skipped(wstate):
    out = [wrapped.update(jax.tree.map(lambda x: x * jnp.nan, g), wstate,
                          params, grad_fn=grad)]
    out.append(wrapped.update(g, out[0][1], params, grad_fn=nan_grad))
    return out

  for bad_updates, bad_state in skipped(wstate):
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(bad_updates))
    for x, y in zip(jax.tree.leaves(bad_state.inner_state),
                    jax.tree.leaves(wstate.inner_state)):
      np.testing.assert_array_equal(x, y)
  assert int(bad_state.notfinite_count) == 2
  assert int(bad_state.total_notfinite) == 2
  for _ in range(2):
    updates, state = plain.update(g, state, params, grad_fn=grad)
    wupdates, wstate = wrapped.update(g, wstate, params, grad_fn=grad)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(wupdates)):
      np.testing.assert_array_equal(x, y)
    assert bool(wstate.last_finite) and int(wstate.notfinite_count) == 0


def _masked_loss_grad_a(w):
  """The gradient of the (separable) loss for leaf "a" only."""
  return {"a": C["a"] * w["a"] ** 3 + B["a"]}


@pytest.mark.parametrize("wrapper", ["masked", "partition"])
def test_masked_and_partition(wrapper):
  """Inside optax.masked/partition bSAM cannot call grad_fn at a complete
  point: a ValueError naming the fix. The fix (adversarial_grads with
  mask_compatible_extra_args=True) steps the covered leaf as the NumPy
  transcription and the others as their own transform."""
  hp = FEATURES
  make = lambda: blrax.bsam(  # noqa: E731
      hp["lr"], ess=hp["ess"], rho=hp["rho"], b1=hp["b1"], b2=hp["b2"],
      damping=hp["damping"], hess_init=hp["h0"], weight_decay=0.05, key=4)

  def build(compatible):
    if wrapper == "masked":
      return optax.masked(make(), {"a": True, "b": False},
                          mask_compatible_extra_args=compatible)
    return optax.partition({"bsam": make(), "sgd": optax.sgd(0.1)},
                           {"a": "bsam", "b": "sgd"},
                           mask_compatible_extra_args=compatible)

  params = params0()
  opt = build(False)
  with pytest.raises(ValueError, match="adversarial_grads=.*"
                     "mask_compatible_extra_args=True"):
    opt.update(grad(params), opt.init(params), params, grad_fn=grad)
  opt = build(True)
  state = opt.init(params)
  m = as_np(M0)
  h, gm = {"a": np.full(3, hp["h0"])}, {"a": np.zeros(3)}
  for _ in range(3):
    theta = blrax.sample_params(params, state)
    np.testing.assert_array_equal(theta["b"], params["b"])  # not covered
    g = grad(theta)
    point = blrax.bsam_adversarial_params(params, state, g)
    np.testing.assert_array_equal(point["b"], params["b"])
    updates, state = opt.update(g, state, params,
                                adversarial_grads=grad(point))
    new = optax.apply_updates(params, updates)
    a, h, gm = np_bsam_step(
        {"a": m["a"]}, h, gm, [{"a": as_np(theta["a"])}], _masked_loss_grad_a,
        lr=hp["lr"], rho=hp["rho"], b1=hp["b1"], b2=hp["b2"],
        damping=hp["damping"], delta={"a": 0.05}, m0={"a": 0.0},
        grads_at=_masked_loss_grad_a)
    # "b": masked passes the gradient (at m: no noise there) through as the
    # update; partition gives it to sgd.
    g_b = np_grad(m)["b"]
    m = {"a": a["a"], "b": m["b"] + g_b if wrapper == "masked"
         else m["b"] - 0.1 * g_b}
    _close(new, m)
    params = new


def test_initial_s_must_be_positive_per_leaf():
  with pytest.raises(ValueError, match="`hess_init`.*hess_init=0.0"):
    blrax.bsam(0.1, ess=10.0, rho=0.1, hess_init=0.0,
               weight_decay={"a": 0.1, "b": 0.0})
  opt = blrax.bsam(0.1, ess=10.0, rho=0.1, hess_init=0.0, weight_decay=0.1,
                   weight_decay_mask={"a": True, "b": False})
  with pytest.raises(ValueError, match="`hess_init`.*weight_decay_mask"):
    opt.init(params0())
  # All decayed: s0 = delta > 0 is fine.
  blrax.bsam(0.1, ess=10.0, rho=0.1, hess_init=0.0,
             weight_decay={"a": 0.1, "b": 0.2}).init(params0())


def test_hessian_is_refused():
  opt = blrax.bsam(0.1, ess=100.0, rho=0.01)
  params = jnp.zeros(3)
  with pytest.raises(ValueError, match="does not take `hessian=`"):
    opt.update(jnp.ones(3), opt.init(params), params, grad_fn=lambda p: p,
               hessian=jnp.ones(3))
