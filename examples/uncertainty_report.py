"""One uncertainty report on digits: AdamW vs IVON mean vs IVON BMA (Flax NNX).

Trains an MLP on scikit-learn's digits of classes 0-7 and holds classes 8
and 9 out as an out-of-distribution (OOD) stream: inputs of the same kind
the model has never seen a label for (a "near-OOD" test, harder than noise).
AdamW (learning rate swept over 1e-3, 3e-3, 1e-2, the best by validation
NLL) is compared with IVON at its posterior mean and with Bayesian model
averaging over posterior draws, and with AdamW after temperature scaling
fitted on the validation split. ``blrax.uncertainty.report`` streams the
held-out test images and the OOD images in batches and prints calibration,
the entropy split, selective prediction and OOD detection side by side;
split-conformal APS sets are calibrated on the validation split.

    python examples/uncertainty_report.py [--seed 0] [--epochs 60]
                                          [--samples 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import blrax
from blrax import uncertainty

IN_CLASSES = 8  # classes 0-7 in distribution, 8 and 9 held out


class MLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def load(seed):
  """Train / validation / test splits of classes 0-7, and classes 8-9."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  ood = x[y >= IN_CLASSES]
  x, y = x[y < IN_CLASSES], y[y < IN_CLASSES]
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25,
                                            random_state=seed, stratify=y)
  x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.2,
                                            random_state=seed, stratify=y_tr)
  return (x_tr, y_tr), (x_va, y_va), (x_te, y_te), ood


def train(opt, params, apply, data, epochs, batch, seed, variational):
  """A plain optax loop; with a blrax optimizer, grads are taken at a draw."""
  x, y = (jnp.asarray(a) for a in data)
  state = opt.init(params)

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb),
                                                           yb).mean()

  def step(carry, idx):
    p, s = carry
    theta = blrax.sample_params(p, s) if variational else p
    grads = jax.grad(loss_fn)(theta, x[idx], y[idx])
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  @jax.jit
  def epoch(p, s, key):
    n = (x.shape[0] // batch) * batch
    order = jax.random.permutation(key, x.shape[0])[:n].reshape(-1, batch)
    return jax.lax.scan(step, (p, s), order)[0]

  key = jax.random.key(seed)
  for _ in range(epochs):
    key, sub = jax.random.split(key)
    params, state = epoch(params, state, sub)
  return params, state


def batches(x, y=None, size=64):
  """The stream: one batch at a time (a generator, as from a data loader)."""
  for i in range(0, len(x), size):
    yield (x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size]


def bma_probs(predictor, x):
  members = predictor(jnp.asarray(x))
  return jnp.exp(jax.nn.logsumexp(members, 0) - jnp.log(members.shape[0]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--samples", type=int, default=32,
                      help="posterior draws for the BMA")
  parser.add_argument("--alpha", type=float, default=0.1,
                      help="conformal miscoverage level")
  parser.add_argument("--out", default=None,
                      help="directory for report.png (plots)")
  args = parser.parse_args()

  train_set, val, test, ood = load(args.seed)
  n_train = len(train_set[0])
  model = MLP([64, 128, 128, IN_CLASSES], nnx.Rngs(args.seed))
  graphdef, init = nnx.split(model, nnx.Param)
  init = nnx.as_pure(init)
  apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
  steps = args.epochs * (n_train // args.batch)

  # AdamW, lr swept: the best validation NLL.
  best = None
  for lr in (1e-3, 3e-3, 1e-2):
    adamw = optax.adamw(optax.cosine_decay_schedule(lr, steps),
                        weight_decay=1e-4)
    params, _ = train(adamw, init, apply, train_set, args.epochs, args.batch,
                      args.seed, False)
    nll = float(blrax.metrics.negative_log_likelihood(
        jax.nn.softmax(apply(params, jnp.asarray(val[0]))), val[1]))
    print(f"AdamW lr {lr:g}: validation NLL {nll:.4f}")
    if best is None or nll < best[0]:
      best = (nll, lr, params)
  _, adam_lr, adam_params = best

  # IVON with ess = N and the settings of the README's digits results.
  ivon = blrax.ivon(optax.cosine_decay_schedule(0.3, steps), ess=n_train,
                    hess_init=1.0, b2=0.999, weight_decay=1e-3, key=args.seed)
  mean, state = train(ivon, init, apply, train_set, args.epochs, args.batch,
                      args.seed, True)

  adam = uncertainty.point_predictor(apply, adam_params)
  temperature = uncertainty.fit_temperature(apply(adam_params,
                                                  jnp.asarray(val[0])), val[1])
  predictors = {
      f"AdamW (lr {adam_lr:g})": adam,
      f"AdamW + T={float(temperature):.2f}":
          uncertainty.temperature_predictor(adam, temperature),
      "IVON (mean)": uncertainty.point_predictor(apply, mean),
      f"IVON (BMA, {args.samples})": uncertainty.posterior_predictor(
          apply, jax.random.key(args.seed + 1), mean, state,
          num_samples=args.samples, chunk_size=min(8, args.samples)),
  }
  reports = {name: uncertainty.report(p, batches(*test),
                                      ood_batches=batches(ood))
             for name, p in predictors.items()}

  print(f"\ndigits, classes 0-{IN_CLASSES - 1}: {n_train} train, "
        f"{len(val[0])} validation, {len(test[0])} test images; OOD: the "
        f"{len(ood)} images of classes 8 and 9; seed {args.seed}, "
        f"{args.epochs} epochs\n")
  print(uncertainty.format_reports(reports))

  # Split-conformal APS sets, calibrated on the validation split: the
  # deterministic sets, and the randomised ones averaged over 100 draws of
  # their uniform U (one draw's coverage varies by about +-0.02 here).
  print(f"\nsplit-conformal APS sets (alpha = {args.alpha}), calibrated on "
        f"the {len(val[0])} validation images, on the test split:\n")
  print("| model | coverage | mean set size | OOD mean set size | coverage "
        "(randomised) | mean set size (randomised) |")
  print("|---|---:|---:|---:|---:|---:|")
  labels = jnp.asarray(test[1])
  for name, p in predictors.items():
    p_val, p_test, p_ood = (bma_probs(p, a) for a in (val[0], test[0], ood))
    q = uncertainty.conformal_threshold(p_val, val[1], args.alpha,
                                        randomized=False)
    sets = uncertainty.conformal_sets(p_test, q, randomized=False)
    ood_sets = uncertainty.conformal_sets(p_ood, q, randomized=False)

    @jax.vmap
    def randomised(key, p_val=p_val, p_test=p_test):
      k1, k2 = jax.random.split(key)
      q = uncertainty.conformal_threshold(p_val, val[1], args.alpha, key=k1)
      sets = uncertainty.conformal_sets(p_test, q, key=k2)
      return jnp.mean(sets[jnp.arange(len(labels)), labels]), jnp.mean(
          sets.sum(1))

    covered, size = randomised(jax.random.split(jax.random.key(args.seed),
                                                100))
    print(f"| {name} | {float(jnp.mean(sets[jnp.arange(len(labels)), labels])):.3f}"
          f" | {float(sets.sum(1).mean()):.2f} | "
          f"{float(ood_sets.sum(1).mean()):.2f} | {float(covered.mean()):.3f}"
          f" | {float(size.mean()):.2f} |")

  if args.out:
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "report.png")
    uncertainty.plot_report(reports).savefig(path, dpi=100)
    print(f"\nplots: {path}")


if __name__ == "__main__":
  main()
