"""Variational LoRA: IVON over low-rank adapters of a frozen character model.

A small character-level transformer (Flax NNX) is pretrained with AdamW on
one domain, the standard library's Python source (its ``.py`` files). Its
attention projections and output layer are ``nnx.LoRALinear`` layers, whose
adapters stay out of the pretraining optimizer. Then the base is frozen and
only the adapters are fine-tuned on another domain, English prose: the
language reference text that CPython ships as ``pydoc_data.topics`` (what
``help("assert")`` prints). The adapters are trained twice, with
``optax.adamw`` and with ``blrax.ivon``, each over a grid of four learning
rates with the same step budget, the rate picked by validation NLL.

The base stays out of the optimizer (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``):
it gets no update, no noise and no posterior, so IVON learns a posterior over
the adapters alone. The script reports test NLL and ECE of next-byte
predictions (the IVON mean and the Bayesian model average over adapter
draws), the per-token predictive entropy and its epistemic part (the mutual
information between the next byte and the adapters) in and out of domain,
and saves the adapter posterior with ``blrax.checkpoint``: the adapters (its
mean) and the whole IVON state (curvature, ``ess``, prior, key, step), not
only the means. It reloads them into a model rebuilt from nothing and checks
that its predictions are equal.

    python examples/lora_finetune.py [--pretrain-steps 1000] [--steps 300]
        [--lrs-adamw 3e-3,1e-2,3e-2,1e-1] [--lrs-ivon 0.3,1,3,10] [--seed 0]
    python examples/lora_finetune.py --tiny     # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blrax
from blrax.checkpoint import restore_checkpoint, save_checkpoint

VOCAB = 256  # bytes
# The pretrained weights: every param that is not an adapter.
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--code-chars", type=int, default=1_000_000,
                      help="bytes of stdlib .py source to pretrain on")
  parser.add_argument("--docs-chars", type=int, default=0,
                      help="bytes of pydoc text to use (0: all, ~466k)")
  parser.add_argument("--pretrain-steps", type=int, default=1000)
  parser.add_argument("--pretrain-lr", type=float, default=3e-3)
  parser.add_argument("--steps", type=int, default=300,
                      help="fine-tuning steps of every adapter run")
  parser.add_argument("--lrs-adamw", default="3e-3,1e-2,3e-2,1e-1")
  parser.add_argument("--lrs-ivon", default="0.3,1,3,10")
  parser.add_argument("--hess-init", type=float, default=3e-3)
  parser.add_argument("--b2", type=float, default=0.99)
  parser.add_argument("--weight-decay", type=float, default=1e-4,
                      help="IVON's prior precision / ess, AdamW's decay")
  parser.add_argument("--samples", type=int, default=16,
                      help="adapter draws for model averaging")
  parser.add_argument("--eval-windows", type=int, default=64,
                      help="windows of seq-len bytes per evaluation set")
  parser.add_argument("--out", default=None,
                      help="directory for the adapter checkpoint (default: a "
                      "temporary one, deleted)")
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long run: small model, few steps")
  if "--tiny" in (sys.argv[1:] if argv is None else argv):
    # Small defaults; flags given explicitly still win.
    parser.set_defaults(
        d_model=32, layers=1, heads=2, rank=2, seq_len=32, batch=16,
        code_chars=60_000, docs_chars=60_000, pretrain_steps=60, steps=40,
        samples=4, lrs_adamw="3e-2", lrs_ivon="3", eval_windows=16)
  args = parser.parse_args(argv)
  return args


# --------------------------------------------------------------------------
# Data: two domains of the standard library, as bytes.


def load_code(max_chars):
  """The bytes of the standard library's .py files (not its tests, not
  ``pydoc_data``, which holds the prose), in a fixed order."""
  root = sysconfig.get_paths()["stdlib"]
  chunks, total = [], 0
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames if d not in (
        "site-packages", "test", "tests", "idle_test", "pydoc_data"))
    for name in sorted(filenames):
      if name.endswith(".py"):
        with open(os.path.join(dirpath, name), "rb") as f:
          chunks.append(f.read())
        total += len(chunks[-1])
        if total >= max_chars:
          return np.frombuffer(b"".join(chunks)[:max_chars], np.uint8).astype(
              np.int32)
  return np.frombuffer(b"".join(chunks), np.uint8).astype(np.int32)


def load_docs(max_chars=0):
  """English prose: the language reference topics ``help()`` prints."""
  from pydoc_data.topics import topics
  text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
  if max_chars:
    text = text[:max_chars]
  return np.frombuffer(text, np.uint8).astype(np.int32)


def split(corpus, val=0.1, test=0.1):
  """Contiguous train / validation / test parts (80/10/10) of a byte stream."""
  a = int((1 - val - test) * len(corpus))
  b = int((1 - test) * len(corpus))
  return corpus[:a], corpus[a:b], corpus[b:]


def windows(corpus, count, seq_len):
  """``count`` evenly spaced (inputs, next-byte targets) windows."""
  starts = np.linspace(0, len(corpus) - seq_len - 1, count).astype(int)
  w = np.stack([corpus[s:s + seq_len + 1] for s in starts])
  return jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:])


def random_batch(corpus, rng, batch, seq_len):
  starts = rng.integers(0, len(corpus) - seq_len - 1, size=batch)
  w = np.stack([corpus[s:s + seq_len + 1] for s in starts])
  return w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------
# The model: a small decoder-only transformer whose linear layers all carry a
# low-rank adapter (nnx.LoRALinear: y = x W + b + x A B, B initialised to 0,
# so the adapters start as the identity edit).


class Block(nnx.Module):

  def __init__(self, d, heads, rank, rngs):
    linear = functools.partial(nnx.LoRALinear, lora_rank=rank, rngs=rngs)
    self.heads = heads
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = linear(d, 3 * d)  # adapted, as in Hu et al.: attention ...
    self.proj = linear(d, d)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    heads = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    attended = jax.nn.dot_product_attention(heads(q), heads(k), heads(v),
                                            is_causal=True)
    x = x + self.proj(attended.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharModel(nnx.Module):
  """Next-byte logits ``(batch, time, 256)`` of byte inputs ``(batch, time)``."""

  def __init__(self, d_model, layers, heads, rank, seq_len, rngs):
    self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (seq_len, d_model)))
    self.blocks = nnx.List([Block(d_model, heads, rank, rngs)
                            for _ in range(layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    # ... and the output layer, which sets the next-byte frequencies.
    self.head = nnx.LoRALinear(d_model, VOCAB, lora_rank=rank, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[:tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


@functools.partial(nnx.jit, static_argnums=0)
def _build(config, rngs):
  return CharModel(*config, rngs)


def make_model(args, seed):
  """A fresh model (initialised in one compiled call)."""
  return _build((args.d_model, args.layers, args.heads, args.rank,
                 args.seq_len), nnx.Rngs(seed))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


# --------------------------------------------------------------------------
# Training: one jitted step per (graph, optimizer kind); the learning rate
# lives in the optimizer state (optax.inject_hyperparams), so a sweep over
# rates compiles once.


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(graphdef, variational, state, x, y):
  model, optimizer = nnx.merge(graphdef, state)
  if variational:  # the gradient at a draw of the adapters
    loss, grads = blrax.flax.nnx_value_and_grad(loss_fn, model, optimizer, x, y)
  else:
    loss, grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, x, y)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), loss


def with_schedule(inner, steps):
  """``inner`` (made with ``inject_hyperparams``) times a cosine decay.

  For IVON this is a learning-rate schedule: its rate only scales the step
  of the mean, not the curvature update.
  """
  return optax.chain(inner, optax.scale_by_schedule(
      optax.cosine_decay_schedule(1.0, steps, alpha=0.05)))


def train(model, tx, wrt, lr, corpus, steps, args, seed, variational):
  """Trains ``model`` in place; returns its ``nnx.Optimizer``."""
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  optimizer.opt_state[0].hyperparams["learning_rate"][...] = lr
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    x, y = random_batch(corpus, rng, args.batch, args.seq_len)
    state, _ = train_step(graphdef, variational, state, x, y)
  nnx.update((model, optimizer), state)
  return optimizer


def ivon_tx(args, ess):
  """IVON over the adapters; ``ess`` = number of fine-tuning tokens."""
  factory = optax.inject_hyperparams(blrax.ivon, static_args=("mc_samples",))
  return with_schedule(factory(
      learning_rate=0.1, ess=ess, hess_init=args.hess_init, b2=args.b2,
      weight_decay=args.weight_decay, key=args.seed), args.steps)


def adamw_tx(args):
  return with_schedule(optax.inject_hyperparams(optax.adamw)(
      learning_rate=1e-3, weight_decay=args.weight_decay), args.steps)


# --------------------------------------------------------------------------
# Prediction: pure functions of (adapters, frozen rest, optimizer state), so
# the trained model and a reloaded one go through the same compiled code.


def _strong(tree):
  """Weakly typed scalars (``inject_hyperparams`` makes some) as strongly
  typed arrays, so a restored state has the same types and reuses the
  compiled predictions."""
  keep = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: x if keep(x) else jnp.asarray(x, x.dtype), tree)


def pure_parts(model, optimizer=None):
  """(graphdef, adapters, everything else, plain optax state) as arrays."""
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  opt_state = None if optimizer is None else _strong(
      nnx.as_pure(optimizer.opt_state))
  return graphdef, nnx.as_pure(lora), nnx.as_pure(rest), opt_state


def _apply(graphdef, rest):
  return lambda adapters, x: nnx.merge(graphdef, adapters, rest)(x)


@functools.partial(jax.jit, static_argnums=0)
def point_log_probs(graphdef, lora, rest, x):
  """``(1, batch, time, 256)``: one member, these adapters."""
  return jax.nn.log_softmax(_apply(graphdef, rest)(lora, x))[None]


@functools.partial(jax.jit, static_argnums=(0, 4))
def posterior_log_probs(graphdef, lora, rest, opt_state, num_samples, key, x):
  """``(S, batch, time, 256)``: ``S`` draws of the adapters from their
  posterior (``blrax.uncertainty.posterior_predictor``)."""
  return blrax.uncertainty.posterior_predictor(
      _apply(graphdef, rest), key, lora, opt_state, num_samples)(x)


@jax.jit
def _scores(members, y):
  s, n, t, k = members.shape
  flat = members.reshape(s, n * t, k)
  probs = jnp.exp(jax.nn.logsumexp(flat, axis=0) - jnp.log(s))
  labels = y.reshape(-1)
  total, _, epistemic = blrax.uncertainty.entropy_decomposition(flat)
  return {"nll": blrax.metrics.negative_log_likelihood(probs, labels),
          "ece": blrax.metrics.expected_calibration_error(probs, labels),
          "acc": blrax.metrics.accuracy(probs, labels),
          "entropy": total.reshape(n, t), "mi": epistemic.reshape(n, t)}


def evaluate(members, y):
  """NLL, ECE and accuracy of the model average of ``members`` (log-probs
  ``(S, batch, time, 256)``), and per-token (total entropy, mutual
  information), each ``(batch, time)``, in nats."""
  out = jax.device_get(_scores(members, y))
  return {k: (float(v) if v.ndim == 0 else v) for k, v in out.items()}


# --------------------------------------------------------------------------


def predict(parts, num_samples, key, x):
  """Member log-probs of ``parts = pure_parts(...)``: the adapters as they
  are (``num_samples = 0``) or ``num_samples`` posterior draws."""
  graphdef, lora, rest, opt_state = parts
  if num_samples == 0:
    return point_log_probs(graphdef, lora, rest, x)
  return posterior_log_probs(graphdef, lora, rest, opt_state, num_samples,
                             key, x)


def pretrain(args, code_train):
  """AdamW on the base (the adapters are not in the optimizer)."""
  model = make_model(args, args.seed)
  tx = optax.inject_hyperparams(optax.adamw)(
      learning_rate=optax.warmup_cosine_decay_schedule(
          0.0, args.pretrain_lr, max(1, args.pretrain_steps // 10),
          args.pretrain_steps), weight_decay=0.01)
  optimizer = nnx.Optimizer(model, tx, wrt=BASE)
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(args.seed)
  for _ in range(args.pretrain_steps):
    x, y = random_batch(code_train, rng, args.batch, args.seq_len)
    state, _ = train_step(graphdef, False, state, x, y)
  nnx.update((model, optimizer), state)
  return model


def finetune(args, pretrained, docs_train, docs_val, method, lrs):
  """Adapter runs over ``lrs``; returns {lr: (model, optimizer, val NLL)}.

  Every run starts from the same pretrained base and adapter init, takes the
  same ``args.steps`` batches, and is scored by the validation NLL of its
  predictive (IVON: the model average of ``args.samples`` draws).
  """
  tx = ivon_tx(args, float(len(docs_train))) if method == "ivon" else (
      adamw_tx(args))
  vx, vy = windows(docs_val, args.eval_windows, args.seq_len)
  runs = {}
  for lr in lrs:
    model = nnx.clone(pretrained)
    optimizer = train(model, tx, nnx.LoRAParam, lr, docs_train, args.steps,
                      args, args.seed + 1, method == "ivon")
    samples = args.samples if method == "ivon" else 0
    members = predict(pure_parts(model, optimizer), samples,
                      jax.random.key(args.seed + 2), vx)
    nll = evaluate(members, vy)["nll"]
    runs[lr] = (model, optimizer, nll if np.isfinite(nll) else np.inf)
  return runs


def save_and_reload(args, model, optimizer, directory):
  """Saves the adapter posterior; restores it into a freshly built model.

  The checkpoint holds the adapters (the posterior mean) and the whole IVON
  state (curvature, ``ess``, prior, key, step). Returns ``pure_parts`` of a
  new model (other random init) whose base is the pretrained one (a LoRA
  base ships separately) and whose adapters and optimizer state are the
  checkpoint's.
  """
  _, lora, _, opt_state = pure_parts(model, optimizer)
  metadata = {"optimizer": "ivon", "rank": args.rank}
  save_checkpoint(directory, lora, opt_state, metadata=metadata)
  # A fresh model with no values at all: every weight comes from disk.
  fresh = nnx.eval_shape(lambda: CharModel(
      args.d_model, args.layers, args.heads, args.rank, args.seq_len,
      nnx.Rngs(0)))
  nnx.update(fresh, nnx.state(model, BASE))
  _, template_lora, _, _ = pure_parts(fresh)
  # The template: the same optimizer and tree; values come from the checkpoint.
  template = jax.eval_shape(ivon_tx(args, 1.0).init, template_lora)
  lora, opt_state = restore_checkpoint(directory, template_lora, template,
                                       metadata=metadata)
  nnx.update(fresh, lora)
  graphdef, lora, rest, _ = pure_parts(fresh)
  opt_state = jax.tree.unflatten(jax.tree.structure(template),
                                 jax.tree.leaves(opt_state))
  return graphdef, lora, rest, _strong(opt_state)


def max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(args):
  start = time.perf_counter()
  code_train, _, code_test = split(load_code(args.code_chars))
  docs_train, docs_val, docs_test = split(load_docs(args.docs_chars))
  print(f"pretrain: {len(code_train):,} bytes of stdlib .py source; "
        f"fine-tune: {len(docs_train):,} bytes of pydoc_data.topics prose "
        f"(val {len(docs_val):,}, test {len(docs_test):,})")
  pretrained = pretrain(args, code_train)
  _, lora0, rest0, _ = pure_parts(pretrained)
  n_base = sum(x.size for x in jax.tree.leaves(nnx.state(pretrained, BASE)))
  n_lora = sum(x.size for x in jax.tree.leaves(lora0))
  print(f"model: {n_base:,} frozen base params, {n_lora:,} adapter params "
        f"(rank {args.rank}); pretrained in {time.perf_counter() - start:.0f} s")

  parse = lambda s: [float(v) for v in s.split(",")]
  sweeps = {m: finetune(args, pretrained, docs_train, docs_val, m,
                        parse(getattr(args, f"lrs_{m}")))
            for m in ("adamw", "ivon")}
  print(f"\nvalidation NLL over the learning-rate grid ({args.steps} steps "
        "each; IVON: BMA):")
  for method, runs in sweeps.items():
    print(f"  {method}: " + ", ".join(f"lr {lr:g}: {v[2]:.4f}"
                                      for lr, v in runs.items()))
  best = {m: min(runs, key=lambda lr, r=runs: r[lr][2])
          for m, runs in sweeps.items()}
  adam_model, _, _ = sweeps["adamw"][best["adamw"]]
  ivon_model, ivon_opt, _ = sweeps["ivon"][best["ivon"]]
  ivon = pure_parts(ivon_model, ivon_opt)

  # The base never moved, and only the adapters have a posterior.
  base_moved = max_difference(nnx.state(pretrained, BASE),
                              nnx.state(ivon_model, BASE))
  exported = blrax.export_posterior(ivon[1], ivon[3])
  std = np.concatenate([np.ravel(s) for s in jax.tree.leaves(
      exported["stddev"])])
  print(f"\nIVON posterior: {std.size:,} adapter stddevs (median "
        f"{np.median(std):.4g}, max {std.max():.4g}), none for the "
        f"{n_base:,} base params; base moved by {base_moved:g}")

  key = jax.random.key(args.seed + 3)
  sets = {
      "prose (in-domain)": windows(docs_test, args.eval_windows, args.seq_len),
      "code (pretraining domain)": windows(code_test, args.eval_windows,
                                           args.seq_len),
      "prose, byte-reversed": windows(docs_test[::-1].copy(),
                                      args.eval_windows, args.seq_len),
      "random bytes": windows(np.random.default_rng(args.seed).integers(
          0, VOCAB, 100 * args.seq_len).astype(np.int32), args.eval_windows,
                              args.seq_len),
  }
  dx, dy = sets["prose (in-domain)"]
  rows = {"pretrained (no adapters)": (pure_parts(pretrained), 0),
          f"AdamW-LoRA (lr {best['adamw']:g})": (pure_parts(adam_model), 0),
          f"IVON-LoRA mean (lr {best['ivon']:g})": (ivon, 0),
          f"IVON-LoRA BMA ({args.samples})": (ivon, args.samples)}
  results = {}
  print(f"\ntest: {dy.size:,} next-byte predictions on held-out prose")
  print("| model | NLL | ECE | acc |\n|---|---:|---:|---:|")
  for name, (parts, samples) in rows.items():
    r = results[name] = evaluate(predict(parts, samples, key, dx), dy)
    print(f"| {name} | {r['nll']:.4f} | {r['ece']:.4f} | {r['acc']:.4f} |")

  print(f"\nper-token uncertainty of the IVON-LoRA BMA ({args.samples} adapter "
        "draws), mean over tokens, nats:")
  print("| text | NLL | entropy | mutual information |\n|---|---:|---:|---:|")
  uncertainty = {}
  for name, (x, y) in sets.items():
    r = uncertainty[name] = evaluate(predict(ivon, args.samples, key, x), y)
    print(f"| {name} | {r['nll']:.4f} | {r['entropy'].mean():.4f} | "
          f"{r['mi'].mean():.3e} |")

  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.abspath(args.out or os.path.join(tmp, "adapter"))
    reloaded = save_and_reload(args, ivon_model, ivon_opt, directory)
  diff = max_difference(predict(reloaded, args.samples, key, dx),
                        predict(ivon, args.samples, key, dx))
  print("\nadapter posterior saved with blrax.checkpoint, reloaded into a "
        f"fresh model: BMA log-probs max |difference| = {diff:g}")
  print(f"total {time.perf_counter() - start:.0f} s")
  return {"pretrained": pretrained, "sweeps": sweeps, "best": best,
          "results": results, "uncertainty": uncertainty, "reloaded": reloaded,
          "ivon": ivon, "reload_difference": diff, "base_moved": base_moved,
          "exported": exported}


if __name__ == "__main__":
  main(parse_args())
