"""Data-parallel step time over 1, 2, 4, 8 devices, IVON against optax.adamw.

Each device count runs in its own process (on CPU the devices are made with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set
before jax is imported). The global batch is fixed, sharded over the devices;
params and optimizer state are replicated. On a CPU host the "devices" share
its cores, so this measures the overhead of the sharded program rather than a
speed-up; on accelerators it measures scaling.

    python benchmarks/device_scaling.py [--devices 1,2,4,8] [--sizes 256,512,512,10]
        [--out device_scaling.png]

Prints a markdown table; with ``--out``, also plots step time over devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
sys.path.insert(0, {bench_dir!r})
import step_time
import blrax

sizes, batch, rounds, inner = {sizes!r}, {batch}, {rounds}, {inner}
n = jax.device_count()
mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
key = jax.random.key(0)
params = jax.device_put(step_time.mlp_init(key, sizes), rep)
xs = jax.device_put(jax.random.normal(key, (inner, batch, sizes[0])), shard)
ys = jax.device_put(jax.random.randint(key, (inner, batch), 0, sizes[-1]), shard)
runs = {{}}
for name, opt, kind in (("adamw", optax.adamw(1e-3), "adam"),
                        ("blrax.ivon", blrax.ivon(1e-3, ess=6e4), "blrax")):
  run = jax.jit(step_time.make_run(opt, kind, inner), out_shardings=rep)
  args = (params, jax.jit(opt.init, out_shardings=rep)(params), key, xs, ys)
  jax.block_until_ready(run(*args))
  runs[name] = (run, args)
times = {{k: [] for k in runs}}
for _ in range(rounds):
  for name, (run, args) in runs.items():
    start = time.perf_counter(); jax.block_until_ready(run(*args))
    times[name].append((time.perf_counter() - start) / inner)
print(json.dumps({{k: statistics.median(v) for k, v in times.items()}}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--sizes", default="256,512,512,10")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--inner", type=int, default=10)
  parser.add_argument("--out", default=None, help="PNG plot path")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  bench_dir = os.path.dirname(os.path.abspath(__file__))
  print(f"MLP {sizes}, global batch {args.batch}, data parallel\n")
  print("| devices | adamw ms | ivon ms | ivon / adamw |")
  print("|---:|---:|---:|---:|")
  counts = [int(d) for d in args.devices.split(",")]
  rows = []
  for count in counts:
    env = dict(os.environ)
    if env.get("JAX_PLATFORMS", "cpu") == "cpu":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={count}")
    code = CHILD.format(bench_dir=bench_dir, sizes=sizes, batch=args.batch,
                        rounds=args.rounds, inner=args.inner)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, env=env, check=True)
    medians = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append(medians)
    print(f"| {count} | {1e3 * medians['adamw']:.3f} | "
          f"{1e3 * medians['blrax.ivon']:.3f} | "
          f"{medians['blrax.ivon'] / medians['adamw']:.2f} |")

  if args.out:
    import matplotlib  # only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in ("adamw", "blrax.ivon"):
      ax.plot(counts, [1e3 * r[name] for r in rows], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices (data parallel, fixed global batch)")
    ax.set_ylabel("ms per train step")
    ax.set_title(f"MLP {sizes}, {os.environ.get('JAX_PLATFORMS') or 'cpu'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
  main()
