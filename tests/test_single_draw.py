"""The train step draws the weight noise once (sample_params and update share it).

Timing lives in benchmarks/; here we check the compiled program: the draw is
one XLA conditional per posterior, and the one in sample_params and the one in
update must have been merged by CSE, inside a plain step and inside lax.scan,
for every diagonal variant and every noise generator.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import blrax

VARIANTS = {
    "ivon": lambda noise: blrax.ivon(0.1, ess=100.0, noise=noise),
    "von": lambda noise: blrax.von(0.1, ess=100.0, noise=noise),
    "vadam": lambda noise: blrax.vadam(0.1, ess=100.0, noise=noise),
    "vogn": lambda noise: blrax.vogn(0.1, ess=100.0, noise=noise),
}
NOISES = ["normal", "hash", "flip"]


def loss(params, x):
  return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]))


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("in_scan", [False, True], ids=["step", "scan"])
def test_one_noise_draw_per_step(variant, noise, in_scan):
  params = {"w": jnp.ones((16, 32)), "b": jnp.zeros(32)}
  opt = optax.chain(optax.clip_by_global_norm(1.0), VARIANTS[variant](noise))
  state = opt.init(params)
  xs = jnp.ones((3, 4, 16))

  def step(carry, x):
    p, s = carry
    theta = blrax.sample_params(p, s)
    if variant == "vogn":
      grads = blrax.per_example_grads(lambda q, xi: loss(q, xi[None]), theta, x)
    else:
      grads = jax.grad(loss)(theta, x)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  if in_scan:
    fn = lambda p, s, xs: jax.lax.scan(step, (p, s), xs)[0]
  else:
    fn = lambda p, s, xs: step((p, s), xs[0])[0]
  hlo = jax.jit(fn).lower(params, state, xs).compile().as_text()
  conditionals = [line for line in hlo.splitlines() if "conditional(" in line]
  if noise == "flip" and variant in ("ivon", "von"):
    # Flip noise has no params-sized draw to share: its conditionals make the
    # per-row and per-column signs only (O(rows + cols) hashes each, kept
    # apart on purpose: merged they measured slower).
    assert 1 <= len(conditionals) <= 2
    for line in conditionals:
      assert "[16,32]" not in line.split("conditional(")[0], line
  else:
    assert len(conditionals) == 1
