r"""The eigenbasis Gaussian: a diagonal posterior in a Kronecker eigenbasis.

Per params leaf, a tensor :math:`W` with modes :math:`1..k` (a matrix
:math:`m\times n`: :math:`k = 2`),

.. math::

  W = M + \mathcal{R}^{-1}(\sigma\odot E), \qquad
  \mathcal{R}^{-1}(Y) = Y \times_1 Q_1 \times_2 Q_2 \cdots \times_k Q_k,
  \qquad \sigma = \frac{1}{\sqrt{\lambda(h' + \delta)}},

with :math:`E` standard normal and one orthogonal matrix :math:`Q_i` per
mode (the identity on a mode without one): for a matrix,
:math:`W = M + Q_L(\sigma\odot E)Q_R^\top`, i.e.
:math:`\mathrm{vec}(W) \sim \mathcal{N}(\mathrm{vec}M, (Q_R\otimes Q_L)
\mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes Q_L)^\top)`. This is the
posterior of :func:`blrax.evon`. This module holds the type and the
rotations it is made of; how the bases and :math:`h'` are learned is
EVON's (``evon.py``).

Storage: per leaf a tuple with one entry per mode, a :math:`d\times d`
orthogonal matrix where the mode is rotated and a :math:`0\times d`
placeholder where it is not (the identity; its shape still records the
size :math:`d`). The modes are those of the leaf, or a coarser grouping of
consecutive axes (EVON's ``merge_dims``): the product of the sizes is the
leaf's size, and a leaf is reshaped to them before the mode products.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from blrax._src import numerics
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian


def real_dtype(param: Any) -> Any:
  """The dtype of a params leaf (an array, a ShapeDtypeStruct or a number);
  complex params are refused."""
  dtype = getattr(param, "dtype", None)
  dtype = jnp.result_type(param) if dtype is None else dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"EVON needs real params, got a leaf of dtype {dtype}.")
  return dtype


def mode_sizes(bases: tuple) -> tuple[int, ...]:
  """The sizes of the modes the bases act on (one per basis or placeholder)."""
  return tuple(int(q.shape[-1]) for q in bases)


def is_rotated(q: jax.Array) -> bool:
  """Whether a mode has a basis (not the :math:`0\\times d` placeholder)."""
  return q.shape[0] > 0


def _mode_products(x: jax.Array, bases: tuple, shape: tuple[int, ...],
                   inverse: bool) -> jax.Array:
  lead = x.shape[:x.ndim - len(shape)]
  y = x.reshape(lead + mode_sizes(bases))
  for i, q in enumerate(bases):
    if is_rotated(q):
      axis = len(lead) + i
      # rotate: sum_a x_a Q_aj (Q^T along the mode); back: sum_j y_j Q_aj.
      y = jnp.moveaxis(
          jnp.tensordot(y, q, axes=([axis], [1 if inverse else 0])), -1, axis)
  return y.reshape(x.shape)


def rotate(x: jax.Array, bases: tuple, shape: tuple[int, ...]) -> jax.Array:
  r""":math:`\mathcal{R}(X) = X\times_1 Q_1^\top\cdots\times_k Q_k^\top` of a
  leaf of shape ``shape`` (leading axes allowed; for a matrix
  :math:`Q_L^\top X Q_R`)."""
  return _mode_products(x, bases, shape, inverse=False)


def unrotate(x: jax.Array, bases: tuple, shape: tuple[int, ...]) -> jax.Array:
  r""":math:`\mathcal{R}^{-1}(Y) = Y\times_1 Q_1\cdots\times_k Q_k` (for a
  matrix :math:`Q_L Y Q_R^\top`), the inverse of :func:`rotate`."""
  return _mode_products(x, bases, shape, inverse=True)


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


def squared_map(x: jax.Array, bases: tuple, shape: tuple[int, ...]):
  r""":math:`X \times_1 (Q_1\odot Q_1) \cdots \times_k (Q_k\odot Q_k)`: the
  diagonal of :math:`\mathcal{R}^{-1}\,\mathrm{diag}(X)\,\mathcal{R}` (for a
  matrix, of :math:`(Q_R\otimes Q_L)\mathrm{diag}(\mathrm{vec}X)(Q_R\otimes
  Q_L)^\top`)."""
  return unrotate(x, tuple(jnp.square(q) for q in bases), shape)


class EigenbasisGaussian(NamedTuple):
  r"""A Gaussian with a Kronecker eigenbasis: EVON's posterior.

  Per params leaf with modes :math:`1..k`, a draw is :math:`M +
  \mathcal{R}^{-1}(\sigma\odot E)` with :math:`\mathcal{R}^{-1}(Y) =
  Y\times_1 Q_1\cdots\times_k Q_k` and :math:`\sigma =
  1/\sqrt{\lambda(h'+\delta)}`; for a matrix :math:`M + Q_L(\sigma\odot
  E)Q_R^\top`, i.e. :math:`\mathrm{vec}(W) \sim N(\mathrm{vec}M,
  (Q_R\otimes Q_L)\mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes
  Q_L)^\top)`. Found in the optimizer state by
  :func:`blrax.find_posteriors`. Its ``stddev()`` (what
  :func:`blrax.posterior_stddev` returns) is the **marginal** standard
  deviation of each weight in the original coordinates, the square root of
  :math:`\sigma^2\times_1(Q_1\odot Q_1)\cdots\times_k(Q_k\odot Q_k)`;
  ``rotated_stddev()`` is :math:`\sigma` itself, in the rotated basis.
  ``rotate(tree)`` maps a params-like tree to the rotated coordinates
  :math:`X\times_1 Q_1^\top\cdots\times_k Q_k^\top` (e.g. to pass
  ``hessian=``), ``unrotate`` back.

  Attributes:
    noise_state: the noise generator's state (the uint32 data of the PRNG
      key of the next draw; of ``mc_samples`` keys for several samples per
      step). The noise is drawn in the rotated basis.
    curvature: :math:`h'`, the curvature in the rotated basis, a pytree like
      the params (float32 or wider).
    bases: per leaf a tuple, one entry per mode: :math:`Q_i`, a
      :math:`d_i\times d_i` orthogonal matrix, or a :math:`0\times d_i`
      array where that mode is not rotated (the identity). A matrix leaf has
      ``(Q_L, Q_R)``, a vector ``(Q,)``, a scalar ``()``; with EVON's
      ``merge_dims`` the modes are groups of consecutive axes.
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
    >>> print([q.shape for q in posterior.bases])  # identity at init
    [(3, 3), (2, 2)]
    >>> print(posterior.stddev())  # 1 / sqrt(ess * hess_init)
    [[0.1 0.1]
     [0.1 0.1]
     [0.1 0.1]]
  """

  noise_state: Any
  curvature: Any
  bases: Any
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
    # The bases tree holds a tuple where the curvature holds a leaf.
    return jax.tree.map(lambda h, qs, *xs: fn(h.shape, qs, *xs),
                        self.curvature, self.bases, *trees)

  def rotate(self, tree: Any) -> Any:
    """:math:`X\\times_1 Q_1^\\top\\cdots\\times_k Q_k^\\top` per leaf of a
    params-like ``tree`` (leading axes allowed)."""
    return self._map(
        lambda shape, qs, x: rotate(jnp.asarray(x), qs, shape), tree)

  def unrotate(self, tree: Any) -> Any:
    """:math:`Y\\times_1 Q_1\\cdots\\times_k Q_k` per leaf (the inverse of
    ``rotate``)."""
    return self._map(
        lambda shape, qs, x: unrotate(jnp.asarray(x), qs, shape), tree)

  def stddev(self) -> Any:
    """The marginal stddev of each weight, in the original coordinates."""
    return self._map(
        lambda shape, qs, s: jnp.sqrt(jnp.maximum(
            squared_map(jnp.square(s), qs, shape), 0.0)),
        self.rotated_stddev())

  def curvature_diagonal(self) -> Any:
    r"""The diagonal of the curvature matrix :math:`\mathcal{R}^{-1}
    \mathrm{diag}(h')\mathcal{R}` (for a matrix, :math:`(Q_R\otimes Q_L)
    \mathrm{diag}(h')(Q_R\otimes Q_L)^\top`), like the params."""
    return self._map(lambda shape, qs, h: squared_map(h, qs, shape),
                     self.curvature)

  def offset(self, noise: Any | None = None) -> Any:
    """:math:`\\mathcal{R}^{-1}(\\sigma\\odot E)`, by default with the
    state's own noise."""
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
