"""Step-level oracles for every BLR variant (their docstrings), in float64 NumPy.

Each oracle below is an independent transcription of one variant's equations,
written from the documented updates, not from blrax's code. It is fed the same noise
as blrax: the draw theta_s comes from the public ``blrax.sample_params``, and
the oracle turns it back into eps_s / sigma = (theta_s - m) * lam * (h + delta)
with its *own* curvature h. The gradients (and the ``hessian=`` inputs) are a
closed form in NumPy of a non-quadratic loss, so the curvature varies with
theta. blrax must follow the oracle step for step: the params (the posterior
mean m) and ``blrax.posterior_stddev`` after every step, to rtol 1e-10.

Only the public API is used; the optimizer state is never read field by field.

To add a variant: write ``<name>_init`` / ``<name>_step`` below and add rows to
``ROWS`` (name, factory, kwargs, oracle, gradient kind).
"""

import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

STEPS = 35
RTOL, ATOL = 1e-10, 1e-13

# ---------------------------------------------------------------------------
# The problem: params {"b": (5,), "w": (3, 4)}, flattened in jax.tree.leaves
# (= ravel_pytree) order: b, then w row-major. D = 17.
# Per-example loss on the flat theta:
#   l_i(theta) = log cosh(a_i . theta - y_i) + 0.05 sum theta^4 + 0.1 sum theta^2
# gradient  tanh(z_i) a_i + 0.2 theta^3 + 0.2 theta
# Hessian   sech^2(z_i) a_i a_i^T + diag(0.6 theta^2 + 0.2)   (positive definite)
# The minibatch loss is the mean over B examples that differ.
# ---------------------------------------------------------------------------
LEAVES = (("b", (5,)), ("w", (3, 4)))
D = sum(math.prod(s) for _, s in LEAVES)
B = 4
_rng = np.random.default_rng(7)
A_DATA = _rng.normal(size=(B, D)) / np.sqrt(D) * 2.0
Y_DATA = _rng.normal(size=(B,))
M0 = _rng.normal(size=(D,))


def flat(tree, lead=()):
  """Pytree -> float64 array (*lead, D) in ravel_pytree order."""
  return np.concatenate(
      [np.asarray(tree[k], np.float64).reshape(lead + (-1,)) for k, _ in LEAVES],
      axis=-1)


def unflat(v):
  """(..., D) -> pytree of float64 jax arrays with the same leading axes."""
  out, i = {}, 0
  lead = v.shape[:-1]
  for k, s in LEAVES:
    n = math.prod(s)
    out[k] = jnp.asarray(v[..., i:i + n].reshape(lead + s), jnp.float64)
    i += n
  return out


def per_example_grad(theta):
  """theta (..., D) -> per-example gradients (..., B, D)."""
  z = theta @ A_DATA.T - Y_DATA                                # (..., B)
  reg = 0.2 * theta**3 + 0.2 * theta                            # (..., D)
  return np.tanh(z)[..., None] * A_DATA + reg[..., None, :]


def mean_grad(theta):
  return per_example_grad(theta).mean(-2)


def full_hessian(theta):
  """theta (..., D) -> Hessian of the minibatch mean loss (..., D, D)."""
  z = theta @ A_DATA.T - Y_DATA
  w = 1.0 / np.cosh(z) ** 2                                      # (..., B)
  ggn = np.einsum("...b,bi,bj->...ij", w, A_DATA, A_DATA) / B
  return ggn + np.einsum("...i,ij->...ij", 0.6 * theta**2 + 0.2, np.eye(D))


def diag_hessian(theta):
  return np.diagonal(full_hessian(theta), axis1=-2, axis2=-1).copy()


def example_loss_jax(params, a, y):
  """The same per-example loss in JAX (for per_example_grads)."""
  theta = jax.flatten_util.ravel_pytree(params)[0]
  return (jnp.log(jnp.cosh(a @ theta - y)) + 0.05 * jnp.sum(theta**4)
          + 0.1 * jnp.sum(theta**2))


# ---------------------------------------------------------------------------
# Oracles. state = dict; step(state, m, th, inputs, hp) -> (state, m, sigma).
# th: (S, D) the draws; inputs: dict with "g" (S, D) mean-batch gradients,
# "gi" (S, B, D) per-example gradients, "H" (S, D) or (S, D, D) Hessians.
# ---------------------------------------------------------------------------


def diag_sigma(lam, h, delta):
  return 1.0 / np.sqrt(lam * (h + delta))


def price_diag(g, th, m, lam, h, delta):
  """mean_s g_s * eps_s / sigma, eps_s / sigma = (theta_s - m) lam (h + delta)."""
  return (g * (th - m)).mean(0) * lam * (h + delta)


def corrected_ema(h, h_hat, rho, delta):
  """h <- (1-rho) h + rho h_hat + 0.5 rho^2 (h - h_hat)^2 / (h + delta)."""
  return ((1 - rho) * h + rho * h_hat
          + 0.5 * rho**2 * (h - h_hat) ** 2 / (h + delta))


def precision_step(hp, t):
  """rho_t: 1 - b2, or max(1 - b2, 1/(n0 + t)) with hess_init_steps = n0."""
  n0 = hp["hess_init_steps"]
  return 1 - hp["b2"] if n0 is None else max(1 - hp["b2"], 1.0 / (n0 + t))


def ivon_init(hp):
  return dict(g=np.zeros(D), h=np.full(D, float(hp["hess_init"])), t=0)


def ivon_step(st, m, th, inp, hp):
  lam, delta, b1 = hp["ess"], hp["weight_decay"], hp["b1"]
  g_bar = inp["g"].mean(0)
  if "H" in inp:
    h_hat = inp["H"].mean(0)
  else:
    h_hat = price_diag(inp["g"], th, m, lam, st["h"], delta)
  g = b1 * st["g"] + (1 - b1) * g_bar
  t = st["t"] + 1
  h = corrected_ema(st["h"], h_hat, precision_step(hp, t), delta)
  g_c = g / (1 - b1**t) if hp["debias"] else g
  step = np.clip((g_c + delta * m) / (h + delta), -hp["clip_radius"],
                 hp["clip_radius"])
  lr = hp["lr"] * (hp["hess_init"] + delta) if hp["rescale_lr"] else hp["lr"]
  m = m - lr * step
  return dict(g=g, h=h, t=t), m, diag_sigma(lam, h, delta)


def von_diag_init(hp):
  return dict(h=np.full(D, float(hp["hess_init"])), t=0)


def von_diag_step(st, m, th, inp, hp):
  t = st["t"] + 1
  lam, delta, rho = hp["ess"], hp["weight_decay"], precision_step(hp, t)
  g_bar = inp["g"].mean(0)
  if "H" in inp:
    h = (1 - rho) * st["h"] + rho * inp["H"].mean(0)
  else:
    h_hat = price_diag(inp["g"], th, m, lam, st["h"], delta)
    h = corrected_ema(st["h"], h_hat, rho, delta)
  m = m - hp["lr"] * (g_bar + delta * m) / (h + delta)
  return dict(h=h, t=t), m, diag_sigma(lam, h, delta)


def von_full_init(hp):
  return dict(S=float(hp["hess_init"]) * np.eye(D))


def von_full_step(st, m, th, inp, hp):
  lam, delta, rho = hp["ess"], hp["weight_decay"], 1 - hp["b2"]
  eye = np.eye(D)
  S = st["S"]
  g_bar = inp["g"].mean(0)
  if "H" in inp:
    S = (1 - rho) * S + rho * inp["H"].mean(0)
  else:
    P = lam * (S + delta * eye)
    # g_s (theta_s - m)^T P, symmetrised, averaged over samples.
    outer = np.einsum("si,sj->sij", inp["g"], (th - m) @ P)
    H_hat = (0.5 * (outer + np.swapaxes(outer, 1, 2))).mean(0)
    A = S + delta * eye
    C = (1 - rho) * A + rho * (H_hat + delta * eye)
    S = 0.5 * (A + C.T @ np.linalg.solve(A, C)) - delta * eye
    S = 0.5 * (S + S.T)
  prec = S + delta * eye
  m = m - hp["lr"] * np.linalg.solve(prec, g_bar + delta * m)
  sigma = np.sqrt(np.diag(np.linalg.inv(lam * prec)))
  return dict(S=S), m, sigma


def vadam_init(hp):
  return dict(g=np.zeros(D), s=np.full(D, float(hp["hess_init"])), t=0)


def vadam_step(st, m, th, inp, hp):
  lam, delta, b1, b2 = hp["ess"], hp["weight_decay"], hp["b1"], hp["b2"]
  g_bar = inp["g"].mean(0)
  # M g_bar^2 estimates the per-example Gauss-Newton diagonal (batch M).
  h_hat = hp.get("batch_size", 1) * g_bar**2
  g = b1 * st["g"] + (1 - b1) * (g_bar + delta * m)
  s = b2 * st["s"] + (1 - b2) * h_hat
  t = st["t"] + 1
  # Adam's debiasing of the data part only: s starts at hess_init, not 0.
  prior = b2**t * hp["hess_init"]
  s_hat = prior + (s - prior) / (1 - b2**t)
  m = m - hp["lr"] * (g / (1 - b1**t)) / (np.sqrt(s_hat) + delta)
  return dict(g=g, s=s, t=t), m, diag_sigma(lam, s, delta)


def vogn_init(hp):
  return dict(g=np.zeros(D), s=np.full(D, float(hp["hess_init"])), t=0)


def vogn_step(st, m, th, inp, hp):
  lam, delta, b1 = hp["ess"], hp["weight_decay"], hp["b1"]
  t = st["t"] + 1
  rho = precision_step(hp, t)
  gi = inp["gi"]                                      # (S, B, D)
  g_bar = gi.mean((0, 1))
  h_hat = (gi**2).mean((0, 1))
  g = b1 * st["g"] + (1 - b1) * (g_bar + delta * m)
  s = (1 - rho) * st["s"] + rho * h_hat
  m = m - hp["lr"] * g / (s + delta)
  return dict(g=g, s=s, t=t), m, diag_sigma(lam, s, delta)


ORACLES = {
    "ivon": (ivon_init, ivon_step),
    "von_diag": (von_diag_init, von_diag_step),
    "von_full": (von_full_init, von_full_step),
    "vadam": (vadam_init, vadam_step),
    "vogn": (vogn_init, vogn_step),
}

# ---------------------------------------------------------------------------
# The table. kind: "grad" (mean-batch gradients), "hessian" (also hessian=),
# "per_example" (VOGN's per-example gradients). kwargs are complete: the oracle
# reads every hyperparameter from them (plus lr), so defaults cannot hide.
# ---------------------------------------------------------------------------
DELTA = 2.0**-4
IVON_KW = dict(ess=64.0, hess_init=0.7, b1=0.8, b2=0.9, weight_decay=DELTA,
               clip_radius=math.inf, rescale_lr=True, debias=True,
               mc_samples=1, key=3, hess_init_steps=None)
VON_KW = dict(ess=64.0, hess_init=0.7, b2=0.9, weight_decay=DELTA,
              mc_samples=1, key=5, hess_init_steps=None)
VADAM_KW = dict(ess=64.0, b1=0.8, b2=0.9, weight_decay=DELTA, hess_init=0.0,
                mc_samples=1, key=11)
VOGN_KW = dict(ess=64.0, b1=0.8, b2=0.9, weight_decay=DELTA, hess_init=0.7,
               mc_samples=1, key=13, hess_init_steps=None)


def _kw(base, **over):
  return {**base, **over}


# (name, factory, learning_rate, kwargs, oracle, kind)
ROWS = [
    ("ivon_mc1", blrax.ivon, 0.05, IVON_KW, "ivon", "grad"),
    ("ivon_mc2", blrax.ivon, 0.05, _kw(IVON_KW, mc_samples=2), "ivon", "grad"),
    ("ivon_clip", blrax.ivon, 0.05, _kw(IVON_KW, clip_radius=0.05), "ivon",
     "grad"),
    ("ivon_plain_mc2", blrax.ivon, 0.02,
     _kw(IVON_KW, rescale_lr=False, debias=False, clip_radius=0.5,
         mc_samples=2), "ivon", "grad"),
    ("ivon_hessian_mc1", blrax.ivon, 0.05, IVON_KW, "ivon", "hessian"),
    # hess_init as a pseudo-count: rho_t = max(1 - b2, 1/(n0 + t)); with
    # b2 = 0.99 the running mean hands over to the EMA at t = 97 < STEPS.
    ("ivon_init_steps", blrax.ivon, 0.05,
     _kw(IVON_KW, b2=0.99, hess_init_steps=3.0), "ivon", "grad"),
    ("ivon_init_steps_hessian_mc2", blrax.ivon, 0.05,
     _kw(IVON_KW, b2=0.99, hess_init_steps=0.0, mc_samples=2), "ivon",
     "hessian"),
    ("ivon_hessian_mc2", blrax.ivon, 0.05, _kw(IVON_KW, mc_samples=2), "ivon",
     "hessian"),
    ("von_diag_mc1", blrax.von, 0.1, _kw(VON_KW, covariance="diag"),
     "von_diag", "grad"),
    ("von_diag_mc2", blrax.von, 0.1,
     _kw(VON_KW, covariance="diag", mc_samples=2), "von_diag", "grad"),
    ("von_diag_hessian_mc1", blrax.von, 0.1, _kw(VON_KW, covariance="diag"),
     "von_diag", "hessian"),
    ("von_diag_init_steps", blrax.von, 0.1,
     _kw(VON_KW, covariance="diag", b2=0.99, hess_init_steps=5.0),
     "von_diag", "grad"),
    ("von_diag_hessian_mc2", blrax.von, 0.1,
     _kw(VON_KW, covariance="diag", mc_samples=2), "von_diag", "hessian"),
    ("von_full_mc1", blrax.von, 0.1, _kw(VON_KW, covariance="full"),
     "von_full", "grad"),
    ("von_full_mc2", blrax.von, 0.1,
     _kw(VON_KW, covariance="full", mc_samples=2), "von_full", "grad"),
    ("von_full_hessian_mc1", blrax.von, 0.1, _kw(VON_KW, covariance="full"),
     "von_full", "hessian"),
    ("von_full_hessian_mc2", blrax.von, 0.1,
     _kw(VON_KW, covariance="full", mc_samples=2), "von_full", "hessian"),
    ("vadam_mc1", blrax.vadam, 0.02, VADAM_KW, "vadam", "grad"),
    ("vadam_mc2", blrax.vadam, 0.02,
     _kw(VADAM_KW, mc_samples=2, hess_init=0.3, batch_size=4),
     "vadam", "grad"),
    ("vogn_mc1", blrax.vogn, 0.05, VOGN_KW, "vogn", "per_example"),
    ("vogn_mc2", blrax.vogn, 0.05, _kw(VOGN_KW, mc_samples=2), "vogn",
     "per_example"),
    ("vogn_init_steps", blrax.vogn, 0.05,
     _kw(VOGN_KW, b2=0.95, hess_init_steps=2.0), "vogn", "per_example"),
]
ROW_BY_NAME = {r[0]: r for r in ROWS}


def _inputs(th, oracle, kind):
  """NumPy gradients (and Hessians) at the draws th (S, D)."""
  inp = {}
  if kind == "per_example":
    inp["gi"] = per_example_grad(th)
  else:
    inp["g"] = mean_grad(th)
  if kind == "hessian":
    inp["H"] = full_hessian(th) if oracle == "von_full" else diag_hessian(th)
  return inp


def _to_blrax(inp, oracle, kind, S):
  """The same inputs as blrax takes them: pytrees (or a (D, D) matrix)."""
  squeeze = (lambda x: x[0]) if S == 1 else (lambda x: x)
  grads = unflat(squeeze(inp["gi"] if kind == "per_example" else inp["g"]))
  extra = {}
  if kind == "hessian":
    if oracle == "von_full":
      extra["hessian"] = jnp.asarray(squeeze(inp["H"]), jnp.float64)
    else:
      extra["hessian"] = unflat(squeeze(inp["H"]))
  return grads, extra


@functools.lru_cache(maxsize=None)
def run(name, steps=STEPS):
  """Runs blrax and the oracle side by side (call under enable_x64).

  Returns (per-step list of (m, m_ref, sigma, sigma_ref)), final params,
  final opt_state, final oracle state.
  """
  _, factory, lr, kw, oracle, kind = ROW_BY_NAME[name]
  init_ref, step_ref = ORACLES[oracle]
  hp = dict(kw, lr=lr)
  S = kw["mc_samples"]
  opt = factory(lr, **kw)
  params = unflat(M0)
  assert np.array_equal(
      np.asarray(jax.flatten_util.ravel_pytree(params)[0]), M0)
  state = opt.init(params)
  update = jax.jit(opt.update)
  traj = []
  m_ref, st_ref = M0.copy(), init_ref(hp)
  ref = []
  for step in range(steps + 1):
    # One jitted call gives the next draw and the stddev after the last step.
    theta, sigma = _sample_and_stddev(params, state)
    if step:
      traj.append((flat(params), ref[-1][0], flat(sigma), ref[-1][1]))
    if step == steps:
      break
    th = flat(theta, (S,))                                  # (S, D)
    inp = _inputs(th, oracle, kind)
    st_ref, m_ref, sigma_ref = step_ref(st_ref, m_ref, th, inp, hp)
    ref.append((m_ref.copy(), sigma_ref))
    grads, extra = _to_blrax(inp, oracle, kind, S)
    updates, state = update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
  return traj, params, state, st_ref


@jax.jit
def _sample_and_stddev(params, state):
  return blrax.sample_params(params, state), blrax.posterior_stddev(state)


def _check_traj(traj):
  for t, (m, m_ref, sig, sig_ref) in enumerate(traj):
    assert np.all(np.isfinite(m_ref)) and np.all(np.isfinite(sig_ref))
    np.testing.assert_allclose(m, m_ref, rtol=RTOL, atol=ATOL,
                               err_msg=f"params (mean m) after step {t + 1}")
    np.testing.assert_allclose(sig, sig_ref, rtol=RTOL, atol=ATOL,
                               err_msg=f"posterior_stddev after step {t + 1}")


@pytest.mark.parametrize("name", [r[0] for r in ROWS])
def test_matches_oracle_float64(name):
  with jax.enable_x64(True):
    traj, *_ = run(name)
  assert len(traj) >= 30
  _check_traj(traj)
  # The run must go somewhere (not a fixed point the oracle trivially matches).
  assert np.max(np.abs(traj[-1][0] - M0)) > 1e-2
  assert np.max(np.abs(traj[-1][3] - traj[0][3])) > 1e-4


def test_regime_makes_the_terms_matter():
  """The clip is active and the noise moves the draws in this regime."""
  with jax.enable_x64(True):
    traj, *_ = run("ivon_clip")
  steps = np.diff(np.stack([M0] + [t[1] for t in traj]), axis=0)
  lr = 0.05 * (IVON_KW["hess_init"] + DELTA)
  assert np.isclose(np.max(np.abs(steps)), lr * 0.05)   # some step clipped
  # Noise scale: sigma ~ 1/sqrt(64 (h + delta)) is not negligible next to m.
  assert np.min(traj[-1][3]) > 1e-2


# ---------------------------------------------------------------------------
# per_example_grads against a Python loop of jax.grad.
# ---------------------------------------------------------------------------


def test_per_example_grads_matches_loop():
  with jax.enable_x64(True):
    params = unflat(M0)
    a, y = jnp.asarray(A_DATA), jnp.asarray(Y_DATA)
    got = blrax.per_example_grads(example_loss_jax, params, a, y)
    grad = jax.jit(jax.grad(example_loss_jax))
    for i in range(B):
      want = grad(params, a[i], y[i])
      for k, _ in LEAVES:
        assert got[k].shape == (B,) + want[k].shape
        np.testing.assert_allclose(got[k][i], want[k], rtol=1e-12, atol=1e-14)
    # And against the closed form used by the oracles.
    np.testing.assert_allclose(flat(got, (B,)), per_example_grad(M0),
                               rtol=1e-12, atol=1e-14)


def test_per_example_grads_mc_samples():
  with jax.enable_x64(True):
    thetas = unflat(np.stack([M0, 0.5 * M0 - 0.3]))       # (2, ...) leaves
    a, y = jnp.asarray(A_DATA), jnp.asarray(Y_DATA)
    got = blrax.per_example_grads(example_loss_jax, thetas, a, y, mc_samples=2)
    grad = jax.jit(jax.grad(example_loss_jax))
    for s in range(2):
      theta_s = jax.tree.map(lambda x: x[s], thetas)
      for i in range(B):
        want = grad(theta_s, a[i], y[i])
        for k, shape in LEAVES:
          assert got[k].shape == (2, B) + shape
          np.testing.assert_allclose(got[k][s, i], want[k], rtol=1e-12,
                                     atol=1e-14)


# ---------------------------------------------------------------------------
# After training: sample_posterior draws have the oracle's spread.
# ---------------------------------------------------------------------------
N_POSTERIOR = 4000


@pytest.mark.parametrize(
    "name", ["ivon_mc1", "von_diag_mc2", "von_full_mc1", "vadam_mc1",
             "vogn_mc2"])
def test_sample_posterior_spread(name):
  oracle = ROW_BY_NAME[name][4]
  with jax.enable_x64(True):
    traj, params, state, st_ref = run(name)
    sigma = flat(blrax.posterior_stddev(state))
    samples = blrax.sample_posterior(jax.random.key(42), params, state,
                                     N_POSTERIOR)
    x = flat(samples, (N_POSTERIOR,))
  m = flat(params)
  np.testing.assert_allclose(m, traj[-1][1], rtol=RTOL, atol=ATOL)
  # posterior_stddev is the sigma of the oracle's own curvature.
  lam, delta = ROW_BY_NAME[name][3]["ess"], DELTA
  if oracle == "von_full":
    cov = np.linalg.inv(lam * (st_ref["S"] + delta * np.eye(D)))
    sigma_ref = np.sqrt(np.diag(cov))
  else:
    curv = st_ref["s"] if oracle in ("vadam", "vogn") else st_ref["h"]
    sigma_ref = diag_sigma(lam, curv, delta)
    cov = np.diag(sigma_ref**2)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=RTOL, atol=ATOL)
  # Empirical mean and std within 5 standard errors, per coordinate.
  n = N_POSTERIOR
  assert np.all(np.abs(x.mean(0) - m) < 5 * sigma / np.sqrt(n))
  emp = x.std(0, ddof=1)
  assert np.all(np.abs(emp - sigma) < 5 * sigma / np.sqrt(2 * n))
  # Full covariance: every entry of the empirical covariance, too
  # (for diagonal posteriors this checks the draws are uncorrelated).
  emp_cov = np.cov(x, rowvar=False)
  se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  assert np.all(np.abs(emp_cov - cov) < 5.5 * se)
