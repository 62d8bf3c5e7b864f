"""Checkpoints of the whole posterior, through orbax.

``save_checkpoint``/``restore_checkpoint`` round-trip params and the whole
optimizer state (PRNG key, noise state and step count included), so a resumed
run is bitwise identical to an uninterrupted one. orbax is an optional
dependency (``pip install 'blrax[checkpoint]'``), imported on first use.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as error:
    raise ImportError(
        "blrax checkpoints need orbax: pip install 'blrax[checkpoint]' "
        "(or orbax-checkpoint).") from error
  return ocp


def _drop_empty(tree: Any) -> Any:
  """Zero-size leaves (the full Gaussian's shape template) become None:
  orbax refuses to save zero-size arrays, and they hold no data."""
  return jax.tree.map(lambda x: None if getattr(x, "size", 1) == 0 else x, tree)


def save_checkpoint(directory: str | os.PathLike, params: Any,
                    opt_state: Any) -> None:
  """Saves params and the whole optimizer state with orbax (blocking)."""
  ocp = _orbax()

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
  ocp = _orbax()
  target = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory),
                                                _drop_empty(target))
  restored = jax.tree.map(
      lambda t, r: jnp.zeros(t.shape, t.dtype) if t.size == 0 else r,
      target, restored)
  return restored["params"], restored["opt_state"]
