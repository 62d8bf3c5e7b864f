"""Optax's optimizer battery (contrib/_common_test.py, alias_test.py), ported.

Gradients are taken at ``blrax.sample_params``, as in the user's loop.
"""


import functools

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import OPTIMIZERS, ids
from optax._src import test_utils

import blrax


def parabola(dtype):
  start = jnp.array([-1.0, 10.0, 1.0], dtype)
  target = jnp.array([1.0, -1.0, 1.0], dtype)
  return start, target, lambda p: jnp.sum(jnp.square(p - target))


def rosenbrock(dtype):
  start = jnp.array([0.0, 0.0], dtype)
  target = jnp.array([1.0, 1.0], dtype)
  return start, target, lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def matrix_parabola(dtype):
  start = jnp.zeros((2, 2), dtype)
  target = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return start, target, lambda p: jnp.sum(jnp.square(p - target))


def mixed_target(dtype):
  t1 = jnp.array([1.0, -1.0, 2.0], dtype)
  t2 = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  start = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))

  def objective(p):
    return jnp.sum(jnp.square(p[0] - t1)) + jnp.sum(jnp.square(p[1] - t2))

  return start, (t1, t2), objective


def grad_at_sample(name, objective, params, state, mc_samples):
  theta = blrax.sample_params(params, state)
  return cases.grads(name, objective, theta, mc_samples)


def make_step(opt, name, objective, mc_samples, **update_kwargs):
  """A train step; the variant's own update arguments (bSAM's grad_fn) are
  added to ``update_kwargs``."""
  update_kwargs = {**cases.update_kwargs(name, objective), **update_kwargs}

  def step(params, state):
    grads = grad_at_sample(name, objective, params, state, mc_samples)
    updates, state = opt.update(grads, state, params, **update_kwargs)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.slow
@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize(
    "target", [parabola, rosenbrock, matrix_parabola, mixed_target],
    ids=lambda t: t.__name__)
def test_converges(name, factory, kwargs, target):
  steps = 30_000
  if cases.variant(name).fixed_step_length:  # whitened: anneal to converge
    kwargs = dict(kwargs, learning_rate=optax.linear_schedule(
        kwargs["learning_rate"], 0.0, steps))
  opt = factory(**kwargs)
  start, final, objective = target(jnp.float32)
  step = jax.jit(make_step(opt, name, objective, kwargs.get("mc_samples", 1)))
  state = opt.init(start)
  state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op must work
  (params, state), _ = jax.lax.scan(
      lambda c, _: (step(*c), None), (start, state), length=steps)
  test_utils.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_extra_args_and_no_recompilation(name, factory, kwargs):
  opt = factory(**kwargs)
  start, _, objective = rosenbrock(jnp.float32)
  step = jax.jit(make_step(opt, name, objective, kwargs.get("mc_samples", 1),
                           unexpected_extra_arg=1))
  params, state = step(start, opt.init(start))
  with test_utils.log_compilations() as logs:
    step(params, state)
  assert not logs, "update recompiled on the second call"


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_inject_hyperparams_is_identical(name, factory, kwargs):
  # inject_hyperparams casts floats to float32; 1 - b2 amplifies that rounding
  # (0.99999 -> 0.99998999: 1 - b2 moves by 0.14%), so use an exact b2.
  kwargs = dict(kwargs, b2=1.0 - 2.0**-16)
  opt = factory(**kwargs)
  injected = optax.inject_hyperparams(
      factory, static_args=cases.static_args(factory))(**kwargs)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  mc = kwargs.get("mc_samples", 1)
  lead = (mc,) if mc > 1 else ()
  grads = cases.lift(
      name, [jnp.ones(lead + (2, 3)), -jnp.ones(lead + (2, 5, 2))], mc)
  extra = cases.update_kwargs(name, cases.linear_loss(grads))
  state = jax.jit(opt.init)(params)
  updates, new_state = jax.jit(functools.partial(opt.update, **extra))(
      grads, state, params)
  state_i = jax.jit(injected.init)(params)
  updates_i, new_state_i = jax.jit(functools.partial(
      injected.update, **extra))(grads, state_i, params)
  test_utils.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  keyless = lambda s: jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, s)
  test_utils.assert_trees_all_close(
      keyless(new_state_i.inner_state), keyless(new_state), rtol=1e-5, atol=1e-5)
  # and the injected state still holds a findable posterior
  np.testing.assert_array_equal(
      blrax.sample_params(params, state_i)[0], blrax.sample_params(params, state)[0])


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserves_dtype(name, factory, kwargs, dtype):
  opt = factory(**kwargs)
  params = jnp.array([1.0, 2.0], dtype)
  mc = kwargs.get("mc_samples", 1)
  state = jax.jit(opt.init)(params)
  loss = lambda x: jnp.sum(x**2)  # noqa: E731
  grads = grad_at_sample(name, loss, params, state, mc)
  updates, _ = jax.jit(functools.partial(
      opt.update, **cases.update_kwargs(name, loss)))(grads, state, params)
  assert updates.dtype == params.dtype
  assert blrax.sample_params(params, state).dtype == params.dtype


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_multi_steps_first_call_is_zero(name, factory, kwargs, dtype):
  opt = optax.MultiSteps(factory(**kwargs), every_k_schedule=4)
  params = jnp.array([1.0, 2.0], dtype)
  state = jax.jit(opt.init)(params)
  mc = kwargs.get("mc_samples", 1)
  loss = lambda x: jnp.sum(x**2)  # noqa: E731
  grads = grad_at_sample(name, loss, params, state, mc)
  update = jax.jit(functools.partial(opt.update,
                                     **cases.update_kwargs(name, loss)))

  def check():
    updates, _ = update(grads, state, params)
    test_utils.assert_trees_all_equal(updates, jnp.zeros_like(params))

  # Where the table says optax.MultiSteps cannot hold the grads (a sample or
  # batch axis), the update must say so clearly.
  cases.check_cell(name, cases.OPTAX_MULTI_STEPS, check,
                   "`grads` leaf has shape")


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64],
    ids=["f16", "bf16", "f32", "f64"])
def test_state_type_stable_under_cond(name, factory, kwargs, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    opt = factory(**kwargs)
    start, _, objective = parabola(dtype)
    mc = kwargs.get("mc_samples", 1)

    extra = cases.update_kwargs(name, objective)

    @jax.jit
    def step(params, state):
      grads = grad_at_sample(name, objective, params, state, mc)
      take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          take, lambda: opt.update(grads, state, params, **extra),
          lambda: (jax.tree.map(jnp.zeros_like, params), state))
      return optax.apply_updates(params, updates), state

    params, state = start, opt.init(start)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == dtype
      take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      state = jax.lax.cond(take, lambda s=state: s, lambda s=new_state: s)


@pytest.mark.parametrize("name,factory,kwargs", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_constant_schedule_equals_float(name, factory, kwargs):
  start, _, objective = parabola(jnp.float32)
  mc = kwargs.get("mc_samples", 1)
  runs = []
  for lr in (1e-3, optax.constant_schedule(1e-3)):
    opt = factory(**dict(kwargs, learning_rate=lr))
    step = jax.jit(make_step(opt, name, objective, mc))
    params, state = start, opt.init(start)
    for _ in range(10):
      params, state = step(params, state)
    runs.append(params)
  test_utils.assert_trees_all_close(runs[0], runs[1])


