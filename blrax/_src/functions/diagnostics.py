"""Posterior diagnostics and export.

``posterior_summary`` answers the most common question about IVON ("does the
Hessian move?") with per-leaf statistics of the curvature and of sigma, ready
for a logger. ``export_posterior`` gives (mean, stddev) for users who only
want that.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from blrax._src.functions import lookup


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
  initial value (``hess_init``) to see whether it moves. Zero-size leaves
  have no statistics and are left out; masked params (``optax.MaskedNode``
  holes) too.

  Args:
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.

  Returns:
    A dict of dicts of scalar arrays.

  Raises:
    ValueError: if ``opt_state`` holds no blrax posterior.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.ivon(0.1, ess=100.0, hess_init=1.0).init(
    ...     {"w": jnp.zeros(3)})
    >>> summary = blrax.posterior_summary(state)
    >>> sorted(summary), round(float(summary["stddev/w"]["median"]), 4)
    (['curvature/w', 'stddev/w'], 0.1)
  """
  out = {}
  for index, posterior in enumerate(lookup.find_posteriors(opt_state)):
    prefix = "" if index == 0 else f"posterior{index}/"
    for name, tree in (("stddev", posterior.stddev()),
                       ("curvature", posterior.curvature_diagonal())):
      leaves = jax.tree_util.tree_flatten_with_path(
          tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
      for path, leaf in leaves:
        if not isinstance(leaf, optax.MaskedNode) and jnp.size(leaf) > 0:
          out[f"{prefix}{name}/{_path_name(path)}"] = _stats(leaf)
  return out


def export_posterior(params: Any, opt_state: Any) -> dict[str, Any]:
  """``{"mean": params, "stddev": sigma}``, both pytrees like the params.

  Args:
    params: the posterior mean.
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.

  Returns:
    A dict with ``"mean"`` (``params``) and ``"stddev"``
    (``blrax.posterior_stddev(opt_state, params)``).

  Raises:
    ValueError: if ``opt_state`` holds no blrax posterior, or its posterior
      does not have the params' tree and shapes.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.zeros(2)}
    >>> state = blrax.ivon(0.1, ess=4.0, hess_init=1.0,
    ...                    weight_decay=0.0).init(params)
    >>> blrax.export_posterior(params, state)["stddev"]["w"]
    Array([0.5, 0.5], dtype=float32)
  """
  for posterior in lookup.find_posteriors(opt_state):
    _check_tree(params, jax.eval_shape(posterior.stddev))
  return {"mean": params, "stddev": lookup.posterior_stddev(opt_state, params)}


def _check_tree(params: Any, posterior_tree: Any) -> None:
  """``params`` must have the tree the posterior was initialised for."""
  hole = lambda x: isinstance(x, optax.MaskedNode)
  want = jax.tree.structure(posterior_tree, is_leaf=hole)
  if jax.tree.structure(params) == want:
    return
  paths = lambda tree, **kw: {jax.tree_util.keystr(p) for p, _ in
                              jax.tree_util.tree_flatten_with_path(tree, **kw)[0]}
  have, need = paths(params), paths(posterior_tree, is_leaf=hole)
  detail = "; ".join(
      f"{what} {', '.join(sorted(keys)[:3])}" for what, keys in
      (("params have leaves the posterior lacks:", have - need),
       ("the posterior has leaves the params lack:", need - have)) if keys)
  raise ValueError(
      "`params` do not have the tree the posterior in `opt_state` was "
      "initialised for: " + (detail or f"params {jax.tree.structure(params)}, "
                             f"posterior {want}") + ".")
