"""Checkpoints resume bitwise; diagnostics and export report the posterior."""

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import WIDE, ids

import blrax
import blrax.checkpoint


def loss(p):
  return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)


def make_step(name, opt, mc_samples=1):
  @jax.jit
  def step(params, state):
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(cases.grads(name, loss, theta, mc_samples),
                                state, params,
                                **cases.update_kwargs(name, loss))
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name,factory,kwargs", WIDE, ids=ids(WIDE))
def test_resumed_run_is_bitwise_identical(tmp_path, name, factory, kwargs):
  opt = optax.chain(optax.clip_by_global_norm(10.0), factory(**kwargs))
  step = make_step(name, opt, kwargs.get("mc_samples", 1))
  params0 = {"w": jnp.linspace(-1, 1, 6).reshape(2, 3), "b": jnp.ones(2)}
  params, state = params0, opt.init(params0)
  for _ in range(3):
    params, state = step(params, state)
  blrax.checkpoint.save_checkpoint(tmp_path / "ckpt", params, state)
  for _ in range(3):
    params, state = step(params, state)
  fresh = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}
  r_params, r_state = blrax.checkpoint.restore_checkpoint(
      tmp_path / "ckpt", fresh, opt.init(fresh))
  for _ in range(3):
    r_params, r_state = step(r_params, r_state)
  jax.tree.map(np.testing.assert_array_equal, r_params, params)
  (a,), (b,) = blrax.find_posteriors(r_state), blrax.find_posteriors(state)
  np.testing.assert_array_equal(a.key, b.key)
  jax.tree.map(np.testing.assert_array_equal, a.curvature, b.curvature)
  assert int(r_state[1][0].count) == int(state[1][0].count) == 6


def test_posterior_summary_and_export():
  opt = blrax.ivon(0.1, ess=4.0, hess_init=0.25, weight_decay=0.0)
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}
  state = opt.init(params)
  summary = blrax.posterior_summary(state)
  assert set(summary) == {"stddev/w", "stddev/b", "curvature/w", "curvature/b"}
  # sigma = 1/sqrt(4 * 0.25) = 1 at init
  np.testing.assert_allclose(summary["stddev/w"]["median"], 1.0)
  np.testing.assert_allclose(summary["curvature/b"]["max"], 0.25)
  exported = blrax.export_posterior(params, state)
  np.testing.assert_allclose(exported["stddev"]["w"], np.ones((2, 3)))
  assert exported["mean"] is params


def test_summary_of_full_covariance_and_partition():
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  opt = optax.partition({"x": blrax.von(0.1, ess=2.0, covariance="full",
                                        hess_init=2.0, weight_decay=0.0),
                         "y": blrax.ivon(0.1, ess=1.0)},
                        {"a": "x", "b": "y"})
  summary = blrax.posterior_summary(opt.init(params))
  np.testing.assert_allclose(summary["curvature/a"]["mean"], 2.0)
  np.testing.assert_allclose(summary["stddev/a"]["mean"], 0.5)
  assert "posterior1/stddev/b" in summary and "stddev/b" not in summary
