"""Every blrax state is plain arrays: generic tools that work on
``optax.adam``'s state work on it (issue 23, friction 2).

The states kept typed PRNG keys before; each test here failed then
("JAX array with PRNGKey dtype cannot be converted to a NumPy array", or a
refused ``astype``/``*``). They now keep the keys' uint32 data and wrap it
where a draw is made; old typed-key checkpoints still restore.
"""

import io
import os

import cases
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax
import blrax.checkpoint
import blrax.flax
from blrax._src.noise import generators as noise_lib

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(2)}

CASES = [c for c in cases.OPTIMIZERS if c.id != "vadam_flip"] + [
    ("ivon_rbg", blrax.ivon,
     dict(learning_rate=1e-2, ess=1e6, key=jax.random.key(3, impl="rbg"))),
    ("ivon_unsafe_rbg_flip", blrax.ivon,
     dict(learning_rate=1e-2, ess=1e6, noise="flip",
          key=jax.random.key(3, impl="unsafe_rbg"))),
]


def loss(p):
  return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)


def make(factory, kwargs):
  """The optimizer and a jitted step (bsam gets its grad_fn)."""
  extra = {"batch_size": 1} if factory is blrax.vadam else {}
  opt = factory(**kwargs, **extra)

  @jax.jit
  def step(params, state):
    theta = blrax.sample_params(params, state)
    grads = cases.grads(factory, loss, theta, kwargs.get("mc_samples", 1))
    updates, state = opt.update(grads, state, params,
                                **cases.update_kwargs(factory, loss))
    return optax.apply_updates(params, updates), state

  return opt, step


def started(factory, kwargs):
  """(step, params, state) after two steps."""
  opt, step = make(factory, kwargs)
  params, state = PARAMS, opt.init(PARAMS)
  for _ in range(2):
    params, state = step(params, state)
  return step, params, state


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name,factory,kwargs", CASES, ids=cases.ids(CASES))
def test_generic_tools_work_on_the_state(name, factory, kwargs):
  step, params, state = started(factory, kwargs)
  leaves = jax.tree.leaves(state)
  # flax serialization round trip, then the same next step.
  restored = flax.serialization.from_bytes(
      state, flax.serialization.to_bytes(state))
  assert_same(restored, state)
  assert_same(step(params, restored), step(params, state))
  # NumPy conversions.
  as_numpy = jax.tree.map(np.asarray, state)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(as_numpy))
  buffer = io.BytesIO()
  np.savez(buffer, *leaves)
  buffer.seek(0)
  with np.load(buffer) as saved:
    for i, x in enumerate(leaves):
      np.testing.assert_array_equal(saved[f"arr_{i}"], np.asarray(x))
  # optax tree utilities.
  cast = optax.tree.cast(state, jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
  assert np.isfinite(float(optax.tree.norm(state)))
  # Arithmetic on every leaf; the copy steps exactly like the original.
  copy = jax.tree.map(lambda a: a * 1, state)
  assert_same(copy, state)
  assert_same(step(params, copy), step(params, state))
  # No typed keys: every leaf is a plain numeric array.
  assert not any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                 for x in leaves)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_key_data_round_trips_every_implementation(impl):
  keys = jax.random.split(jax.random.key(5, impl=impl), 3)
  data = noise_lib.key_data(keys)
  assert data.dtype == jnp.uint32
  assert data.shape == (3, noise_lib.KEY_WIDTHS[impl])
  back = noise_lib.wrap_key(data)
  assert str(jax.random.key_impl(back)) == impl
  np.testing.assert_array_equal(jax.random.key_data(back),
                                jax.random.key_data(keys))


def test_key_data_is_the_seed_key_data():
  # The state's draws are those of the key the optimizer was given.
  state = blrax.ivon(0.1, ess=10.0, key=7).init(PARAMS)
  np.testing.assert_array_equal(blrax.find_posteriors(state)[0].key,
                                jax.random.key_data(jax.random.key(7)))


@pytest.mark.parametrize("data", [jnp.zeros(3, jnp.uint32),
                                  jnp.zeros(2, jnp.int32),
                                  jnp.zeros((), jnp.uint32)])
def test_wrap_key_refuses_what_is_not_key_data(data):
  with pytest.raises(ValueError, match=r"`data` must be PRNG key data.*got "
                     r"data of shape"):
    noise_lib.wrap_key(data)


def typed(state):
  """``state`` as older blrax kept it: typed keys instead of key data."""
  keyed = (noise_lib.NormalNoiseState, noise_lib.HashNoiseState,
           noise_lib.FlipNoiseState, blrax.FullGaussian)
  return jax.tree.map(
      lambda x: x._replace(key=noise_lib.wrap_key(x.key))
      if isinstance(x, keyed) else x,
      state, is_leaf=lambda x: isinstance(x, keyed))


@pytest.mark.parametrize("name,factory,kwargs", CASES, ids=cases.ids(CASES))
def test_old_typed_key_checkpoint_restores(tmp_path, name, factory, kwargs):
  step, params, state = started(factory, kwargs)
  old = typed(state)
  assert any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
             for x in jax.tree.leaves(old))
  blrax.checkpoint.save_checkpoint(tmp_path / "ckpt", params, old)
  opt, _ = make(factory, kwargs)
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  r_params, r_state = blrax.checkpoint.restore_checkpoint(
      tmp_path / "ckpt", zeros, opt.init(zeros))
  assert_same(r_params, params)
  assert_same(r_state, state)
  assert_same(step(r_params, r_state), step(params, state))


def test_old_typed_key_checkpoint_of_another_configuration_fails(tmp_path):
  opt = blrax.ivon(0.1, ess=100.0)
  blrax.checkpoint.save_checkpoint(tmp_path / "ckpt", PARAMS,
                                   typed(opt.init(PARAMS)))
  assert os.path.exists(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"noise_state\.key: saved shape \(2,\) "
                     r"dtype uint32, template has shape \(2, 2\) dtype uint32"):
    blrax.checkpoint.restore_checkpoint(
        tmp_path / "ckpt", PARAMS,
        blrax.ivon(0.1, ess=100.0, mc_samples=2).init(PARAMS))
  rbg = blrax.ivon(0.1, ess=100.0, key=jax.random.key(0, impl="rbg"))
  with pytest.raises(ValueError, match=r"noise_state\.key: saved shape \(2,\) "
                     r"dtype uint32, template has shape \(4,\) dtype uint32"):
    blrax.checkpoint.restore_checkpoint(tmp_path / "ckpt", PARAMS,
                                        rbg.init(PARAMS))


def test_linen_train_state_serializes():
  opt = blrax.ivon(0.1, ess=100.0, key=5)
  ts = blrax.flax.VariationalTrainState.create(apply_fn=None, params=PARAMS,
                                               tx=opt)
  ts = ts.apply_gradients(grads=jax.grad(loss)(ts.sample_params()))
  restored = flax.serialization.from_bytes(
      ts, flax.serialization.to_bytes(ts))
  assert_same(restored.opt_state, ts.opt_state)
  assert_same(restored.sample_params(), ts.sample_params())
