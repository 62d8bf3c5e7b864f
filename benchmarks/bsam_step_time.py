"""Train-step time of bSAM against optax.adamw, SAM (Adam inner) and IVON.

The MLP and batches of ``benchmarks/step_time.py`` (256-1024-1024-10, batch
128 by default), each optimizer running the full step its user writes, jitted,
``--inner`` steps inside one ``lax.scan``, the variants interleaved round by
round so the shared machine's drift hits all alike:

- ``adamw``: gradient at the params (the reference, ratio 1.00);
- ``floor``: adamw plus one normal draw of all params (see step_time.py);
- ``sam (adam)``: ``optax.contrib.sam(optax.adam, normalize + sgd(0.05),
  opaque_mode=True)``, two gradients;
- ``blrax.ivon``: draw, one gradient, update;
- ``blrax.bsam``: draw, gradient, adversarial gradient (``grad_fn``), update.

    python benchmarks/bsam_step_time.py [--sizes 256,1024,1024,10] [--batch 128]

Prints the median and the fastest round per step, as ratios to adamw.
"""

from __future__ import annotations

import os
import sys

import jax
import optax

import blrax

sys.path.insert(0, os.path.dirname(__file__))
from step_time import compare, mlp_init, mlp_loss, timing_parser  # noqa: E402


def make_run(kind, opt):
  """A jitted function running a scan of full train steps of ``kind``."""

  def step(carry, batch):
    params, state, key = carry
    x, y = batch
    grad_fn = lambda p: jax.grad(mlp_loss)(p, x, y)  # noqa: E731
    if kind == "floor":
      key, sub = jax.random.split(key)  # threaded: a fresh draw every step
      noise = optax.tree.random_like(sub, params, jax.random.normal)
      grads = grad_fn(jax.tree.map(lambda p, e: p + 1e-6 * e, params, noise))
      updates, state = opt.update(grads, state, params)
    elif kind == "sam":
      updates, state = opt.update(grad_fn(params), state, params,
                                  grad_fn=lambda p, _: grad_fn(p))
    elif kind == "ivon":
      theta = blrax.sample_params(params, state)
      updates, state = opt.update(grad_fn(theta), state, params)
    elif kind == "bsam":
      theta = blrax.sample_params(params, state)
      updates, state = opt.update(grad_fn(theta), state, params,
                                  grad_fn=grad_fn)
    else:
      updates, state = opt.update(grad_fn(params), state, params)
    return (optax.apply_updates(params, updates), state, key), None

  @jax.jit
  def run(params, state, xs, ys):
    return jax.lax.scan(step, (params, state, jax.random.key(1)), (xs, ys))[0]

  return run


def main():
  args = timing_parser(__doc__.splitlines()[0], sizes="256,1024,1024,10", batch=128,
                       inner=10, rounds=9).parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  key = jax.random.key(0)
  params = mlp_init(key, sizes)
  xs = jax.random.normal(key, (args.inner, args.batch, sizes[0]))
  ys = jax.random.randint(key, (args.inner, args.batch), 0, sizes[-1])
  n_train = 60_000
  entries = {
      "adamw": ("adam", optax.adamw(1e-3)),
      "floor": ("floor", optax.adamw(1e-3)),
      "sam (adam)": ("sam", optax.contrib.sam(
          optax.adam(1e-3), optax.chain(optax.contrib.normalize(),
                                        optax.sgd(0.05)), opaque_mode=True)),
      "blrax.ivon": ("ivon", blrax.ivon(1e-3, ess=n_train)),
      "blrax.bsam": ("bsam", blrax.bsam(1e-3, ess=n_train, rho=0.05)),
  }
  compare(entries, make_run, params, xs, ys, args)


if __name__ == "__main__":
  main()
