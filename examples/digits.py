"""Digits classification, IVON vs AdamW, over several seeds (Flax NNX).

Trains an MLP on scikit-learn's digits with ``optax.adamw`` and ``blrax.ivon``
using the NNX helper ``blrax.flax.nnx_value_and_grad`` (gradients at a
posterior draw, the rest of the loop unchanged), then prints held-out accuracy,
NLL, ECE and Brier score (mean ± std over seeds) for AdamW, IVON at its mean
and IVON with Bayesian model averaging, and saves a reliability diagram.

    python examples/digits.py [--seeds 0 1 2] [--epochs 60] [--samples 64]
                              [--out digits_reliability.png]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import blrax  # noqa: E402
import blrax.flax  # noqa: E402


class MLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def adamw_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def ivon_step(model, optimizer, x, y):
  loss, grads = blrax.flax.nnx_value_and_grad(loss_fn, model, optimizer, x, y)
  optimizer.update(model, grads)
  return loss


def fit(model, tx, step, data, epochs, batch, seed, desc):
  x, y = data
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  for _ in tqdm(range(epochs), desc=desc, leave=False):
    order = rng.permutation(len(x))
    for i in range(len(x) // batch):
      idx = order[i * batch:(i + 1) * batch]
      step(model, optimizer, x[idx], y[idx])
  return optimizer


def run_seed(seed, args):
  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.25,
      random_state=seed, stratify=y)
  steps = args.epochs * (len(x_tr) // args.batch)
  sizes = [64, 128, 128, 10]

  adam_model = MLP(sizes, nnx.Rngs(seed))
  adamw = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  fit(adam_model, adamw, adamw_step, (x_tr, y_tr), args.epochs, args.batch,
      seed, f"AdamW seed {seed}")

  model = MLP(sizes, nnx.Rngs(seed))
  ivon = blrax.ivon(optax.cosine_decay_schedule(args.lr, steps), ess=len(x_tr),
                    hess_init=args.hess_init, b2=args.b2, weight_decay=1e-3,
                    key=seed)
  optimizer = fit(model, ivon, ivon_step, (x_tr, y_tr), args.epochs, args.batch,
                  seed, f"IVON seed {seed}")

  # The predictive functions take the NNX model and its optimizer directly
  # (apply_fn=None calls model(x)); only the nnx.Param variables are drawn.
  xt = jnp.asarray(x_te)
  probs = {
      "AdamW": jax.nn.softmax(adam_model(xt)),
      "IVON (mean)": blrax.predictive.predictive_probs(None, None, model,
                                                       optimizer, xt,
                                                       mean_only=True),
      f"IVON (BMA, {args.samples})": blrax.predictive.predictive_probs(
          None, jax.random.key(seed + 100), model, optimizer, xt,
          num_samples=args.samples, chunk_size=min(16, args.samples)),
  }
  labels = jnp.asarray(y_te)
  metrics = {
      name: {"acc": float(blrax.metrics.accuracy(p, labels)),
             "nll": float(blrax.metrics.negative_log_likelihood(p, labels)),
             "ece": float(blrax.metrics.expected_calibration_error(p, labels)),
             "brier": float(blrax.metrics.brier_score(p, labels))}
      for name, p in probs.items()}
  return metrics, probs, labels


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--samples", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.3)
  parser.add_argument("--hess-init", type=float, default=1.0)
  parser.add_argument("--b2", type=float, default=0.999)
  parser.add_argument("--out", default="digits_reliability.png")
  args = parser.parse_args()

  runs = [run_seed(seed, args) for seed in args.seeds]
  names = list(runs[0][0])
  print(f"\ndigits, 450 held-out images, seeds {args.seeds} (mean ± std)")
  print(f"| {'optimizer':<18} | acc | NLL | ECE | Brier |")
  print("|---|---:|---:|---:|---:|")
  for name in names:
    cells = []
    for metric in ("acc", "nll", "ece", "brier"):
      values = np.array([r[0][name][metric] for r in runs])
      cells.append(f"{values.mean():.4f} ± {values.std():.4f}")
    print(f"| {name:<18} | " + " | ".join(cells) + " |")

  _, probs, labels = runs[0]
  fig, axes = plt.subplots(1, len(probs), figsize=(4 * len(probs), 4))
  for ax, (name, p) in zip(axes, probs.items()):
    blrax.metrics.reliability_diagram(p, labels, num_bins=10, ax=ax, label=name)
    ax.set_title(name)
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"\nreliability diagram (seed {args.seeds[0]}): {args.out}")


if __name__ == "__main__":
  main()
