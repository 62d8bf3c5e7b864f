"""Whose posterior is it? IVON settings on the quickstart, by the data's share.

Trains the quickstart's MLP (digits, 64-128-128-10, 1078 training images,
batch 32, 60 epochs, cosine lr 0.3, ``ess`` = 1078) with each IVON setting
and prints, averaged over the seeds: test accuracy and NLL of the mean, of
the model average as trained and calibrated (:func:`blrax.calibrate_posterior`
on the validation split), the fitted temperature, and
:func:`blrax.posterior_health`'s medians: the curvature's shares (initial
value, data) and the prior's share of the precision, sigma and sigma/|m|.

The settings go from the quickstart's (``hess_init`` sets sigma) to ones in
which the data set the curvature (``data_share`` >= 0.5): a small
``hess_init``, a fast ``b2`` or ``hess_init_steps``, with a ``weight_decay``
that bounds sigma <= 1/sqrt(ess * weight_decay).

    python benchmarks/data_share_sweep.py [--seeds 0 1 2]
        [--settings '[{"b2": 0.999}, ...]']

Results of 2026-12-07: benchmarks/results/data_share_sweep.txt.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blrax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import quickstart  # noqa: E402

# Each updates the quickstart's IVON keywords (below).
SETTINGS = [
    {},  # the quickstart
    {"hess_init_steps": 100},
    {"weight_decay": 1e-2, "hess_init": 0.1, "hess_init_steps": 10},
    {"weight_decay": 1e-2, "hess_init": 0.03, "b2": 0.99},
    {"weight_decay": 1e-2, "hess_init": 0.01},
    {"weight_decay": 0.1, "hess_init": 0.01},
]
EPOCHS, BATCH = 60, 32  # the quickstart's defaults


def run(setting, seed):
  x_train, x_val, x_test, y_train, y_val, y_test = quickstart.load(seed)
  params, apply = quickstart.model(seed)
  steps = EPOCHS * (len(x_train) // BATCH)
  options = {**quickstart.IVON_SETTINGS, **setting}
  ivon = blrax.ivon(optax.cosine_decay_schedule(quickstart.IVON_LR, steps),
                    ess=len(x_train), key=seed, **options)
  mean, state = quickstart.train(ivon, params, apply, jnp.asarray(x_train),
                                 jnp.asarray(y_train), EPOCHS, BATCH, seed,
                                 True, "IVON")
  calibration = blrax.calibrate_posterior(
      apply, mean, state, [(jnp.asarray(x_val), jnp.asarray(y_val))], key=seed)
  xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
  bma = lambda s: blrax.predictive.predictive_probs(apply, seed + 1, mean, s,
                                                    xt, num_samples=64)
  nll = lambda p: float(blrax.metrics.negative_log_likelihood(p, yt))
  mean_probs = jax.nn.softmax(apply(mean, xt))
  health = blrax.posterior_health(
      mean, state, hess_init=options["hess_init"], b2=options["b2"],
      hess_init_steps=options.get("hess_init_steps"), warn=False).overall
  return {
      "acc": float(blrax.metrics.accuracy(mean_probs, yt)),
      "mean": nll(mean_probs), "bma": nll(bma(state)),
      "cal": nll(bma(calibration.opt_state)),
      "tau": calibration.temperature,
      **{k: health[k] for k in ("init_share", "data_share", "prior_share",
                                "stddev", "relative_stddev")},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--settings", type=json.loads, default=SETTINGS)
  args = parser.parse_args()
  columns = ("acc", "mean", "bma", "cal", "tau", "init_share", "data_share",
             "prior_share", "stddev", "relative_stddev")
  print(f"seeds {args.seeds}; quickstart IVON {quickstart.IVON_SETTINGS}, "
        f"lr {quickstart.IVON_LR}, "
        f"{EPOCHS} epochs, batch {BATCH}; test metrics, medians of health")
  print("| setting | " + " | ".join(columns) + " |")
  print("|---" * (len(columns) + 1) + "|")
  for setting in args.settings:
    rows = [run(setting, seed) for seed in args.seeds]
    print(f"| {json.dumps(setting) if setting else 'quickstart'} | "
          + " | ".join(f"{np.mean([r[c] for r in rows]):.4g}" for c in columns)
          + " |", flush=True)


if __name__ == "__main__":
  main()
