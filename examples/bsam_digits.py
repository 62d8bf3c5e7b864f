"""Digits: bSAM vs SAM (Adam inner) vs IVON vs AdamW, learning rates tuned.

A 64-128-10 MLP on scikit-learn's digits (train / validation / test split
60/15/25, stratified). Every method's learning rate is picked from the same
grid by validation accuracy (mean over seeds, ties by NLL); the table then
reports held-out test accuracy, NLL and ECE (mean ± std over seeds) at that
learning rate, for the mean of the Bayesian methods' posteriors and for their
Bayesian model average (``blrax.predictive``). All learning rates and seeds of
one method train together (``jax.vmap`` over one jitted ``lax.scan``), so the
script compiles each method once. Step times: ``benchmarks/bsam_step_time.py``.

    python examples/bsam_digits.py [--seeds 0 1 2] [--epochs 40]
        [--lrs 0.003 0.01 0.03 0.1 0.3 1 3 10] [--rho 0.05] [--samples 32]
        [--methods AdamW "SAM (Adam)" IVON bSAM]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import blrax

SIZES = (64, 128, 10)
METHODS = ("AdamW", "SAM (Adam)", "IVON", "bSAM")
BATCH = 64


def init_mlp(key):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(SIZES) - 1),
                       zip(SIZES[:-1], SIZES[1:])):
    params.append({"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
                   "b": jnp.zeros(b)})
  return params


def apply_mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  logits = apply_mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(method, lr, key, n_train, total_steps, rho=0.05):
  """The method's optimizer for a (possibly traced) learning rate."""
  schedule = optax.cosine_decay_schedule(lr, total_steps)
  if method == "AdamW":
    return optax.adamw(schedule, weight_decay=1e-4)
  if method == "SAM (Adam)":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
    return optax.contrib.sam(optax.adam(schedule), adversary, opaque_mode=True)
  if method == "IVON":
    return blrax.ivon(schedule, ess=n_train, hess_init=1.0, b2=0.999,
                      weight_decay=1e-3, key=key)
  if method == "bSAM":
    return blrax.bsam(schedule, ess=n_train, rho=rho, weight_decay=1e-3,
                      key=key)
  raise ValueError(f"unknown method {method!r}")


def train_step(method, opt, params, state, x, y):
  """One step of the loop each method's user writes."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)  # noqa: E731
  if method == "AdamW":
    updates, state = opt.update(grad_fn(params), state, params)
  elif method == "SAM (Adam)":
    updates, state = opt.update(grad_fn(params), state, params,
                                grad_fn=lambda p, _: grad_fn(p))
  elif method == "IVON":
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(grad_fn(theta), state, params)
  else:  # bSAM: gradient at the draw, then at the adversarial point.
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(grad_fn(theta), state, params,
                                grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state


def make_trainer(method, data, epochs, rho):
  x_tr, y_tr = data
  n = len(x_tr)
  per_epoch = n // BATCH
  total = epochs * per_epoch

  def train(lr, seed):
    key = jax.random.key(seed)
    init_key, noise_key, data_key = jax.random.split(key, 3)
    opt = make_optimizer(method, lr, noise_key, n, total, rho)
    params = init_mlp(init_key)
    state = opt.init(params)

    def epoch(carry, k):
      order = jax.random.permutation(k, n)[:per_epoch * BATCH]
      batches = order.reshape(per_epoch, BATCH)

      def step(carry, idx):
        params, state = carry
        return train_step(method, opt, params, state, x_tr[idx],
                          y_tr[idx]), None

      return jax.lax.scan(step, carry, batches)[0], None

    (params, state), _ = jax.lax.scan(epoch, (params, state),
                                      jax.random.split(data_key, epochs))
    return params, state

  # All learning rates x seeds at once: one compile per method.
  return jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))


def scores(probs, labels):
  return {"acc": float(blrax.metrics.accuracy(probs, labels)),
          "nll": float(blrax.metrics.negative_log_likelihood(probs, labels)),
          "ece": float(blrax.metrics.expected_calibration_error(probs, labels))}


def index(tree, i, j):
  return jax.tree.map(lambda x: x[i, j], tree)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--lrs", type=float, nargs="+",
                      default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
  parser.add_argument("--rho", type=float, default=0.05,
                      help="bSAM's rho (SAM's normalised radius is 0.05)")
  parser.add_argument("--samples", type=int, default=32)
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=METHODS)
  args = parser.parse_args(argv)

  x, y = load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
  x_rest, x_te, y_rest, y_te = train_test_split(
      x, y, test_size=0.25, random_state=0, stratify=y)
  x_tr, x_va, y_tr, y_va = train_test_split(
      x_rest, y_rest, test_size=0.2, random_state=0, stratify=y_rest)
  data = (jnp.asarray(x_tr), jnp.asarray(y_tr))
  lrs, seeds = jnp.asarray(args.lrs), jnp.asarray(args.seeds)

  methods = args.methods
  rows = []
  for method in methods:
    start = time.perf_counter()
    params, states = make_trainer(method, data, args.epochs, args.rho)(
        lrs, seeds)
    val = [[scores(jax.nn.softmax(apply_mlp(index(params, i, j), x_va)), y_va)
            for j in range(len(args.seeds))] for i in range(len(args.lrs))]

    def rank(i):  # a diverged run (non-finite NLL) ranks last
      nll = np.mean([v["nll"] for v in val[i]])
      acc = np.mean([v["acc"] for v in val[i]])
      return (acc, -nll) if np.isfinite(nll) else (-np.inf, -np.inf)

    best = max(range(len(args.lrs)), key=rank)
    print(f"{method}: trained {len(args.lrs)} lrs x {len(args.seeds)} seeds "
          f"in {time.perf_counter() - start:.0f} s; validation accuracy by lr "
          + ", ".join(f"{lr:g}: {np.mean([v['acc'] for v in val[i]]):.3f}"
                      for i, lr in enumerate(args.lrs))
          + f"; chosen lr {args.lrs[best]:g}")
    per_seed = {}
    for j, seed in enumerate(args.seeds):
      p, s = index(params, best, j), index(states, best, j)
      probs = {"": jax.nn.softmax(apply_mlp(p, x_te))}
      if method in ("IVON", "bSAM"):
        probs = {" (mean)": probs[""],
                 " (BMA)": blrax.predictive.predictive_probs(
                     apply_mlp, jax.random.key(1000 + seed), p, s, x_te,
                     num_samples=args.samples)}
      for suffix, pr in probs.items():
        per_seed.setdefault(method + suffix, []).append(scores(pr, y_te))
    for name, results in per_seed.items():
      row = {"method": name, "lr": args.lrs[best]}
      for metric in ("acc", "nll", "ece"):
        values = np.array([r[metric] for r in results])
        row[metric], row[metric + "_std"] = values.mean(), values.std()
      rows.append(row)

  print(f"\ndigits, {len(x_te)} test images, {args.epochs} epochs, seeds "
        f"{args.seeds}, lr from {args.lrs} by validation accuracy, bSAM rho "
        f"{args.rho} (mean ± std over seeds)\n")
  print("| method | lr | accuracy | NLL | ECE |")
  print("|---|---:|---:|---:|---:|")
  for row in rows:
    print(f"| {row['method']} | {row['lr']:g} | "
          + " | ".join(f"{row[m]:.4f} ± {row[m + '_std']:.4f}"
                       for m in ("acc", "nll", "ece")) + " |")
  for metric, better in (("acc", max), ("nll", min), ("ece", min)):
    winner = better(rows, key=lambda r: r[metric])
    print(f"best {metric}: {winner['method']} ({winner[metric]:.4f})")

  return rows


if __name__ == "__main__":
  main()
