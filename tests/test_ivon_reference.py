"""IVON against an independent NumPy transcription of blrax.ivon's update.

The oracle below is written from the equations, not from blrax: it takes the
sampled weights theta_s (from the public ``sample_params``), gradients computed
in NumPy from a closed form, and steps its own float64 state. blrax must follow
it step for step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

ESS = 64.0


def loss_grad(theta):
  """Gradient of sum(0.3 theta^4 / 4 + sin(theta) + 0.5 theta^2), in NumPy."""
  return 0.3 * theta**3 + np.cos(theta) + theta


def oracle_step(state, m, thetas, grads, hp):
  """One IVON step (blrax.ivon's docstring). ``thetas``/``grads``: (S, ...)."""
  g, h, t = state
  lam, delta = hp["ess"], hp["weight_decay"]
  g_bar = grads.mean(0)
  h_hat = (grads * (thetas - m)).mean(0) * lam * (h + delta)
  g = hp["b1"] * g + (1 - hp["b1"]) * g_bar
  b2 = hp["b2"]
  if hp["correction"]:
    h = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (
        h + delta)
  else:
    h = b2 * h + (1 - b2) * h_hat
  t = t + 1
  g_c = g / (1 - hp["b1"] ** t) if hp["debias"] else g
  step = np.clip((g_c + delta * m) / (h + delta), -hp["clip_radius"],
                 hp["clip_radius"])
  lr = hp["lr"] * (hp["hess_init"] + delta) if hp["rescale_lr"] else hp["lr"]
  return (g, h, t), m - lr * step


CASES = [
    dict(mc_samples=1, clip_radius=np.inf, rescale_lr=True, debias=True),
    dict(mc_samples=2, clip_radius=np.inf, rescale_lr=True, debias=True),
    dict(mc_samples=1, clip_radius=0.05, rescale_lr=True, debias=True),
    dict(mc_samples=2, clip_radius=0.05, rescale_lr=False, debias=False),
    dict(mc_samples=1, clip_radius=np.inf, rescale_lr=False, debias=True),
    dict(mc_samples=1, clip_radius=np.inf, rescale_lr=True, debias=False),
    dict(mc_samples=2, clip_radius=np.inf, rescale_lr=True, debias=True,
         noise="hash"),
    dict(mc_samples=2, clip_radius=0.05, rescale_lr=True, debias=True,
         noise="flip"),
]


def run(case, steps, correction=True):
  """Runs blrax and the oracle side by side; returns both trajectories."""
  hp = dict(lr=0.05, ess=ESS, hess_init=0.7, b1=0.8, b2=0.9,
            weight_decay=2.0**-6, correction=correction, noise="normal")
  hp.update(case)
  opt = blrax.ivon(
      learning_rate=hp["lr"], ess=hp["ess"], hess_init=hp["hess_init"],
      b1=hp["b1"], b2=hp["b2"], weight_decay=hp["weight_decay"],
      clip_radius=hp["clip_radius"], rescale_lr=hp["rescale_lr"],
      debias=hp["debias"], mc_samples=hp["mc_samples"], noise=hp["noise"],
      key=3)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4))),
            "b": jnp.asarray(rng.normal(size=(5,)))}
  state = opt.init(params)
  sample = jax.jit(blrax.sample_params)
  update = jax.jit(opt.update)
  ref_m = jax.tree.map(np.asarray, params)
  ref_state = {k: (np.zeros_like(v), np.full_like(v, hp["hess_init"]), 0)
               for k, v in ref_m.items()}
  blrax_traj, ref_traj = [], []
  for _ in range(steps):
    theta = sample(params, state)
    grads = jax.tree.map(lambda t: loss_grad(np.asarray(t, np.float64)), theta)
    for k in ref_m:
      th = np.asarray(theta[k], np.float64)
      gr = grads[k]
      if hp["mc_samples"] == 1:
        th, gr = th[None], gr[None]
      ref_state[k], ref_m[k] = oracle_step(ref_state[k], ref_m[k], th, gr, hp)
    dtype = jax.tree.leaves(params)[0].dtype
    updates, state = update(jax.tree.map(lambda g: jnp.asarray(g, dtype), grads),
                            state, params)
    params = optax.apply_updates(params, updates)
    inner = state[0]
    blrax_traj.append((jax.tree.map(np.asarray, params),
                       jax.tree.map(np.asarray, inner.posterior.curvature),
                       jax.tree.map(np.asarray, inner.momentum)))
    ref_traj.append(({k: v.copy() for k, v in ref_m.items()},
                     {k: v[1].copy() for k, v in ref_state.items()},
                     {k: v[0].copy() for k, v in ref_state.items()}))
  return blrax_traj, ref_traj


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(sorted(c.items())))
def test_matches_oracle_float64(case):
  with jax.enable_x64(True):
    ours, ref = run(case, steps=40)
  for (m, h, g), (rm, rh, rg) in zip(ours, ref):
    for k in rm:
      np.testing.assert_allclose(m[k], rm[k], rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(h[k], rh[k], rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(g[k], rg[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:2], ids=["mc1", "mc2"])
def test_matches_oracle_float32(case):
  ours, ref = run(case, steps=40)
  for m, rm in zip(ours, ref):
    for mine, theirs in zip(m, rm):
      for k in theirs:
        np.testing.assert_allclose(mine[k], theirs[k], rtol=2e-4, atol=2e-5)


def test_positivity_correction_matters_in_this_regime():
  """With b2 = 0.9 the correction term changes h: the oracle test can fail."""
  with jax.enable_x64(True):
    ours, _ = run(CASES[0], steps=10)
    _, no_correction = run(CASES[0], steps=10, correction=False)
  diff = max(np.max(np.abs(ours[-1][1][k] - no_correction[-1][1][k]))
             for k in ("w", "b"))
  assert diff > 1e-3
