r"""The prior of a diagonal posterior: its precision per leaf, and its mean.

Every blrax optimizer fits :math:`q(\theta)` under a Gaussian prior
:math:`p(\theta) = \mathcal N(m_0, 1/(\lambda\delta))`: the weight decay
:math:`\delta` is the prior precision divided by the effective sample size
:math:`\lambda`, and the step pulls the mean towards :math:`m_0` with
:math:`\delta(m - m_0)`. By default :math:`\delta` is one scalar and
:math:`m_0 = 0` (plain weight decay). This module lets both vary:

- ``weight_decay`` a pytree like the params (a scalar or an array
  broadcastable to each leaf): per-parameter prior precisions, e.g. none on
  biases and LayerNorm scales, or a previous task's posterior precision;
- ``weight_decay_mask`` a pytree of bools like the params (or a function of
  the params returning one), as in ``optax.adamw(mask=...)``: where False,
  :math:`\delta = 0`;
- ``prior_mean`` a pytree like the params: :math:`m_0` (continual learning:
  the previous task's posterior mean).

Since :math:`\delta` is also part of the posterior precision
:math:`\lambda(h+\delta)`, the posterior's :math:`\sigma` uses it per leaf.
The resolved per-leaf values live in the posterior state
(:class:`blrax.DiagonalGaussian`), so ``posterior_stddev`` needs nothing else.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import validation


def _hole(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_per_leaf(weight_decay: Any) -> bool:
  """Whether ``weight_decay`` is per leaf (a pytree or a non-scalar array)
  rather than one scalar (a number or a 0-d array, traced or not)."""
  leaves, treedef = jax.tree.flatten(weight_decay)
  if not jax.tree_util.treedef_is_leaf(treedef) or len(leaves) != 1:
    return True
  return np.ndim(leaves[0]) > 0


def check(weight_decay: Any, weight_decay_mask: Any,
          prior_mean: Any) -> None:
  """Checks the prior's hyperparameters where they are concrete.

  Raises:
    ValueError: naming the argument and the value: a negative, NaN,
      infinite or too large decay, a mask that is not boolean, a prior mean
      that is not real and finite.
  """
  if not is_per_leaf(weight_decay):
    validation.check_state_scale("weight_decay", weight_decay)
  else:
    for path, value in _leaves_with_path(weight_decay):
      _check_decay_leaf(path, value)
  if weight_decay_mask is not None and not callable(weight_decay_mask):
    _check_mask(weight_decay_mask)
  if prior_mean is not None:
    for path, value in _leaves_with_path(prior_mean):
      if validation.is_traced(value):
        continue
      array = _real_array("prior_mean", path, value)
      if not np.all(np.isfinite(array)):
        raise ValueError(
            f"`prior_mean`{path} must be finite, got {_show(array)}.")


def _leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_hole)
  return [(_at(path), leaf) for path, leaf in flat if not _hole(leaf)]


def _at(path) -> str:
  text = jax.tree_util.keystr(path)
  return f" (at {text})" if text else ""


def _show(array: np.ndarray) -> str:
  return repr(array.item()) if array.size == 1 else f"an array with {array}"


def _real_array(name: str, path: str, value: Any) -> np.ndarray:
  try:
    array = np.asarray(value)
  except (TypeError, ValueError) as error:
    raise validation.ArgumentTypeError(
        f"`{name}`{path} must be real numbers, got {value!r}.") from error
  if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                   or np.issubdtype(array.dtype, np.integer)):
    raise validation.ArgumentTypeError(
        f"`{name}`{path} must be real numbers, got {value!r}.")
  return array


def _check_decay_leaf(path: str, value: Any) -> None:
  if validation.is_traced(value):
    return
  array = _real_array("weight_decay", path, value).astype(np.float64)
  bad = ~np.isfinite(array) | (array < 0) | (array > validation.STATE_LIMIT)
  if np.any(bad):
    raise ValueError(
        f"`weight_decay`{path} must be finite, >= 0 and at most "
        f"{validation.STATE_LIMIT:.2g}, got weight_decay={_show(array[bad])}.")


def _check_mask(mask: Any) -> None:
  for path, value in _leaves_with_path(mask):
    if validation.is_traced(value):
      continue
    if np.asarray(value).dtype != np.bool_:
      raise ValueError(
          f"`weight_decay_mask`{path} must be booleans (True: decayed), got "
          f"weight_decay_mask={value!r}.")


def _match(name: str, tree: Any, params: Any, fn: Callable) -> Any:
  """``fn(param, value)`` leaf by leaf; masked-out params stay holes."""
  params_def = jax.tree.structure(params, is_leaf=_hole)
  try:  # ``tree`` must have the params' structure (its leaves may be trees).
    params_def.flatten_up_to(tree)
  except ValueError as error:
    raise ValueError(
        f"`{name}` must have the structure of the params ({params_def}), "
        f"got {jax.tree.structure(tree)}.") from error
  return jax.tree.map(
      lambda p, v: p if _hole(p) else fn(p, v), params, tree, is_leaf=_hole)


def _shaped(name: str, param: Any, value: Any, dtype) -> jax.Array:
  shape = tuple(np.shape(param))
  try:
    value = jnp.asarray(value, dtype)
  except (TypeError, ValueError) as error:
    raise validation.ArgumentTypeError(
        f"`{name}` leaf for a param of shape {shape} must be a number or an "
        f"array broadcastable to it, got {value!r}.") from error
  try:
    fits = np.broadcast_shapes(value.shape, shape) == shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
        f"`{name}` leaf of shape {value.shape} does not broadcast to its "
        f"param's shape {shape}.")
  return value


def decay_tree(weight_decay: Any, weight_decay_mask: Any, params: Any,
               state_dtype: Callable) -> Any:
  r"""The per-leaf :math:`\delta`: a pytree like ``params`` (holes kept).

  Args:
    weight_decay: a scalar, or a pytree like ``params`` of scalars or arrays
      broadcastable to each leaf.
    weight_decay_mask: None, a pytree of bools like ``params``, or a function
      of ``params`` returning one.
    params: the params (or their ``ShapeDtypeStruct``\ s).
    state_dtype: ``param -> dtype`` of the state kept for it.

  Returns:
    A pytree like ``params`` whose leaves are :math:`\delta` (shape ``()`` or
    broadcastable to the leaf) in the state's dtype.
  """
  if is_per_leaf(weight_decay):
    tree = _match("weight_decay", weight_decay, params,
                  lambda p, d: _shaped("weight_decay", p, d, state_dtype(p)))
  else:
    tree = jax.tree.map(
        lambda p: p if _hole(p) else jnp.asarray(weight_decay, state_dtype(p)),
        params, is_leaf=_hole)
  if weight_decay_mask is None:
    return tree
  mask = (weight_decay_mask(params) if callable(weight_decay_mask)
          else weight_decay_mask)
  _check_mask(mask)
  masked = _match("weight_decay_mask", mask, params,
                  lambda p, m: _shaped("weight_decay_mask", p, m, bool))
  return jax.tree.map(
      lambda d, m: d if _hole(d) else jnp.where(m, d, jnp.zeros_like(d)),
      tree, masked, is_leaf=_hole)


def mean_tree(prior_mean: Any, params: Any, state_dtype: Callable) -> Any:
  """:math:`m_0` like ``params`` in the state's dtype, full-shaped."""
  return _match(
      "prior_mean", prior_mean, params,
      lambda p, m: jnp.broadcast_to(_shaped("prior_mean", p, m, state_dtype(p)),
                                    np.shape(p)))
