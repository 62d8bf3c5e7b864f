"""Bayes' rule for Gaussian posteriors: the pieces every posterior type's
``merge`` shares (:func:`blrax.merge_posteriors`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import base, validation


def leafwise(value: Any, like: Any) -> Any:
  """``value`` (a scalar or a tree like ``like``) as a tree like ``like``."""
  if jax.tree.structure(value, is_leaf=base.is_hole) == jax.tree.structure(
      like, is_leaf=base.is_hole) and jax.tree.leaves(like):
    return value
  return jax.tree.map(lambda _: value, like)

def is_scalar(value: Any) -> bool:
  return not isinstance(value, (tuple, list, dict)) and np.ndim(value) == 0 \
      and len(jax.tree.leaves(value)) == 1

def prior_mean_like(posterior: Any, like: Any) -> Any:
  """The posterior's prior mean as a tree like ``like`` (zeros if it has none)."""
  mean = getattr(posterior, "prior_mean", ())
  if jax.tree.leaves(mean):
    return leafwise(mean, like)
  return jax.tree.map(jnp.zeros_like, like)

def common(name: str, values: Sequence[Any], what: str, hint: str) -> Any:
  """The first of ``values`` after checking (when concrete) that all agree."""
  first = values[0]
  for k, value in enumerate(values[1:], start=1):
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(value)):
      if validation.is_traced(a) or validation.is_traced(b):
        continue
      if not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=0.0):
        raise ValueError(
            f"`{name}`: the shards' {what} differ (shard 0 vs shard {k}: "
            f"{np.asarray(a).ravel()[:3]} vs {np.asarray(b).ravel()[:3]}); "
            f"{hint}")
  return first

PRIOR_HINT = (
    "merging assumes one prior. Train shard k with weight_decay = "
    "Lambda0 / ess_k (so that every prior precision ess_k * weight_decay_k "
    "is Lambda0), or pass the merged prior explicitly as `prior_precision=` "
    "(and `prior_mean=`): each shard's own prior is then divided out exactly.")

def like_leaf(value: jax.Array, old: Any) -> jax.Array:
  """The merged per-leaf decay ``value`` in the shape and dtype of ``old``.

  A full-shaped ``value`` for a leaf whose state keeps a scalar decay (an
  explicit ``prior_precision``) must be uniform.
  """
  shape, dtype = np.shape(old), jnp.result_type(old)
  value = jnp.asarray(value)
  if value.shape != shape:
    if shape == () and not validation.is_traced(value) and value.size and bool(
        jnp.all(value == value.ravel()[0])):
      value = value.ravel()[0]
    elif shape and np.broadcast_shapes(value.shape, shape) == shape:
      value = jnp.broadcast_to(value, shape)
    else:
      raise ValueError(
          "`prior_precision` has a leaf of shape "
          f"{value.shape} that varies where the state keeps one weight decay "
          f"of shape {shape} (built with a scalar weight_decay for it): pass "
          "a scalar for that leaf, or train with a per-element weight_decay.")
  return value.astype(dtype)


