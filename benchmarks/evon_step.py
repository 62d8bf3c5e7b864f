"""Train-step time of EVON against IVON and optax.adamw, same process.

Each optimizer runs the full step the user writes (draw the weights, take the
gradient, update), jitted, ``--inner`` steps inside one ``lax.scan`` (a
multiple of EVON's refresh period, so the eigendecompositions are amortised
as in training). The rounds are interleaved so the shared machine's drift
hits all alike; the median per-step time is reported, with ratios to IVON
and to adamw, both wall-clock and CPU time of the process (on a shared
machine the CPU time is the steadier measure of the work). Two models:

- ``mlp``: 784-1024-1024-10 ReLU MLP (1.87M params), batch ``--batch``;
- ``transformer``: a pre-LN decoder (by default 2 layers, d_model 128, 4
  heads, MLP 512, vocabulary 256, context 64: 0.47M params; ``--tx-dim 256
  --tx-context 128``: 1.75M params), ``--tx-batch`` sequences per step.

    python benchmarks/evon_step.py [--inner 20] [--rounds 3] [--batch 128]
        [--tx-batch 16] [--tx-dim 128] [--tx-layers 2] [--tx-context 64]

EVON's extra cost per step is four rotations per weight matrix
(:math:`Q_L^\\top X Q_R` or back: the draw, the gradient, the
preconditioned numerator, the step) and the two Kronecker factors, about
:math:`10mn(m+n)` flops, against :math:`6Bmn` for the forward and backward
pass of :math:`B` examples (or tokens): the ratio to IVON is about
:math:`1 + 5(m+n)/(3B)`, plus an ``eigh`` per side every
``precondition_frequency`` steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import blrax


def mlp_init(key, sizes=(784, 1024, 1024, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_loss(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


VOCAB, HEADS = 256, 4


def transformer_init(key, dim=128, layers=2, context=64):
  """Pre-LN decoder: ``layers`` blocks of width ``dim``, MLP ``4 dim``."""
  hidden = 4 * dim
  keys = iter(jax.random.split(key, 4 + 6 * layers))
  normal = lambda shape, fan_in: (jax.random.normal(next(keys), shape)
                                  / jnp.sqrt(fan_in))
  blocks = [{
      "ln1": jnp.ones(dim), "ln2": jnp.ones(dim),
      "qkv": normal((dim, 3 * dim), dim), "out": normal((dim, dim), dim),
      "up": normal((dim, hidden), dim), "down": normal((hidden, dim), hidden),
  } for _ in range(layers)]
  return {"embed": normal((VOCAB, dim), 1.0),
          "pos": normal((context, dim), 1.0) * 0.1, "layers": blocks,
          "ln": jnp.ones(dim), "head": normal((dim, VOCAB), dim)}


def _norm(x, scale):
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale


def transformer_loss(params, tokens, targets):
  x = params["embed"][tokens] + params["pos"]
  context, dim = params["pos"].shape
  mask = jnp.tril(jnp.ones((context, context), bool))
  for layer in params["layers"]:
    q, k, v = jnp.split(_norm(x, layer["ln1"]) @ layer["qkv"], 3, axis=-1)
    split = lambda t: t.reshape(t.shape[:-1] + (HEADS, dim // HEADS))
    att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(
        dim // HEADS)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(x.shape)
    x = x + y @ layer["out"]
    x = x + jax.nn.gelu(_norm(x, layer["ln2"]) @ layer["up"]) @ layer["down"]
  logits = _norm(x, params["ln"]) @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         targets).mean()


def make_run(opt, loss, blr):
  def step(carry, batch):
    params, state = carry
    theta = blrax.sample_params(params, state) if blr else params
    grads = jax.grad(loss)(theta, *batch)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def run(params, state, xs, ys):
    return jax.lax.scan(step, (params, state), (xs, ys))[0]

  return run


def bench(name, params, loss, data, inner, rounds, ess):
  optimizers = {
      "adamw": (optax.adamw(1e-3), False),
      "ivon": (blrax.ivon(0.1, ess=ess), True),
      "evon": (blrax.evon(0.1, ess=ess), True),
  }
  runs = {}
  for label, (opt, blr) in optimizers.items():
    run = make_run(opt, loss, blr)
    state = opt.init(params)
    start = time.perf_counter()
    jax.block_until_ready(run(params, state, *data))  # compile + warm up
    runs[label] = (run, state)
    print(f"  {name}/{label}: compiled in {time.perf_counter() - start:.1f} s",
          flush=True)
  wall = {label: [] for label in runs}
  cpu = {label: [] for label in runs}
  for _ in range(rounds):
    for label, (run, state) in runs.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(run(params, state, *data))
      wall[label].append((time.perf_counter() - start) / inner)
      cpu[label].append((time.process_time() - start_cpu) / inner)
  wall = {label: statistics.median(t) for label, t in wall.items()}
  cpu = {label: statistics.median(t) for label, t in cpu.items()}
  print(f"\n{name}: {sum(x.size for x in jax.tree.leaves(params)):,} params")
  print("| optimizer | wall ms/step | / ivon | / adamw | CPU ms/step | / ivon "
        "| / adamw |")
  print("|---|---|---|---|---|---|---|")
  for label in runs:
    print(f"| {label} | {1e3 * wall[label]:.1f} | "
          f"{wall[label] / wall['ivon']:.2f} | "
          f"{wall[label] / wall['adamw']:.2f} | {1e3 * cpu[label]:.1f} | "
          f"{cpu[label] / cpu['ivon']:.2f} | {cpu[label] / cpu['adamw']:.2f} |")
  return wall, cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--inner", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--tx-batch", type=int, default=16,
                      help="transformer sequences per step")
  parser.add_argument("--tx-dim", type=int, default=128)
  parser.add_argument("--tx-layers", type=int, default=2)
  parser.add_argument("--tx-context", type=int, default=64)
  parser.add_argument("--models", default="mlp,transformer")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"inner={args.inner} rounds={args.rounds}")
  key = jax.random.key(0)
  if "mlp" in args.models:
    xs = jax.random.normal(key, (args.inner, args.batch, 784))
    ys = jax.random.randint(key, (args.inner, args.batch), 0, 10)
    bench(f"mlp (batch {args.batch})", mlp_init(key), mlp_loss, (xs, ys),
          args.inner, args.rounds, ess=60000.0)
  if "transformer" in args.models:
    context = args.tx_context
    tokens = jax.random.randint(key, (args.inner, args.tx_batch, context + 1),
                                0, VOCAB)
    bench(f"transformer (d_model {args.tx_dim}, {args.tx_layers} layers; "
          f"{args.tx_batch}x{context} = {args.tx_batch * context} tokens/step)",
          transformer_init(key, args.tx_dim, args.tx_layers, context),
          transformer_loss,
          (tokens[..., :-1], tokens[..., 1:]), args.inner, args.rounds,
          ess=1e6)


if __name__ == "__main__":
  main()
