"""How much can any diagonal posterior improve on the quickstart's mean?

Trains the quickstart's MLP with IVON (digits, 1078 training images, its
documented settings) and replaces the trained curvature h by four diagonal
curvatures at the same mean:

- ``trained``: h as trained (mostly ``hess_init``; see ``posterior_health``);
- ``data``: the data's part of h, debiased, max(0, (h - h0 w_t)/(1 - w_t));
- ``empirical_fisher``: the mean squared per-example gradient at the mean;
- ``fisher``: the same with labels drawn from the model (8 draws), a Monte
  Carlo estimate of the Fisher (= GGN) diagonal: a diagonal Laplace posterior.

For each, :func:`blrax.calibrate_posterior` fits the temperature and the
prior scale (5 values, 1e-2..1e2; 64 draws), sampled and linearised, on the
validation split, as a user would (then the test NLL of 64 fresh draws), and
once on the **test split itself**: an oracle, the lowest test NLL that the
search reaches (tau = 0, the mean, is one of its points), the most that a
posterior of that shape can gain over the mean.

    python benchmarks/posterior_headroom.py [--seeds 0 1 2] [--epochs 60]
        [--samples 64] [--prior-scales 0.01 0.1 1 10 100]

Results of 2026-12-07: benchmarks/results/posterior_headroom.txt.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blrax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import quickstart  # noqa: E402

BATCH = 32  # the quickstart's
SHAPES = ("trained", "data", "empirical_fisher", "fisher")


def with_curvature(opt_state, curvature):
  """``opt_state`` with the diagonal posterior's h replaced."""
  is_posterior = lambda x: isinstance(x, blrax.DiagonalGaussian)
  return jax.tree.map(
      lambda x: x._replace(curvature=curvature) if is_posterior(x) else x,
      opt_state, is_leaf=is_posterior)


def curvatures(apply, mean, opt_state, x, y, steps, seed):
  """The four diagonal curvatures of the module docstring."""
  h = blrax.find_posteriors(opt_state)[0].curvature
  settings = quickstart.IVON_SETTINGS
  w = settings["b2"] ** steps
  data = jax.tree.map(
      lambda c: jnp.maximum((c - settings["hess_init"] * w) / (1 - w), 0.0), h)

  def example_loss(p, xi, yi):
    return optax.softmax_cross_entropy_with_integer_labels(
        apply(p, xi[None]), yi[None]).sum()

  per_example = jax.jit(jax.vmap(jax.grad(example_loss), (None, 0, 0)))
  squared = lambda labels: jax.tree.map(lambda g: jnp.mean(g**2, 0),
                                        per_example(mean, x, labels))
  logits = apply(mean, x)
  draws = [squared(jax.random.categorical(jax.random.key(seed * 100 + i),
                                          logits)) for i in range(8)]
  fisher = jax.tree.map(lambda *d: sum(d) / len(d), *draws)
  return {"trained": h, "data": data, "empirical_fisher": squared(y),
          "fisher": fisher}


def run(seed, epochs, samples, prior_scales):
  x_train, x_val, x_test, y_train, y_val, y_test = quickstart.load(seed)
  params, apply = quickstart.model(seed)
  steps = epochs * (len(x_train) // BATCH)
  ivon = blrax.ivon(optax.cosine_decay_schedule(quickstart.IVON_LR, steps),
                    ess=len(x_train), key=seed, **quickstart.IVON_SETTINGS)
  x, y = jnp.asarray(x_train), jnp.asarray(y_train)
  mean, state = quickstart.train(ivon, params, apply, x, y, epochs, BATCH,
                                 seed, True, "IVON")
  xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)
  splits = {"validation": [(jnp.asarray(x_val), jnp.asarray(y_val))],
            "test": [(xt, yt)]}
  nll = lambda p: float(blrax.metrics.negative_log_likelihood(p, yt))
  row = {"mean": nll(jax.nn.softmax(apply(mean, xt)))}
  for shape, h in curvatures(apply, mean, state, x, y, steps, seed).items():
    shaped = with_curvature(state, h)
    for linearized in (False, True):
      predict = (blrax.predictive.linearized_probs if linearized
                 else blrax.predictive.predictive_probs)
      fit = lambda batches: blrax.calibrate_posterior(
          apply, mean, shaped, batches, key=seed, num_samples=samples,
          linearized=linearized, prior_scales=prior_scales)
      row[shape, linearized, "validation"] = nll(predict(
          apply, seed + 1, mean, fit(splits["validation"]).opt_state, xt,
          num_samples=samples))
      row[shape, linearized, "test (oracle)"] = fit(splits["test"]).nll
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--samples", type=int, default=64,
                      help="posterior draws per model average")
  parser.add_argument("--prior-scales", type=float, nargs="+",
                      default=[0.01, 0.1, 1.0, 10.0, 100.0])
  args = parser.parse_args(argv)
  rows = [run(seed, args.epochs, args.samples, args.prior_scales)
          for seed in args.seeds]
  mean_nll = np.mean([r["mean"] for r in rows])
  print(f"seeds {args.seeds}; quickstart IVON {quickstart.IVON_SETTINGS}, "
        f"lr {quickstart.IVON_LR}, {args.epochs} epochs, batch {BATCH}")
  print(f"test NLL of the mean: {mean_nll:.4f}; calibrated model averages "
        "(temperature and prior scale fitted on the split named):")
  print("| curvature | predictive | fitted on validation | fitted on test "
        "(oracle) | oracle gain over the mean |")
  print("|---|---|---|---|---|")
  for shape in SHAPES:
    for linearized in (False, True):
      val, oracle = (np.mean([r[shape, linearized, s] for r in rows])
                     for s in ("validation", "test (oracle)"))
      print(f"| {shape} | {'linearised' if linearized else 'sampled'} | "
            f"{val:.4f} | {oracle:.4f} | {1 - oracle / mean_nll:.1%} |")


if __name__ == "__main__":
  main()
