"""A character-level GPT on the Python standard library's source, IVON vs AdamW.

A small decoder-only transformer (Flax NNX) reads the bytes of the standard
library's ``.py`` files and predicts the next byte. It is trained with
``optax.adamw`` (nanoGPT's recipe) and with ``blrax.ivon`` (the IVON authors'
GPT-2 recipe) on the same batches, from the same init, with the same warmup +
cosine schedule shape, gradient clipping and accumulation. It reports
validation loss, perplexity and the calibration (ECE) of next-character
predictions, for IVON both at its mean and by Bayesian model averaging, and
how wide the posterior is (median sigma/|w| and the expected noise cost
params/(2 ess) in nats).

    python examples/char_gpt.py [--steps 2000] [--d-model 128] [--layers 4]
        [--heads 4] [--seq-len 128] [--batch 32] [--accumulate 1] [--seed 0]
        [--ess N|10N|cold|<number>] [--grad-clip 1.0] [--warmup 100]
        [--devices 1] [--bf16] [--curves out_dir]
    python examples/char_gpt.py --tiny      # seconds; what the tests run
    python examples/char_gpt.py --small --sweep sweep.jsonl  # the comparison

``--ess`` is a number, a multiple of the number N of training characters
(``N``, ``10N``, ``0.5N``) or ``cold`` (1e9: the posterior collapses to a
point, IVON becomes a deterministic sign-like optimizer). ``--accumulate k``
averages k micro-batches per update (``optax.MultiSteps`` for AdamW,
``blrax.MultiSteps`` for IVON and EVON, which draws fresh weights for every
micro-batch). Weight decay skips biases and LayerNorm params in both
optimizers (``decay_mask``). ``--sweep FILE.jsonl`` runs the learning-rate x
ess grid, then extra seeds for the winners, appending one JSON line per run
(a rerun skips finished runs) and writing ``FILE.md``; ``--table FILE.jsonl``
only rewrites the table. ``--curves DIR`` writes loss-vs-step curves
(``curves.json``, ``curves.png``).

``--devices N`` trains data-parallel over N devices (on CPU it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N``). ``--bf16`` keeps params
and activations in bfloat16; IVON's curvature and momentum stay float32.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import sysconfig
import time

COLD_ESS = 1e9  # "cold": sigma ~ 1/sqrt(1e9 h), far below the weights' scale
OPTIMIZERS = {"adamw": "AdamW", "ivon": "IVON", "evon": "EVON"}


def parse_ess(text, n_train=None):
  """``"N"``, ``"10N"``, ``"0.5N"``, ``"cold"`` or a number -> ess (a float).

  With ``n_train=None`` only checks the text (returns None for N multiples).
  """
  value = str(text).strip()
  try:
    if value.lower() == "cold":
      return COLD_ESS
    if value.upper().endswith("N"):
      factor = float(value[:-1]) if value[:-1] else 1.0
      number = None if n_train is None else factor * n_train
    else:
      factor = number = float(value)
  except ValueError:
    factor = number = float("nan")
  if not (math.isfinite(factor) and factor > 0):
    raise ValueError(f"`ess` must be a positive number, a multiple of N "
                     f"(like 10N) or 'cold', got ess={text!r}.")
  return number


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000,
                      help="optimizer updates (each of --accumulate batches)")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32,
                      help="sequences per micro-batch")
  parser.add_argument("--accumulate", type=int, default=1,
                      help="micro-batches averaged per update")
  parser.add_argument("--corpus-chars", type=int, default=2_000_000)
  parser.add_argument("--val-windows", type=int, default=256,
                      help="validation windows of --seq-len (fixed, disjoint)")
  parser.add_argument("--seed", type=int, default=0,
                      help="init, batch order and IVON's weight noise")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--samples", type=int, default=8,
                      help="posterior samples for model averaging")
  parser.add_argument("--warmup", type=int, default=None,
                      help="linear warmup updates, then cosine to 0.1 x peak "
                           "(default: steps // 10)")
  parser.add_argument("--grad-clip", type=float, default=1.0,
                      help="global grad-norm clip before both optimizers "
                           "(0: none)")
  parser.add_argument("--lr-adamw", type=float, default=3e-3)
  parser.add_argument("--wd-adamw", type=float, default=0.1)
  parser.add_argument("--b2-adamw", type=float, default=0.95)
  parser.add_argument("--lr-ivon", type=float, default=3e3,
                      help="peak step is lr x (hess_init + wd) x clip_radius")
  parser.add_argument("--wd-ivon", type=float, default=1e-6)
  parser.add_argument("--lr-evon", type=float, default=3e-3,
                      help="EVON's learning rate: the length of its whitened "
                           "step (official defaults otherwise)")
  parser.add_argument("--hess-init", type=float, default=1e-3)
  parser.add_argument("--clip-radius", type=float, default=1e-3)
  parser.add_argument("--b2", type=float, default=0.99999, help="IVON's b2")
  parser.add_argument("--ess", default="N",
                      help="IVON's ess: a number, kN (N = training chars) "
                           "or 'cold'")
  parser.add_argument("--optimizers", default="adamw,ivon",
                      help="which to train, comma separated: adamw, ivon, "
                           "evon")
  parser.add_argument("--curves", default=None,
                      help="a folder: write curves.json and curves.png")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="val loss every k updates for --curves "
                           "(default steps // 10)")
  parser.add_argument("--sweep", default=None,
                      help="a .jsonl file: run the lr x ess sweep + seeds")
  parser.add_argument("--table", default=None,
                      help="a .jsonl file of a sweep: only write its table")
  parser.add_argument("--tiny", action="store_true",
                      help="a seconds-long run: small model, few steps")
  parser.add_argument("--small", action="store_true",
                      help="the sweep's model: 84,544 params, 21.3 train chars/param")
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--tiny" in argv:  # explicit flags still win
    parser.set_defaults(steps=30, d_model=32, layers=1, heads=2, seq_len=32,
                        batch=8, corpus_chars=100_000, samples=2,
                        val_windows=16)
  if "--small" in argv:
    parser.set_defaults(d_model=48, layers=2, heads=4, seq_len=64,
                        corpus_chars=2_000_000, val_windows=512)
  args = parser.parse_args(argv)
  for name in ("steps", "d_model", "layers", "heads", "seq_len", "batch",
               "accumulate", "devices", "samples", "val_windows"):
    if getattr(args, name) < 1:
      raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got "
                       f"{getattr(args, name)}.")
  parse_ess(args.ess)
  if args.warmup is None:
    args.warmup = args.steps // 10
  if not 0 <= args.warmup < args.steps:
    raise ValueError(f"`--warmup` must be in [0, steps), got {args.warmup}.")
  if args.grad_clip < 0:
    raise ValueError(f"`--grad-clip` must be >= 0, got {args.grad_clip}.")
  if args.eval_every is None:
    args.eval_every = max(1, args.steps // 10)
  wanted = [w.strip().lower() for w in args.optimizers.split(",")]
  for w in wanted:
    if w not in OPTIMIZERS:
      raise ValueError(f"`--optimizers` must name {', '.join(OPTIMIZERS)}, "
                       f"got {w!r}.")
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
NO_DECAY = ("bias", "scale")  # the names of biases and LayerNorm params


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


def decay_mask(params):
  """True where weight decay applies: matrices (kernels, token and position
  embeddings); False for biases and LayerNorm scales/biases (nanoGPT's split;
  by name, since attention biases are 2-D)."""
  def decays(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return str(name) not in NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def batches(corpus, rng, batch, seq_len, accumulate=1):
  """``accumulate`` micro-batches of random windows: two (k, batch, seq) arrays."""
  starts = rng.integers(0, len(corpus) - seq_len - 1, size=accumulate * batch)
  windows = np.stack([corpus[s:s + seq_len + 1] for s in starts])
  windows = windows.reshape(accumulate, batch, seq_len + 1)
  return windows[..., :-1], windows[..., 1:]


def val_windows(val, count, seq_len):
  """``count`` disjoint windows spread evenly over the validation split."""
  count = min(count, (len(val) - 1) // seq_len)
  starts = np.linspace(0, len(val) - seq_len - 1, count).astype(int)
  windows = np.stack([val[s:s + seq_len + 1] for s in starts])
  return windows[:, :-1], windows[:, 1:]


def _schedule(peak, args):
  """Linear warmup to ``peak``, then cosine to 0.1 x peak (``peak`` may be
  traced, so one compiled step serves every learning rate)."""
  unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, args.warmup, args.steps,
                                            end_value=0.1)
  return lambda count: peak * unit(count)


def _multi_steps(opt, k, variational):
  if k == 1:
    return opt
  if variational:  # a fresh weight draw for every micro-batch
    return blrax.MultiSteps(opt, every_k_schedule=k)
  return optax.MultiSteps(opt, every_k_schedule=k)


def make_optimizer(name, args, params, lr, ess=None, key=0):
  """The optimizer for ``"AdamW"``, ``"IVON"`` or ``"EVON"`` (``lr``, ``ess``
  and ``key`` may be traced), wrapped in the grad clip and the accumulation.
  EVON runs with the official defaults (its ``lr`` is the length of its
  whitened step) and IVON's decay mask."""
  mask = decay_mask(params)
  if name == "AdamW":
    opt = optax.adamw(_schedule(lr, args), b1=0.9, b2=args.b2_adamw,
                      weight_decay=args.wd_adamw, mask=mask)
  elif name == "IVON":
    opt = blrax.ivon(_schedule(lr, args), ess=ess, hess_init=args.hess_init,
                     b2=args.b2, clip_radius=args.clip_radius, key=key,
                     weight_decay=args.wd_ivon, weight_decay_mask=mask)
  elif name == "EVON":  # the official defaults; the lr is a step length
    opt = blrax.evon(_schedule(lr, args), ess=ess, key=key,
                     weight_decay_mask=mask)
  else:
    raise ValueError(f"`optimizers` must name adamw, ivon or evon, got "
                     f"{name!r}.")
  # The clip sees every micro-batch in both (blrax.MultiSteps clips inside,
  # so AdamW's clip goes before optax.MultiSteps).
  clip = [optax.clip_by_global_norm(args.grad_clip)] if args.grad_clip else []
  if name != "AdamW":
    return _multi_steps(optax.chain(*clip, opt), args.accumulate, True)
  return optax.chain(*clip, _multi_steps(opt, args.accumulate, False))


def optimizer_info(name, args, n_train):
  if name == "AdamW":
    return {"lr": args.lr_adamw, "wd": args.wd_adamw, "b2": args.b2_adamw}
  ess = parse_ess(args.ess, n_train)
  if name == "EVON":  # its defaults; the lr is the whitened step length
    defaults = {k: v.default for k, v in
                inspect.signature(blrax.evon).parameters.items()}
    return {"lr": args.lr_evon, "wd": defaults["weight_decay"],
            "b2": defaults["b2"], "ess": args.ess, "ess_value": ess,
            "hess_init": defaults["hess_init"], "peak_step": args.lr_evon}
  lr = args.lr_ivon
  return {"lr": lr, "wd": args.wd_ivon, "b2": args.b2,
          "ess": args.ess, "ess_value": ess, "hess_init": args.hess_init,
          "clip_radius": args.clip_radius,
          "peak_step": lr * (args.hess_init + args.wd_ivon)
          * args.clip_radius}


_CORPUS = {}


def data(args):
  """(train, val) splits (90/10, contiguous) of the corpus, cached."""
  if args.corpus_chars not in _CORPUS:
    corpus = load_corpus(args.corpus_chars)
    split = int(0.9 * len(corpus))
    _CORPUS[args.corpus_chars] = corpus[:split], corpus[split:]
  return _CORPUS[args.corpus_chars]


def median_sigma_over_w(state, mean):
  """Median over params of sigma/|w| (posterior stddev over the mean)."""
  sigma = blrax.posterior_stddev(state, mean)
  ratios = jax.tree.map(
      lambda s, w: (s / jnp.maximum(jnp.abs(w.astype(jnp.float32)), 1e-12)
                    ).ravel(), sigma, mean)
  return float(jnp.median(jnp.concatenate(jax.tree.leaves(ratios))))


_STATIC = ("d_model", "layers", "heads", "seq_len", "batch", "accumulate",
           "corpus_chars", "val_windows", "devices", "bf16", "samples",
           "warmup", "steps", "grad_clip", "wd_adamw", "b2_adamw", "wd_ivon",
           "hess_init", "clip_radius", "b2")
_COMPILED = {}


def compiled(name, args):
  """The jitted init/step/eval functions of one configuration, cached: the
  learning rate, ess and seed are arguments, so a sweep compiles once."""
  key = (name,) + tuple(getattr(args, k) for k in _STATIC)
  if key in _COMPILED:
    return _COMPILED[key]
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  graphdef, _ = nnx.split(GPT(args, dtype, nnx.Rngs(0)), nnx.Param)
  apply = lambda p, tokens: nnx.merge(graphdef, p)(tokens)
  variational = name != "AdamW"

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())

  def build(p, hp):
    return make_optimizer(name, args, p, hp["lr"], hp["ess"],
                          jax.random.key(hp["seed"]))

  def init(p, hp):
    return build(p, hp).init(p)

  def step(p, s, xs, ys, hp):
    opt = build(p, hp)

    def micro(carry, xy):
      p, s = carry
      theta = blrax.sample_params(p, s) if variational else p
      loss, grads = jax.value_and_grad(loss_fn)(theta, *xy)
      updates, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (p, s), losses = jax.lax.scan(micro, (p, s), (xs, ys))
    return p, s, losses.mean()

  def evaluate(p, s, x, key):
    if not variational:
      return jax.nn.log_softmax(apply(p, x)), None
    mean = blrax.predictive.predictive_log_probs(apply, None, p, s, x,
                                                 mean_only=True)
    bma = blrax.predictive.predictive_log_probs(
        apply, key, p, s, x, num_samples=args.samples, chunk_size=1)
    return mean, bma

  fns = {
      "dtype": dtype, "variational": variational, "replicated": replicated,
      "sharded": NamedSharding(mesh, P(None, "data")),
      "init": jax.jit(init, out_shardings=replicated),
      "step": jax.jit(step, out_shardings=(replicated,) * 3,
                      donate_argnums=(0, 1)),
      "val_loss": jax.jit(loss_fn), "evaluate": jax.jit(evaluate)}
  _COMPILED[key] = fns
  return fns


def train_one(name, args, log=print):
  """Trains one optimizer; returns a result dict (metrics, curves, config)."""
  train, val = data(args)
  fns = compiled(name, args)
  dtype, variational = fns["dtype"], fns["variational"]
  _, params0 = nnx.split(GPT(args, dtype, nnx.Rngs(args.seed)), nnx.Param)
  params0 = nnx.as_pure(params0)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  info = optimizer_info(name, args, len(train))
  hp = {"lr": jnp.float32(info["lr"]),
        "ess": jnp.float32(info.get("ess_value", 1.0)),
        "seed": jnp.int32(args.seed)}

  vx, vy = val_windows(val, args.val_windows, args.seq_len)
  vx, vy = jnp.asarray(vx), jnp.asarray(vy)
  curve_x, curve_y = vx[:max(1, len(vx) // 4)], vy[:max(1, len(vy) // 4)]

  params = jax.device_put(params0, fns["replicated"])
  state = fns["init"](params, hp)
  rng = np.random.default_rng(args.seed)
  curve = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
  start = time.perf_counter()
  for i in tqdm(range(args.steps), desc=name, leave=False):
    xs, ys = batches(train, rng, args.batch, args.seq_len, args.accumulate)
    params, state, loss = fns["step"](
        params, state, jax.device_put(xs, fns["sharded"]),
        jax.device_put(ys, fns["sharded"]), hp)
    if args.curves:
      curve["step"].append(i + 1)
      curve["train_loss"].append(loss)
      if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
        curve["val_step"].append(i + 1)
        curve["val_loss"].append(fns["val_loss"](params, curve_x, curve_y))
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  curve["train_loss"] = [float(v) for v in curve["train_loss"]]
  curve["val_loss"] = [float(v) for v in curve["val_loss"]]
  if not math.isfinite(float(loss)):
    log(f"{name}: non-finite training loss {float(loss)}")

  labels = vy.reshape(-1)

  def metrics(log_probs):
    log_probs = log_probs.reshape(-1, VOCAB)
    nll = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))
    probs = jnp.exp(log_probs)
    return {"loss": float(nll), "ppl": float(jnp.exp(nll)),
            "acc": float(blrax.metrics.accuracy(probs, labels)),
            "ece": float(blrax.metrics.expected_calibration_error(probs, labels))}

  result = {"optimizer": name, "seed": args.seed, "n_params": int(n_params),
            "train_chars": int(len(train)), "val_chars": int(len(val)),
            "val_predictions": int(labels.size), "seconds": seconds,
            "steps": args.steps, "batch": args.batch,
            "accumulate": args.accumulate, "seq_len": args.seq_len,
            "warmup": args.warmup, "grad_clip": args.grad_clip,
            "model": f"d{args.d_model} x{args.layers} h{args.heads}",
            "dtype": jnp.dtype(dtype).name, **info, "curve": curve}
  mean, bma = fns["evaluate"](params, state, vx,
                              jax.random.key(1000 + args.seed))
  result["mean"] = metrics(mean)
  if variational:
    result["bma"] = metrics(bma)
    result["samples"] = args.samples
    result["sigma_over_w"] = median_sigma_over_w(state, params)
    result["noise_cost"] = n_params / (2 * info["ess_value"])
    curvature = jnp.concatenate([
        c.ravel() for post in blrax.find_posteriors(state)
        for c in jax.tree.leaves(post.curvature)])
    result["curvature_dtype"] = str(curvature.dtype)
    result["curvature_median"] = float(jnp.median(curvature))
  result["params_dtype"] = str(jax.tree.leaves(params)[0].dtype)
  result["_state"], result["_params"] = state, params
  return result


def _row(label, m, seconds):
  return (f"| {label} | {m['loss']:.4f} | {m['ppl']:.3f} | {m['acc']:.4f} | "
          f"{m['ece']:.4f} | {seconds:.1f} |")


def write_curves(results, folder):
  """``curves.json`` (loss vs update) and ``curves.png`` in ``folder``."""
  os.makedirs(folder, exist_ok=True)
  curves = {r["optimizer"]: r["curve"] for r in results}
  with open(os.path.join(folder, "curves.json"), "w") as f:
    json.dump(curves, f)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, c in curves.items():
    train = np.asarray(c["train_loss"])
    width = max(1, len(train) // 50)  # a running mean over ~2% of the run
    smooth = np.convolve(train, np.ones(width) / width, mode="valid")
    line, = ax.plot(c["step"][width - 1:], smooth, alpha=0.6,
                    label=f"{name} train")
    ax.plot(c["val_step"], c["val_loss"], "o-", color=line.get_color(),
            label=f"{name} val (mean)")
  ax.set_xlabel("update")
  ax.set_ylabel("loss (nats/char)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(folder, "curves.png"), dpi=100)
  plt.close(fig)


def main(args):
  if args.table:
    return write_table(args.table)
  if args.sweep:
    return sweep(args)
  train, _ = data(args)
  wanted = [w.strip().lower() for w in args.optimizers.split(",")]
  names = [n for w, n in OPTIMIZERS.items() if w in wanted]
  results = []
  for name in names:
    results.append(train_one(name, args))
    if args.curves:  # after each optimizer, so a timeout keeps what finished
      write_curves(results, args.curves)
  first = results[0]
  print(f"corpus: {len(train) + first['val_chars']:,} bytes of stdlib source "
        f"(train {len(train):,} / val {first['val_chars']:,}, contiguous 90/10)"
        f"; model: {first['n_params']:,} params ({first['dtype']}), "
        f"{len(train) / first['n_params']:.1f} training chars/param; "
        f"{args.devices} device(s); {args.steps} updates of {args.accumulate} x "
        f"{args.batch} x {args.seq_len} chars; seed {args.seed}")
  print(f"\nvalidation: {first['val_predictions']:,} next-character predictions")
  print("| model | val loss | perplexity | acc | ECE | train s |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in results:
    name = r["optimizer"]
    if name == "AdamW":
      print(_row("AdamW", r["mean"], r["seconds"]))
    else:
      print(_row(f"{name} (mean)", r["mean"], r["seconds"]))
      print(_row(f"{name} (BMA, {r['samples']})", r["bma"], r["seconds"]))
  for r in results:
    name = r["optimizer"]
    if name != "AdamW":
      print(f"\n{name} ess {r['ess']} = {r['ess_value']:.3g}: median "
            f"sigma/|w| {r['sigma_over_w']:.4f}; params/(2 ess) = "
            f"{r['noise_cost']:.4f} nats")
      print(f"{name} curvature ({r['curvature_dtype']}): median "
            f"{r['curvature_median']:.4g} (init {args.hess_init}); params "
            f"{r['params_dtype']}")
  return results


# ---------------------------------------------------------------- the sweep

SWEEP_ADAMW_LR = (2e-3, 6e-3, 2e-2)
SWEEP_EVON_LR = (1e-3, 3e-3, 1e-2)  # whitened step lengths
SWEEP_PEAK_STEP = (2e-3, 6e-3, 2e-2)  # IVON lr x (h0 + wd) x clip_radius
SWEEP_ESS = ("cold", "10N", "100N")  # at the best lr of ess = N
SWEEP_SEEDS = (1, 2)


def _key(name, lr, ess, seed):
  return f"{name}|{lr:.6g}|{ess}|{seed}"


def _score(r):
  return min(r["mean"]["loss"], r.get("bma", r["mean"])["loss"])


def _load(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def sweep(args):
  """AdamW over SWEEP_ADAMW_LR, IVON (ess = N) over SWEEP_PEAK_STEP, IVON at
  SWEEP_ESS at the best of those, then each lr grid extended by one 3x step
  past an edge winner; EVON (if asked) over SWEEP_EVON_LR at ess = N and cold
  at its best; then SWEEP_SEEDS for the best of each optimizer and the best
  at ess = N; appends to ``args.sweep`` and writes the table."""
  done = {_key(r["optimizer"], r["lr"], r.get("ess"), r["seed"])
          for r in _load(args.sweep)}
  ivon_lr = [s / ((args.hess_init + args.wd_ivon) * args.clip_radius)
             for s in SWEEP_PEAK_STEP]

  def run(name, lr, ess, seed):
    if _key(name, lr, ess, seed) in done:
      return
    run_args = argparse.Namespace(**{**vars(args), "seed": seed,
                                     "ess": ess or "N", "curves": None})
    setattr(run_args, f"lr_{name.lower()}", lr)
    r = train_one(name, run_args)
    for k in [k for k in r if k.startswith("_")]:
      del r[k]
    del r["curve"]
    if name == "AdamW":
      r["ess"] = None
    with open(args.sweep, "a") as f:
      f.write(json.dumps(r) + "\n")
    done.add(_key(name, lr, ess, seed))
    print(f"{name} lr {lr:.3g} ess {ess} seed {seed}: val {r['mean']['loss']:.4f}"
          + (f" / BMA {r['bma']['loss']:.4f}" if "bma" in r else "")
          + f" ({r['seconds']:.0f} s)", flush=True)

  def best_lr(name, ess, lrs, extend=True):
    """Runs ``lrs`` (and one more 3x step past an edge winner): the best lr."""
    for lr in lrs:
      run(name, lr, ess, args.seed)
    rows = {r["lr"]: r for r in _load(args.sweep) if r["seed"] == args.seed
            and r["optimizer"] == name and r.get("ess") == ess}
    best = min(rows.values(), key=_score)["lr"]
    edge = {max(lrs): 3.0, min(lrs): 1 / 3.0}.get(best)
    if edge and extend:
      run(name, best * edge, ess, args.seed)
      rows = {r["lr"]: r for r in _load(args.sweep) if r["seed"] == args.seed
              and r["optimizer"] == name and r.get("ess") == ess}
      best = min(rows.values(), key=_score)["lr"]
    return best

  wanted = args.optimizers.lower().split(",")
  if "adamw" in wanted:
    best_lr("AdamW", None, SWEEP_ADAMW_LR)
  if "ivon" in wanted:
    at_n = best_lr("IVON", "N", ivon_lr, extend=False)
    for ess in SWEEP_ESS:  # at the best lr of the 3-point grid
      run("IVON", at_n, ess, args.seed)
    best_lr("IVON", "N", ivon_lr)
  if "evon" in wanted:  # its own grid at ess = N, and cold at its best
    at_n = best_lr("EVON", "N", SWEEP_EVON_LR)
    run("EVON", at_n, "cold", args.seed)
  grid = [r for r in _load(args.sweep) if r["seed"] == args.seed]
  best = []
  for pick in (lambda r: r["optimizer"] == "AdamW",
               lambda r: r["optimizer"] == "IVON",
               lambda r: r["optimizer"] == "IVON" and r["ess"] == "N",
               lambda r: r["optimizer"] == "EVON",
               lambda r: r["optimizer"] == "EVON" and r["ess"] == "N"):
    rows = [r for r in grid if pick(r)]
    if rows:
      best.append(min(rows, key=_score))
  for seed in SWEEP_SEEDS:  # seed by seed, so a cut-short sweep is balanced
    for r in best:
      run(r["optimizer"], r["lr"], r["ess"], seed)
  write_table(args.sweep)


def _stats(values):
  values = np.asarray(values, float)
  std = values.std(ddof=1) if len(values) > 1 else float("nan")
  return values.mean(), std


def write_table(path):
  """Markdown tables of a sweep file: the grid (seed 0) and the seeds."""
  rows = _load(path)
  if not rows:
    raise ValueError(f"`--table` found no runs in {path!r}.")
  first = rows[0]
  lines = [
      f"Model {first['model']}, {first['n_params']:,} params; "
      f"{first['train_chars']:,} training chars "
      f"({first['train_chars'] / first['n_params']:.1f} per param), "
      f"{first['val_chars']:,} validation chars (contiguous 90/10 split), "
      f"{first['val_predictions']:,} validation predictions; "
      f"{first['steps']} updates of {first['accumulate']} x {first['batch']} x "
      f"{first['seq_len']} chars, warmup {first['warmup']} + cosine to 0.1x, "
      f"grad clip {first['grad_clip']}.", "",
      "| optimizer | lr (peak step) | ess | seed | val loss | BMA val loss | "
      "ECE | BMA ECE | median sigma/abs(w) | params/(2 ess) | s |",
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    step = r.get("peak_step", r["lr"])
    cells = [f"{r['lr']:.3g} ({step:.3g})", r.get("ess") or "-", r["seed"],
             f"{r['mean']['loss']:.4f}"]
    if "bma" in r:
      cells += [f"{r['bma']['loss']:.4f}", f"{r['mean']['ece']:.4f}",
                f"{r['bma']['ece']:.4f}", f"{r['sigma_over_w']:.4f}",
                f"{r['noise_cost']:.4f}"]
    else:
      cells += ["-", f"{r['mean']['ece']:.4f}", "-", "-", "-"]
    cells.append(f"{r['seconds']:.0f}")
    lines.append(f"| {r['optimizer']} | " + " | ".join(map(str, cells)) + " |")
  groups = {}
  for r in rows:
    groups.setdefault((r["optimizer"], r["lr"], r.get("ess")), []).append(r)
  lines += ["", "Seeds (mean ± std over the seeds run):", "",
            "| optimizer | lr | ess | seeds | val loss | perplexity | ECE | "
            "BMA val loss | BMA perplexity | BMA ECE | median sigma/abs(w) | "
            "params/(2 ess) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  fmt = lambda v, d=4: f"{v[0]:.{d}f} ± {v[1]:.{d}f}"
  for (name, lr, ess), rs in groups.items():
    if len(rs) < 2:
      continue
    cells = [fmt(_stats([r["mean"][k] for r in rs]), d)
             for k, d in (("loss", 4), ("ppl", 3), ("ece", 4))]
    if name != "AdamW":
      cells += [fmt(_stats([r["bma"][k] for r in rs]), d)
                for k, d in (("loss", 4), ("ppl", 3), ("ece", 4))]
      cells += [fmt(_stats([r["sigma_over_w"] for r in rs])),
                f"{rs[0]['noise_cost']:.4f}"]
    else:
      cells += ["-"] * 5
    lines.append(f"| {name} | {lr:.3g} | {ess or '-'} | {len(rs)} | "
                 + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(text)
  print(text)
  return text


if __name__ == "__main__":
  main(ARGS)
