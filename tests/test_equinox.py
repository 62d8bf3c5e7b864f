"""Equinox as a first-class path: an ``eqx.Module`` with non-array fields.

The recipe (README, "Equinox"): ``params, static = eqx.partition(model,
eqx.is_inexact_array)``, ``opt.init(params)``, ``eqx.combine(theta, static)``
in the loss at the draw. It must give the same trajectory as the same network
written as a plain pytree of arrays; a missed step gets a short error that
says what to do.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax

eqx = pytest.importorskip("equinox")


class MLP(eqx.Module):
  layers: list
  activation: Callable
  name: str

  def __init__(self, key, sizes=(4, 6, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    self.layers = [eqx.nn.Linear(a, b, key=k)
                   for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
    self.activation = jax.nn.tanh
    self.name = "mlp"

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = self.activation(layer(x))
    return self.layers[-1](x)


def _pure_apply(params, x):
  """The same network on a list of (weight, bias) pairs (Equinox's order)."""
  for w, b in params[:-1]:
    x = jnp.tanh(x @ w.T + b)
  w, b = params[-1]
  return x @ w.T + b


def _data():
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jnp.arange(8) % 3
  return x, y


def _train(opt, params, loss_fn, steps=4):
  x, y = _data()
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = blrax.value_and_grad(loss_fn)(params, state, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(loss)
  return params, state, jnp.stack(losses)


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_equinox_module_trains_like_the_plain_pytree(mc_samples):
  model = MLP(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def eqx_loss(theta, x, y):
    logits = jax.vmap(eqx.combine(theta, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def pure_loss(theta, x, y):
    logits = _pure_apply(theta, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  pure = [(layer.weight, layer.bias) for layer in model.layers]
  opt = blrax.ivon(0.05, ess=100.0, hess_init=1.0, mc_samples=mc_samples,
                   key=3)
  eqx_params, eqx_state, eqx_losses = _train(opt, params, eqx_loss)
  pure_params, pure_state, pure_losses = _train(opt, pure, pure_loss)

  np.testing.assert_allclose(eqx_losses, pure_losses, rtol=1e-5, atol=1e-6)
  for layer, (w, b) in zip(eqx_params.layers, pure_params):
    np.testing.assert_allclose(layer.weight, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias, b, rtol=1e-5, atol=1e-6)
  for layer, (sw, sb) in zip(blrax.posterior_stddev(eqx_state).layers,
                             blrax.posterior_stddev(pure_state)):
    np.testing.assert_allclose(layer.weight, sw, rtol=1e-5)
    np.testing.assert_allclose(layer.bias, sb, rtol=1e-5)
  assert not np.allclose(eqx_losses[0], eqx_losses[-1])  # it did train
  # The non-array fields survive: the trained mean is the module again.
  trained = eqx.combine(eqx_params, static)
  assert trained.name == "mlp" and trained.activation is jax.nn.tanh
  # Posterior draws come back as modules' arrays, usable with combine.
  draws = blrax.sample_posterior(jax.random.key(5), eqx_params, eqx_state, 2)
  assert draws.layers[0].weight.shape == (2, 6, 4)


def test_equinox_predictive_on_the_partitioned_params():
  model = MLP(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  state = blrax.ivon(0.1, ess=10.0, key=0).init(params)
  x, _ = _data()
  probs = blrax.predictive.predictive_probs(
      lambda p, xb: jax.vmap(eqx.combine(p, static))(xb), jax.random.key(1),
      params, state, x, num_samples=3)
  assert probs.shape == (8, 3)
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-5)


def _short_and_helpful(error):
  text = str(error)
  assert "eqx.partition(model, eqx.is_inexact_array)" in text, text
  assert "eqx.combine" in text, text
  assert "PyTreeDef" not in text and len(text) < 600, text


def test_init_with_the_whole_module_says_partition():
  model = MLP(jax.random.key(0))
  with pytest.raises(TypeError) as error:
    blrax.ivon(0.1, ess=10.0).init(model)
  _short_and_helpful(error.value)
  assert "at .activation" in str(error.value)


def test_update_and_draw_with_the_whole_module_say_partition():
  model = MLP(jax.random.key(0))
  params, _ = eqx.partition(model, eqx.is_inexact_array)
  opt = blrax.ivon(0.1, ess=10.0)
  state = opt.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError) as error:  # the module as params in update
    opt.update(grads, state, model)
  _short_and_helpful(error.value)
  with pytest.raises(ValueError) as error:  # the module at the draw
    blrax.sample_params(model, state)
  _short_and_helpful(error.value)


class _Tagged(eqx.Module):
  weight: jax.Array
  tag: str = eqx.field(static=True)


def test_static_field_mismatch_is_short():
  """Same leaf paths, different static data: no two full PyTreeDefs."""
  big = {f"layer_{i}": _Tagged(jnp.ones(2), "a" * 40) for i in range(12)}
  other = {k: _Tagged(v.weight, "b" * 40) for k, v in big.items()}
  opt = blrax.ivon(0.1, ess=10.0)
  state = opt.init(big)
  with pytest.raises(ValueError) as error:
    opt.update(jax.tree.map(jnp.zeros_like, big), state, other)
  text = str(error.value)
  assert "static fields" in text and len(text) < 600, text
