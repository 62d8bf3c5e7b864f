"""Step time and optimizer-state memory over model sizes, against optax.adamw.

For models from ~1e4 to ~1e7 params (MLPs, or the decoder-only transformer of
``examples/char_gpt.py``), times the full train step (draw, gradient,
update) of the blrax diagonal variants, optax.adamw and the floor (adamw
plus one normal draw of all params), all in the same process and interleaved
(see step_time.py), and counts optimizer-state bytes. Writes a markdown
table to stdout and a PNG plot.

    python benchmarks/scaling.py [--widths 32,256,900,3000] [--out scaling.png]
    python benchmarks/scaling.py --model transformer [--configs 16:1,64:2,...]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(HERE, os.pardir, "examples"))
import step_time  # noqa: E402


def mlp_case(width, batch):
  """(label, params, loss, xs, ys) for the MLP 256-width-width-10."""
  sizes = [256, width, width, 10]
  inner = max(2, min(20, int(2e7 // (width * width + 256 * width))))
  key = jax.random.key(0)
  params = step_time.mlp_init(key, sizes)
  xs = jax.random.normal(key, (inner, batch, sizes[0]))
  ys = jax.random.randint(key, (inner, batch), 0, sizes[-1])
  return f"MLP 256-{width}-{width}-10", params, step_time.mlp_loss, xs, ys


def transformer_case(d_model, layers, batch, seq_len=32):
  """The same for the char_gpt transformer (``batch`` sequences of 32)."""
  import char_gpt  # the example defines the model
  from flax import nnx

  config = argparse.Namespace(d_model=d_model, layers=layers,
                              heads=max(1, d_model // 64), seq_len=seq_len)
  graphdef, params = nnx.split(char_gpt.GPT(config, jnp.float32, nnx.Rngs(0)),
                               nnx.Param)
  params = nnx.as_pure(params)

  def loss(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  n_params = sum(x.size for x in jax.tree.leaves(params))
  inner = max(2, min(20, int(2e7 // n_params)))
  tokens = jax.random.randint(jax.random.key(0), (inner, batch, seq_len + 1),
                              0, char_gpt.VOCAB)
  label = f"GPT d{d_model} x{layers}"
  return label, params, loss, tokens[..., :-1], tokens[..., 1:]


def state_bytes(opt, params) -> int:
  """Bytes of the optimizer state (typed keys count as their key data)."""
  state = jax.eval_shape(opt.init, params)
  total = 0
  for leaf in jax.tree.leaves(state):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      total += 8 * max(1, leaf.size)  # two uint32 words per key
    else:
      total += leaf.size * leaf.dtype.itemsize
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
  parser.add_argument("--widths", default="32,256,900,3000",
                      help="MLP: hidden widths of MLPs 256-w-w-10")
  parser.add_argument("--configs", default="16:1,64:2,192:4,384:6",
                      help="transformer: d_model:layers, comma separated")
  parser.add_argument("--batch", type=int, default=None,
                      help="examples (MLP, default 128) or sequences of 32 "
                      "tokens (transformer, default 4) per step")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default="scaling.png")
  args = parser.parse_args()

  if args.model == "mlp":
    batch = args.batch or 128
    cases = [lambda w=int(w): mlp_case(w, batch)
             for w in args.widths.split(",")]
  else:
    batch = args.batch or 4
    cases = [lambda c=c: transformer_case(*map(int, c.split(":")), batch)
             for c in args.configs.split(",")]
  rows = []
  for case in cases:
    label, params, loss, xs, ys = case()
    variants = step_time.default_variants(with_vogn=False)
    n_params, medians = step_time.benchmark_model(params, loss, xs, ys,
                                                  args.rounds, variants)
    memory = {name: state_bytes(opt, params)
              for name, (opt, _) in variants.items()}
    memory["adamw"] = state_bytes(optax.adamw(1e-3), params)
    rows.append((n_params, medians, memory))
    print(f"done: {label}, {n_params:,} params", file=sys.stderr)

  names = list(rows[0][1])
  print(f"{args.model}, {jax.devices()[0].platform}, batch {batch}; step time "
        "/ adamw (/ floor); state bytes / adamw's\n")
  print("| params | " + " | ".join(names) + " | ivon state / adamw state | "
        "ivon flip state / adamw state |")
  print("|---:|" + "---:|" * (len(names) + 2))
  for n_params, medians, memory in rows:
    cells = [f"{medians[k] / medians['adamw']:.2f} "
             f"({medians[k] / medians['floor']:.2f})" for k in names]
    extra = {k: memory[k] - memory["adamw"]
             for k in ("blrax.ivon", "blrax.ivon (flip noise)")}
    print(f"| {n_params:,} | " + " | ".join(cells) + " | "
          + " | ".join(f"{memory[k] / memory['adamw']:.6f} (+{b:,} B)"
                       for k, b in extra.items()) + " |")

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  counts = [r[0] for r in rows]
  for name in names:
    ax1.loglog(counts, [1e3 * r[1][name] for r in rows], "o-", label=name)
    ax2.semilogx(counts, [r[1][name] / r[1]["floor"] for r in rows], "o-",
                 label=name)
  ax1.set_title(f"{args.model}, {jax.devices()[0].platform}")
  ax1.set_xlabel("params")
  ax1.set_ylabel("ms per train step")
  ax1.legend(fontsize=8)
  ax2.set_xlabel("params")
  ax2.set_ylabel("step time / floor")
  ax2.axhline(1.15, color="k", ls=":", lw=1)
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"\nplot: {args.out}")


if __name__ == "__main__":
  main()
