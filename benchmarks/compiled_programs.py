"""The optimised XLA program of each optimizer's train step, normalised.

A refactor that leaves an optimizer's compiled program unchanged cannot
change its speed. Run this in two checkouts and compare the fingerprints:

    python benchmarks/compiled_programs.py > after.txt
    cd ../old && PYTHONPATH=. python benchmarks/compiled_programs.py > before.txt
    diff before.txt after.txt

Each line: optimizer, a hash of the optimised HLO (file names, stack frames
and instruction numbering removed), and its instruction count. Same hash:
the same program on this backend.
"""

from __future__ import annotations

import hashlib
import re
import warnings

import jax
import jax.numpy as jnp
import optax

import blrax


def mlp(params, x):
  h = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
  return h @ params[1]["w"] + params[1]["b"]


def normalised(text: str) -> list[str]:
  """The instructions of an HLO module with names renumbered in order of
  appearance, without metadata."""
  lines, names = [], {}
  for line in text.splitlines():
    if " = " not in line and not line.strip().startswith(("ENTRY", "%",
                                                           "ROOT", "}")):
      continue
    line = re.sub(r", (metadata|frontend_attributes)=\{[^}]*\}", "", line)
    line = re.sub(r", stack_frame_id=\d+", "", line)
    line = re.sub(r"%([\w.\-]+)",
                  lambda m: "%" + names.setdefault(m.group(1), f"v{len(names)}"),
                  line)
    lines.append(line)
  return lines


def main():
  key = jax.random.key(0)
  params = [{"w": jax.random.normal(key, (16, 32)) / 4, "b": jnp.zeros(32)},
            {"w": jax.random.normal(key, (32, 4)) / 6, "b": jnp.zeros(4)}]
  x = jax.random.normal(key, (8, 16))
  y = jnp.arange(8) % 4
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      mlp(p, x), y).mean()
  optimizers = {
      "ivon": blrax.ivon(1e-3, ess=100.0),
      "ivon_hash": blrax.ivon(1e-3, ess=100.0, noise="hash"),
      "ivon_flip": blrax.ivon(1e-3, ess=100.0, noise="flip"),
      "ivon_mc2": blrax.ivon(1e-3, ess=100.0, mc_samples=2),
      "von_diag": blrax.von(1e-3, ess=100.0),
      "vadam": blrax.vadam(1e-3, ess=100.0, batch_size=8),
      "vogn": blrax.vogn(1e-3, ess=100.0),
      "evon": blrax.evon(1e-3, ess=100.0),
      "bsam": blrax.bsam(1e-3, ess=100.0, rho=0.01),
      "adamw": optax.adamw(1e-3),
  }
  for name, opt in optimizers.items():

    def step(params, state, name=name, opt=opt):
      theta = blrax.sample_params(params, state) if name != "adamw" else params
      mc = 2 if name == "ivon_mc2" else 1
      grads = (jax.vmap(jax.grad(loss))(theta) if mc > 1
               else jax.grad(loss)(theta))
      kwargs = {}
      if name == "vogn":  # the squares of value_grads_and_squares
        kwargs["hessian"] = jax.tree.map(jnp.square, grads)
      if name == "bsam":
        kwargs["grad_fn"] = jax.grad(loss)
      updates, state = opt.update(grads, state, params, **kwargs)
      return optax.apply_updates(params, updates), state

    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      text = jax.jit(step).lower(params, opt.init(params)).compile().as_text()
    lines = normalised(text)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    print(f"{name:10s} {digest} {len(lines)}")


if __name__ == "__main__":
  main()
