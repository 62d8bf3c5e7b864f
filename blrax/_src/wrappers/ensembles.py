"""Ensembles of variational learners: independent weight noise per member.

``jax.vmap(opt.init)(stacked_params)`` copies the optimizer's one key into
every member, so every member draws the same noise (``init`` warns at trace
time). :func:`ensemble_init` folds each member's index into its keys;
:func:`fold_in_keys` is the primitive, for states built some other way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import full as full_gaussian

# The states whose ``key`` field holds PRNG key data (blrax.noise.key_data).
_KEYED = (noise_lib.NormalNoiseState, noise_lib.HashNoiseState,
          noise_lib.FlipNoiseState, full_gaussian.FullGaussian)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _holds_key(x: Any) -> bool:
  return isinstance(x, _KEYED) or _is_key(x)


def fold_in_keys(opt_state: Any, data: Any) -> Any:
  r"""``opt_state`` with ``data`` folded into each of its PRNG keys.

  Every PRNG key in the (possibly nested) optax state — the weight-noise key
  of each blrax posterior (kept as key data), each of its ``mc_samples``
  keys, and any typed PRNG key — becomes
  ``jax.random.fold_in(key, data)``; everything else is returned unchanged.
  States that differ only by ``data`` then draw independent noise, which is
  what an ensemble's members need.

  Args:
    opt_state: an optimizer state holding at least one PRNG key (any
      blrax optimizer's, possibly inside optax wrappers).
    data: a non-negative int (or int32/uint32 scalar, traced under ``vmap``
      or ``jit``), e.g. the member index.

  Returns:
    The state with the same structure, shapes and dtypes.

  Raises:
    ValueError: if ``opt_state`` holds no PRNG key, or ``data`` is not an
      integer scalar (or an int outside [0, 2**32)).

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> state = blrax.ivon(0.1, ess=10.0, key=0).init(jnp.zeros(3))
    >>> a = blrax.sample_params(jnp.zeros(3), blrax.fold_in_keys(state, 0))
    >>> b = blrax.sample_params(jnp.zeros(3), blrax.fold_in_keys(state, 1))
    >>> bool(jnp.all(a == b))
    False
  """
  dtype = getattr(data, "dtype", None)
  if dtype is None and isinstance(data, int) and not isinstance(data, bool):
    if not 0 <= data < 2**32:  # fold_in takes 32 bits
      raise ValueError(f"`data` must be an int in [0, 2**32), got data={data}.")
    dtype = np.dtype(np.int32) if data < 2**31 else np.dtype(np.uint32)
  if (dtype is None or not jnp.issubdtype(dtype, jnp.integer)
      or np.shape(data) != ()):
    raise ValueError(
        f"`data` must be an integer scalar (e.g. a member index), got "
        f"data={data!r}.")
  leaves = jax.tree.leaves(opt_state, is_leaf=_holds_key)
  if not any(_holds_key(x) for x in leaves):
    raise ValueError(
        "`opt_state` holds no PRNG key to fold `data` into (is it a blrax "
        f"optimizer's state?); got a {type(opt_state).__name__}.")

  def fold(key):
    flat = key.reshape(-1)
    folded = jax.vmap(lambda k: jax.random.fold_in(k, data))(flat)
    return folded.reshape(key.shape)

  def fold_node(x):
    if _is_key(x):
      return fold(x)
    if isinstance(x, _KEYED):
      return x._replace(key=noise_lib.stored_like(
          x.key, fold(noise_lib.wrap_key(x.key))))
    return x

  return jax.tree.map(fold_node, opt_state, is_leaf=_holds_key)


def ensemble_init(opt: optax.GradientTransformation, params: Any) -> Any:
  r"""``opt.init`` for an ensemble: member ``m`` gets ``m`` folded into its keys.

  ``params`` are the members' params stacked along a leading axis of size
  ``M``. Returns the stacked states, where member ``m``'s state is exactly
  ``blrax.fold_in_keys(opt.init(params_m), m)``: the same hyperparameters,
  independent weight noise. Train the ensemble by vmapping the usual step over
  the leading axis of params and states; each member's trajectory is then the
  one it would have alone from that state (``tests/test_ensembles.py``).

  For ``mc_samples = 1`` and a scalar ``key``, member ``m`` equals the
  optimizer built with ``key=jax.random.fold_in(key, m)``. The other way to
  independent members is a batched key, with the factory inside the vmap:
  ``jax.vmap(lambda p, k: blrax.ivon(..., key=k).init(p))(params, keys)``.
  ``jax.vmap(opt.init)(params)`` alone gives every member the same noise
  (``init`` warns when it sees that at trace time).

  Args:
    opt: a blrax optimizer, possibly inside optax wrappers or a chain.
    params: the members' params, every leaf with the same leading axis size
      ``M >= 1``.

  Returns:
    The members' optimizer states, stacked along a leading axis ``M``.

  Raises:
    ValueError: if ``params`` has no leaves, leaves without a leading axis,
      or leading axes of different sizes; or if the state holds no PRNG key.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=10.0, key=0)
    >>> params = jnp.zeros((4, 3))  # 4 members, 3 weights each
    >>> states = blrax.ensemble_init(opt, params)
    >>> draws = jax.vmap(blrax.sample_params)(params, states)
    >>> bool(jnp.all(draws[0] == draws[1]))  # independent noise
    False
  """
  sizes = {np.shape(x)[0] if np.ndim(x) else None
           for x in jax.tree.leaves(params)}
  if not sizes or None in sizes or len(sizes) != 1:
    raise ValueError(
        "`params` must be the members' params stacked along a leading axis "
        "of one size M (every leaf of shape (M, ...)), got leading sizes "
        f"{sorted(sizes, key=str) if sizes else 'none (no leaves)'}.")
  (size,) = sizes
  with noise_lib.keys_folded_in_after_init():
    return jax.vmap(lambda p, m: fold_in_keys(opt.init(p), m))(
        params, jnp.arange(size, dtype=jnp.int32))
