"""25-step trajectories of every optimizer, for refactors that must not change them.

``python tests/golden/trajectories.py`` writes ``trajectories.npz`` next to this
file, with the machine it ran on (:func:`machine`);
``tests/test_trajectories.py`` recomputes every run and compares it bitwise on
that machine. XLA's CPU code generation depends on the CPU (its vector
instructions round differently), so elsewhere the comparison allows
``CROSS_MACHINE_TOLERANCE`` of each array's largest magnitude. Regenerate only
for a change that is meant to alter a trajectory (or on a new CI machine,
after checking that the tolerant comparison passes there), and say which in
the commit.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import blrax

STEPS = 25
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
Y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
PARAMS = {"w": jnp.asarray(0.3 * rng.normal(size=(4, 3)), jnp.float32),
          "b": jnp.zeros(3, jnp.float32)}
MASK = {"w": True, "b": False}


def example_loss(p, x, y):
  out = jnp.tanh(x @ p["w"] + p["b"])
  return 0.5 * jnp.sum((out - y) ** 2)


def loss(p):
  return jnp.mean(jax.vmap(example_loss, (None, 0, 0))(p, X, Y))


def hess_diag(p):  # Gauss-Newton-free: the exact diagonal via a vmap of hvps
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  f = lambda v: loss(unravel(v))
  eye = jnp.eye(flat.size)
  diag = jax.vmap(lambda e: e @ jax.hessian(f)(flat) @ e)(eye)
  return unravel(diag)


# name -> (optimizer, how its update is called: "grad", "per_example",
# "hessian", "bsam", "squares")
CASES = {
    "ivon": (blrax.ivon(0.05, ess=50.0), "grad"),
    "ivon_mc2": (blrax.ivon(0.05, ess=50.0, mc_samples=2), "grad"),
    "ivon_hash": (blrax.ivon(0.05, ess=50.0, noise="hash"), "grad"),
    "ivon_flip": (blrax.ivon(0.05, ess=50.0, noise="flip"), "grad"),
    "ivon_features": (blrax.ivon(
        0.05, ess=50.0, weight_decay={"w": 1e-2, "b": 1e-3},
        prior_mean={"w": 0.1 * jnp.ones((4, 3)), "b": jnp.zeros(3)},
        hess_init_steps=5.0, clip_radius=1.0, b2=0.99), "grad"),
    "ivon_mask": (blrax.ivon(0.05, ess=50.0, weight_decay_mask=MASK), "grad"),
    "ivon_hessian": (blrax.ivon(0.05, ess=50.0), "hessian"),
    "von_diag": (blrax.von(0.1, ess=50.0), "grad"),
    "von_diag_hessian": (blrax.von(0.1, ess=50.0), "hessian"),
    "von_full": (blrax.von(0.05, ess=50.0, covariance="full"), "grad"),
    "von_full_mc2": (blrax.von(0.05, ess=50.0, covariance="full",
                               mc_samples=2), "grad"),
    "von_full_hessian": (blrax.von(0.05, ess=50.0, covariance="full"),
                         "full_hessian"),
    "von_full_prior": (blrax.von(
        0.05, ess=50.0, covariance="full", weight_decay=1e-2,
        prior_mean={"w": 0.1 * jnp.ones((4, 3)), "b": jnp.zeros(3)}), "grad"),
    "vadam": (blrax.vadam(0.05, ess=50.0, batch_size=8), "grad"),
    "vadam_mc2_mask": (blrax.vadam(0.05, ess=50.0, batch_size=8, mc_samples=2,
                                   weight_decay_mask=MASK), "grad"),
    "vogn": (blrax.vogn(0.05, ess=50.0), "per_example"),
    "vogn_squares": (blrax.vogn(0.05, ess=50.0), "squares"),
    "evon": (blrax.evon(0.05, ess=50.0, precondition_frequency=3), "grad"),
    "evon_mc2": (blrax.evon(0.05, ess=50.0, mc_samples=2,
                            precondition_frequency=4,
                            weight_decay_mask=MASK), "grad"),
    "bsam": (blrax.bsam(0.05, ess=50.0, rho=0.05), "bsam"),
    "bsam_adversarial": (blrax.bsam(0.05, ess=50.0, rho=0.05, b2=0.99,
                                    weight_decay=1e-2), "bsam_adversarial"),
}


def _mc(state) -> int:
  return blrax.find_posteriors(state)[0].mc_samples


def make_step(opt, mode):
  @jax.jit
  def step(params, state):
    theta = blrax.sample_params(params, state)
    mc = _mc(state)
    grad = jax.grad(loss)
    kwargs = {}
    if mode == "per_example":
      per = jax.vmap(jax.grad(example_loss), (None, 0, 0))
      grads = (jax.vmap(lambda t: per(t, X, Y))(theta) if mc > 1
               else per(theta, X, Y))
    elif mode == "squares":
      batch_loss = lambda p, x, y: jnp.mean(jax.vmap(
          example_loss, (None, 0, 0))(p, x, y))
      _, grads, squares = blrax.value_grads_and_squares(
          batch_loss, theta, X, Y)
      kwargs["hessian"] = squares
    else:
      grads = jax.vmap(grad)(theta) if mc > 1 else grad(theta)
    if mode == "hessian":
      kwargs["hessian"] = (jax.vmap(hess_diag)(theta) if mc > 1
                           else hess_diag(theta))
    if mode == "full_hessian":
      flat, unravel = jax.flatten_util.ravel_pytree(theta)
      kwargs["hessian"] = jax.hessian(lambda v: loss(unravel(v)))(flat)
    if mode == "bsam":
      kwargs["grad_fn"] = grad
    if mode == "bsam_adversarial":
      point = blrax.bsam_adversarial_params(params, state, grads)
      kwargs["adversarial_grads"] = grad(point)
    updates, state = opt.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state
  return step


def run(name):
  """The params and state leaves after each of ``STEPS`` updates."""
  opt, mode = CASES[name]
  step = make_step(opt, mode)
  params, state = PARAMS, opt.init(PARAMS)
  out = []
  for _ in range(STEPS):
    params, state = step(params, state)
    out.append(jax.flatten_util.ravel_pytree(params)[0])
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  return np.stack(out), leaves


# Another CPU's rounding moved these trajectories by at most 3.6e-6 of an
# array's scale (EVON; 2e-7 for the others); a changed equation moves them
# by orders of magnitude more.
CROSS_MACHINE_TOLERANCE = 1e-4


def machine() -> str:
  """What the bits depend on besides the code: jaxlib and the CPU."""
  import jaxlib
  model, flags = "", ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = value.strip()
  digest = hashlib.sha1(flags.encode()).hexdigest()[:12]
  return f"jaxlib {jaxlib.__version__}; {model or 'unknown CPU'}; {digest}"


if __name__ == "__main__":
  arrays = {"machine": np.array(machine())}
  for name in CASES:
    path, leaves = run(name)
    arrays[f"{name}/params"] = path
    for i, leaf in enumerate(leaves):
      arrays[f"{name}/state{i}"] = leaf
    print(name, path[-1][:3])
  np.savez(os.path.join(os.path.dirname(__file__), "trajectories.npz"),
           **arrays)
