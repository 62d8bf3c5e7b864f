"""Train-step time of blrax optimizers against optax.adamw on the same MLP.

Each optimizer runs the full step the user writes (draw the weights, take the
gradient, update), jitted, for ``--inner`` steps inside one ``lax.scan``.
Three steps are timed in the same process, interleaved round by round so the
shared machine's drift hits all alike:

- ``adamw``: optax.adamw's step (the reference, ratio 1.00);
- ``floor``: adamw's step plus one normal draw of all params, added (tiny)
  to the weights before the gradient. On CPU the threefry normal draw costs
  about as much as a whole Adam step, so this is what "as cheap as Adam"
  means for any weight-perturbation method;
- the blrax optimizers (VOGN with per-example gradients, as it needs).

    python benchmarks/step_time.py [--sizes 256,1024,1024,10] [--batch 128]

Prints a markdown table of median step times and ratios to adamw and floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import blrax


def mlp_init(key, sizes):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1),
                       zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
                   "b": jnp.zeros(b)})
  return params


def mlp_loss(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def example_loss(params, x, y):
  return mlp_loss(params, x[None], y[None])


def make_run(opt, kind, inner, loss=mlp_loss):
  """A jitted function running ``inner`` full train steps of ``kind``."""

  def step(carry, batch):
    params, state, key = carry
    x, y = batch
    if kind == "per_example":  # VOGN: per-example gradients at the draw
      theta = blrax.sample_params(params, state)
      grads = blrax.per_example_grads(example_loss, theta, x, y)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state, key), None
    if kind == "blrax":
      theta = blrax.sample_params(params, state)
    elif kind == "floor":
      key, sub = jax.random.split(key)
      noise = optax.tree.random_like(sub, params, jax.random.normal)
      theta = jax.tree.map(lambda p, e: p + 1e-6 * e, params, noise)
    else:
      theta = params
    grads = jax.grad(loss)(theta, x, y)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state, key), None

  @jax.jit
  def run(params, state, key, xs, ys):
    return jax.lax.scan(step, (params, state, key), (xs, ys))[0]

  return run


def mlp_data(sizes, batch, inner):
  """The MLP ``sizes``' params and ``inner`` random batches: (params, xs,
  ys)."""
  key = jax.random.key(0)
  xs = jax.random.normal(key, (inner, batch, sizes[0]))
  ys = jax.random.randint(key, (inner, batch), 0, sizes[-1])
  return mlp_init(key, sizes), xs, ys


def benchmark(sizes, batch, inner, rounds, variants):
  """Median step times on the MLP ``sizes``: (param count, {name: seconds})."""
  params, xs, ys = mlp_data(sizes, batch, inner)
  return benchmark_model(params, mlp_loss, xs, ys, rounds, variants)


def benchmark_model(params, loss, xs, ys, rounds, variants):
  """Median step times of ``loss`` at ``params`` over the batches ``xs, ys``
  (a leading axis of ``inner`` steps), for adamw, the floor and ``variants``.
  """
  key = jax.random.key(0)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  inner = jax.tree.leaves(xs)[0].shape[0]
  adamw = optax.adamw(1e-3)
  entries = {"adamw": (adamw, "adam"), "floor": (adamw, "floor")}
  entries.update(variants)
  runs = {}
  for name, (opt, kind) in entries.items():
    run = make_run(opt, kind, inner, loss)
    args = (params, opt.init(params), key, xs, ys)
    jax.block_until_ready(run(*args))  # compile and warm up
    runs[name] = (run, args)
  times = time_rounds(runs, rounds, inner)
  medians = {name: statistics.median(t) for name, t in times.items()}
  return n_params, medians


def time_rounds(runs, rounds, inner):
  """Per-step seconds of each compiled ``name: (run, args)`` over ``rounds``
  calls of ``inner`` steps, interleaved round by round so that the shared
  machine's drift hits all alike: ``{name: [seconds]}``."""
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (run, args) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run(*args))
      times[name].append((time.perf_counter() - start) / inner)
  return times


def compare(entries, make_run, params, xs, ys, args):
  """Compiles ``make_run(kind, opt)`` for each ``name: (kind, opt)``, times
  them with :func:`time_rounds` and prints the MLP and the ratio table."""
  runs = {}
  for name, (kind, opt) in entries.items():
    run = make_run(kind, opt)
    call = (params, opt.init(params), xs, ys)
    jax.block_until_ready(run(*call))  # compile and warm up
    runs[name] = (run, call)
  times = time_rounds(runs, args.rounds, args.inner)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"MLP {args.sizes}, {n_params:,} params, batch {args.batch}, "
        f"{jax.devices()[0].platform}, {args.rounds} rounds of {args.inner} "
        "steps\n")
  print_ratio_table(times)


def print_ratio_table(times, reference="adamw"):
  """The median and the fastest round per step of each entry of
  :func:`time_rounds`'s output, as ratios to ``reference``'s."""
  print(f"| step | median ms | median / {reference} | fastest / {reference} |")
  print("|---|---:|---:|---:|")
  med = {n: statistics.median(t) for n, t in times.items()}
  low = {n: min(t) for n, t in times.items()}
  for name in times:
    print(f"| {name} | {1e3 * med[name]:.2f} | "
          f"{med[name] / med[reference]:.2f} | "
          f"{low[name] / low[reference]:.2f} |")


def default_variants(n_train=60_000, with_vogn=True):
  """name -> (optimizer, kind); VOGN's per-example grads cost ~batch x memory."""
  variants = {
      "blrax.ivon": (blrax.ivon(1e-3, ess=n_train), "blrax"),
      "blrax.ivon (hash noise)": (blrax.ivon(1e-3, ess=n_train, noise="hash"),
                                  "blrax"),
      "blrax.ivon (flip noise)": (blrax.ivon(1e-3, ess=n_train, noise="flip"),
                                  "blrax"),
      "blrax.von (diag)": (blrax.von(1e-3, ess=n_train), "blrax"),
      "blrax.vadam": (blrax.vadam(1e-3, ess=n_train), "blrax"),
  }
  if with_vogn:
    variants["blrax.vogn"] = (blrax.vogn(1e-3, ess=n_train), "per_example")
  return variants


def timing_parser(description: str, *, sizes: str, batch: int, inner: int,
                  rounds: int) -> argparse.ArgumentParser:
  """The command line every step-time benchmark shares, with its defaults."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--sizes", default=sizes,
                      help="MLP layer widths, comma separated")
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--inner", type=int, default=inner,
                      help="steps per timed call (inside one lax.scan)")
  parser.add_argument("--rounds", type=int, default=rounds)
  return parser


def main():
  parser = timing_parser(__doc__.splitlines()[0], sizes="256,1024,1024,10",
                         batch=128, inner=20, rounds=15)
  parser.add_argument("--no-vogn", action="store_true",
                      help="skip VOGN (per-example gradients are slow on CPU)")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  n_params, medians = benchmark(sizes, args.batch, args.inner, args.rounds,
                                default_variants(with_vogn=not args.no_vogn))
  print(f"MLP {sizes}, {n_params:,} params, batch {args.batch}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, "
        f"jax {jax.__version__}, optax {optax.__version__}\n")
  print("| step | median ms | / adamw | / floor |")
  print("|---|---:|---:|---:|")
  for name, t in medians.items():
    print(f"| {name} | {1e3 * t:.3f} | {t / medians['adamw']:.2f} | "
          f"{t / medians['floor']:.2f} |")


if __name__ == "__main__":
  main()
