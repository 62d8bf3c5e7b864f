"""NNX and Linen helpers give the numbers of the plain functional loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blrax
import blrax.flax

X = jax.random.normal(jax.random.key(0), (16, 4))
Y = jax.random.randint(jax.random.key(1), (16,), 0, 3)


class MLP(nnx.Module):

  def __init__(self, rngs, batch_norm=False):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs) if batch_norm else None
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.hidden(x)
    if self.norm is not None:
      h = self.norm(h)
    return self.out(jax.nn.relu(h))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_loop_equals_functional_loop():
  opt = blrax.ivon(0.1, ess=100.0, hess_init=0.5, key=3)
  model = MLP(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)

  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    loss, grads = blrax.flax.nnx_value_and_grad(nnx_loss, model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss

  # Plain functional loop on the same params, key and optimizer.
  apply = lambda p, x: nnx.merge(graphdef, p)(x)

  @jax.jit
  def functional_step(params, state, x, y):
    theta = blrax.sample_params(params, state)
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(theta)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params, state = params0, opt.init(params0)
  for _ in range(5):
    nnx_loss_value = nnx_step(model, optimizer, X, Y)
    params, state, loss = functional_step(params, state, X, Y)
    np.testing.assert_allclose(nnx_loss_value, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               nnx.as_pure(nnx.state(model, nnx.Param)), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               blrax.posterior_stddev(optimizer.opt_state),
               blrax.posterior_stddev(state))


def test_nnx_batch_norm_statistics_and_no_aliasing():
  model = MLP(nnx.Rngs(0), batch_norm=True)
  optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0), wrt=nnx.Param)
  mean_before = nnx.as_pure(nnx.state(model, nnx.Param))
  loss, grads = blrax.flax.nnx_value_and_grad(nnx_loss, model, optimizer, X, Y)
  # the draw never leaks into the model's params
  jax.tree.map(np.testing.assert_array_equal,
               nnx.as_pure(nnx.state(model, nnx.Param)), mean_before)
  # batch statistics moved as in a plain training step: momentum 0.99 of
  # zeros plus 0.01 of the batch mean of the sampled hidden layer
  sample = blrax.flax.nnx_sample(model, optimizer)  # same draw (state unchanged)
  hidden = sample.hidden(X)
  np.testing.assert_allclose(model.norm.mean[...], 0.01 * hidden.mean(0),
                             rtol=1e-5, atol=1e-7)
  optimizer.update(model, grads)  # grads keep their nnx.Param wrappers


def test_linen_train_state_equals_functional_loop():

  class LinenMLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(jax.nn.relu(nn.Dense(8)(x)))

  module = LinenMLP()
  params = module.init(jax.random.key(0), X)["params"]
  opt = blrax.ivon(0.1, ess=100.0, key=5)
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      module.apply({"params": p}, X), Y).mean()
  ts = blrax.flax.VariationalTrainState.create(apply_fn=module.apply,
                                               params=params, tx=opt)
  state = opt.init(params)

  @jax.jit
  def train_state_step(ts):
    return ts.apply_gradients(grads=jax.grad(loss_fn)(ts.sample_params()))

  @jax.jit
  def functional_step(params, state):
    theta = blrax.sample_params(params, state)
    updates, state = opt.update(jax.grad(loss_fn)(theta), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(4):
    ts = train_state_step(ts)
    params, state = functional_step(params, state)
  assert int(ts.step) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ts.params, params)


def test_linen_train_state_forwards_hessian():
  opt = blrax.ivon(1.0, ess=float("inf"), b2=0.0, b1=0.0, weight_decay=0.0,
                   hess_init=1.0, rescale_lr=False)
  ts = blrax.flax.VariationalTrainState.create(apply_fn=None,
                                               params=jnp.array([2.0]), tx=opt)
  # loss = 2 t^2: Newton with b2 = 0 jumps to 0... up to IVON's correction:
  # h = hhat + (h0 - hhat)^2 / 2 / h0 = 4 + 4.5 = 8.5, step = 8 / 8.5.
  ts = ts.apply_gradients(grads=jnp.array([8.0]), hessian=jnp.array([4.0]))
  np.testing.assert_allclose(ts.params, 2.0 - 8.0 / 8.5, rtol=1e-6)
