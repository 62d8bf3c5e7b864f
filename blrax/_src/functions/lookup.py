r"""Find the variational posterior in any optax state, and use it.

The posterior of a blrax optimizer is a sub-state of one of the posterior
types (:class:`blrax.DiagonalGaussian`, :class:`blrax.FullGaussian`,
:class:`blrax.EigenbasisGaussian`). It is
found **by type**, anywhere in a nested optax state: inside ``chain``,
``named_chain``, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
``masked`` and ``partition`` (whose ``optax.MaskedNode`` holes mark params
that get no noise), and inside an ``nnx.Optimizer``'s ``opt_state``. Several
posteriors (one per partition) may cover disjoint parts of the params.

A posterior is anything that implements the :class:`base.Posterior`
protocol (``mc_samples``, ``stddev()``, ``offset()``: the draw the next update
expects, :math:`\theta - m`, ``sample_offsets(key, n)``, ...), each returning
a tree like the params with holes where it does not reach; this module knows
no posterior type by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from blrax._src import base, validation
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian

_hole = base.is_hole


def find_posteriors(opt_state: Any) -> list[Any]:
  """All variational sub-states in ``opt_state``, in tree order.

  Args:
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.

  Returns:
    A list of posteriors (:class:`blrax.DiagonalGaussian`,
    :class:`blrax.FullGaussian`): one per blrax optimizer in the state.

  Raises:
    ValueError: if there is none.

  Examples:
    >>> import jax.numpy as jnp, optax, blrax
    >>> opt = optax.chain(optax.clip(1.0), blrax.ivon(0.1, ess=100.0))
    >>> posteriors = blrax.find_posteriors(opt.init(jnp.zeros(2)))
    >>> [type(p).__name__ for p in posteriors]
    ['DiagonalGaussian']
  """
  found = base.find(base.unwrap_nnx(opt_state), base.is_posterior)
  if not found:
    raise ValueError(
        "`opt_state` holds no blrax posterior: pass the state of a blrax "
        "optimizer (alone or inside optax wrappers)."
    )
  return found


def merge_covering(params: Any, trees: list[Any], fill: Any) -> list[Any]:
  """For each params leaf, the first covering leaf among ``trees`` (or fill)."""

  def pick(p, *candidates):
    for c in candidates:
      if not _hole(c):
        return c
    return fill(p)

  return jax.tree.map(pick, params, *trees, is_leaf=_hole)


def common_mc_samples(posteriors: list[Any]) -> int:
  counts = {p.mc_samples for p in posteriors}
  if len(counts) != 1:
    raise ValueError(f"posteriors disagree on mc_samples: {sorted(counts)}.")
  return counts.pop()


def check_covers(params: Any, posteriors: list[Any]) -> None:
  """Each posterior's leaves must have the shapes of the params they cover."""
  for posterior in posteriors:
    shapes = jax.eval_shape(posterior.stddev)
    if jax.tree.structure(params, is_leaf=_hole) != jax.tree.structure(
        shapes, is_leaf=_hole):
      raise ValueError(
          "`params` must have the structure the optimizer was initialised "
          f"with: {gaussian.structure_difference(params, shapes, 'the state')}"
          " (the posterior in `opt_state` does not belong to these `params`)")
    try:
      covered = jax.tree.map(
          lambda p, s: optax.MaskedNode() if _hole(s) else p, params, shapes,
          is_leaf=_hole)
      gaussian.check_params(covered, shapes)
    except ValueError as error:
      raise ValueError(f"{error} (the posterior in `opt_state` does not "
                       "belong to these `params`)") from None


def _add_offsets(params: Any, offsets: Any, leading: tuple[int, ...]) -> Any:
  def add(p, d):
    p = jnp.asarray(p)
    if d is None or not gaussian.is_trainable(p):  # masked, or an int leaf
      return jnp.broadcast_to(p, leading + p.shape)
    return (p.astype(d.dtype) + d).astype(p.dtype)

  return jax.tree.map(add, params, offsets)


def sample_params(params: Any, opt_state: Any) -> Any:
  r"""The draw :math:`\theta = m + \sigma\epsilon` the next ``update`` expects.

  A pure function of its inputs: the noise comes from the key in
  ``opt_state``, and ``update`` regenerates the same noise from the same
  state (inside one ``jit``, XLA computes it once). With ``mc_samples = S > 1``
  every leaf gets a leading axis of size ``S``; take gradients with
  ``jax.vmap(jax.grad(loss))``. Params outside the posterior (masked by
  ``optax.masked``/``partition``) are returned unperturbed.

  Args:
    params: the posterior mean :math:`m` (the params being trained).
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.

  Returns:
    A pytree like ``params``, in the params' dtypes.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, mc_samples=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> theta = blrax.sample_params(params, opt.init(params))
    >>> theta["w"].shape  # mc_samples draws along a leading axis
    (4, 3)
  """
  posteriors = find_posteriors(opt_state)
  mc = common_mc_samples(posteriors)
  check_covers(params, posteriors)
  offsets = merge_covering(params, [p.offset() for p in posteriors], lambda _: None)
  return _add_offsets(params, offsets, () if mc == 1 else (mc,))


def posterior_stddev(opt_state: Any, params: Any | None = None) -> Any:
  r"""The posterior standard deviation :math:`\sigma`, a pytree like the params.

  Needs no hyperparameters: ``ess`` and the prior precision live in the state.

  Args:
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.
    params: optional; when given, params outside every posterior (frozen by a
      mask) get an exact zero of their shape, and the result has the params'
      tree structure even where the state has ``optax.MaskedNode`` holes.

  Returns:
    A pytree of float32 (or wider) arrays.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, hess_init=4.0, weight_decay=0.0)
    >>> state = opt.init({"w": jnp.zeros(2)})
    >>> print(blrax.posterior_stddev(state)["w"])  # 1 / sqrt(ess * h)
    [0.05 0.05]
  """
  posteriors = find_posteriors(opt_state)
  trees = [p.stddev() for p in posteriors]
  if params is None:
    params = trees[0]
    fill = lambda _: jnp.zeros((), jnp.float32)
  else:
    check_covers(params, posteriors)
    fill = lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(
        jnp.result_type(p), jnp.float32))
    # Int leaves (counters) get no noise: their sigma is an exact zero.
    trees = [jax.tree.map(
        lambda p, s: s if _hole(s) or gaussian.is_trainable(p) else fill(p),
        params, t, is_leaf=_hole) for t in trees]
  return merge_covering(params, trees, fill)


def sample_posterior(
    key: jax.Array, params: Any, opt_state: Any, num_samples: int
) -> Any:
  r"""``num_samples`` independent draws from :math:`q`, for model averaging.

  Args:
    key: a PRNG key; independent of the key inside the optimizer state.
    params: the posterior mean.
    opt_state: the state of a blrax optimizer, possibly nested in wrappers.
    num_samples: how many draws; the leading axis of every leaf.

  Returns:
    A pytree like ``params`` whose leaves have a leading axis ``num_samples``.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0)
    >>> params = {"w": jnp.zeros(3)}
    >>> samples = blrax.sample_posterior(jax.random.key(1), params,
    ...                                  opt.init(params), num_samples=8)
    >>> samples["w"].shape
    (8, 3)
  """
  num_samples = validation.check_integer("num_samples", num_samples, low=1)
  key = noise_lib.canonicalize_key(key)
  posteriors = find_posteriors(opt_state)
  check_covers(params, posteriors)
  keys = jax.random.split(key, len(posteriors))
  offsets = merge_covering(
      params,
      [p.sample_offsets(k, num_samples) for p, k in zip(posteriors, keys)],
      lambda _: None,
  )
  return _add_offsets(params, offsets, (num_samples,))

