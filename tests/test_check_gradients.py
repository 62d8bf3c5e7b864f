"""The wrong loop made loud (issue 23, friction 1): blrax.check_gradients.

An optax loop swapped to a blrax optimizer without changing how it takes
gradients (at the mean) runs silently and gives a wrong posterior; the check,
called once on one batch, names the mistake and the fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax


def _problem():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = jnp.tanh(x @ jnp.array([1.0, -2.0, 0.5]))
  params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.zeros(())}
  return params, x, y


def _loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)


OPTIMIZERS = {
    "ivon": lambda s: blrax.ivon(0.1, ess=16.0, mc_samples=s, key=1),
    "ivon_tight": lambda s: blrax.ivon(0.1, ess=1e6, mc_samples=s, key=1),
    "von": lambda s: blrax.von(0.1, ess=16.0, mc_samples=s, key=1),
    "von_full": lambda s: blrax.von(0.1, ess=16.0, mc_samples=s, key=1,
                                    covariance="full"),
    "vadam": lambda s: blrax.vadam(0.1, ess=16.0, batch_size=16,
                                   mc_samples=s, key=1),
    "evon": lambda s: blrax.evon(0.1, ess=16.0, mc_samples=s, key=1),
    "chain": lambda s: optax.chain(optax.clip_by_global_norm(1.0),
                                   blrax.ivon(0.1, ess=16.0, mc_samples=s,
                                              key=1)),
}


@pytest.mark.parametrize("mc_samples", [1, 2])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_draw_passes_mean_is_refused(name, mc_samples):
  params, x, y = _problem()
  opt = OPTIMIZERS[name](mc_samples)
  state = opt.init(params)
  check = blrax.check_gradients(_loss)
  step = jax.jit(blrax.value_and_grad(_loss))  # the loop's jitted grads
  _, grads = step(params, state, x, y)
  check(grads, params, state, x, y)  # the right loop passes
  at_mean = jax.grad(_loss)(params, x, y)  # the unchanged optax loop
  if mc_samples > 1:
    at_mean = jax.tree.map(lambda g: jnp.stack([g] * mc_samples), at_mean)
  with pytest.raises(ValueError, match="taken at the mean.*value_and_grad"):
    check(at_mean, params, state, x, y)
  # and after some training steps, still
  for _ in range(3):
    _, grads = step(params, state, x, y)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  _, grads = step(params, state, x, y)
  check(grads, params, state, x, y)
  at_mean = jax.grad(_loss)(params, x, y)
  if mc_samples > 1:
    at_mean = jax.tree.map(lambda g: jnp.stack([g] * mc_samples), at_mean)
  with pytest.raises(ValueError, match="taken at the mean"):
    check(at_mean, params, state, x, y)


def test_by_hand_draw_passes():
  params, x, y = _problem()
  state = blrax.ivon(0.1, ess=16.0, key=3).init(params)
  grads = jax.grad(_loss)(blrax.sample_params(params, state), x, y)
  blrax.check_gradients(_loss)(grads, params, state, x, y)


def test_other_batch_is_neither():
  params, x, y = _problem()
  state = blrax.ivon(0.1, ess=16.0, key=1).init(params)
  _, grads = blrax.value_and_grad(_loss)(params, state, x[:8], y[:8])
  with pytest.raises(ValueError, match="neither"):
    blrax.check_gradients(_loss)(grads, params, state, x, y)


def test_has_aux_and_kwargs():
  params, x, y = _problem()
  state = blrax.ivon(0.1, ess=16.0, key=1).init(params)

  def loss(p, x, *, y):
    value = _loss(p, x, y)
    return value, {"loss": value}

  (_, _), grads = blrax.value_and_grad(loss, has_aux=True)(params, state, x, y=y)
  check = blrax.check_gradients(loss, has_aux=True)
  check(grads, params, state, x, y=y)
  with pytest.raises(ValueError, match="taken at the mean"):
    check(jax.grad(loss, has_aux=True)(params, x, y=y)[0], params, state, x, y=y)


def test_shape_mismatch_and_jit_are_refused():
  params, x, y = _problem()
  state = blrax.ivon(0.1, ess=16.0, mc_samples=2, key=1).init(params)
  check = blrax.check_gradients(_loss)
  with pytest.raises(ValueError, match="shaped like the gradient at the draw"):
    check(jax.grad(_loss)(params, x, y), params, state, x, y)
  state1 = blrax.ivon(0.1, ess=16.0, key=1).init(params)
  with pytest.raises(ValueError, match="outside `jit`"):
    jax.jit(lambda g, p, s: check(g, p, s, x, y))(params, params, state1)
  with pytest.raises(TypeError, match="loss_fn"):
    blrax.check_gradients(3)


def test_plain_optax_state_is_not_checked():
  params, x, y = _problem()
  state = optax.adamw(0.1).init(params)
  grads = jax.grad(_loss)(params, x, y)
  assert blrax.check_gradients(_loss)(grads, params, state, x, y) is None


def test_mean_gradients_really_give_a_wrong_posterior():
  """Why the check exists: the mean loop's stddev differs from the draw
  loop's (linear regression, where the draw loop is exact)."""
  x = jax.random.normal(jax.random.key(0), (64, 2))
  y = x @ jnp.array([1.0, -1.0]) + 0.1 * jax.random.normal(
      jax.random.key(1), (64,))
  loss = lambda w, x, y: 0.5 * jnp.mean((x @ w - y) ** 2)  # noqa: E731
  opt = blrax.ivon(0.05, ess=64.0, hess_init=1.0, b2=0.99, key=0)

  def run(at_draw):
    def step(carry, _):
      w, s = carry
      g = (blrax.value_and_grad(loss)(w, s, x, y)[1] if at_draw
           else jax.grad(loss)(w, x, y))
      u, s = opt.update(g, s, w)
      return (optax.apply_updates(w, u), s), None
    w = jnp.zeros(2)
    (w, s), _ = jax.lax.scan(step, (w, opt.init(w)), None, length=800)
    return blrax.posterior_stddev(s)

  right, wrong = run(True), run(False)
  assert not np.allclose(right, wrong, rtol=0.3)
