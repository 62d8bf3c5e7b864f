"""A posterior over part of the params: Bayesian last layer on digits.

Pretrains an MLP with AdamW, then keeps its feature layers frozen and learns a
posterior over the last layer only, with ``optax.partition``: IVON for the
``"bayes"`` part, ``optax.set_to_zero()`` for the ``"frozen"`` part. The
frozen params get no noise (``sample_params`` returns them untouched and their
stddev is exactly zero); only the last layer is averaged over.

    python examples/partial_posterior.py [--epochs 30] [--samples 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import blrax


def init_mlp(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer{i}": {"w": jax.random.normal(k, (a, b)) / np.sqrt(a),
                        "b": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def apply(params, x):
  names = sorted(params)
  for name in names[:-1]:
    x = jax.nn.relu(x @ params[name]["w"] + params[name]["b"])
  return x @ params[names[-1]]["w"] + params[names[-1]]["b"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def train(opt, params, x, y, epochs, batch, seed, variational, desc):
  state = opt.init(params)

  @jax.jit
  def step(params, state, idx):
    theta = blrax.sample_params(params, state) if variational else params
    updates, state = opt.update(jax.grad(loss_fn)(theta, x[idx], y[idx]), state,
                                params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  for _ in tqdm(range(epochs), desc=desc, leave=False):
    order = rng.permutation(len(x))
    for i in range(len(x) // batch):
      params, state = step(params, state, order[i * batch:(i + 1) * batch])
  return params, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--samples", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.25,
      random_state=args.seed, stratify=y)
  x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
  params = init_mlp(jax.random.key(args.seed), [64, 128, 128, 10])
  params, _ = train(optax.adamw(1e-3), params, x_tr, y_tr, args.epochs,
                    args.batch, args.seed, False, "pretrain (AdamW)")

  last = sorted(params)[-1]
  labels = {name: jax.tree.map(lambda _, n=name: "bayes" if n == last
                               else "frozen", layer)
            for name, layer in params.items()}
  opt = optax.partition(
      {"bayes": blrax.ivon(0.05, ess=len(x_tr), hess_init=1.0, b2=0.999,
                           weight_decay=1e-3, key=args.seed),
       "frozen": optax.set_to_zero()}, labels)
  mean, state = train(opt, params, x_tr, y_tr, args.epochs, args.batch,
                      args.seed, True, "last layer (IVON)")

  theta = blrax.sample_params(mean, state)
  std = blrax.posterior_stddev(state, mean)
  for name in sorted(mean):
    moved = float(jnp.max(jnp.abs(theta[name]["w"] - mean[name]["w"])))
    print(f"{name}: max |sample - mean| = {moved:.4f}, "
          f"median stddev = {float(jnp.median(std[name]['w'])):.4f}")

  xt, yt = jnp.asarray(x_te), jnp.asarray(y_te)
  at_mean = blrax.predictive.predictive_probs(apply, None, mean, state, xt,
                                              mean_only=True)
  bma = blrax.predictive.predictive_probs(apply, jax.random.key(1), mean, state,
                                          xt, num_samples=args.samples)
  pretrained = jax.nn.softmax(apply(params, xt))
  print("\n| model | acc | NLL | ECE |\n|---|---:|---:|---:|")
  for name, p in (("pretrained (AdamW)", pretrained),
                  ("last-layer IVON, mean", at_mean),
                  (f"last-layer IVON, BMA {args.samples}", bma)):
    print(f"| {name} | {float(blrax.metrics.accuracy(p, yt)):.4f} | "
          f"{float(blrax.metrics.negative_log_likelihood(p, yt)):.4f} | "
          f"{float(blrax.metrics.expected_calibration_error(p, yt)):.4f} |")


if __name__ == "__main__":
  main()
