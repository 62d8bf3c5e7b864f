r"""The diagonal-Gaussian posterior shared by every diagonal BLR variant.

All diagonal variants (IVON, diagonal VON, Vadam, VOGN) keep the same
variational family, in the normalised form of Shen et al. (2024):

.. math::

  q(\theta) = \mathcal{N}\big(m,\ \mathrm{diag}(\sigma^2)\big), \qquad
  \sigma = \frac{1}{\sqrt{\lambda\,(h + \delta)}},

where the mean :math:`m` is the params, :math:`h` a curvature estimate kept in
the optimizer state, :math:`\lambda` the effective sample size (``ess``) and
:math:`\delta` the weight decay (prior precision divided by :math:`\lambda`).
A draw is :math:`\theta = m + \sigma\epsilon`, with :math:`\epsilon` from the
noise generator whose state the posterior holds (``noise.py``).

This module is the core: it imports no variant and no API module; the
posterior functions (``lookup.py``) find its states by type.

References:
  Shen et al., `Variational Learning is Effective for Large Deep Networks
  <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  Khan & Rue, `The Bayesian Learning Rule <https://arxiv.org/abs/2107.04562>`_,
  JMLR 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import base, numerics, validation
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import merge_rules
from blrax._src.posteriors import prior as prior_lib


def state_dtype(dtype: Any) -> jnp.dtype:
  """Curvature and momentum dtype: at least float32 whatever the params use.

  A bfloat16 EMA with ``b2 = 0.99999`` would never move (the increment is
  below bf16 resolution), so low-precision params get float32 state.
  """
  return jnp.promote_types(dtype, jnp.float32)


def scalar(value: Any) -> jax.Array:
  """A hyperparameter kept in the state: a float32 scalar (float64 under x64)."""
  return jnp.asarray(value, jnp.result_type(float))


def stddev(curvature: jax.Array, ess: jax.Array, weight_decay: jax.Array):
  r""":math:`\sigma = 1/\sqrt{\lambda (h + \delta)}` for one leaf.

  Exactly 0 when ``ess = inf`` (a point mass), even where :math:`h+\delta=0`;
  at most :math:`1/\sqrt{\text{tiny}}` (finite) where
  :math:`\lambda(h+\delta)` underflows.
  """
  precision = jnp.maximum(ess * (curvature + weight_decay),
                          jnp.finfo(curvature.dtype).tiny)
  return jnp.where(jnp.isinf(ess), 0.0, jax.lax.rsqrt(precision))


class DiagonalGaussian(NamedTuple):
  r"""A diagonal Gaussian :math:`N(m, 1/(\lambda(h+\delta)))` around the params.

  The posterior of every diagonal variant (IVON, diagonal VON, Vadam,
  VOGN), found in their states by :func:`blrax.find_posteriors`.

  Attributes:
    noise_state: the state of the noise generator (``blrax.noise``): the
      uint32 data of the PRNG key of the next draw (``mc_samples`` keys' data
      when the optimizer draws
      several samples per step), and whatever else the generator keeps.
    curvature: :math:`h`, a pytree like the params (``optax.MaskedNode`` where
      a wrapper masked a param out), float32 or wider.
    ess: :math:`\lambda`, the effective sample size, a float scalar.
    weight_decay: :math:`\delta`, the prior precision over :math:`\lambda`:
      a float scalar, or a pytree like the curvature (per-leaf prior
      precisions, ``weight_decay=`` a pytree or ``weight_decay_mask=``).
    prior_mean: :math:`m_0`, the prior's mean, a pytree like the params; an
      empty tuple when it is 0 (the default).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, hess_init=3.0, weight_decay=1.0)
    >>> posterior = blrax.find_posteriors(opt.init(jnp.zeros(2)))[0]
    >>> print(posterior.curvature, posterior.ess, posterior.weight_decay)
    [3. 3.] 100.0 1.0
    >>> print(posterior.stddev())  # 1 / sqrt(ess * (h + weight_decay))
    [0.05 0.05]
  """

  noise_state: Any
  curvature: Any
  ess: jax.Array
  weight_decay: Any
  prior_mean: Any = ()

  @property
  def key(self) -> jax.Array:
    return self.noise_state.key

  @property
  def mc_samples(self) -> int:
    return noise_lib.num_keys(self.key)

  def noise(self) -> Any:
    """The standard-normal :math:`\\epsilon` this state's next update expects
    (zeros when ``ess = inf``: the posterior is a point mass)."""
    return self.noise_state.draw(self.curvature, jnp.isfinite(self.ess))

  def decays(self) -> Any:
    """:math:`\\delta` like the curvature (the scalar repeated per leaf)."""
    return per_leaf(self.weight_decay, self.curvature)

  def stddev(self) -> Any:
    """:math:`\\sigma` like the params, with holes where masked."""
    return jax.tree.map(lambda h, d: stddev(h, self.ess, d), self.curvature,
                        self.decays())

  def curvature_diagonal(self) -> Any:
    """:math:`h`, like the params (for diagnostics)."""
    return self.curvature

  def offset(self, noise: Any | None = None) -> Any:
    """:math:`\\sigma\\epsilon`, by default with the state's own noise."""
    noise = self.noise() if noise is None else noise
    return jax.tree.map(lambda s, e: s * e, self.stddev(), noise)

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    """``num_samples`` fresh draws of :math:`\\sigma\\epsilon` from ``key``."""
    return self.offset(self.noise_state.fresh(key, self.curvature, num_samples))

  @classmethod
  def merge(cls, posteriors, means, prior_precision, prior_mean):
    """Merges :class:`DiagonalGaussian` posteriors; returns (mean, posterior)."""
    first = posteriors[0]
    curv = first.curvature
    ess = [p.ess for p in posteriors]
    total = sum(ess[1:], ess[0])
    decays = [merge_rules.leafwise(p.weight_decay, p.curvature) for p in posteriors]
    priors = [jax.tree.map(lambda d, e=e: e * d, dk)
              for dk, e in zip(decays, ess)]
    prior_means = [merge_rules.prior_mean_like(p, m) for p, m in zip(posteriors, means)]
    scalar_prior = all(merge_rules.is_scalar(p.weight_decay) for p in posteriors)
    if prior_precision is None:
      prior_precision = merge_rules.common("opt_states", priors, "prior precisions "
                                "ess * weight_decay", merge_rules.PRIOR_HINT)
      if scalar_prior:
        prior_precision = jax.tree.leaves(prior_precision)[0]
    else:
      scalar_prior = merge_rules.is_scalar(prior_precision)
    if prior_mean is None:
      prior_mean = merge_rules.common("opt_states", prior_means, "prior means",
                           "pass `prior_mean=`.")
    lam0 = merge_rules.leafwise(prior_precision, curv)

    def leaf(lam0_, m0, *per_shard):
      if base.is_hole(lam0_):
        return lam0_
      k = len(posteriors)
      h, m, d, mk0 = (per_shard[i * k:(i + 1) * k] for i in range(4))
      if not is_trainable(m[0]):  # an int counter: shard 0's.
        return jnp.asarray(m[0]), sum(e * hk for e, hk in zip(ess, h)) / total
      dtype = h[0].dtype
      # Every mean scaled by one power of two (exact) to below 4, so that
      # the linear terms cannot overflow for huge means; the merged mean is
      # scaled back and saturated.
      means_ = [x.astype(dtype) for x in (m0, *m, *mk0)]
      _, scale = numerics.power_of_two_normalised(
          jnp.stack([jnp.max(jnp.abs(x)) for x in means_]))
      m0, *means_ = (x / scale for x in means_)
      m, mk0 = means_[:k], means_[k:]
      # The shards' likelihoods: precision e_k h_k, linear term e_k (h_k + d_k)
      # m_k - e_k d_k m0_k = e_k h_k m_k + e_k d_k (m_k - m0_k).
      lik = sum(e * hk for e, hk in zip(ess, h))
      lin = sum(e * (hk * mk + dk * (mk - m0k))
                for e, hk, mk, dk, m0k in zip(ess, h, m, d, mk0))
      precision = lam0_ + lik
      num = lam0_ * m0 + lin
      tiny = jnp.finfo(dtype).tiny
      fallback = sum(m) / k
      mean = jnp.where(precision > tiny, num / jnp.maximum(precision, tiny),
                       fallback)
      return numerics.finite(numerics.finite(mean) * scale), lik / total

    out = jax.tree.map(leaf, lam0, merge_rules.leafwise(prior_mean, curv), *[
        c for c in (p.curvature for p in posteriors)], *means, *decays,
                       *prior_means, is_leaf=base.is_hole)
    pair = lambda x: isinstance(x, tuple)  # noqa: E731
    mean = jax.tree.map(lambda x: x if base.is_hole(x) else x[0], out,
                        is_leaf=lambda x: pair(x) or base.is_hole(x))
    curvature = jax.tree.map(lambda x: x if base.is_hole(x) else x[1], out,
                             is_leaf=lambda x: pair(x) or base.is_hole(x))
    # Each leaf keeps the shape and dtype of shard 0's (so the merged state
    # restores into `opt.init(params)` and a jitted step does not retrace).
    old_decays = merge_rules.leafwise(first.weight_decay, curv)
    weight_decay = (scalar(jnp.asarray(prior_precision) / total)
                    if scalar_prior else
                    jax.tree.map(
                        lambda l0, h, old: l0 if base.is_hole(l0) else
                        merge_rules.like_leaf((l0 / total).astype(h.dtype), old),
                        lam0, curvature, old_decays, is_leaf=base.is_hole))
    fields = dict(curvature=curvature, ess=scalar(total),
                  weight_decay=weight_decay)
    if "prior_mean" in type(first)._fields:
      old = getattr(first, "prior_mean", ())
      if jax.tree.leaves(old) or any(
          np.any(np.asarray(x) != 0) for x in jax.tree.leaves(prior_mean)
          if not validation.is_traced(x)):
        fields["prior_mean"] = merge_rules.leafwise(prior_mean, curv)
    return mean, first._replace(**fields)


def per_leaf(weight_decay: Any, like: Any) -> Any:
  """``weight_decay`` as a pytree like ``like``: a single leaf (a scalar) is
  repeated for every leaf, a pytree is returned as it is."""
  if prior_lib.is_per_leaf(weight_decay):
    return weight_decay
  return jax.tree.map(lambda _: weight_decay, like)


def init_diagonal_gaussian(params: Any, *, key: int | jax.Array,
                           curvature_init: Any, ess: Any, weight_decay: Any,
                           mc_samples: int,
                           generator: noise_lib.Generator,
                           prior_mean: Any = ()) -> DiagonalGaussian:
  """Builds the posterior state; only maps over ``params`` (shapes suffice).

  ``weight_decay`` is a scalar or an already resolved per-leaf pytree
  (``prior.decay_tree``); ``prior_mean`` a resolved pytree or ``()``.
  """
  # full_like (not full) so that under an explicit-sharding mesh the state is
  # sharded like the params; it also accepts ShapeDtypeStructs.
  curvature = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, curvature_init, state_dtype(
          real_dtype(p, jax.tree_util.keystr(path) or "(root)"))), params)
  return DiagonalGaussian(
      noise_state=generator.init(noise_lib.initial_key(key, mc_samples, params),
                                 curvature),
      curvature=curvature, ess=scalar(ess),
      weight_decay=(weight_decay if prior_lib.is_per_leaf(weight_decay)
                    else scalar(weight_decay)),
      prior_mean=prior_mean)


def _hole(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_grads(grads: Any, params: Any, mc_samples: int, name: str = "grads",
                batch_axis: bool = False):
  """Raises ``ValueError`` unless each leaf is ``(mc_samples,) + param.shape``.

  With ``mc_samples == 1`` the sample axis is absent; with ``batch_axis``
  (per-example gradients) a batch axis of any size follows it.
  """
  if params is None:
    raise ValueError(
        "blrax optimizers need `params` (the posterior mean) in `update`."
    )
  grads_def = jax.tree.structure(grads, is_leaf=_hole)
  params_def = jax.tree.structure(params, is_leaf=_hole)
  if grads_def != params_def:
    raise ValueError(
        f"`{name}` must have the structure of params: "
        f"{structure_difference(grads, params, '`params`')}.")
  prefix = () if mc_samples == 1 else (mc_samples,)
  for path, g, p in zip(_paths(params), jax.tree.leaves(grads),
                        jax.tree.leaves(params)):
    if not is_trainable(p):
      continue  # ints, bools: no update whatever the grads (float0 or not).
    g_dtype = _dtype(g)
    if g_dtype is None or not jnp.issubdtype(g_dtype, jnp.floating):
      raise ValueError(
          f"`{name}` leaf{_at(path)} must be real floating point, got dtype "
          f"{g_dtype} (complex params and grads are not supported).")
    shape, p_shape = tuple(np.shape(g)), tuple(np.shape(p))
    if batch_axis and len(shape) == len(prefix) + 1 + len(p_shape):
      if shape[len(prefix)] == 0:
        raise ValueError(
            f"`{name}` leaf{_at(path)} has a batch of 0 examples (shape {shape}): "
            "the curvature of an empty batch is undefined.")
      shape = shape[:len(prefix)] + shape[len(prefix) + 1:]
    elif batch_axis:
      shape = None
    want = prefix + p_shape
    if shape != want:
      expected = (str(want) if not batch_axis else
                  "(" + ", ".join(map(str, prefix + ("batch",) + p_shape)) + ")")
      hint = ("VOGN's curvature is the mean squared per-example gradient: "
              "pass the mean gradient with hessian=squares, both from "
              "blrax.value_grads_and_squares(loss_fn, params, *batch) (one "
              "pass, about 2.2x an Adam step), i.e. update(grads, state, "
              "params, hessian=squares); or per-example gradients with a "
              "batch axis after the sample axis, from "
              "blrax.per_example_grads (one pass per example)"
              if batch_axis else
              "no leading sample axis" if mc_samples == 1 else
              "leading axis of size mc_samples, e.g. from "
              "jax.vmap(jax.grad(loss))")
      if mc_samples > 1 and shape == p_shape:
        hint += (
            "; got the params' own shape. Under optax.MultiSteps this is its "
            "params-shaped gradient accumulator, whatever shape was passed "
            "in: optax.MultiSteps cannot carry the sample axis, use "
            "blrax.MultiSteps (a weight draw per micro-batch) instead")
      raise ValueError(
          f"`{name}` leaf has shape {tuple(np.shape(g))}{_at(path)}, expected "
          f"{expected} "
          f"(mc_samples={mc_samples}: {hint}).")


def _dtype(x: Any):
  """The dtype of an array or of a Python number (None for anything else)."""
  if hasattr(x, "dtype"):
    return x.dtype
  if isinstance(x, (bool, int, float, complex)):
    return jnp.result_type(x)
  return None


def real_dtype(param: Any, path: str = "(root)"):
  """The dtype of a params leaf; raises unless it is a real array or number."""
  dtype = _dtype(param)
  if dtype is None:
    raise validation.ArgumentTypeError(
        f"`params` leaf{_at(path)} must be an array or a number, got "
        f"{type(param).__name__}{EQUINOX_HINT}.")
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(
        f"`params` leaf{_at(path)} is complex ({dtype}): blrax posteriors are "
        "over real parameters.")
  return dtype


def _at(path: str) -> str:
  return "" if path == "(root)" else f" (at {path})"


def _paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) or "(root)" for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_hole)[0]
          if not _hole(leaf)]


def is_trainable(param: Any) -> bool:
  """Floating-point params get noise and updates; ints and bools (counters,
  flags) are carried unchanged, as with optax's own optimizers."""
  dtype = _dtype(param)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) or "(root)" for path, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_hole)[0]]


def structure_difference(tree: Any, like: Any, like_name: str) -> str:
  """How ``tree``'s structure differs from ``like``'s, by leaf path (the
  missing and unexpected keys), or both PyTreeDefs if the paths agree."""
  mine, theirs = _leaf_paths(tree), _leaf_paths(like)
  missing = [p for p in theirs if p not in set(mine)]
  extra = [p for p in mine if p not in set(theirs)]
  show = lambda paths: ", ".join(paths[:5]) + (  # noqa: E731
      f" and {len(paths) - 5} more" if len(paths) > 5 else "")
  parts = ([f"it lacks {show(missing)}, which {like_name} has"] if missing
           else []) + ([f"it has {show(extra)}, which {like_name} lacks"]
                       if extra else [])
  if not parts:
    return (f"the same leaf paths but different containers or static fields: "
            f"got {_short(jax.tree.structure(tree, is_leaf=_hole))}, "
            f"{like_name} has {_short(jax.tree.structure(like, is_leaf=_hole))}"
            f"{non_array_hint(tree) or non_array_hint(like)}")
  return "; ".join(parts) + (non_array_hint(tree) or non_array_hint(like))


EQUINOX_HINT = (
    " (an Equinox module holds non-array fields: train only its arrays, "
    "`params, static = eqx.partition(model, eqx.is_inexact_array)`, "
    "`opt.init(params)`, and rebuild the model at the draw with "
    "`eqx.combine(params, static)`)")


def non_array_hint(tree: Any) -> str:
  """:data:`EQUINOX_HINT` if ``tree`` has a leaf that is no array or number
  (a function, a string: an unpartitioned Equinox module), else ``""``."""
  leaves = jax.tree.leaves(tree, is_leaf=_hole)
  if any(not _hole(x) and _dtype(x) is None for x in leaves):
    return EQUINOX_HINT
  return ""


def _short(treedef: Any, limit: int = 120) -> str:
  text = str(treedef)
  return text if len(text) <= limit else text[:limit] + "..."


def check_params(params: Any, curvature: Any) -> None:
  """Raises ``ValueError`` unless ``params`` matches the state's shapes.

  ``params`` are the mean the state was initialised for: a different shape
  would silently broadcast against the curvature.
  """
  params_def = jax.tree.structure(params, is_leaf=_hole)
  state_def = jax.tree.structure(curvature, is_leaf=_hole)
  if params_def != state_def:
    raise ValueError(
        "`params` must have the structure the optimizer was initialised "
        f"with: {structure_difference(params, curvature, 'the state')}.")
  for path, p, h in zip(_paths(params), jax.tree.leaves(params),
                        jax.tree.leaves(curvature)):
    real_dtype(p, path)
    if tuple(np.shape(p)) != tuple(h.shape):
      raise ValueError(
          f"`params` leaf{_at(path)} has shape {tuple(np.shape(p))}, but the "
          f"optimizer state was initialised for shape {tuple(h.shape)}.")
