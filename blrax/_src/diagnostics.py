"""Posterior diagnostics, export and checkpoints.

``posterior_summary`` answers the most common question about IVON ("does the
Hessian move?") with per-leaf statistics of the curvature and of sigma, ready
for a logger. ``export_posterior`` gives (mean, stddev) for users who only
want that. ``save_checkpoint``/``restore_checkpoint`` round-trip params and
the whole optimizer state (PRNG key and step count included) through orbax,
so a resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from blrax._src import lookup


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "params"


def _stats(x: jax.Array) -> dict[str, jax.Array]:
  x = jnp.ravel(x)
  return {"min": jnp.min(x), "median": jnp.median(x), "mean": jnp.mean(x),
          "max": jnp.max(x)}


def posterior_summary(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-leaf min/median/mean/max of sigma and of the curvature.

  Keys are ``"stddev/<leaf path>"`` and ``"curvature/<leaf path>"`` (for a
  full covariance: the diagonal of :math:`S`), so the dict can go straight to
  a logger (flatten it with ``f"{k}/{stat}"``). Compare the curvature with its
  initial value (``hess_init``) to see whether it moves.
  """
  out = {}
  for index, posterior in enumerate(lookup.find_posteriors(opt_state)):
    prefix = "" if index == 0 else f"posterior{index}/"
    for name, tree in (("stddev", posterior.stddev()),
                       ("curvature", posterior.curvature_diagonal())):
      leaves = jax.tree_util.tree_flatten_with_path(
          tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
      for path, leaf in leaves:
        if not isinstance(leaf, optax.MaskedNode):
          out[f"{prefix}{name}/{_path_name(path)}"] = _stats(leaf)
  return out


def export_posterior(params: Any, opt_state: Any) -> dict[str, Any]:
  """``{"mean": params, "stddev": sigma}``, both pytrees like the params."""
  return {"mean": params, "stddev": lookup.posterior_stddev(opt_state, params)}


def _drop_empty(tree: Any) -> Any:
  """Zero-size leaves (the full Gaussian's shape template) become None:
  orbax refuses to save zero-size arrays, and they hold no data."""
  return jax.tree.map(lambda x: None if getattr(x, "size", 1) == 0 else x, tree)


def save_checkpoint(directory: str | os.PathLike, params: Any,
                    opt_state: Any) -> None:
  """Saves params and the whole optimizer state with orbax (blocking)."""
  import orbax.checkpoint as ocp  # Imported lazily: only checkpoints need it.

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory),
                    _drop_empty({"params": params, "opt_state": opt_state}))
  checkpointer.wait_until_finished()


def restore_checkpoint(directory: str | os.PathLike, params: Any,
                       opt_state: Any) -> tuple[Any, Any]:
  """Restores ``(params, opt_state)``; the arguments give structure and dtypes.

  Pass e.g. freshly initialised params and ``opt.init(params)`` (or their
  ``jax.eval_shape``); typed PRNG keys are restored as typed keys.
  """
  import orbax.checkpoint as ocp

  target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory),
                                                _drop_empty(target))
  restored = jax.tree.map(
      lambda t, r: jnp.zeros(t.shape, t.dtype) if t.size == 0 else r,
      target, restored)
  return restored["params"], restored["opt_state"]
