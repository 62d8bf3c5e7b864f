r"""The full-covariance Gaussian posterior over all params, flattened.

.. math::

  q(\theta) = \mathcal{N}(m, P^{-1}), \qquad P = \lambda (S + D_\delta),

with :math:`m` the params flattened by ``jax.flatten_util.ravel_pytree``,
:math:`S` a :math:`D\times D` curvature matrix kept in the state, :math:`\lambda`
the effective sample size and :math:`D_\delta = \mathrm{diag}(\delta)` the
weight decay: :math:`\delta I` for one scalar :math:`\delta`, or a diagonal
of per-coordinate decays (a per-leaf ``weight_decay`` or a
``weight_decay_mask``); the prior is :math:`N(m_0, (\lambda D_\delta)^{-1})`.
A draw is
:math:`\theta = m + L^{-\top}\epsilon/\sqrt\lambda` with :math:`LL^\top =
S + D_\delta` (Cholesky), whose covariance is :math:`L^{-\top}L^{-1}/\lambda =
P^{-1}`. One factor of :math:`S + D_\delta` serves the draw, the Price estimate
and the covariance (:math:`\sqrt\lambda L` is the factor of :math:`P`, and
never overflows where :math:`P` would). Cost: :math:`O(D^2)` memory and
:math:`O(D^3)` factorisations (three per train step), so it is for small models.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import numerics, validation
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import merge_rules


def flatten(tree: Any, leading: int = 0) -> jax.Array:
  """Concatenates the leaves (ravel_pytree order); keeps ``leading`` axes."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,))
  lead = leaves[0].shape[:leading]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate(
      [x.reshape(lead + (-1,)).astype(dtype) for x in leaves], axis=-1)


def unflatten(template: Any, flat: jax.Array) -> Any:
  """Splits the last axis of ``flat`` into leaves shaped like ``template``.

  ``template`` leaves have a leading axis of size 0 (they carry shape and
  dtype at no memory cost); holes (``optax.MaskedNode``) stay holes.
  """
  leaves, treedef = jax.tree.flatten(template)
  lead = flat.shape[:-1]
  out, start = [], 0
  for leaf in leaves:
    shape = leaf.shape[1:]
    size = int(np.prod(shape))
    out.append(flat[..., start:start + size].reshape(lead + shape))
    start += size
  return jax.tree.unflatten(treedef, out)


def shape_template(params: Any) -> Any:
  """Zero-size arrays that remember each param's shape and dtype."""
  return jax.tree.map(lambda p: jnp.zeros((0,) + tuple(p.shape), p.dtype),
                      params)


def dimension(template: Any) -> int:
  return sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(template))


def decay_matrix(weight_decay: Any, dim: int, dtype: Any) -> jax.Array:
  r""":math:`D_\delta`, the ``(D, D)`` weight-decay matrix: :math:`\delta I` for
  a scalar :math:`\delta`, :math:`\mathrm{diag}(\delta)` for a ``(D,)``
  vector."""
  if jnp.ndim(weight_decay) == 0:
    return weight_decay * jnp.eye(dim, dtype=dtype)
  return jnp.diag(jnp.asarray(weight_decay, dtype))


def price_curvature(grads: jax.Array, noise: jax.Array, factor: jax.Array,
                    ess: jax.Array) -> jax.Array:
  r"""Price estimate :math:`\hat H = \mathrm{mean}_s\,\mathrm{sym}(\hat g_s
  (\theta_s - m)^\top P)`.

  With :math:`\theta_s - m = L^{-\top}\epsilon_s/\sqrt\lambda` and
  :math:`LL^\top = S + D_\delta`, :math:`(\theta_s - m)^\top P =
  \sqrt\lambda\,(L\epsilon_s)^\top`, so no inverse is needed. Unbiased for
  :math:`E_q[\nabla^2\bar\ell]` (Stein's lemma).

  Args:
    grads: ``(S, D)`` gradients at the draws.
    noise: ``(S, D)`` standard-normal draws :math:`\epsilon_s`.
    factor: :math:`L`, the ``(D, D)`` lower Cholesky factor of
      :math:`S + D_\delta`.
    ess: :math:`\lambda`.
  """
  scaled = numerics.finite((noise @ factor.T) * jnp.sqrt(ess))  # sqrt(l) L e
  # Both factors enter the product scaled by powers of two to below 4 in
  # magnitude, and the scales are applied to each entry of the result: a
  # huge finite gradient then saturates (numerics.finite) where the plain
  # product could add +inf to -inf. The same bits for every other input.
  grads_unit, grads_scale = numerics.power_of_two_normalised(grads)
  scaled_unit, scaled_scale = numerics.power_of_two_normalised(scaled)
  outer = grads_unit.T @ scaled_unit / grads.shape[0]
  outer = 0.5 * (outer + outer.T)
  return numerics.finite(numerics.finite(outer * grads_scale) * scaled_scale)


class FullGaussian(NamedTuple):
  r"""A full-covariance Gaussian :math:`N(m, (\lambda(S+D_\delta))^{-1})`,
  :math:`D_\delta = \mathrm{diag}(\delta)`.

  The posterior of ``blrax.von(..., covariance="full")``.

  Attributes:
    key: the uint32 data (``blrax.noise.key_data``) of the PRNG key of the
      next draw (of a batch of keys for several samples).
    curvature: :math:`S`, a ``(D, D)`` symmetric matrix (float32 or wider).
    ess: :math:`\lambda`, a float scalar.
    weight_decay: :math:`\delta`: a float scalar (:math:`D_\delta = \delta
      I`), or a ``(D,)`` vector in ``ravel_pytree`` order (:math:`D_\delta =
      \mathrm{diag}(\delta)`; a per-leaf ``weight_decay`` or a
      ``weight_decay_mask``, zeros where masked).
    template: zero-size arrays shaped like the params (for unflattening).
    prior_mean: :math:`m_0` flattened to ``(D,)``; an empty tuple when it is
      0 (the default).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.von(0.1, ess=4.0, covariance="full", weight_decay=0.0)
    >>> posterior = blrax.find_posteriors(opt.init(jnp.zeros(2)))[0]
    >>> print(posterior.curvature)
    [[1. 0.]
     [0. 1.]]
    >>> print(posterior.precision())  # ess * (S + diag(weight_decay))
    [[4. 0.]
     [0. 4.]]
  """

  key: jax.Array
  curvature: jax.Array
  ess: jax.Array
  weight_decay: jax.Array
  template: Any
  prior_mean: Any = ()

  @property
  def mc_samples(self) -> int:
    return noise_lib.num_keys(self.key)

  def precision(self) -> jax.Array:
    """:math:`P = \\lambda (S + D_\\delta)`."""
    return self.ess * (self.curvature + self.decay_matrix())

  def factor(self) -> jax.Array:
    """:math:`L`, the lower Cholesky factor of :math:`S + D_\\delta`
    (:math:`\\sqrt\\lambda L` is :math:`P`'s)."""
    return jnp.linalg.cholesky(self.curvature + self.decay_matrix())

  def decay_matrix(self) -> jax.Array:
    """:math:`D_\\delta`, the ``(D, D)`` prior precision over ``ess``."""
    return decay_matrix(self.weight_decay, self.curvature.shape[0],
                        self.curvature.dtype)

  def decay_vector(self) -> jax.Array:
    """:math:`\\delta` per coordinate, ``(D,)`` (the diagonal of
    :math:`D_\\delta`)."""
    return jnp.broadcast_to(
        jnp.asarray(self.weight_decay, self.curvature.dtype),
        self.curvature.shape[:1])

  def covariance(self) -> jax.Array:
    """:math:`P^{-1}`, a ``(D, D)`` matrix (zeros when ``ess = inf``)."""
    eye = jnp.eye(self.curvature.shape[0], dtype=self.curvature.dtype)
    return jax.lax.cond(
        jnp.isfinite(self.ess),
        lambda: jax.scipy.linalg.cho_solve((self.factor(), True), eye)
        / self.ess,
        lambda: 0.0 * self.curvature)

  def noise(self) -> jax.Array:
    """Standard-normal :math:`\\epsilon`, shape ``(D,)`` or ``(S, D)``."""
    noise_key = noise_lib.split_key(noise_lib.wrap_key(self.key))[0]
    dim = self.curvature.shape[0]
    draw = lambda k: jax.random.normal(k, (dim,), self.curvature.dtype)
    return draw(noise_key) if noise_key.ndim == 0 else jax.vmap(draw)(noise_key)

  def next_key(self) -> jax.Array:
    return noise_lib.stored_like(
        self.key, noise_lib.split_key(noise_lib.wrap_key(self.key))[1])

  def advanced(self, curvature: Any, ess: Any, weight_decay: Any):
    """The posterior after an update: next key, new curvature and
    hyperparameters (the current ones, which ``inject_hyperparams`` may have
    changed; a ``(D,)`` weight decay keeps its dtype). Keeps the posterior's
    type."""
    decay = (gaussian.scalar(weight_decay) if jnp.ndim(weight_decay) == 0
             else jnp.asarray(weight_decay, self.weight_decay.dtype))
    return self._replace(key=self.next_key(), curvature=curvature,
                         ess=gaussian.scalar(ess), weight_decay=decay)

  def flat_offset(self, noise: jax.Array) -> jax.Array:
    """:math:`L^{-\\top}\\epsilon/\\sqrt\\lambda` for each row of ``noise``
    (zeros if ess=inf)."""

    def solve():
      return jax.scipy.linalg.solve_triangular(
          self.factor().T, noise.reshape(-1, noise.shape[-1]).T, lower=False
      ).T.reshape(noise.shape) / jnp.sqrt(self.ess)

    return jax.lax.cond(jnp.isfinite(self.ess), solve, lambda: 0.0 * noise)

  def stddev(self) -> Any:
    return unflatten(self.template, jnp.sqrt(jnp.diag(self.covariance())))

  def decays(self) -> Any:
    """:math:`\\delta` per coordinate, like the params."""
    return unflatten(self.template, self.decay_vector())

  def curvature_diagonal(self) -> Any:
    """The diagonal of :math:`S`, like the params (for diagnostics)."""
    return unflatten(self.template, jnp.diag(self.curvature))

  def offset(self, noise: jax.Array | None = None) -> Any:
    noise = self.noise() if noise is None else noise
    return unflatten(self.template, self.flat_offset(noise))

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    noise = jax.random.normal(
        key, (num_samples, self.curvature.shape[0]), self.curvature.dtype)
    return self.offset(noise)

  @classmethod
  def merge(cls, posteriors, means, prior_precision, prior_mean):
    r"""Merges :class:`FullGaussian` posteriors; returns (mean, posterior).

    With :math:`\Lambda_0 = \mathrm{diag}(\lambda_0)` the merged prior:
    :math:`\Lambda = \Lambda_0 + \sum_k \lambda_k S_k` and
    :math:`\Lambda m = \Lambda_0 m_0 + \sum_k \lambda_k (S_k m_k +
    \delta_k\odot(m_k - m_{0k}))`. The merged weight decay
    :math:`\lambda_0/\sum_k\lambda_k` keeps shard 0's form (a scalar, or a
    ``(D,)`` vector).
    """
    first = posteriors[0]
    dtype = first.curvature.dtype
    dim = first.curvature.shape[0]
    ess = [p.ess for p in posteriors]
    total = sum(ess[1:], ess[0])
    priors = [p.ess * p.weight_decay for p in posteriors]
    flat_means = [flatten(m).astype(dtype) for m in means]
    prior_means = [_flat_prior_mean(p, m)
                   for p, m in zip(posteriors, flat_means)]
    if prior_precision is None:
      prior_precision = merge_rules.common(
          "opt_states", priors, "prior precisions ess * weight_decay",
          merge_rules.PRIOR_HINT)
    elif not merge_rules.is_scalar(prior_precision):
      # A pytree like the params: its leaves (scalars or full-shaped),
      # flattened to (D,) in ravel_pytree order.
      prior_precision = flatten(jax.tree.map(
          lambda t, v: jnp.broadcast_to(jnp.asarray(v, dtype), t.shape[1:]),
          first.template, prior_precision))
    m0 = (merge_rules.common("opt_states", prior_means, "prior means",
                             "pass `prior_mean=`.")
          if prior_mean is None else
          flatten(merge_rules.leafwise(prior_mean, means[0])))
    lik = sum(e * p.curvature for e, p in zip(ess, posteriors))
    # The means scaled by one power of two (exact) to below 4, so that the
    # linear term cannot overflow for huge means; scaled back after.
    _, scale = numerics.power_of_two_normalised(jnp.stack(
        [jnp.max(jnp.abs(x)) for x in (m0.astype(dtype), *flat_means,
                                        *prior_means)]))
    scaled_m0 = m0.astype(dtype) / scale
    lin = sum(e * (p.curvature @ (m / scale)
                   + p.weight_decay * (m / scale - m0k / scale))
              for e, p, m, m0k in zip(ess, posteriors, flat_means, prior_means))
    precision = decay_matrix(prior_precision, dim, dtype) + lik
    precision = 0.5 * (precision + precision.T)
    chol = jnp.linalg.cholesky(precision)
    if not validation.is_traced(chol) and not np.all(np.isfinite(chol)):
      raise ValueError(
          "`opt_states`: the merged precision diag(prior_precision) + "
          "sum_k ess_k S_k is not positive definite.")
    mean = jax.scipy.linalg.cho_solve((chol, True),
                                      prior_precision * scaled_m0 + lin)
    mean = numerics.finite(numerics.finite(mean) * scale)
    mean = unflatten(first.template, mean)
    if jnp.ndim(first.weight_decay) == 0 and jnp.ndim(prior_precision) == 0:
      decay = gaussian.scalar(jnp.asarray(prior_precision) / total)
    else:  # shard 0's form: a (D,) vector, or a scalar if uniform
      decay = merge_rules.like_leaf(
          jnp.asarray(prior_precision, dtype) / total.astype(dtype),
          first.weight_decay)
    fields = dict(curvature=lik / total, ess=gaussian.scalar(total),
                  weight_decay=decay)
    if "prior_mean" in type(first)._fields and (
        jax.tree.leaves(getattr(first, "prior_mean", ()))
        or validation.is_traced(m0) or np.any(np.asarray(m0) != 0)):
      fields["prior_mean"] = m0.astype(dtype)
    return mean, first._replace(**fields)


def _flat_prior_mean(posterior: Any, flat_mean: jax.Array) -> jax.Array:
  """A FullGaussian's prior mean, flat ``(D,)`` (zeros if it keeps none)."""
  mean = getattr(posterior, "prior_mean", ())
  if jax.tree.leaves(mean):
    return jnp.asarray(mean, flat_mean.dtype)
  return jnp.zeros_like(flat_mean)


