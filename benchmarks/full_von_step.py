"""Train-step time of full-covariance VON against optax.adamw and IVON.

A small MLP (``--sizes``, default 16-24-10: 658 params, the size full VON is
for: its state is a D x D matrix and each step factors it), each optimizer
running the full step its user writes, jitted, ``--inner`` steps inside one
``lax.scan``, the variants interleaved round by round so the shared machine's
drift hits all alike:

- ``adamw``: gradient at the params (the reference, ratio 1.00);
- ``blrax.ivon``: draw, one gradient, update;
- ``blrax.von (full)``: draw, one gradient, update (Price estimator);
- ``blrax.von (full, hessian=)``: the same with a given ``(D, D)`` matrix
  (here the outer product of the gradient, the cheapest stand-in).

    python benchmarks/full_von_step.py [--sizes 16,24,10] [--batch 64]

Prints the median and the fastest round per step, as ratios to adamw.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax

import blrax

sys.path.insert(0, os.path.dirname(__file__))
from step_time import compare, mlp_data, mlp_loss, timing_parser  # noqa: E402


def make_run(kind, opt):
  """A jitted function running a scan of full train steps of ``kind``."""

  def step(carry, batch):
    params, state = carry
    x, y = batch
    grad_fn = lambda p: jax.grad(mlp_loss)(p, x, y)  # noqa: E731
    if kind == "adam":
      updates, state = opt.update(grad_fn(params), state, params)
    else:
      grads = grad_fn(blrax.sample_params(params, state))
      extra = {}
      if kind == "hessian":
        flat = jax.flatten_util.ravel_pytree(grads)[0]
        extra["hessian"] = jnp.outer(flat, flat)
      updates, state = opt.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def run(params, state, xs, ys):
    return jax.lax.scan(step, (params, state), (xs, ys))[0]

  return run


def main():
  args = timing_parser(__doc__.splitlines()[0], sizes="16,24,10", batch=64,
                       inner=20, rounds=9).parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  params, xs, ys = mlp_data(sizes, args.batch, args.inner)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_train = 1_000
  full = lambda: blrax.von(1e-2, ess=n_train, covariance="full",  # noqa: E731
                           max_dim=max(n_params, 1))
  entries = {
      "adamw": ("adam", optax.adamw(1e-3)),
      "blrax.ivon": ("draw", blrax.ivon(0.1, ess=n_train)),
      "blrax.von (full)": ("draw", full()),
      "blrax.von (full, hessian=)": ("hessian", full()),
  }
  compare(entries, make_run, params, xs, ys, args)


if __name__ == "__main__":
  main()
