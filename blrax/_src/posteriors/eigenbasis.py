r"""The eigenbasis Gaussian: a diagonal posterior in a Kronecker eigenbasis.

Per weight matrix :math:`W \in \mathbb{R}^{m\times n}` (a leaf of shape
:math:`(d_1, \dots, d_k)` seen as :math:`(d_1\cdots d_{k-1}) \times d_k`),

.. math::

  \mathrm{vec}(W) \sim \mathcal{N}\big(\mathrm{vec}(M),\
    (Q_R\otimes Q_L)\,\mathrm{diag}(\mathrm{vec}\,\sigma^2)\,
    (Q_R\otimes Q_L)^\top\big), \qquad
  \sigma = \frac{1}{\sqrt{\lambda(h' + \delta)}},

with :math:`Q_L`, :math:`Q_R` orthogonal: the posterior of
:func:`blrax.evon`. This module holds the type and the rotations it is made
of; how the bases and :math:`h'` are learned is EVON's (``evon.py``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from blrax._src import numerics
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """The 2-D view of a leaf: ``(prod(shape[:-1]), shape[-1])``; a vector
  ``(d,)`` is ``(d, 1)``, a scalar ``(1, 1)``."""
  if len(shape) == 0:
    return (1, 1)
  if len(shape) == 1:
    return (shape[0], 1)
  return (math.prod(shape[:-1]), shape[-1])


def real_dtype(param: Any) -> Any:
  """The dtype of a params leaf (an array, a ShapeDtypeStruct or a number);
  complex params are refused."""
  dtype = getattr(param, "dtype", None)
  dtype = jnp.result_type(param) if dtype is None else dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"EVON needs real params, got a leaf of dtype {dtype}.")
  return dtype


def rotate_matrix(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
  """:math:`Q_L^\\top X Q_R` over the last two axes (identity where a basis
  is the empty placeholder)."""
  if left.size:
    x = jnp.matmul(left.T, x)
  if right.size:
    x = jnp.matmul(x, right)
  return x


def unrotate_matrix(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
  """:math:`Q_L X Q_R^\\top` over the last two axes."""
  if left.size:
    x = jnp.matmul(left, x)
  if right.size:
    x = jnp.matmul(x, right.T)
  return x


def scaled(linear, x: jax.Array, power: int = 1) -> jax.Array:
  """``linear(x)`` for a map homogeneous of degree ``power`` (a rotation:
  1, an outer product: 2), computed on ``x / max|x|`` and scaled back,
  saturated at the dtype's range: huge finite entries would otherwise meet
  as ``inf - inf`` inside the matrix product."""
  scale = jnp.max(jnp.abs(x)) if x.size else jnp.ones((), x.dtype)
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  out = linear(x / scale)
  for _ in range(power):
    out = numerics.finite(out * scale)
  return out


def as_matrix(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x`` (leading axes, then ``shape``) with ``shape`` viewed as a matrix."""
  lead = x.shape[:x.ndim - len(shape)]
  return x.reshape(lead + matrix_shape(shape))


def squared_map(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
  r""":math:`(Q_L\odot Q_L)\,X\,(Q_R\odot Q_R)^\top`: the diagonal of
  :math:`(Q_R\otimes Q_L)\mathrm{diag}(\mathrm{vec}X)(Q_R\otimes Q_L)^\top`."""
  return unrotate_matrix(x, jnp.square(left), jnp.square(right))


class EigenbasisGaussian(NamedTuple):
  r"""A Gaussian with Kronecker eigenbasis: EVON's posterior.

  Per params leaf (seen as an :math:`m\times n` matrix, see
  :func:`blrax.scale_by_evon`),
  :math:`\mathrm{vec}(W) \sim N(\mathrm{vec}M, (Q_R\otimes Q_L)
  \mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes Q_L)^\top)` with
  :math:`\sigma = 1/\sqrt{\lambda(h'+\delta)}`: a draw is
  :math:`M + Q_L(\sigma\odot E)Q_R^\top`. Found in the optimizer state by
  :func:`blrax.find_posteriors`. Its ``stddev()`` (what
  :func:`blrax.posterior_stddev` returns) is the **marginal** standard
  deviation of each weight in the original coordinates,
  :math:`\sqrt{(Q_L\odot Q_L)\,\sigma^2\,(Q_R\odot Q_R)^\top}`;
  ``rotated_stddev()`` is :math:`\sigma` itself, in the rotated basis.
  ``rotate(tree)`` maps a params-like tree to the rotated coordinates
  :math:`Q_L^\top X Q_R` (e.g. to pass ``hessian=``), ``unrotate`` back.

  Attributes:
    noise_state: the noise generator's state (the uint32 data of the PRNG
      key of the next draw; of ``mc_samples`` keys for several samples per
      step). The noise is drawn
      in the rotated basis.
    curvature: :math:`h'`, the curvature in the rotated basis, a pytree like
      the params (float32 or wider).
    left: :math:`Q_L` per leaf, an :math:`m\times m` orthogonal matrix, or a
      ``(0, 0)`` array where the left side is the identity.
    right: :math:`Q_R` per leaf, :math:`n\times n` or ``(0, 0)``.
    ess: :math:`\lambda`, a float scalar.
    weight_decay: :math:`\delta`, a float scalar, or one scalar per leaf (a
      pytree like the curvature) when the optimizer was given a per-leaf
      ``weight_decay`` or a ``weight_decay_mask``.
    prior_mean: :math:`M_0`, the prior's mean, a pytree like the params; an
      empty tuple when it is 0 (the default).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.evon(0.1, ess=100.0, weight_decay=0.0)
    >>> posterior = blrax.find_posteriors(opt.init(jnp.zeros((3, 2))))[0]
    >>> print(posterior.left.shape, posterior.right.shape)  # identity at init
    (3, 3) (2, 2)
    >>> print(posterior.stddev())  # 1 / sqrt(ess * hess_init)
    [[0.1 0.1]
     [0.1 0.1]
     [0.1 0.1]]
  """

  noise_state: Any
  curvature: Any
  left: Any
  right: Any
  ess: jax.Array
  weight_decay: jax.Array
  prior_mean: Any = ()

  @property
  def key(self) -> jax.Array:
    return self.noise_state.key

  @property
  def mc_samples(self) -> int:
    return noise_lib.num_keys(self.key)

  def noise(self) -> Any:
    """The standard normals :math:`E` (rotated basis) of the next update
    (zeros when ``ess = inf``)."""
    return self.noise_state.draw(self.curvature, jnp.isfinite(self.ess))

  def decays(self) -> Any:
    """:math:`\\delta` per leaf, a pytree like the curvature."""
    return gaussian.per_leaf(self.weight_decay, self.curvature)

  def rotated_stddev(self) -> Any:
    """:math:`\\sigma = 1/\\sqrt{\\lambda(h'+\\delta)}` in the rotated basis."""
    return jax.tree.map(
        lambda h, d: gaussian.stddev(h, self.ess, d), self.curvature,
        self.decays())

  def _map(self, fn, *trees) -> Any:
    return jax.tree.map(
        lambda h, ql, qr, *xs: fn(h.shape, ql, qr, *xs), self.curvature,
        self.left, self.right, *trees)

  def rotate(self, tree: Any) -> Any:
    """:math:`Q_L^\\top X Q_R` per leaf of a params-like ``tree`` (leading
    axes allowed)."""
    return self._map(
        lambda shape, ql, qr, x: rotate_matrix(as_matrix(jnp.asarray(x), shape),
                                         ql, qr).reshape(jnp.shape(x)),
        tree)

  def unrotate(self, tree: Any) -> Any:
    """:math:`Q_L X Q_R^\\top` per leaf (the inverse of ``rotate``)."""
    return self._map(
        lambda shape, ql, qr, x: unrotate_matrix(as_matrix(jnp.asarray(x), shape),
                                           ql, qr).reshape(jnp.shape(x)),
        tree)

  def stddev(self) -> Any:
    """The marginal stddev of each weight, in the original coordinates."""
    return self._map(
        lambda shape, ql, qr, s: jnp.sqrt(jnp.maximum(squared_map(
            jnp.square(s).reshape(matrix_shape(shape)), ql, qr), 0.0)
        ).reshape(shape), self.rotated_stddev())

  def curvature_diagonal(self) -> Any:
    r"""The diagonal of the curvature matrix :math:`(Q_R\otimes Q_L)
    \mathrm{diag}(h')(Q_R\otimes Q_L)^\top`, like the params."""
    return self._map(
        lambda shape, ql, qr, h: squared_map(
            h.reshape(matrix_shape(shape)), ql, qr).reshape(shape),
        self.curvature)

  def offset(self, noise: Any | None = None) -> Any:
    """:math:`Q_L(\\sigma\\odot E)Q_R^\\top`, by default with the state's
    own noise."""
    noise = self.noise() if noise is None else noise
    return self.unrotate(jax.tree.map(lambda s, e: s * e,
                                      self.rotated_stddev(), noise))

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    """``num_samples`` fresh draws of the offset from ``key``."""
    return self.offset(
        self.noise_state.fresh(key, self.curvature, num_samples))

  @classmethod
  def merge(cls, posteriors, means, prior_precision, prior_mean):
    """Refused: shards' eigenbases differ, so their precisions do not add in
    closed form within this type."""
    del posteriors, means, prior_precision, prior_mean
    raise ValueError(
        "`opt_states` holds EigenbasisGaussian posteriors (evon): their "
        "eigenbases differ between shards, so Bayes' rule does not stay in "
        "this family; merge_posteriors supports DiagonalGaussian (ivon, von, "
        "vadam, vogn, bsam) and FullGaussian (von covariance='full').")
