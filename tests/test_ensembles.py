"""Ensembles: independent weight noise per member (issue 23, friction 3)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

M = 3


def _params():
  return {"w": jax.random.normal(jax.random.key(7), (M, 4, 2)),
          "b": jnp.zeros((M, 2))}


def _member(tree, m):
  return jax.tree.map(lambda a: a[m], tree)


def _loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _data():
  x = jax.random.normal(jax.random.key(1), (6, 4))
  return x, jnp.ones((6, 2))


def _step(opt):
  def step(params, state, x, y):
    _, grads = blrax.value_and_grad(_loss)(params, state, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _first_draws(params, states):
  return jax.vmap(blrax.sample_params)(params, states)["w"]


def test_vmapped_init_shares_noise_and_warns():
  opt = blrax.ivon(0.1, ess=10.0, key=0)
  params = _params()
  with pytest.warns(UserWarning, match="ensemble_init") as record:
    states = jax.vmap(opt.init)(params)
  assert record[0].filename == __file__  # points at the user's line
  noise = _first_draws(params, states) - params["w"]
  np.testing.assert_allclose(noise[0] / np.std(noise[0]),
                             noise[1] / np.std(noise[1]), rtol=1e-5)


@pytest.mark.parametrize("factory", [
    lambda key: blrax.ivon(0.1, ess=10.0, key=key),
    lambda key: blrax.ivon(0.1, ess=10.0, mc_samples=2, key=key),
    lambda key: blrax.von(0.1, ess=10.0, key=key, covariance="full"),
    lambda key: blrax.evon(0.1, ess=10.0, key=key),
    lambda key: optax.chain(optax.clip(1.0),
                            blrax.ivon(0.1, ess=10.0, key=key, noise="hash")),
])
def test_ensemble_init_members_get_independent_noise(factory):
  opt, params = factory(0), _params()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the recipe does not warn
    states = blrax.ensemble_init(opt, params)
  draws = jax.vmap(blrax.sample_params)(params, states)
  noise = jax.tree.map(lambda d, p: d - p if d.ndim == p.ndim else
                       d - p[:, None], draws, params)["w"]
  for a in range(M):
    for b in range(a + 1, M):
      assert not np.allclose(noise[a], noise[b])
    # member m's state is fold_in_keys(init(params_m), m), exactly
    alone = blrax.fold_in_keys(opt.init(_member(params, a)), a)
    for x, y in zip(jax.tree.leaves(_member(states, a)), jax.tree.leaves(alone)):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x, y = jax.random.key_data(x), jax.random.key_data(y)
      np.testing.assert_array_equal(x, y)


def test_ensemble_members_equal_independent_runs():
  """The vmapped ensemble's members train exactly as separate optimizers
  built with key = fold_in(key, m)."""
  opt, params = blrax.ivon(0.05, ess=10.0, hess_init=1.0, key=4), _params()
  x, y = _data()
  step = jax.jit(jax.vmap(_step(opt), in_axes=(0, 0, None, None)))
  states = blrax.ensemble_init(opt, params)
  p = params
  for _ in range(3):
    p, states = step(p, states, x, y)
  for m in range(M):
    alone_opt = blrax.ivon(0.05, ess=10.0, hess_init=1.0,
                           key=jax.random.fold_in(jax.random.key(4), m))
    alone_step = jax.jit(_step(alone_opt))
    q = _member(params, m)
    s = alone_opt.init(q)
    for _ in range(3):
      q, s = alone_step(q, s, x, y)
    np.testing.assert_allclose(p["w"][m], q["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        blrax.posterior_stddev(_member(states, m))["w"],
        blrax.posterior_stddev(s)["w"], rtol=1e-5)


def test_factory_with_batched_keys_is_independent_and_silent():
  params = _params()
  keys = jax.random.split(jax.random.key(0), M)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    states = jax.vmap(
        lambda p, k: blrax.ivon(0.1, ess=10.0, key=k).init(p))(params, keys)
  noise = _first_draws(params, states) - params["w"]
  assert not np.allclose(noise[0], noise[1])


def test_plain_init_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    blrax.ivon(0.1, ess=10.0).init(_member(_params(), 0))
    jax.jit(blrax.ivon(0.1, ess=10.0).init)(_member(_params(), 0))


def test_fold_in_keys_refuses_bad_input():
  state = blrax.ivon(0.1, ess=10.0).init(jnp.zeros(2))
  with pytest.raises(ValueError, match="data=1.5"):
    blrax.fold_in_keys(state, 1.5)
  with pytest.raises(ValueError, match="data=-1"):
    blrax.fold_in_keys(state, -1)
  with pytest.raises(ValueError, match="data=8589934592"):  # 2**33 > 32 bits
    blrax.fold_in_keys(state, 2**33)
  blrax.fold_in_keys(state, 2**32 - 1)  # the largest
  with pytest.raises(ValueError, match="holds no PRNG key"):
    blrax.fold_in_keys(optax.adam(0.1).init(jnp.zeros(2)), 0)
  with pytest.raises(ValueError, match="leading axis"):
    blrax.ensemble_init(blrax.ivon(0.1, ess=10.0),
                        {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2,))})
