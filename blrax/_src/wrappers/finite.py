"""Optax wrappers that need to know what a blrax ``update`` takes.

``optax.apply_if_finite`` returns zeros shaped like the *gradients* when it
rejects a step. A blrax optimizer with ``mc_samples > 1`` (or VOGN) takes
gradients with a leading sample (or batch) axis and returns updates shaped
like the params, so optax's two branches disagree and ``lax.cond`` fails.
:func:`apply_if_finite` is the same wrapper with zeros shaped like the
update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import validation


def apply_if_finite(
    inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
  """``optax.apply_if_finite`` for any blrax optimizer (and any other).

  Skips an update whose gradients (or extra arrays such as ``hessian=``)
  hold a NaN or an inf (the inner state,
  noise key included, is left as it was), unless more than
  ``max_consecutive_errors`` such updates came in a row. Extra arguments
  that are not arrays pass through unchecked; where one is a function
  (bSAM's ``grad_fn``, which takes a gradient inside the update), the
  update is computed first and skipped as well if its result is not
  finite. Unlike
  ``optax.apply_if_finite``, it also wraps optimizers whose gradients have a
  different shape from their updates: blrax optimizers with
  ``mc_samples > 1`` and VOGN's per-example gradients. The state is an
  ``optax.ApplyIfFiniteState``, so ``blrax.sample_params`` finds the
  posterior inside it as usual.

  Args:
    inner: the transformation to wrap.
    max_consecutive_errors: how many non-finite updates in a row to skip.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> opt = blrax.apply_if_finite(
    ...     blrax.ivon(0.1, ess=100.0, mc_samples=2), max_consecutive_errors=3)
    >>> params = jnp.ones(2)
    >>> state = opt.init(params)
    >>> grads = jnp.full((2, 2), jnp.nan)  # two samples, both NaN
    >>> updates, state = opt.update(grads, state, params)
    >>> print(updates, int(state.notfinite_count))
    [0. 0.] 1
  """
  validation.check_integer("max_consecutive_errors", max_consecutive_errors,
                           low=0)
  inner = optax.with_extra_args_support(inner)
  base = optax.apply_if_finite(inner, max_consecutive_errors)

  def update_fn(updates, state, params=None, **extra_args):
    # The grads and any array passed alongside them (e.g. ``hessian=``).
    isfinite = _all_finite((updates, extra_args))
    computed = None
    if any(callable(x) for x in jax.tree.leaves(extra_args)):
      # A function (bSAM's grad_fn) takes gradients inside the update: their
      # finiteness shows only in its result.
      computed = inner.update(updates, state.inner_state, params, **extra_args)
      isfinite = jnp.logical_and(isfinite, _all_finite(computed[0]))
    notfinite_count = jnp.where(
        isfinite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))

    def do_update(_):
      if computed is not None:
        return computed
      return inner.update(updates, state.inner_state, params, **extra_args)

    def reject_update(_):
      # Zeros shaped like what the inner update returns (not like grads).
      shapes = jax.eval_shape(do_update, None)[0]
      return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
              state.inner_state)

    new_updates, inner_state = jax.lax.cond(
        jnp.logical_or(isfinite, notfinite_count > max_consecutive_errors),
        do_update, reject_update, None)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=isfinite,
        total_notfinite=jnp.where(isfinite, state.total_notfinite,
                                  optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(base.init, update_fn)


def _is_float_array(x: Any) -> bool:
  """An array or number of a float (or complex) dtype; functions and other
  objects among the extra arguments are not checked."""
  if not isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)):
    return False
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _all_finite(tree: Any) -> jax.Array:
  checked = [x for x in jax.tree.leaves(tree) if _is_float_array(x)]
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in checked],
                           dtype=bool))
