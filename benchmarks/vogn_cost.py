"""VOGN's step cost: per-example gradients against one-pass squared gradients.

The MLP of ``benchmarks/step_time.py`` (1.3M params by default), one full
jitted train step each (draw, gradients, update), timed in the same process
and interleaved round by round so the machine's drift hits all alike:

- ``optax.adamw``: the reference (ratio 1.00);
- ``blrax.ivon``: a gradient at the draw;
- ``blrax.vogn`` fed by ``blrax.per_example_grads`` (a ``jax.vmap`` of
  ``jax.grad`` over the batch: ``B x params`` gradients);
- ``blrax.vogn`` fed by ``blrax.value_grads_and_squares`` (mean gradient and
  mean squared per-example gradient in one backward pass, passed as
  ``update(grads, state, params, hessian=squares)``).

    python benchmarks/vogn_cost.py [--sizes 256,1024,1024,10] [--batch 128]

The per-example variant is slow on CPU, so it runs fewer steps per timed call
(``--slow-inner``) and rounds (``--slow-rounds``); the table gives the median
time of one step. Prints a markdown table with ratios to adamw.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from step_time import make_run, mlp_init, mlp_loss

import blrax


def make_squares_run(opt, inner, loss=mlp_loss):
  """``inner`` VOGN steps fed by :func:`blrax.value_grads_and_squares`."""

  def step(carry, batch):
    params, state, key = carry
    theta = blrax.sample_params(params, state)
    _, grads, squares = blrax.value_grads_and_squares(loss, theta, *batch)
    updates, state = opt.update(grads, state, params, hessian=squares)
    return (optax.apply_updates(params, updates), state, key), None

  @jax.jit
  def run(params, state, key, xs, ys):
    return jax.lax.scan(step, (params, state, key), (xs, ys))[0]

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="256,1024,1024,10",
                      help="MLP layer widths, comma separated")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--inner", type=int, default=10,
                      help="steps per timed call (inside one lax.scan)")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--slow-inner", type=int, default=1,
                      help="steps per timed call for per-example VOGN")
  parser.add_argument("--slow-rounds", type=int, default=3,
                      help="rounds in which per-example VOGN is timed")
  parser.add_argument("--n-train", type=float, default=60_000)
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]

  key = jax.random.key(0)
  params = mlp_init(key, sizes)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  xs = jax.random.normal(key, (args.inner, args.batch, sizes[0]))
  ys = jax.random.randint(key, (args.inner, args.batch), 0, sizes[-1])

  vogn = blrax.vogn(1e-3, ess=args.n_train)
  entries = {  # name: (optimizer, run factory, steps per call)
      "optax.adamw": (optax.adamw(1e-3),
                      lambda o, n: make_run(o, "adam", n), args.inner),
      "blrax.ivon": (blrax.ivon(1e-3, ess=args.n_train),
                     lambda o, n: make_run(o, "blrax", n), args.inner),
      "blrax.vogn + value_grads_and_squares": (
          vogn, make_squares_run, args.inner),
      "blrax.vogn + per_example_grads": (
          vogn, lambda o, n: make_run(o, "per_example", n), args.slow_inner),
  }
  runs = {}
  for name, (opt, factory, inner) in entries.items():
    run = factory(opt, inner)
    call = (params, opt.init(params), key, xs[:inner], ys[:inner])
    jax.block_until_ready(run(*call))  # compile and warm up
    runs[name] = (run, call, inner)
  times = {name: [] for name in runs}
  for r in range(args.rounds):
    for name, (run, call, inner) in runs.items():
      if inner == args.slow_inner and r >= args.slow_rounds and (
          name.endswith("per_example_grads")):
        continue
      start = time.perf_counter()
      jax.block_until_ready(run(*call))
      times[name].append((time.perf_counter() - start) / inner)
  medians = {name: statistics.median(t) for name, t in times.items()}

  print(f"MLP {sizes}, {n_params:,} params, batch {args.batch}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, "
        f"jax {jax.__version__}, optax {optax.__version__}\n")
  print("| step | median ms | / adamw |")
  print("|---|---:|---:|")
  for name, t in medians.items():
    print(f"| {name} | {1e3 * t:.2f} | {t / medians['optax.adamw']:.2f} |")


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing anything
  main()
