"""posterior_summary and export_posterior against NumPy statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax


def _trained(factory, **kwargs):
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
            "b": jnp.linspace(0.5, -0.5, 5)}
  opt = factory(0.05, ess=30.0, b2=0.5, **kwargs)
  loss = lambda p: sum(jnp.sum(jnp.cos(3 * x) * x**2) for x in jax.tree.leaves(p))

  def step(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss)(blrax.sample_params(p, s)), s, p)
    return (optax.apply_updates(p, updates), s), None

  return jax.lax.scan(step, (params, opt.init(params)), length=20)[0]


@pytest.mark.parametrize("factory", [blrax.ivon, blrax.von], ids=["ivon", "von"])
def test_posterior_summary_matches_numpy(factory):
  params, state = _trained(factory, hess_init=2.0, weight_decay=0.01)
  (posterior,) = blrax.find_posteriors(state)
  summary = blrax.posterior_summary(state)
  std = blrax.posterior_stddev(state)
  for name in ("w", "b"):
    h = np.asarray(posterior.curvature[name], np.float64)
    sigma = 1.0 / np.sqrt(30.0 * (h + 0.01))
    np.testing.assert_allclose(np.asarray(std[name]), sigma, rtol=1e-5)
    for kind, values in (("stddev", sigma), ("curvature", h)):
      stats = summary[f"{kind}/['{name}']"] if f"{kind}/['{name}']" in summary \
          else summary[f"{kind}/{name}"]
      want = {"min": values.min(), "median": np.median(values),
              "mean": values.mean(), "max": values.max()}
      assert np.ptp(values) > 0  # the statistics differ, so a swap would show
      for stat, value in want.items():
        np.testing.assert_allclose(float(stats[stat]), value, rtol=1e-5,
                                   err_msg=f"{kind}/{name}/{stat}")
  exported = blrax.export_posterior(params, state)
  for name in ("w", "b"):
    np.testing.assert_array_equal(exported["stddev"][name], std[name])
    np.testing.assert_array_equal(exported["mean"][name], params[name])


@pytest.mark.parametrize("state", [None, {}, {"w": jnp.ones(2)},
                                   optax.adam(0.1).init({"w": jnp.ones(2)})],
                         ids=["none", "empty", "params", "adam"])
def test_no_posterior_is_a_clear_error(state):
  for call in (blrax.posterior_summary,
               lambda s: blrax.export_posterior({"w": jnp.ones(2)}, s)):
    with pytest.raises(ValueError, match="holds no blrax posterior"):
      call(state)
