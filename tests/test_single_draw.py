"""The train step draws the weight noise once (sample_params and update share it).

Timing lives in benchmarks/; here we check the compiled program: the draw is
one XLA conditional per posterior, and the one in sample_params and the one in
update must have been merged by CSE, inside a plain step and inside lax.scan.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import blrax


def loss(params, x):
  return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]))


@pytest.mark.parametrize("in_scan", [False, True], ids=["step", "scan"])
def test_one_noise_draw_per_step(in_scan):
  params = {"w": jnp.ones((16, 32)), "b": jnp.zeros(32)}
  opt = optax.chain(optax.clip_by_global_norm(1.0), blrax.ivon(0.1, ess=100.0))
  state = opt.init(params)
  xs = jnp.ones((3, 4, 16))

  def step(carry, x):
    p, s = carry
    theta = blrax.sample_params(p, s)
    updates, s = opt.update(jax.grad(loss)(theta, x), s, p)
    return (optax.apply_updates(p, updates), s), None

  if in_scan:
    fn = lambda p, s, xs: jax.lax.scan(step, (p, s), xs)[0]
  else:
    fn = lambda p, s, xs: step((p, s), xs[0])[0]
  hlo = jax.jit(fn).lower(params, state, xs).compile().as_text()
  assert len(re.findall(r"conditional\(", hlo)) == 1
