"""Does the linearised predictive fix the under-fitting of the sampled BMA?

Trains IVON on scikit-learn digits exactly as ``examples/quickstart.py`` does
(75/25 split, MLP 64-128-128-10, 60 epochs of batch 32) and compares the
held-out accuracy, NLL and ECE of: the posterior mean, the sampled BMA
(``blrax.predictive.predictive_log_probs``), the linearised sampled
predictive and the linearised probit (``blrax.predictive.linearized_log_probs``).

    python benchmarks/linearized_digits.py [--seeds 0 1 2] [--samples 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blrax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import quickstart  # noqa: E402


def run(seed, epochs, batch, samples):
  x_train, x_test, y_train, y_test = quickstart.load(seed)
  model = quickstart.MLP([64, 128, 128, 10], nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  apply = lambda p, xb: nnx.merge(graphdef, p)(xb)
  x_tr, y_tr = jnp.asarray(x_train), jnp.asarray(y_train)
  steps = epochs * (len(x_train) // batch)
  ivon = blrax.ivon(optax.cosine_decay_schedule(0.3, steps), ess=len(x_train),
                    hess_init=1.0, b2=0.999, weight_decay=1e-3, key=seed)
  mean, state = quickstart.train(ivon, params, apply, x_tr, y_tr, epochs,
                                 batch, seed, True, "IVON")
  xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
  key = jax.random.key(seed + 1)
  pred = blrax.predictive
  methods = {
      "mean": lambda: pred.predictive_log_probs(apply, None, mean, state, xt,
                                                mean_only=True),
      f"BMA ({samples})": lambda: pred.predictive_log_probs(
          apply, key, mean, state, xt, num_samples=samples, chunk_size=16),
      f"linearised sampled ({samples})": lambda: pred.linearized_log_probs(
          apply, key, mean, state, xt, num_samples=samples, chunk_size=16),
      "linearised probit": lambda: pred.linearized_log_probs(
          apply, None, mean, state, xt, method="probit"),
  }
  rows = {}
  for name, fn in methods.items():
    start = time.perf_counter()
    probs = jnp.exp(jax.block_until_ready(fn()))
    seconds = time.perf_counter() - start
    rows[name] = (float(blrax.metrics.accuracy(probs, yt)),
                  float(blrax.metrics.negative_log_likelihood(probs, yt)),
                  float(blrax.metrics.expected_calibration_error(probs, yt)),
                  seconds)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--samples", type=int, default=64)
  args = parser.parse_args()
  results = {}
  for seed in args.seeds:
    rows = run(seed, args.epochs, args.batch, args.samples)
    print(f"\nseed {seed} (digits, 450 held-out images; seconds include "
          "compilation)")
    print(f"| {'predictive':<26} | {'acc':>6} | {'nll':>6} | {'ece':>6} | "
          f"{'s':>5} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 7}|")
    for name, (acc, nll, ece, sec) in rows.items():
      print(f"| {name:<26} | {acc:6.4f} | {nll:6.4f} | {ece:6.4f} | "
            f"{sec:5.1f} |")
      results.setdefault(name, []).append((acc, nll, ece))
  if len(args.seeds) > 1:
    print(f"\nmean over seeds {args.seeds}")
    print(f"| {'predictive':<26} | {'acc':>6} | {'nll':>6} | {'ece':>6} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for name, values in results.items():
      acc, nll, ece = np.mean(values, axis=0)
      print(f"| {name:<26} | {acc:6.4f} | {nll:6.4f} | {ece:6.4f} |")


if __name__ == "__main__":
  main()
