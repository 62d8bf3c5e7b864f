"""blrax.ivon against the PyTorch reference IVON (``ivon-opt``), same noise.

Optional: needs ``torch`` and ``ivon-opt`` (GPL-3.0; installed only to run
this comparison, never imported by blrax):

    pip install torch==2.13.0 ivon-opt
    python benchmarks/reference_check.py [--steps 100] [--mc 1] [--time]

Part 1 trains the same float64 MLP with both optimizers for ``--steps``
steps. The reference draws its noise with ``torch.randn``; we hand it the
standard-normal draw blrax uses for that step (read from the blrax state), so
both follow one trajectory, and print the largest differences of the means
and of the curvature. Part 2 (``--time``) times a full float32 train step of
each on one MLP: the reference (sample, forward/backward, step), blrax.ivon
and optax.adamw (jitted), and torch.optim.AdamW for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax
import torch
from ivon import _ivon as reference

import blrax

jax.config.update("jax_enable_x64", True)


def make_data(n, sizes, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, sizes[0]))
  y = rng.integers(0, sizes[-1], size=n)
  return x, y


def init_params(sizes, seed=0):
  rng = np.random.default_rng(seed)
  params = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    params += [rng.normal(size=(a, b)) / np.sqrt(a), np.zeros(b)]
  return params


def jax_loss(params, x, y):
  for i in range(0, len(params) - 2, 2):
    x = jax.nn.relu(x @ params[i] + params[i + 1])
  logits = x @ params[-2] + params[-1]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def torch_loss(params, x, y):
  for i in range(0, len(params) - 2, 2):
    x = torch.relu(x @ params[i] + params[i + 1])
  logits = x @ params[-2] + params[-1]
  return torch.nn.functional.cross_entropy(logits, y)


HP = dict(lr=0.05, ess=500.0, hess_init=0.5, beta1=0.9, beta2=0.999,
          weight_decay=1e-3, clip_radius=1.0)


def compare(steps, mc, sizes=(10, 16, 4), batch=32):
  x, y = make_data(512, list(sizes))
  init = init_params(list(sizes))
  opt = blrax.ivon(HP["lr"], ess=HP["ess"], hess_init=HP["hess_init"],
                   b1=HP["beta1"], b2=HP["beta2"],
                   weight_decay=HP["weight_decay"],
                   clip_radius=HP["clip_radius"], mc_samples=mc, key=0)
  params = [jax.numpy.asarray(p) for p in init]
  state = opt.init(params)
  torch_params = [torch.tensor(p, requires_grad=True) for p in init]
  ref = reference.IVON(torch_params, mc_samples=mc, **HP)

  grad = jax.grad(jax_loss)
  if mc > 1:
    grad = jax.vmap(grad, in_axes=(0, None, None))
  sample = jax.jit(blrax.sample_params)
  update = jax.jit(opt.update)
  real_randn = torch.randn
  for t in range(steps):
    idx = np.arange(t * batch, (t + 1) * batch) % len(x)
    xb, yb = x[idx], y[idx]
    (posterior,) = blrax.find_posteriors(state)
    noise = [np.asarray(e) for e in posterior.noise()]  # blrax's draw
    flat = [np.concatenate([e[s].ravel() for e in noise]) if mc > 1
            else np.concatenate([e.ravel() for e in noise]) for s in range(mc)]
    for s in range(mc):
      reference.torch.randn = lambda *a, s=s, **k: torch.tensor(flat[s])
      with ref.sampled_params(train=True):
        ref.zero_grad()
        torch_loss(torch_params, torch.tensor(xb), torch.tensor(yb)).backward()
    reference.torch.randn = real_randn
    ref.step()
    theta = sample(params, state)
    updates, state = update(grad(theta, xb, yb), state, params)
    params = optax.apply_updates(params, updates)

  (posterior,) = blrax.find_posteriors(state)
  ref_hess = ref.param_groups[0]["hess"].numpy()
  ours_hess = np.concatenate([h.ravel() for h in posterior.curvature])
  ours_mean = np.concatenate([np.asarray(p).ravel() for p in params])
  ref_mean = np.concatenate([p.detach().numpy().ravel() for p in torch_params])
  return (np.max(np.abs(ours_mean - ref_mean)) / np.max(np.abs(ref_mean)),
          np.max(np.abs(ours_hess - ref_hess)) / np.max(np.abs(ref_hess)))


def time_steps(sizes, batch, steps, rounds):
  """Median seconds per full float32 train step of each implementation."""
  jax.config.update("jax_enable_x64", False)
  torch.set_num_threads(2)
  x, y = make_data(batch * steps, sizes)
  x32 = x.astype(np.float32)
  init = [p.astype(np.float32) for p in init_params(sizes)]
  results = {}

  def torch_run(kind):
    params = [torch.tensor(p, requires_grad=True) for p in init]
    if kind == "ivon":
      opt = reference.IVON(params, lr=1e-3, ess=60000.0)
    else:
      opt = torch.optim.AdamW(params, lr=1e-3)
    xs, ys = torch.tensor(x32), torch.tensor(y)

    def run():
      for t in range(steps):
        xb, yb = xs[t * batch:(t + 1) * batch], ys[t * batch:(t + 1) * batch]
        opt.zero_grad()
        if kind == "ivon":
          with opt.sampled_params(train=True):
            torch_loss(params, xb, yb).backward()
        else:
          torch_loss(params, xb, yb).backward()
        opt.step()

    return run

  def jax_run(opt, variational):
    def step(carry, batch_xy):
      p, s = carry
      theta = blrax.sample_params(p, s) if variational else p
      g = jax.grad(jax_loss)(theta, *batch_xy)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    params = [jax.numpy.asarray(p) for p in init]
    xs = jax.numpy.asarray(x32).reshape(steps, batch, -1)
    ys = jax.numpy.asarray(y).reshape(steps, batch)
    fn = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), (xs, ys))[0])
    state = opt.init(params)
    jax.block_until_ready(fn(params, state))
    return lambda: jax.block_until_ready(fn(params, state))

  runs = {"optax.adamw (jax)": jax_run(optax.adamw(1e-3), False),
          "blrax.ivon (jax)": jax_run(blrax.ivon(1e-3, ess=60000.0), True),
          "torch AdamW": torch_run("adamw"),
          "ivon-opt IVON (torch)": torch_run("ivon")}
  for run in runs.values():
    run()  # warm up
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append((time.perf_counter() - start) / steps)
  for name, t in times.items():
    results[name] = statistics.median(t)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--mc", type=int, default=1)
  parser.add_argument("--time", action="store_true")
  parser.add_argument("--sizes", default="256,1024,1024,10")
  args = parser.parse_args()
  for mc in sorted({1, args.mc}):
    mean_err, hess_err = compare(args.steps, mc)
    print(f"mc_samples={mc}, {args.steps} steps, float64: max relative "
          f"difference of means {mean_err:.2e}, of curvature {hess_err:.2e}")
  if args.time:
    sizes = [int(s) for s in args.sizes.split(",")]
    results = time_steps(sizes, batch=128, steps=20, rounds=7)
    base = results["optax.adamw (jax)"]
    print(f"\nfloat32 train step, MLP {sizes}, batch 128, 2 threads")
    print("| implementation | median ms | / optax.adamw |")
    print("|---|---:|---:|")
    for name, t in results.items():
      print(f"| {name} | {1e3 * t:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
  main()
