"""Digits classification with an Equinox MLP trained by IVON.

An ``eqx.Module`` holds arrays and non-array fields (here its activation
function and a name). blrax posteriors are over arrays only, so the model is
split once, ``params, static = eqx.partition(model, eqx.is_inexact_array)``;
the optimizer sees ``params`` alone and the loss rebuilds the model at the
posterior draw with ``eqx.combine(theta, static)``. Prints held-out accuracy
and NLL of the posterior mean and of the Bayesian model average.

    python examples/equinox_mlp.py [--epochs 20] [--samples 16] [--seed 0]
"""

from __future__ import annotations

import argparse
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import blrax


class MLP(eqx.Module):
  """An MLP whose activation (a function) and name (a string) are fields."""

  layers: list
  activation: Callable
  name: str

  def __init__(self, sizes, key, activation=jax.nn.relu, name="mlp"):
    keys = jax.random.split(key, len(sizes) - 1)
    self.layers = [eqx.nn.Linear(a, b, key=k)
                   for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
    self.activation = activation
    self.name = name

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = self.activation(layer(x))
    return self.layers[-1](x)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.3, random_state=args.seed)

  model = MLP([64, 64, 10], jax.random.key(args.seed))
  # The optimizer sees the float arrays only; `static` keeps the rest.
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(theta, xb, yb):
    logits = jax.vmap(eqx.combine(theta, static))(xb)  # the model at the draw
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  batch = 32
  steps = args.epochs * (len(x_train) // batch)
  opt = blrax.ivon(optax.cosine_decay_schedule(0.3, steps), ess=len(x_train),
                   hess_init=1.0, b2=0.999, weight_decay=1e-3, key=args.seed)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, xb, yb):
    loss, grads = blrax.value_and_grad(loss_fn)(params, opt_state, xb, yb)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(args.seed)
  for epoch in range(args.epochs):
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      params, opt_state, loss = train_step(params, opt_state, x_train[idx],
                                           y_train[idx])
      losses.append(float(loss))
    print(f"epoch {epoch + 1:3d}  train loss at the draws {np.mean(losses):.4f}")

  def apply_fn(theta, xb):
    return jax.vmap(eqx.combine(theta, static))(xb)

  labels = jnp.asarray(y_test)
  mean_log_probs = jax.nn.log_softmax(apply_fn(params, x_test))
  bma_log_probs = blrax.predictive.predictive_log_probs(
      apply_fn, jax.random.key(args.seed + 1), params, opt_state, x_test,
      num_samples=args.samples)
  for name, log_probs in (("IVON (mean)", mean_log_probs),
                          (f"IVON (BMA, {args.samples})", bma_log_probs)):
    acc = float(jnp.mean(jnp.argmax(log_probs, -1) == labels))
    nll = float(-jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1)))
    print(f"| {name} | acc {acc:.4f} | NLL {nll:.4f} |")
  trained = eqx.combine(params, static)  # the trained mean as an eqx.Module
  print(f"model {trained.name!r}, activation {trained.activation.__name__}")


if __name__ == "__main__":
  main()
