"""The posterior is found by type wherever optax wrappers put it.

Oracle: a bare optimizer with the same key draws the same noise, so the draw
through any wrapper must equal the bare draw bit for bit (on the leaves the
posterior covers), and masked leaves must come back untouched.
"""

import functools

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import WIDE, ids

import blrax

PARAMS = {"a": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.array([0.5, -1.0])}


def loss(p):
  return jnp.sum(jnp.sin(p["a"])) + jnp.sum(p["b"] ** 2)


def bare_draw(factory, kwargs, params):
  opt = factory(**kwargs)
  return blrax.sample_params(params, opt.init(params))


def assert_same(x, y):
  jax.tree.map(np.testing.assert_array_equal, x, y)


def mc(kwargs):
  return kwargs.get("mc_samples", 1)


# name: (wrapper, the table's feature for it, what its refusal names).
WRAPPERS = {
    "chain_clip": (lambda o: optax.chain(optax.clip_by_global_norm(1.0), o),
                   None, ""),
    "named_chain": (lambda o: optax.named_chain(
        ("clip", optax.clip_by_global_norm(1.0)), ("blr", o)), None, ""),
    "multi_steps": (lambda o: optax.MultiSteps(o, every_k_schedule=2),
                    cases.OPTAX_MULTI_STEPS, "`grads` leaf has shape"),
    "apply_if_finite": (lambda o: optax.apply_if_finite(o, 3),
                        cases.OPTAX_APPLY_IF_FINITE, ""),
}


@pytest.mark.parametrize("wrapper", WRAPPERS.values(), ids=WRAPPERS.keys())
@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_wrapped_draw_equals_bare_draw(wrapper, name, factory, kwargs):
  wrap, feature, refusal = wrapper
  opt = wrap(factory(**kwargs))
  state = opt.init(PARAMS)
  assert_same(blrax.sample_params(PARAMS, state),
              bare_draw(factory, kwargs, PARAMS))
  assert_same(blrax.posterior_stddev(state),
              blrax.posterior_stddev(factory(**kwargs).init(PARAMS)))

  def trains():  # the draw moves with the state
    theta = blrax.sample_params(PARAMS, state)
    updates, new = opt.update(cases.grads(name, loss, theta, mc(kwargs)),
                              state, PARAMS, **cases.update_kwargs(name, loss))
    params = optax.apply_updates(PARAMS, updates)
    assert jax.tree.all(jax.tree.map(
        lambda x: bool(jnp.all(jnp.isfinite(x))),
        blrax.sample_params(params, new)))

  if feature is None:
    trains()
  else:  # optax's wrappers need params-shaped grads; see README, Caveats
    cases.check_cell(name, feature, trains, refusal)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_inject_hyperparams(name, factory, kwargs):
  opt = optax.inject_hyperparams(factory, static_args=("mc_samples",))(**kwargs)
  state = opt.init(PARAMS)
  assert_same(blrax.sample_params(PARAMS, state),
              bare_draw(factory, kwargs, PARAMS))


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_multi_steps_shares_noise_within_accumulation(name, factory, kwargs):
  opt = optax.MultiSteps(factory(**kwargs), every_k_schedule=2)

  @jax.jit
  def step(params, state):
    theta = blrax.sample_params(params, state)
    grads = cases.grads(name, loss, theta, mc(kwargs))
    updates, state = opt.update(grads, state, params,
                                **cases.update_kwargs(name, loss))
    return optax.apply_updates(params, updates), state, theta

  def shares():
    state = opt.init(PARAMS)
    params = PARAMS
    draws = []
    for _ in range(4):
      params, state, theta = step(params, state)
      draws.append(theta)
    offset = lambda d, p: jax.tree.map(jnp.subtract, d, p)  # noqa: E731
    assert_same(offset(draws[0], PARAMS), offset(draws[1], PARAMS))
    assert not np.allclose(draws[1]["a"], draws[2]["a"])

  # optax.MultiSteps accumulates params-shaped grads only.
  cases.check_cell(name, cases.OPTAX_MULTI_STEPS, shares,
                   "`grads` leaf has shape")


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_apply_if_finite_rejects_nan_and_continues(name, factory, kwargs):
  # optax's reject branch returns zeros shaped like the grads: where they
  # have a sample or batch axis the table says it is unsupported.
  cases.check_cell(name, cases.OPTAX_APPLY_IF_FINITE,
                   lambda: rejects_nan_and_continues(name, factory, kwargs))


def rejects_nan_and_continues(name, factory, kwargs):
  opt = optax.apply_if_finite(factory(**kwargs), 3)
  state = opt.init(PARAMS)
  step = jax.jit(functools.partial(opt.update,
                                   **cases.update_kwargs(name, loss)))
  lead = (mc(kwargs),) if mc(kwargs) > 1 else ()
  nan_grads = cases.lift(name, jax.tree.map(
      lambda p: jnp.full(lead + p.shape, jnp.nan), PARAMS), mc(kwargs))
  updates, bad_state = step(nan_grads, state, PARAMS)
  assert int(bad_state.notfinite_count) == 1
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      jax.random.key_data(x) if jax.dtypes.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x,
      jax.random.key_data(y) if jax.dtypes.issubdtype(
          y.dtype, jax.dtypes.prng_key) else y),
      bad_state.inner_state, state.inner_state)
  assert_same(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  # Two finite steps (EVON's first call only starts its bases): they move.
  total, good_state = 0.0, bad_state
  for _ in range(2):
    theta = blrax.sample_params(PARAMS, good_state)
    updates, good_state = step(cases.grads(name, loss, theta, mc(kwargs)),
                               good_state, PARAMS)
    assert int(good_state.notfinite_count) == 0
    total = total + updates["a"]
  assert not np.allclose(total, 0.0)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_masked_params_get_no_noise(name, factory, kwargs):
  mask = {"a": True, "b": False}
  # mask_compatible_extra_args: bSAM's adversarial_grads are masked too.
  opt = optax.masked(factory(**kwargs), mask, mask_compatible_extra_args=True)
  state = opt.init(PARAMS)
  theta = blrax.sample_params(PARAMS, state)
  lead = (mc(kwargs),) if mc(kwargs) > 1 else ()
  np.testing.assert_array_equal(theta["b"],
                                np.broadcast_to(PARAMS["b"], lead + (2,)))
  np.testing.assert_array_equal(
      theta["a"], bare_draw(factory, kwargs, {"a": PARAMS["a"]})["a"])
  std = blrax.posterior_stddev(state, PARAMS)
  np.testing.assert_array_equal(std["b"], np.zeros(2))
  assert std["a"].shape == (2, 3) and np.all(std["a"] > 0)
  samples = blrax.sample_posterior(jax.random.key(1), PARAMS, state, 5)
  np.testing.assert_array_equal(samples["b"], np.broadcast_to(PARAMS["b"], (5, 2)))
  assert samples["a"].shape == (5, 2, 3)
  grads = cases.grads(name, loss, theta, mc(kwargs))
  updates, state = opt.update(grads, state, PARAMS, **cases.update_kwargs(
      name, loss, PARAMS, state, grads))
  assert updates["a"].shape == (2, 3)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_partition_two_posteriors_and_a_frozen_part(name, factory, kwargs):
  params = dict(PARAMS, c=jnp.ones(4))
  labels = {"a": "first", "b": "second", "c": "frozen"}
  opt = optax.partition(
      {"first": factory(**dict(kwargs, key=1)),
       "second": factory(**dict(kwargs, key=2)),
       "frozen": optax.set_to_zero()}, labels,
      mask_compatible_extra_args=True)
  state = opt.init(params)
  theta = blrax.sample_params(params, state)
  np.testing.assert_array_equal(
      theta["a"], bare_draw(factory, dict(kwargs, key=1), {"a": params["a"]})["a"])
  np.testing.assert_array_equal(
      theta["b"], bare_draw(factory, dict(kwargs, key=2), {"b": params["b"]})["b"])
  lead = (mc(kwargs),) if mc(kwargs) > 1 else ()
  np.testing.assert_array_equal(theta["c"],
                                np.broadcast_to(params["c"], lead + (4,)))
  assert len(blrax.find_posteriors(state)) == 2
  full_loss = lambda p: loss(p) + jnp.sum(p["c"] ** 2)  # noqa: E731
  grads = cases.grads(name, full_loss, theta, mc(kwargs))
  updates, state = opt.update(grads, state, params, **cases.update_kwargs(
      name, full_loss, params, state, grads))
  assert not np.any(updates["c"])


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_mc_samples_leading_axis(name, factory, kwargs):
  opt = factory(**dict(kwargs, mc_samples=3))
  state = opt.init(PARAMS)
  theta = blrax.sample_params(PARAMS, state)
  assert theta["a"].shape == (3, 2, 3) and theta["b"].shape == (3, 2)
  assert not np.allclose(theta["a"][0], theta["a"][1])
  extra = cases.update_kwargs(name, loss)
  updates, state = opt.update(cases.grads(name, loss, theta, 3), state, PARAMS,
                              **extra)
  assert updates["a"].shape == (2, 3)
  with pytest.raises(ValueError, match="grads"):
    opt.update(cases.grads(name, loss, PARAMS), state, PARAMS, **extra)


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_nnx_optimizer_state(name, factory, kwargs):
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, factory(**kwargs), wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  theta = blrax.sample_params(params, optimizer.opt_state)
  assert_same(theta, bare_draw(factory, kwargs, params))
  std = blrax.posterior_stddev(optimizer.opt_state)
  assert jax.tree.structure(std) == jax.tree.structure(params)
