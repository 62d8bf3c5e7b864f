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
import optax

from blrax._src import base
from blrax._src.functions import lookup


def num_draws(opt_state: Any) -> int:
  """The ``mc_samples`` of the blrax posterior(s) in ``opt_state``."""
  return lookup.common_mc_samples(lookup.find_posteriors(opt_state))


def has_posterior(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a blrax posterior (else: a plain optax one)."""
  return bool(base.find(base.unwrap_nnx(opt_state), base.is_posterior))


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


def check_gradients(
    loss_fn: Callable[..., Any], *, has_aux: bool = False,
) -> Callable[..., None]:
  r"""A one-off check that a loop's gradients were taken at the draw.

  Returns ``check(grads, params, opt_state, *args, **kwargs)``, which
  recomputes the gradient of ``loss_fn`` at the draw(s) ``update`` expects
  (:func:`blrax.sample_params`) and at the mean ``params``, and raises unless
  ``grads`` is the one at the draw: gradients at the mean (an unchanged optax
  loop) are accepted silently by ``update`` and give a wrong posterior. Call it
  once, outside ``jit``, on one batch, with the grads your step computed from
  the same ``params``, ``opt_state`` and batch, before the ``update``:

  .. code-block:: python

    check = blrax.check_gradients(loss_fn)
    grads = my_grad_fn(params, opt_state, batch)   # what the loop computes
    check(grads, params, opt_state, batch)         # raises if at the mean

  It costs two gradient evaluations (and their compilation) per call and
  nothing otherwise: ``update`` is unchanged. ``grads`` counts as at the draw
  when it is closer to the draw's gradient than a tenth of the distance
  between the draw's and the mean's. A state without a blrax posterior
  (``optax.adamw``'s) has no draw: nothing is checked.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)``, the scalar loss the loop
      differentiates (as for :func:`blrax.value_and_grad`).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``check(grads, params, opt_state, *args, **kwargs) -> None``; ``grads``
    as ``update`` takes them (a leading axis ``S`` for ``mc_samples = S >
    1``). It raises ``ValueError`` if ``grads`` is the mean's gradient, if it
    is neither the draw's nor the mean's (a different batch or loss?), or if
    its shapes are not the draws' (VOGN's per-example grads are not checked
    here); and if called under ``jit`` (it compares concrete values).

  Raises:
    TypeError: if ``loss_fn`` is not callable.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> loss = lambda w, x: jnp.mean((x @ w - 1.0) ** 2)
    >>> params, x = jnp.ones(3), jnp.arange(12.0).reshape(4, 3)
    >>> state = blrax.ivon(0.1, ess=4.0, key=0).init(params)
    >>> check = blrax.check_gradients(loss)
    >>> _, grads = blrax.value_and_grad(loss)(params, state, x)
    >>> check(grads, params, state, x)  # at the draw: passes
    >>> try:
    ...   check(jax.grad(loss)(params, x), params, state, x)
    ... except ValueError as error:
    ...   print(str(error)[:47])
    `grads` were taken at the mean `params`, not at
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got loss_fn={loss_fn!r}.")
  at_draw = jax.jit(value_and_grad(loss_fn, has_aux=has_aux))
  at_mean = jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux))

  def check(grads: Any, params: Any, opt_state: Any, *args: Any,
            **kwargs: Any) -> None:
    if not has_posterior(opt_state):
      return
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(
        (grads, params))):
      raise ValueError(
          "blrax.check_gradients compares concrete values: call it outside "
          "`jit` (e.g. once on the first batch), with the grads your jitted "
          "step computed.")
    _, want = at_draw(params, opt_state, *args, **kwargs)
    _, mean = at_mean(params, *args, **kwargs)
    if num_draws(opt_state) > 1:  # the mean's gradient, once per draw
      mean = jax.tree.map(lambda m, w: jnp.broadcast_to(m, w.shape), mean, want)
    if jax.tree.structure(grads) != jax.tree.structure(want) or any(
        jnp.shape(g) != jnp.shape(w) for g, w in zip(jax.tree.leaves(grads),
                                                     jax.tree.leaves(want))):
      shapes = lambda t: jax.tree.map(jnp.shape, t)  # noqa: E731
      raise ValueError(
          f"`grads` must be shaped like the gradient at the draw(s), "
          f"{shapes(want)}; got {shapes(grads)}.")
    def dist(a, b):
      return float(optax.tree.norm(jax.tree.map(
          lambda x, y: jnp.asarray(x, jnp.float32) - y, a, b)))
    to_draw, to_mean, apart = dist(grads, want), dist(grads, mean), dist(
        want, mean)
    if to_draw <= 0.1 * apart or to_draw <= 1e-6 * (
        float(optax.tree.norm(want)) + 1e-30):
      return
    if to_mean <= 0.1 * apart:
      raise ValueError(
          "`grads` were taken at the mean `params`, not at the posterior draw "
          "the optimizer expects (|grads - grad at draw| = "
          f"{to_draw:.3g}, |grads - grad at mean| = {to_mean:.3g}); `update` "
          "would accept them and the posterior would come out wrong. Take "
          "them with `blrax.value_and_grad(loss_fn)(params, opt_state, ...)`, "
          "or `jax.grad(loss_fn)(blrax.sample_params(params, opt_state), ...)`.")
    raise ValueError(
        "`grads` are neither the gradient at the posterior draw nor at the mean "
        f"(|grads - grad at draw| = {to_draw:.3g}, |grads - grad at mean| = "
        f"{to_mean:.3g}, draw to mean {apart:.3g}): were they computed from "
        "these `params`, `opt_state` and arguments, with this `loss_fn`?")

  return check
