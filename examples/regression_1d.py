"""1-D regression with predictive bands: IVON on a Flax Linen MLP.

Fits noisy samples of a sine with a gap in the inputs using
``blrax.flax.VariationalTrainState`` (Linen's ``TrainState`` for blrax
optimizers), then plots the posterior-predictive mean and ±2 std bands from
``blrax.predictive.predictive_mean_variance``. The bands should widen in the
gap and outside the data.

    python examples/regression_1d.py [--steps 4000] [--samples 200]
                                     [--out regression_1d.png]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import blrax  # noqa: E402
import blrax.flax  # noqa: E402

NOISE = 0.1


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (64, 64):
      x = jnp.tanh(nn.Dense(width)(x))
    return nn.Dense(1)(x)[..., 0]


def make_data(seed, n=80):
  rng = np.random.default_rng(seed)
  x = np.concatenate([rng.uniform(-3, -0.7, n // 2), rng.uniform(0.7, 3, n // 2)])
  y = np.sin(2 * x) + NOISE * rng.normal(size=n)
  return x[:, None].astype(np.float32), y.astype(np.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--samples", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=0.002)
  parser.add_argument("--hess-init", type=float, default=30.0)
  parser.add_argument("--b2", type=float, default=0.999)
  parser.add_argument("--out", default="regression_1d.png")
  args = parser.parse_args()

  x, y = make_data(args.seed)
  module = MLP()
  params = module.init(jax.random.key(args.seed), x)["params"]
  # Gaussian likelihood: mean loss = mean squared error / (2 noise^2).
  loss_fn = lambda p: jnp.mean((module.apply({"params": p}, x) - y) ** 2) / (
      2 * NOISE**2)
  tx = blrax.ivon(optax.cosine_decay_schedule(args.lr, args.steps), ess=len(x),
                  hess_init=args.hess_init, b2=args.b2, weight_decay=1e-2,
                  key=args.seed)
  state = blrax.flax.VariationalTrainState.create(apply_fn=module.apply,
                                                  params=params, tx=tx)

  @jax.jit
  def train_step(state):
    loss, grads = jax.value_and_grad(loss_fn)(state.sample_params())
    return state.apply_gradients(grads=grads), loss

  for _ in tqdm(range(args.steps), desc="IVON"):
    state, loss = train_step(state)

  grid = np.linspace(-5, 5, 300, dtype=np.float32)[:, None]
  apply = lambda p, inputs: module.apply({"params": p}, inputs)
  mean, var = blrax.predictive.predictive_mean_variance(
      apply, jax.random.key(args.seed + 1), state.params, state.opt_state, grid,
      num_samples=args.samples, chunk_size=50, noise_variance=NOISE**2)
  std = np.sqrt(np.asarray(var))
  inside = (np.abs(grid[:, 0]) > 0.7) & (np.abs(grid[:, 0]) < 3)
  print(f"final loss {float(loss):.3f}; predictive std: "
        f"{std[inside].mean():.3f} on the data, "
        f"{std[np.abs(grid[:, 0]) < 0.7].mean():.3f} in the gap, "
        f"{std[np.abs(grid[:, 0]) > 4].mean():.3f} beyond |x| > 4")

  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3,
                  label="±2 std (BMA)")
  ax.plot(grid[:, 0], mean, label="predictive mean")
  ax.plot(grid[:, 0], np.sin(2 * grid[:, 0]), "k:", lw=1, label="truth")
  ax.scatter(x[:, 0], y, s=8, c="k", label="data")
  ax.set_ylim(-3, 3)
  ax.legend(loc="lower left", fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"plot: {args.out}")


if __name__ == "__main__":
  main()
