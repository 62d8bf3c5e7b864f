"""A character-level GPT on the Python standard library's source, IVON vs AdamW.

A small decoder-only transformer (Flax NNX) reads the bytes of the standard
library's ``.py`` files and predicts the next byte. It is trained with
``optax.adamw`` and with ``blrax.ivon``; the script reports validation loss,
perplexity and the calibration (ECE) of next-character predictions, for IVON
both at its mean and by Bayesian model averaging.

    python examples/char_gpt.py [--steps 2000] [--d-model 128] [--layers 4]
        [--heads 4] [--seq-len 128] [--batch 32] [--devices 1] [--bf16]
    python examples/char_gpt.py --tiny      # seconds; what the tests run

``--devices N`` trains data-parallel over N devices (on CPU it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N``). ``--bf16`` keeps params
and activations in bfloat16; IVON's curvature and momentum stay float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--corpus-chars", type=int, default=2_000_000)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--samples", type=int, default=8,
                      help="posterior samples for model averaging")
  parser.add_argument("--lr-adamw", type=float, default=1e-3)
  parser.add_argument("--lr-ivon", type=float, default=8.0)
  parser.add_argument("--hess-init", type=float, default=0.01)
  parser.add_argument("--clip-radius", type=float, default=float("inf"))
  parser.add_argument("--b2", type=float, default=0.999)
  parser.add_argument("--optimizers", default="adamw,ivon",
                      help="which to train, comma separated")
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long run: small model, few steps")
  args = parser.parse_args(argv)
  if args.tiny:
    args.steps, args.d_model, args.layers, args.heads = 30, 32, 1, 2
    args.seq_len, args.batch, args.corpus_chars, args.samples = 32, 8, 100_000, 2
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 1 and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import blrax  # noqa: E402

VOCAB = 256  # bytes


def load_corpus(max_chars):
  """The bytes of the standard library's .py files, in a fixed order."""
  root = sysconfig.get_paths()["stdlib"]
  chunks, total = [], 0
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "test", "tests"))
    for name in sorted(filenames):
      if name.endswith(".py"):
        with open(os.path.join(dirpath, name), "rb") as f:
          data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
          corpus = np.frombuffer(b"".join(chunks)[:max_chars], np.uint8)
          return corpus.astype(np.int32)
  return np.frombuffer(b"".join(chunks), np.uint8).astype(np.int32)


class Block(nnx.Module):

  def __init__(self, d, heads, dtype, rngs):
    self.norm1 = nnx.LayerNorm(d, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, dtype=dtype, param_dtype=dtype,
                                       decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class GPT(nnx.Module):

  def __init__(self, args, dtype, rngs):
    self.embed = nnx.Embed(VOCAB, args.d_model, dtype=dtype, param_dtype=dtype,
                           rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (args.seq_len, args.d_model), dtype))
    self.blocks = nnx.List([Block(args.d_model, args.heads, dtype, rngs)
                            for _ in range(args.layers)])
    self.norm = nnx.LayerNorm(args.d_model, dtype=dtype, param_dtype=dtype,
                              rngs=rngs)
    self.head = nnx.Linear(args.d_model, VOCAB, dtype=dtype, param_dtype=dtype,
                           rngs=rngs)

  def __call__(self, tokens):
    length = tokens.shape[-1]
    x = self.embed(tokens) + self.pos[:length]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x)).astype(jnp.float32)


def batches(corpus, rng, batch, seq_len):
  starts = rng.integers(0, len(corpus) - seq_len - 1, size=batch)
  windows = np.stack([corpus[s:s + seq_len + 1] for s in starts])
  return windows[:, :-1], windows[:, 1:]


def main(args):
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  corpus = load_corpus(args.corpus_chars)
  split = int(0.9 * len(corpus))
  train, val = corpus[:split], corpus[split:]
  graphdef, params0 = nnx.split(GPT(args, dtype, nnx.Rngs(0)), nnx.Param)
  params0 = nnx.as_pure(params0)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  apply = lambda p, tokens: nnx.merge(graphdef, p)(tokens)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  mesh = jax.make_mesh((args.devices,), ("data",),
                       axis_types=(AxisType.Auto,))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  ess = float(len(train))  # one "example" per predicted character

  optimizers = {
      "AdamW": (optax.adamw(optax.warmup_cosine_decay_schedule(
          0.0, args.lr_adamw, args.steps // 10, args.steps), weight_decay=0.1),
          False),
      "IVON": (blrax.ivon(optax.warmup_cosine_decay_schedule(
          0.0, args.lr_ivon, args.steps // 10, args.steps), ess=ess,
          hess_init=args.hess_init, b2=args.b2, weight_decay=1e-5,
          clip_radius=args.clip_radius, key=0), True),
  }
  wanted = args.optimizers.lower().split(",")
  optimizers = {k: v for k, v in optimizers.items() if k.lower() in wanted}
  print(f"corpus: {len(corpus):,} bytes of stdlib source; model: {n_params:,} "
        f"params ({jnp.dtype(dtype).name}); {args.devices} device(s)")
  results = {}
  for name, (opt, variational) in optimizers.items():
    def step(p, s, x, y, opt=opt, variational=variational):
      theta = blrax.sample_params(p, s) if variational else p
      loss, grads = jax.value_and_grad(loss_fn)(theta, x, y)
      updates, s = opt.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss

    params = jax.device_put(params0, replicated)
    state = jax.jit(opt.init, out_shardings=replicated)(params)
    step = jax.jit(step, out_shardings=(replicated, replicated, replicated))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=name, leave=False):
      x, y = batches(train, rng, args.batch, args.seq_len)
      params, state, loss = step(params, state, jax.device_put(x, sharded),
                                 jax.device_put(y, sharded))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    results[name] = (params, state, seconds)

  val_rng = np.random.default_rng(1)
  vx, vy = batches(val, val_rng, 4 * args.batch, args.seq_len)
  vx, vy = jnp.asarray(vx), jnp.asarray(vy)
  labels = vy.reshape(-1)
  print(f"\nvalidation: {labels.size:,} next-character predictions")
  print("| model | val loss | perplexity | acc | ECE | train s |")
  print("|---|---:|---:|---:|---:|---:|")

  def report(label, log_probs, seconds):
    log_probs = log_probs.reshape(-1, VOCAB)
    nll = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))
    probs = jnp.exp(log_probs)
    print(f"| {label} | {float(nll):.4f} | {float(jnp.exp(nll)):.3f} | "
          f"{float(blrax.metrics.accuracy(probs, labels)):.4f} | "
          f"{float(blrax.metrics.expected_calibration_error(probs, labels)):.4f} | "
          f"{seconds:.1f} |")

  if "AdamW" in results:
    adam_params, _, adam_seconds = results["AdamW"]
    report("AdamW", jax.nn.log_softmax(apply(adam_params, vx)), adam_seconds)
  if "IVON" not in results:
    return
  mean, state, ivon_seconds = results["IVON"]
  report("IVON (mean)", blrax.predictive.predictive_log_probs(
      apply, None, mean, state, vx, mean_only=True), ivon_seconds)
  report(f"IVON (BMA, {args.samples})", blrax.predictive.predictive_log_probs(
      apply, jax.random.key(2), mean, state, vx, num_samples=args.samples,
      chunk_size=1), ivon_seconds)
  (posterior,) = blrax.find_posteriors(state)
  curvature = jnp.concatenate([c.ravel() for c in
                               jax.tree.leaves(posterior.curvature)])
  print(f"\nIVON curvature ({curvature.dtype}): median "
        f"{float(jnp.median(curvature)):.4f} (init {args.hess_init}); params "
        f"{jax.tree.leaves(mean)[0].dtype}")


if __name__ == "__main__":
  main(ARGS)
