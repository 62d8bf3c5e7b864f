r"""Gradients at the posterior draw, by construction.

The BLR's update needs the gradient at a draw :math:`\theta = m + \sigma
\epsilon` from the posterior, with the :math:`\epsilon` that the optimizer's
state holds; a gradient taken at the mean :math:`m` is accepted silently by
``update`` and gives a wrong (too wide) posterior. :func:`value_and_grad`
wraps a loss so that the draw cannot be missed: it takes the params (the
mean) and the optimizer state, draws with :func:`blrax.sample_params`, and
differentiates there, over every draw when ``mc_samples > 1``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blrax._src import lookup


def num_draws(opt_state: Any) -> int:
  """The ``mc_samples`` of the blrax posterior(s) in ``opt_state``."""
  return lookup._mc_samples(lookup.find_posteriors(opt_state))


def has_posterior(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a blrax posterior (else: a plain optax one)."""
  opt_state = lookup._unwrap_nnx(opt_state)  # noqa: SLF001
  return any(isinstance(x, lookup.POSTERIOR_TYPES) for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, lookup.POSTERIOR_TYPES)))


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False,
    allow_int: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  r"""``jax.value_and_grad(loss_fn)`` evaluated at the optimizer's draw(s).

  Returns a function ``(params, opt_state, *args, **kwargs) -> (value,
  grads)``. It draws :math:`\theta_s = m + \sigma\epsilon_s`,
  :math:`s = 1..S`, with :func:`blrax.sample_params` (the draws the next
  ``update`` expects) and returns

  .. math::

    \text{value} = \frac1S \sum_s \ell(\theta_s), \qquad
    \text{grads}_s = \nabla\ell(\theta_s),

  where ``grads`` has a leading axis ``S`` when ``mc_samples = S > 1`` (the
  shape ``update`` wants) and none when ``S = 1``. The value is the Monte Carlo
  estimate of the expected loss, the data term of the variational objective.
  With ``has_aux`` the aux output of each draw is returned stacked along a
  leading axis ``S`` (no axis when ``S = 1``).

  VOGN needs per-example gradients instead (:func:`blrax.per_example_grads`),
  and ``optax.MultiSteps`` accumulates params-shaped gradients, so it cannot
  carry ``S > 1`` (its ``update`` then refuses the grads).

  A state without a blrax posterior (e.g. ``optax.adamw``'s) has no draw:
  the gradient is then ``jax.value_and_grad(loss_fn)`` at ``params``
  itself, so one training script can swap AdamW and IVON.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar (the mean loss
      over a batch); differentiated with respect to its first argument.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``, as in
      ``jax.value_and_grad``.
    allow_int: as in ``jax.value_and_grad``: whether int params (counters)
      are allowed; their gradients are ``float0`` zeros, which the blrax
      optimizers accept (an int leaf is never updated).

  Returns:
    A function ``(params, opt_state, *args, **kwargs) -> (value, grads)``
    (``((value, aux), grads)`` with ``has_aux``); ``params`` is the posterior
    mean and ``opt_state`` the state of a blrax optimizer, possibly nested in
    optax wrappers (or any other optax state: then at ``params``).

  Raises:
    TypeError: if ``loss_fn`` is not callable.

  Examples:
    >>> import jax.numpy as jnp, optax, blrax
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> params, x = jnp.ones(3), jnp.ones((4, 3))
    >>> opt = blrax.ivon(0.1, ess=4.0, mc_samples=2)
    >>> state = opt.init(params)
    >>> value, grads = blrax.value_and_grad(loss)(params, state, x)
    >>> grads.shape  # one gradient per draw
    (2, 3)
    >>> updates, state = opt.update(grads, state, params)

  References:
    Khan & Rue, `The Bayesian Learning Rule
    <https://arxiv.org/abs/2107.04562>`_, JMLR 2023.
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got loss_fn={loss_fn!r}.")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux, allow_int=allow_int)

  @functools.wraps(loss_fn)
  def at_draw(params: Any, opt_state: Any, *args: Any, **kwargs: Any):
    if not has_posterior(opt_state):  # e.g. optax.adamw: no draw to take
      return grad_fn(params, *args, **kwargs)
    theta = lookup.sample_params(params, opt_state)
    if num_draws(opt_state) == 1:
      return grad_fn(theta, *args, **kwargs)
    out, grads = jax.vmap(lambda t: grad_fn(t, *args, **kwargs))(theta)
    if has_aux:
      value, aux = out
      return (jnp.mean(value, axis=0), aux), grads
    return jnp.mean(out, axis=0), grads

  return at_draw
