"""IVON's curvature schedule: the reference EMA against hess_init as a pseudo-count.

For each ``hess_init_steps`` (None: the reference step rho = 1 - b2; n0: rho_t
= max(1 - b2, 1/(n0 + t))) trains IVON on the tasks of
``posterior_benchmark.py`` (3 seeds, 2000 steps, batch 32, cosine lr) at three
(lr, weight decay) points and prints the test NLL and accuracy of the mean,
the BMA as trained, the calibrated BMA and the calibrated linearised
predictive, the fitted temperature and the median curvature h.

    python benchmarks/hess_init_steps_sweep.py [--n0 none 100 1000]
        [--tasks digits digits10 cancer]

Results of 2026-12-06: benchmarks/results/hess_init_steps_sweep.txt.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import posterior_benchmark as pb  # noqa: E402

GRID = [(0.1, 1e-4), (0.3, 1e-4), (0.3, 1e-3)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n0", nargs="+", default=["none", "100", "1000"])
  parser.add_argument("--tasks", nargs="+",
                      default=["digits", "digits10", "cancer"])
  parser.add_argument("--steps", type=int, default=2000)
  args = parser.parse_args()
  for n0 in args.n0:
    pb.IVON_OPTIONS.clear()
    if n0 != "none":
      pb.IVON_OPTIONS["hess_init_steps"] = float(n0)
    for name in args.tasks:
      task, splits = pb.stack_tasks(name, [0, 1, 2])
      params, states, _ = pb.train(task, "ivon", GRID, args.steps, [0, 1, 2])
      for c, config in enumerate(GRID):
        rows = {}
        for i, split in enumerate(splits):
          result = pb.evaluate_posterior(split, "ivon", pb.index(params, c, i),
                                         pb.index(states, c, i))
          for method, metrics in result.items():
            for m in ("nll", "acc"):
              rows.setdefault(f"{method}.{m}", []).append(metrics[m])
          rows.setdefault("tau", []).append(result["ivon/cal"]["temperature"])
          h = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
              pb.index(states, c, i)[0].posterior.curvature)])
          rows.setdefault("h_med", []).append(float(np.median(h)))
        print(json.dumps(dict(pb.IVON_OPTIONS)), name, config, " ".join(
            f"{k}={np.mean(v):.4f}" for k, v in rows.items()), flush=True)


if __name__ == "__main__":
  main()
