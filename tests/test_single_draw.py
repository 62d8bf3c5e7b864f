"""The train step draws the weight noise once (sample_params and update share it).

Timing lives in benchmarks/; here we check the compiled program, for every
variant of the table (tests/cases.py; its noise rows cover the generators):
the draw's ops (a conditional with a params-shaped result per posterior,
LAPACK calls for a full covariance) must appear in the step, plain or inside
lax.scan, no more often than in ``update`` or ``sample_params`` alone: the
draw in sample_params and the one in update were merged by CSE. Flip noise
has no params-sized draw to share: its conditionals make the per-row and
per-column signs only (kept apart on purpose: merged they measured slower),
so none of its conditionals may be params-shaped. tests/test_feature_matrix.py
runs the plain step; this file the step inside lax.scan.
"""

import cases
import jax
import jax.numpy as jnp
import optax
import pytest
from cases import VARIANTS

import blrax

PARAMS = {"b": jnp.zeros(32), "w": jnp.ones((16, 32))}


def draw_ops(hlo, shapes):
  """Counts of the draw's ops in compiled HLO text: conditionals with a
  result of one of ``shapes`` (the noise is made in one) and LAPACK calls."""
  counts = {"conditional": 0}
  for line in hlo.splitlines():
    if "conditional(" in line:
      result = line.split("conditional(")[0]
      if any(s in result for s in shapes):
        counts["conditional"] += 1
    if 'custom_call_target="lapack' in line:
      target = line.split('custom_call_target="')[1].split('"')[0]
      counts[target] = counts.get(target, 0) + 1
  return counts


def check_single_draw(v, kwargs, params=PARAMS, compiler_options=None,
                      in_scan=False):
  """Compiles sample_params, update and the train step (in lax.scan if
  ``in_scan``); raises AssertionError unless the step holds each draw op
  only as often as the busier of sample_params and update alone."""
  opt = optax.chain(optax.clip_by_global_norm(1.0), v.factory(**kwargs))
  state = opt.init(params)
  rows = jax.tree.leaves(params)[-1].shape[0]
  x = jnp.linspace(-1.0, 1.0, 4 * rows).reshape(4, rows)

  def loss(p):
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))

  def update(g, p, s):
    return opt.update(g, s, p, **cases.update_kwargs(v, loss))

  def step(p, s):
    grads = cases.grads(v, loss, blrax.sample_params(p, s), v.mc_samples)
    updates, s = update(grads, p, s)
    return optax.apply_updates(p, updates), s

  def scan(p, s):
    return jax.lax.scan(lambda c, _: (step(*c), None), (p, s), length=3)[0]

  grads = cases.grads(v, loss, blrax.sample_params(params, state),
                      v.mc_samples)
  programs = {"sample": (blrax.sample_params, (params, state)),
              "update": (update, (grads, params, state)),
              "step": (scan if in_scan else step, (params, state))}
  # The leaves' shapes, with a sample axis if any, as HLO writes them.
  shapes = ["[" + ",".join(map(str, ((v.mc_samples,) if v.mc_samples > 1
                                     else ()) + leaf.shape)) + "]"
            for leaf in jax.tree.leaves(params) if leaf.ndim == 2]
  counts = {name: draw_ops(jax.jit(fn).lower(*args).compile(
      compiler_options).as_text(), shapes)
            for name, (fn, args) in programs.items()}
  ops = set(counts["sample"]) | set(counts["update"]) | set(counts["step"])
  for op in ops:
    alone = max(counts["sample"].get(op, 0), counts["update"].get(op, 0))
    assert counts["step"].get(op, 0) <= alone, (op, counts)


@pytest.mark.parametrize("v", [cases.param(v, v) for v in VARIANTS])
def test_one_noise_draw_per_step_in_scan(v):
  cases.check_cell(v, cases.SINGLE_DRAW,
                   lambda: check_single_draw(v, v.wide, in_scan=True))
