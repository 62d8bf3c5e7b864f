"""Flax NNX and Linen helpers: train a Flax model with a blrax optimizer.

NNX: :func:`nnx_value_and_grad` takes the gradient at a posterior draw of the
model's params and leaves the user's loop otherwise unchanged::

    optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=n), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = blrax.nnx_value_and_grad(loss_fn, model, optimizer, x, y)
      optimizer.update(model, grads)   # updates the mean
      return loss

Linen: :class:`VariationalTrainState` is a ``TrainState`` whose
``apply_gradients`` forwards ``hessian=`` to the optimizer (Linen's treats
extra keywords as field replacements) and which can draw its own sample.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from flax.training import train_state

from blrax._src import lookup


def nnx_sample(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.Module:
  """A clone of ``model`` whose trained params are the draw the update expects.

  The clone is independent (no aliasing): running it never writes the draw
  into ``model``. Params outside ``optimizer.wrt`` are copied unchanged.
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  theta = lookup.sample_params(params, optimizer.opt_state)
  sample = nnx.clone(model)
  nnx.update(sample, theta)
  return sample


def nnx_value_and_grad(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
):
  """``nnx.value_and_grad(loss_fn)`` evaluated at a posterior draw.

  Gradients are taken on a clone of ``model`` holding the draw (so they keep
  their ``nnx.Param`` wrappers and ``optimizer.update(model, grads)`` accepts
  them). Non-param state that the forward pass changes (batch-norm
  statistics, counters, RNG state) is copied back into ``model``, as a plain
  training step would leave it.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)``, the mean loss of a batch.
    model: the model; its params are the posterior mean.
    optimizer: an ``nnx.Optimizer`` holding a blrax optimizer (possibly
      wrapped). Needs ``mc_samples=1``.
    *args: passed to ``loss_fn``.
    has_aux: as in ``nnx.value_and_grad``.
    **kwargs: passed to ``loss_fn``.

  Returns:
    ``(value, grads)`` as ``nnx.value_and_grad`` returns them.
  """
  sample = nnx_sample(model, optimizer)
  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt),
                               has_aux=has_aux)
  value, grads = grad_fn(sample, *args, **kwargs)
  nnx.update(model, nnx.state(sample, nnx.Not(optimizer.wrt)))
  return value, grads


class VariationalTrainState(train_state.TrainState):
  """A Linen ``TrainState`` for blrax optimizers.

  ``state.sample_params()`` is the draw to take gradients at;
  ``state.apply_gradients(grads=..., hessian=...)`` updates the mean and
  forwards ``hessian`` (and any ``update_kwargs``) to the optimizer.
  """

  def sample_params(self) -> Any:
    return lookup.sample_params(self.params, self.opt_state)

  def apply_gradients(self, *, grads: Any, hessian: Any = None,
                      update_kwargs: dict | None = None, **kwargs: Any):
    extra = dict(update_kwargs or {})
    if hessian is not None:
      extra["hessian"] = hessian
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **extra)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), self.params,
                          updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        **kwargs)
