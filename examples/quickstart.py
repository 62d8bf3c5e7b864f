"""IVON vs AdamW on scikit-learn's digits, with a Flax NNX MLP.

Trains the same MLP with ``optax.adamw`` and with ``blrax.ivon`` (``ess`` =
training-set size, ``b2`` set for the run length) and prints held-out
accuracy, NLL and ECE for AdamW (also with a temperature fitted on a
validation split), IVON at its posterior mean, and IVON's Bayesian model
average over posterior samples: as trained, and calibrated on the same
validation split (:func:`blrax.calibrate_posterior`: the posterior's
temperature, fitted by the model average's NLL; no retraining), sampled and
linearised. Then ``posterior_health`` says how much of the curvature the data
set.

    python examples/quickstart.py [--epochs 60] [--samples 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import blrax

# IVON's settings: hess_init=1 (the default); b2 = 0.999 rather than 0.99999
# so that the curvature EMA (1/(1-b2) = 1000 steps) moves within this
# ~2000-step run; weight_decay = 1e-3 is a N(0, 1/(ess * 1e-3)) prior.
IVON_LR = 0.3
IVON_SETTINGS = {"hess_init": 1.0, "b2": 0.999, "weight_decay": 1e-3}


class MLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def load(seed):
  """Train / validation / test: 1078 / 269 / 450 digits."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y.astype(np.int32), test_size=0.25, random_state=seed, stratify=y)
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=0.2, random_state=seed, stratify=y_rest)
  return x_train, x_val, x_test, y_train, y_val, y_test


def model(seed):
  """The MLP's initial params (a pure pytree) and ``apply(params, x)``."""
  graphdef, params = nnx.split(MLP([64, 128, 128, 10], nnx.Rngs(seed)),
                               nnx.Param)
  return nnx.as_pure(params), lambda p, xb: nnx.merge(graphdef, p)(xb)


def train(opt, params, apply, x, y, epochs, batch, seed, variational, desc):
  """Plain optax loop; with a blrax optimizer, grads are taken at a sample."""
  state = opt.init(params)

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()

  # blrax.value_and_grad differentiates at the posterior draw that the
  # next update expects (blrax.sample_params), never at the mean.
  grad_fn = (blrax.value_and_grad(loss_fn) if variational
             else lambda p, s, *batch: jax.value_and_grad(loss_fn)(p, *batch))

  def step(carry, batch_idx):
    p, s = carry
    _, grads = grad_fn(p, s, x[batch_idx], y[batch_idx])
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  @jax.jit
  def epoch(p, s, key):
    n = (x.shape[0] // batch) * batch
    order = jax.random.permutation(key, x.shape[0])[:n].reshape(-1, batch)
    return jax.lax.scan(step, (p, s), order)[0]

  key = jax.random.key(seed)
  for _ in tqdm(range(epochs), desc=desc, leave=False):
    key, sub = jax.random.split(key)
    params, state = epoch(params, state, sub)
  return params, state


def report(name, probs, y):
  probs, y = jnp.asarray(probs), jnp.asarray(y)
  print(f"{name:<34} {float(blrax.metrics.accuracy(probs, y)):>8.4f} "
        f"{float(blrax.metrics.negative_log_likelihood(probs, y)):>8.4f} "
        f"{float(blrax.metrics.expected_calibration_error(probs, y)):>8.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--samples", type=int, default=64,
                      help="posterior samples for model averaging")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x_train, x_val, x_test, y_train, y_val, y_test = load(args.seed)
  params, apply = model(args.seed)
  x_tr, y_tr = jnp.asarray(x_train), jnp.asarray(y_train)
  xv, xt = jnp.asarray(x_val), jnp.asarray(x_test)
  steps = args.epochs * (len(x_train) // args.batch)

  adamw = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  adam_params, _ = train(adamw, params, apply, x_tr, y_tr, args.epochs,
                         args.batch, args.seed, False, "AdamW")

  ivon = blrax.ivon(optax.cosine_decay_schedule(IVON_LR, steps),
                    ess=len(x_train), key=args.seed, **IVON_SETTINGS)
  mean, state = train(ivon, params, apply, x_tr, y_tr, args.epochs,
                      args.batch, args.seed, True, "IVON")

  # The posterior's temperature, fitted on the validation split (tau = 0 is
  # the mean, so there the calibrated average is never worse than the mean).
  validation = [(xv, jnp.asarray(y_val))]
  calibration = blrax.calibrate_posterior(apply, mean, state, validation,
                                          key=args.seed)
  # The same for the linearised predictive f(m) + J (theta - m).
  linear = blrax.calibrate_posterior(apply, mean, state, validation,
                                     key=args.seed, linearized=True)
  bma = lambda s: blrax.predictive.predictive_probs(
      apply, args.seed + 1, mean, s, xt, num_samples=args.samples)
  temperature = blrax.uncertainty.fit_temperature(apply(adam_params, xv),
                                                  y_val)

  print(f"\ndigits, {len(x_test)} held-out images, seed {args.seed}")
  print(f"{'':<34} {'acc':>8} {'nll':>8} {'ece':>8}")
  report("AdamW", jax.nn.softmax(apply(adam_params, xt)), y_test)
  report("AdamW + temperature",
         jax.nn.softmax(apply(adam_params, xt) / temperature), y_test)
  report("IVON (mean)", jax.nn.softmax(apply(mean, xt)), y_test)
  report(f"IVON (BMA, {args.samples} samples)", bma(state), y_test)
  report(f"IVON (calibrated BMA, {args.samples})", bma(calibration.opt_state),
         y_test)
  report(f"IVON (calibrated linearised, {args.samples})",
         blrax.predictive.linearized_probs(apply, args.seed + 1, mean,
                                           linear.opt_state, xt,
                                           num_samples=args.samples), y_test)
  print(f"\nposterior temperature {calibration.temperature:.3g} (validation "
        f"NLL {calibration.nll:.4f}; mean {calibration.mean_nll:.4f}, as "
        f"trained {calibration.uncalibrated_nll:.4f}); linearised "
        f"{linear.temperature:.3g} (validation NLL {linear.nll:.4f})")
  std = jnp.concatenate([s.ravel() for s in jax.tree.leaves(
      blrax.posterior_stddev(calibration.opt_state))])
  print(f"calibrated posterior stddev: median {float(jnp.median(std)):.4f}, "
        f"min {float(std.min()):.4f}, max {float(std.max()):.4f}")
  # Is the trained posterior the data's, the prior's or still hess_init's?
  print(blrax.posterior_health(mean, state, hess_init=IVON_SETTINGS["hess_init"],
                               b2=IVON_SETTINGS["b2"], warn=False))


if __name__ == "__main__":
  main()
