"""Step time and optimizer-state memory over model sizes, against optax.adamw.

For MLPs from ~1e4 to ~1e7 params, times the full train step (draw,
gradient, update) of the blrax diagonal variants, optax.adamw and the floor
(adamw plus one normal draw of all params), all in the same process and
interleaved (see step_time.py), and counts optimizer-state bytes. Writes a
markdown table to stdout and a PNG plot.

    python benchmarks/scaling.py [--widths 32,256,900,3000] [--out scaling.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402


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
  parser.add_argument("--widths", default="32,256,900,3000",
                      help="hidden widths of MLPs 256-w-w-10")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default="scaling.png")
  args = parser.parse_args()

  rows = []
  for width in [int(w) for w in args.widths.split(",")]:
    sizes = [256, width, width, 10]
    variants = step_time.default_variants(with_vogn=False)
    inner = max(2, min(20, int(2e7 // (width * width + 256 * width))))
    n_params, medians = step_time.benchmark(sizes, args.batch, inner,
                                            args.rounds, variants)
    params = step_time.mlp_init(jax.random.key(0), sizes)
    memory = {name: state_bytes(opt, params)
              for name, (opt, _) in variants.items()}
    memory["adamw"] = state_bytes(optax.adamw(1e-3), params)
    rows.append((n_params, medians, memory))
    print(f"done: {n_params:,} params", file=sys.stderr)

  names = list(rows[0][1])
  print(f"{jax.devices()[0].platform}, batch {args.batch}; step time / adamw "
        "(/ floor); state bytes / adamw's\n")
  print("| params | " + " | ".join(names) + " | ivon state / adamw state |")
  print("|---:|" + "---:|" * (len(names) + 1))
  for n_params, medians, memory in rows:
    cells = [f"{medians[k] / medians['adamw']:.2f} "
             f"({medians[k] / medians['floor']:.2f})" for k in names]
    ratio = memory["blrax.ivon"] / memory["adamw"]
    print(f"| {n_params:,} | " + " | ".join(cells) + f" | {ratio:.6f} "
          f"(+{memory['blrax.ivon'] - memory['adamw']} B) |")

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  counts = [r[0] for r in rows]
  for name in names:
    ax1.loglog(counts, [1e3 * r[1][name] for r in rows], "o-", label=name)
    ax2.semilogx(counts, [r[1][name] / r[1]["floor"] for r in rows], "o-",
                 label=name)
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
