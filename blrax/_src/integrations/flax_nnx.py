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

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx
from flax.training import train_state

from blrax._src.functions import gradients, lookup, squared_grads


def nnx_sample(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.Module:
  """A clone of ``model`` whose trained params are the draw the update expects.

  The clone is independent (no aliasing): running it never writes the draw
  into ``model``. Params outside ``optimizer.wrt`` are copied unchanged.

  Args:
    model: the model; its params are the posterior mean.
    optimizer: an ``nnx.Optimizer`` holding a blrax optimizer with
      ``mc_samples=1`` (for several draws use :func:`nnx_value_and_grad`).

  Returns:
    A new ``nnx.Module`` like ``model`` holding the draw.

  Raises:
    ValueError: if the optimizer draws ``mc_samples > 1`` samples per step.

  Examples:
    >>> import blrax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=8.0),
    ...                           wrt=nnx.Param)
    >>> sample = blrax.flax.nnx_sample(model, optimizer)
    >>> bool((sample.kernel[...] != model.kernel[...]).all())
    True
  """
  draws = gradients.num_draws(optimizer.opt_state)
  if draws != 1:
    raise ValueError(
        f"nnx_sample makes one model, but the optimizer draws mc_samples={draws}"
        " samples per step; use blrax.flax.nnx_value_and_grad, which vmaps "
        "over them.")
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  theta = lookup.sample_params(params, optimizer.opt_state)
  sample = nnx.clone(model)
  nnx.update(sample, theta)
  return sample


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _with_values(variables: Any, values: Any) -> Any:
  """``variables`` (a state of ``nnx.Variable``) holding ``values`` (a pure
  tree with the same leaves, possibly with a leading sample axis)."""
  return jax.tree.unflatten(jax.tree.structure(variables), jax.tree.leaves(values))


def _collapse_draws(rest: Any) -> Any:
  """Non-param state left by ``S`` vmapped forward passes, back to one copy:
  float state (batch-norm statistics) averaged over the draws, the rest
  (counters, RNG keys, identical in every draw) from the first."""

  def one(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.mean(x, axis=0).astype(x.dtype)
    return x[0]

  return jax.tree.map(one, rest)


def nnx_value_and_grad(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
):
  r"""``nnx.value_and_grad(loss_fn)`` evaluated at the optimizer's draw(s).

  The model's trained params (``optimizer.wrt``) are the posterior mean. This
  draws :math:`\theta_s = m + \sigma\epsilon_s` with
  :func:`blrax.sample_params` (the draws the next update expects), runs
  ``loss_fn`` on the model holding each draw, and returns gradients that keep
  their ``nnx.Param`` wrappers, so ``optimizer.update(model, grads)`` accepts
  them. With ``mc_samples = S > 1`` the draws run under ``jax.vmap`` (a
  sample axis over the split model): the value is the mean over draws and
  every gradient leaf has a leading axis ``S``, as ``update`` expects.

  Non-param state that the forward pass changes (batch-norm statistics,
  counters, RNG state) is written back into ``model``, as a plain training
  step would leave it; with ``S > 1`` float state is averaged over the draws
  and counters/RNG state come from the first (the draws share one dropout
  mask, since they share the model's RNG state). ``model`` itself is never
  changed by the draw: its params stay the mean.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)``, the mean loss of a batch
      (``(loss, aux)`` with ``has_aux``).
    model: the model; its params are the posterior mean.
    optimizer: an ``nnx.Optimizer`` holding a blrax optimizer (possibly
      wrapped in optax transformations), or its ``opt_state`` (then the
      trained variables are ``nnx.Param``).
    *args: passed to ``loss_fn``.
    has_aux: as in ``nnx.value_and_grad``; with ``S > 1`` the aux outputs are
      stacked along a leading axis ``S``.
    **kwargs: passed to ``loss_fn``.

  Returns:
    ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``), as
    ``nnx.value_and_grad`` returns them.

  Raises:
    ValueError: ``has_aux=True`` and ``loss_fn`` returns no ``(loss, aux)``
      pair; a state without a blrax posterior.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, blrax.ivon(0.1, ess=8.0, mc_samples=2), wrt=nnx.Param)
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss, grads = blrax.flax.nnx_value_and_grad(
    ...     loss_fn, model, optimizer, jnp.ones((8, 3)))
    >>> grads["kernel"].shape  # one gradient per draw
    (2, 3, 1)
    >>> _ = optimizer.update(model, grads)
  """
  wrt, opt_state = _unwrap_optimizer(optimizer)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  # Pure arrays: Variables of the caller's trace cannot be mutated inside ours.
  rest = nnx.as_pure(rest)
  theta = lookup.sample_params(nnx.as_pure(params), opt_state)
  draws = gradients.num_draws(opt_state)

  def loss_at(draw_params, rest):
    sample = nnx.merge(graphdef, draw_params, rest)
    out = loss_fn(sample, *args, **kwargs)
    new_rest = nnx.state(sample, nnx.Not(wrt))
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          "`has_aux=True` needs loss_fn to return a pair (loss, aux), got "
          f"{type(out).__name__} of shape {jnp.shape(out)}: return "
          "(loss, aux), or pass has_aux=False for a loss alone.")
    value, aux = out if has_aux else (out, None)
    return value, (aux, new_rest)

  grad_fn = jax.value_and_grad(loss_at, has_aux=True)
  if draws == 1:
    (value, (aux, new_rest)), grads = grad_fn(_with_values(params, theta), rest)
  else:
    (value, (aux, new_rest)), grads = jax.vmap(grad_fn, in_axes=(0, None))(
        _with_values(params, theta), rest)
    value, new_rest = jnp.mean(value, axis=0), _collapse_draws(new_rest)
  nnx.update(model, new_rest)
  return ((value, aux) if has_aux else value), grads


def nnx_value_grads_and_squares(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    *batch: Any,
    reduction: str = "mean",
):
  r"""VOGN's inputs for an NNX model, at the optimizer's draw(s), in one pass.

  :func:`blrax.value_grads_and_squares` for an NNX model: draws
  :math:`\theta = m + \sigma\epsilon` as :func:`nnx_value_and_grad` does and
  returns the loss, the mean gradient :math:`\bar g` and the mean squared
  per-example gradient :math:`\hat h = \mathrm{mean}_i\, g_i^2` at the draw,
  for ``optimizer.update(model, grads, hessian=squares)``. ``nnx.Linear``
  and ``nnx.Conv`` kernels and biases (and any param
  entering one dense, convolution, broadcast or elementwise op with an
  activation) need no per-example gradients; other params (embeddings,
  tied weights) get theirs from a ``jax.vmap`` over the examples. The model
  must treat examples independently: no batch statistics (batch norm), and
  no dropout, whose masks the per-example fallback cannot reproduce.

  With ``mc_samples = S > 1`` the draws run under ``jax.vmap``: the value is
  the mean over draws, ``grads`` and ``squares`` have a leading axis ``S``.
  Non-param state the forward pass changes is written back into ``model``
  as :func:`nnx_value_and_grad` does.

  Args:
    loss_fn: ``loss_fn(model, *batch)``, the mean (or sum) of the examples'
      losses.
    model: the model; its params are the posterior mean.
    optimizer: an ``nnx.Optimizer`` holding a blrax optimizer, or its
      ``opt_state`` (then the trained variables are ``nnx.Param``).
    *batch: arrays whose leading axis is the batch.
    reduction: ``"mean"`` if ``loss_fn`` averages over the batch, ``"sum"``
      if it sums.

  Returns:
    ``(value, grads, squares)``; ``grads`` and ``squares`` are states of
    ``nnx.Param`` like ``nnx.grad``'s.

  Raises:
    ValueError: as :func:`blrax.value_grads_and_squares`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, blrax.vogn(0.1, ess=8.0),
    ...                           wrt=nnx.Param)
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss, grads, squares = blrax.flax.nnx_value_grads_and_squares(
    ...     loss_fn, model, optimizer, jnp.ones((8, 3)))
    >>> squares["kernel"].shape
    (3, 1)
    >>> _ = optimizer.update(model, grads, hessian=squares)
  """
  wrt, opt_state = _unwrap_optimizer(optimizer)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)
  theta = lookup.sample_params(nnx.as_pure(params), opt_state)

  def loss_at(draw_params, rest, *examples):
    sample = nnx.merge(graphdef, draw_params, rest)
    value = loss_fn(sample, *examples)
    return value, nnx.as_pure(nnx.state(sample, nnx.Not(wrt)))

  def at(draw):
    return squared_grads.value_grads_squares_aux(
        loss_at, _with_values(params, draw), rest, batch, reduction)

  if gradients.num_draws(opt_state) == 1:
    value, new_rest, grads, squares = at(theta)
  else:
    value, new_rest, grads, squares = jax.vmap(at)(theta)
    value, new_rest = jnp.mean(value, axis=0), _collapse_draws(new_rest)
  nnx.update(model, new_rest)
  return value, grads, squares


def _unwrap_optimizer(opt_state: Any) -> tuple[Any, Any]:
  """(the trained-variable filter, the optax state) of an optimizer input."""
  if isinstance(opt_state, nnx.Optimizer):
    return opt_state.wrt, opt_state.opt_state
  return nnx.Param, opt_state


def _is_variable_state(x: Any) -> bool:
  return isinstance(x, nnx.State) and any(
      _is_variable(v) for v in jax.tree.leaves(x, is_leaf=_is_variable))


def trained_arrays(params: Any, opt_state: Any) -> tuple[Any, Any]:
  """(pure arrays of the trained variables, the optax state) for an NNX
  model or its state with its ``nnx.Optimizer``; other inputs unchanged."""
  wrt, opt_state = _unwrap_optimizer(opt_state)
  if isinstance(params, nnx.Module):
    return nnx.as_pure(nnx.state(params, wrt)), opt_state
  if _is_variable_state(params):
    return nnx.as_pure(nnx.filter_state(params, wrt)), opt_state
  return params, opt_state


def _eval_hint(apply: Callable[..., Any]) -> Callable[..., Any]:
  """``apply``, re-raising Flax's trace-level error with what to do."""

  @functools.wraps(apply)
  def wrapped(pure, inputs):
    try:
      return apply(pure, inputs)
    except flax_errors.TraceContextError as error:
      raise ValueError(
          "the model changed its own state while predicting (BatchNorm or "
          "Dropout in train mode), which the posterior draws cannot do: call "
          "model.eval() before predicting (and model.train() before training "
          f"again). Flax said: {error}") from error

  return wrapped


def functional(apply_fn: Callable[..., Any] | None, params: Any,
               opt_state: Any) -> tuple[Callable[[Any, Any], Any], Any, Any]:
  """``(apply_fn(params, inputs), params, opt_state)`` for an NNX model.

  ``params`` may be an ``nnx.Module`` (called as ``apply_fn(model, inputs)``,
  or ``model(inputs)`` when ``apply_fn`` is None) or an ``nnx.State`` of the
  whole model (``apply_fn(state, inputs)``, batch statistics included);
  ``opt_state`` may be the ``nnx.Optimizer``. The returned params are the
  pure arrays of the trained variables (``optimizer.wrt``, else
  ``nnx.Param``); everything else is held fixed at its current value (so put
  BatchNorm/Dropout in eval mode first with ``model.eval()``). Other inputs
  come back unchanged.
  """
  wrt, opt_state = _unwrap_optimizer(opt_state)
  if isinstance(params, nnx.Module):
    graphdef, trained, rest = nnx.split(params, wrt, ...)
    call = apply_fn if apply_fn is not None else (lambda m, x: m(x))

    @_eval_hint
    def apply_model(pure, inputs):
      return call(nnx.merge(graphdef, _with_values(trained, pure), rest), inputs)

    return apply_model, nnx.as_pure(trained), opt_state
  if _is_variable_state(params):
    trained, rest = nnx.filter_state(params, wrt, ...)
    if apply_fn is None:
      raise TypeError("`apply_fn` is required with an nnx.State: "
                      "apply_fn(state, inputs) -> outputs.")

    @_eval_hint
    def apply_state(pure, inputs):
      return apply_fn(nnx.merge_state(_with_values(trained, pure), rest), inputs)

    return apply_state, nnx.as_pure(trained), opt_state
  return apply_fn, params, opt_state


class VariationalTrainState(train_state.TrainState):
  """A Linen ``TrainState`` for blrax optimizers.

  ``state.sample_params()`` is the draw to take gradients at;
  ``state.apply_gradients(grads=..., hessian=...)`` updates the mean and
  forwards ``hessian`` (and any ``update_kwargs``) to the optimizer.

  Attributes:
    step: the number of updates so far.
    apply_fn: the Linen ``module.apply``.
    params: the posterior mean.
    tx: the blrax optimizer (possibly wrapped).
    opt_state: its state, holding the posterior.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, blrax
    >>> module = nn.Dense(1)
    >>> params = module.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> state = blrax.flax.VariationalTrainState.create(
    ...     apply_fn=module.apply, params=params,
    ...     tx=blrax.ivon(0.1, ess=8.0))
    >>> loss = lambda p: jnp.mean(state.apply_fn(p, jnp.ones((4, 2))) ** 2)
    >>> state = state.apply_gradients(grads=jax.grad(loss)(state.sample_params()))
    >>> int(state.step)
    1
  """

  def sample_params(self) -> Any:
    """The draw the next update expects.

    Returns:
      ``blrax.sample_params(self.params, self.opt_state)``.
    """
    return lookup.sample_params(self.params, self.opt_state)

  def apply_gradients(self, *, grads: Any, hessian: Any = None,
                      update_kwargs: dict | None = None, **kwargs: Any):
    """One optimizer update of the mean.

    Args:
      grads: gradients at :meth:`sample_params`.
      hessian: optional, forwarded to the optimizer's ``update``.
      update_kwargs: other extra arguments of the optimizer's ``update``.
      **kwargs: fields to replace, as in ``TrainState.apply_gradients``.

    Returns:
      The new state, with ``step`` incremented.
    """
    extra = dict(update_kwargs or {})
    if hessian is not None:
      extra["hessian"] = hessian
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **extra)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), self.params,
                          updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        **kwargs)
