"""Run by tests/test_multidevice.py in a process with 8 CPU devices.

Checks: data-parallel (replicated params) and fully sharded (FSDP) IVON
runs, also with noise="flip", and EVON runs, equal the single-device run over
many steps;
one MC sample per device equals the single-device mc_samples=8 run; init
works on abstract inputs; state shardings follow the params after init and
after update; the noise is drawn shard by shard (no full-size draw on any
device).
"""

import functools
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import blrax  # noqa: E402

assert jax.device_count() == 8, jax.devices()
STEPS = 25
D_IN, D_HID, D_OUT, BATCH = 16, 64, 8, 32


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (D_IN, D_HID)) / 4, "b1": jnp.zeros(D_HID),
          "w2": jax.random.normal(k2, (D_HID, D_OUT)) / 8, "b2": jnp.zeros(D_OUT)}


DATA_X = jax.random.normal(jax.random.key(1), (STEPS, BATCH, D_IN))
DATA_Y = jax.random.randint(jax.random.key(2), (STEPS, BATCH), 0, D_OUT)


def make_step(opt, mc_samples=1):
  def step(params, state, x, y):
    theta = blrax.sample_params(params, state)
    if mc_samples > 1:  # sample s sees batch chunk s
      xs = x.reshape(mc_samples, -1, x.shape[-1])
      ys = y.reshape(mc_samples, -1)
      grads = jax.vmap(jax.grad(loss_fn))(theta, xs, ys)
    else:
      grads = jax.grad(loss_fn)(theta, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run(opt, step, params, state, shard_data=None, steps=STEPS):
  for t in range(steps):
    x, y = DATA_X[t], DATA_Y[t]
    if shard_data is not None:
      x, y = jax.device_put(x, shard_data), jax.device_put(y, shard_data)
    params, state = step(params, state, x, y)
  return params, state


def assert_close(a, b, what, rtol=1e-5, atol=1e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol, err_msg=what)


def posterior_of(state):
  (posterior,) = blrax.find_posteriors(state)
  return posterior


def state_shardings(opt, params, param_sharding, replicated):
  """Shardings of ``opt``'s state: like the params for params-shaped leaves
  (found by optax.tree.map_params), replicated otherwise. ``init`` runs on
  abstract inputs only. EVON's bases and factors are trees of the params'
  structure whose leaves are tuples (one matrix per mode): taken as leaves
  (``is_leaf``) and replicated."""
  abstract = jax.eval_shape(opt.init, params)
  return optax.tree.map_params(
      opt, lambda v, s: replicated if isinstance(v, tuple) else s, abstract,
      param_sharding, transform_non_params=lambda _: replicated,
      is_leaf=lambda v: isinstance(v, (jax.ShapeDtypeStruct, jax.Array,
                                       tuple)))


def main():
  params0 = init_params()
  opt = blrax.ivon(0.05, ess=1000.0, hess_init=0.5, b2=0.999, key=7)
  ref_params, ref_state = run(opt, jax.jit(make_step(opt)), params0,
                              opt.init(params0))

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))

  # 1. Data parallel: params and state replicated, batch sharded.
  params = jax.device_put(params0, replicated)
  state = jax.jit(opt.init, out_shardings=replicated)(params)
  step = jax.jit(make_step(opt), out_shardings=replicated)
  dp_params, dp_state = run(opt, step, params, state, shard_data=batch)
  assert_close(dp_params, ref_params, "data parallel params")
  assert_close(posterior_of(dp_state).curvature,
               posterior_of(ref_state).curvature, "data parallel curvature")

  # 1b. Data parallel with noise="flip" (its stored draw replicated too).
  flip = blrax.ivon(0.05, ess=1000.0, hess_init=0.5, b2=0.999, key=7,
                    noise=blrax.noise.flip_noise(4))
  flip_ref, _ = run(flip, jax.jit(make_step(flip)), params0, flip.init(params0))
  params = jax.device_put(params0, replicated)
  state = jax.jit(flip.init, out_shardings=replicated)(params)
  step = jax.jit(make_step(flip), out_shardings=replicated)
  flip_dp, _ = run(flip, step, params, state, shard_data=batch)
  assert_close(flip_dp, flip_ref, "data parallel params, flip noise")

  # 2. Fully sharded: every param sharded along its last axis, the state
  #    sharded like the params (via optax.tree.map_params), batch sharded.
  param_sharding = jax.tree.map(
      lambda p: NamedSharding(mesh, P(*([None] * (p.ndim - 1) + ["data"]))),
      params0)
  state_sharding = state_shardings(opt, params0, param_sharding, replicated)
  params = jax.device_put(params0, param_sharding)
  state = jax.jit(opt.init, out_shardings=state_sharding)(params)
  curv = posterior_of(state).curvature
  for name in params0:
    assert curv[name].sharding.is_equivalent_to(param_sharding[name], 2), name
  step = jax.jit(make_step(opt), out_shardings=(param_sharding, state_sharding))
  compiled = step.lower(params, state, DATA_X[0], DATA_Y[0]).compile().as_text()
  fs_params, fs_state = run(opt, step, params, state, shard_data=batch)
  assert_close(fs_params, ref_params, "fsdp params")
  assert_close(posterior_of(fs_state).curvature,
               posterior_of(ref_state).curvature, "fsdp curvature")
  curv = posterior_of(fs_state).curvature
  for name in params0:
    assert curv[name].sharding.is_equivalent_to(param_sharding[name], 2), name
    assert fs_params[name].sharding.is_equivalent_to(param_sharding[name], 2)
  # The noise is drawn per shard: the largest param (64 x 8, sharded to 8 x 8
  # and 16 x 64 to 16 x 8) never appears as a full-size random-bits array.
  bits = set(re.findall(r"u32\[(\d+,\d+)\]", compiled))
  assert "16,64" not in bits and "64,8" not in bits, sorted(bits)
  assert "16,8" in bits, sorted(bits)

  # 2b. Fully sharded with noise="flip": its stored draw is sharded like the
  #     params too (same shapes), and the run equals the single-device one.
  flip_sharding = state_shardings(flip, params0, param_sharding, replicated)
  params = jax.device_put(params0, param_sharding)
  state = jax.jit(flip.init, out_shardings=flip_sharding)(params)
  step = jax.jit(make_step(flip), out_shardings=(param_sharding, flip_sharding))
  flip_fs, flip_fs_state = run(flip, step, params, state, shard_data=batch)
  assert_close(flip_fs, flip_ref, "fsdp params, flip noise")
  base = posterior_of(flip_fs_state).noise_state.base_noise
  for name in params0:
    assert base[name].sharding.is_equivalent_to(param_sharding[name], 2), name

  # 3. One MC sample per device: mc_samples = 8, sample axis sharded with
  #    the data; equals the single-device mc_samples = 8 run.
  opt8 = blrax.ivon(0.05, ess=1000.0, hess_init=0.5, b2=0.999, mc_samples=8,
                    key=7)
  ref8_params, ref8_state = run(opt8, jax.jit(make_step(opt8, 8)), params0,
                                opt8.init(params0))
  params = jax.device_put(params0, replicated)
  state = jax.jit(opt8.init, out_shardings=replicated)(params)
  theta = jax.jit(blrax.sample_params, out_shardings=NamedSharding(mesh, P("data")))(
      params, state)
  assert jax.tree.leaves(theta)[0].sharding.spec == P("data")
  step = jax.jit(make_step(opt8, 8), out_shardings=replicated)
  mc_params, mc_state = run(opt8, step, params, state, shard_data=batch)
  assert_close(mc_params, ref8_params, "per-device sample params")
  assert_close(posterior_of(mc_state).curvature,
               posterior_of(ref8_state).curvature, "per-device sample curvature")
  # 4. EVON, data parallel and fully sharded, every mode with a factor:
  #    w1's right factor (64 x 64) and w2's left one are rank-deficient for
  #    several steps (a null space whose LAPACK eigenvectors, and whose QR
  #    power iterates, move with rounding); EVON completes a null space from
  #    a fixed start, so every program draws the same weights.
  #    At the defaults: the first call's bases, and so the next draw, agree
  #    to rounding. With LAPACK's own signs (canonical_signs=False, as the
  #    official code) two columns of w1's left basis flip between the
  #    programs: the next draws part by 0.16.
  evon_with = functools.partial(blrax.evon, 0.05, ess=1000.0, hess_init=0.5,
                                b2=0.999, key=7, precondition_frequency=5)
  evon = evon_with()
  draw = jax.jit(blrax.sample_params)
  one_ref = run(evon, jax.jit(make_step(evon)), params0, evon.init(params0),
                steps=1)
  params = jax.device_put(params0, replicated)
  state = jax.jit(evon.init, out_shardings=replicated)(params)
  one_dp = run(evon, jax.jit(make_step(evon), out_shardings=replicated),
               params, state, shard_data=batch, steps=1)
  assert_close(draw(*one_dp), draw(*one_ref), "evon next draw at defaults",
               atol=1e-5)
  #    Over many steps the defaults' bfloat16 Newton-Schulz turns the
  #    programs' last-bit differences into 0.4% ones (the params part by
  #    0.012 in 12 steps), so the long check whitens in float32. Even then
  #    Newton-Schulz multiplies a difference in the update's small singular
  #    directions by up to a^5 = 490 (its slope at 0): the params drift
  #    apart by about 1e-6 per step (measured 2.1e-5 after 25), hence 1e-4.
  evon = evon_with(whiten_dtype=jnp.float32)
  evon_ref, evon_ref_state = run(evon, jax.jit(make_step(evon)), params0,
                                 evon.init(params0))
  bases = posterior_of(evon_ref_state).bases
  assert [q.shape for q in bases["w1"]] == [(16, 16), (64, 64)]
  assert [q.shape for q in bases["w2"]] == [(64, 64), (8, 8)]
  params = jax.device_put(params0, replicated)
  state = jax.jit(evon.init, out_shardings=replicated)(params)
  step = jax.jit(make_step(evon), out_shardings=replicated)
  evon_dp, _ = run(evon, step, params, state, shard_data=batch)
  assert_close(evon_dp, evon_ref, "evon data parallel params", atol=1e-4)
  evon_sharding = state_shardings(evon, params0, param_sharding, replicated)
  params = jax.device_put(params0, param_sharding)
  state = jax.jit(evon.init, out_shardings=evon_sharding)(params)
  step = jax.jit(make_step(evon), out_shardings=(param_sharding,
                                                 evon_sharding))
  evon_fs, evon_fs_state = run(evon, step, params, state, shard_data=batch)
  assert_close(evon_fs, evon_ref, "evon fsdp params", atol=1e-4)
  assert_close(posterior_of(evon_fs_state).curvature,
               posterior_of(evon_ref_state).curvature, "evon fsdp curvature",
               atol=1e-4)
  for q, q_ref in zip(jax.tree.leaves(posterior_of(evon_fs_state).bases),
                      jax.tree.leaves(bases)):
    np.testing.assert_allclose(np.asarray(q), np.asarray(q_ref), atol=1e-3,
                               err_msg="evon fsdp bases")
  curv = posterior_of(evon_fs_state).curvature
  for name in params0:
    assert curv[name].sharding.is_equivalent_to(param_sharding[name], 2), name
  print("multidevice OK")


if __name__ == "__main__":
  main()
  sys.exit(0)
