r"""EVON: IVON in the eigenbasis of SOAP's Kronecker preconditioner.

A structured Gaussian posterior, per params tensor :math:`W` with modes
:math:`1..k` (a weight matrix :math:`m\times n`: :math:`k = 2`):

.. math::

  W = M + \mathcal{R}^{-1}(\sigma\odot E), \qquad
  \mathcal{R}^{-1}(Y) = Y\times_1 Q_1\cdots\times_k Q_k, \qquad
  \sigma = \frac{1}{\sqrt{\lambda(h' + \delta)}},

:math:`E\sim N(0, I)`; for a matrix :math:`W = M + Q_L(\sigma\odot
E)Q_R^\top`, i.e. :math:`\mathrm{vec}(W) \sim \mathcal{N}(\mathrm{vec}M,
(Q_R\otimes Q_L)\mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes Q_L)^\top)`.
The bases :math:`Q_i` are the eigenvectors of the Kronecker factors
:math:`L_i = \mathrm{EMA}(G_{(i)}G_{(i)}^\top)` of the gradients (one per
mode, as in SOAP, Vyas et al., 2024); in the rotated coordinates
:math:`\mathcal{R}(W) = W\times_1 Q_1^\top\cdots\times_k Q_k^\top` the
posterior is diagonal and IVON's update runs there. The covariance is not
diagonal, at about SOAP's cost.

This is the algorithm of the official implementation
(``team-approx-bayes/evon``, ``evon-src/evon.py``) as specified in
``docs/evon_algorithm.md``, step for step: the first call only starts the
factors and the bases; a QR power iteration refreshes them after the mean
update; the curvature keeps its index across a refresh; the update is
whitened (Newton-Schulz) before the learning rate. ``tests/test_evon.py``
checks it against the float64 transcription ``tests/evon_reference.py``.

References:
  Minut, Daheim, Miani, Khan, Lin & Möllenhoff, *SOAP-Bubbles: Structured
  Weight Uncertainty for Neural Networks*, arXiv 2606.23357, 2026.
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024.
  Shen et al., `Variational Learning is Effective for Large Deep Networks
  <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  Jordan et al., `Muon: An optimizer for hidden layers in neural networks
  <https://kellerjordan.github.io/posts/muon/>`_, 2024.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature_lib
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps as steps_lib
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import eigenbasis
from blrax._src.posteriors import prior as prior_lib

# Muon's quintic Newton-Schulz: coefficients, iterations, and the floor of
# the Frobenius norm its input is divided by.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_NORM_FLOOR = 1e-7
# Added to the diagonal of a Kronecker factor before the first eigh.
EIGH_JITTER = 1e-30
REFRESH_RULES = ("qr", "eigh")


class ScaleByEVONState(NamedTuple):
  r"""State of :func:`blrax.scale_by_evon`.

  Attributes:
    count: number of ``update`` calls so far (int32). The first call only
      starts the Kronecker factors and bases; the step :math:`t` of the
      later calls (debiasing, refresh schedule) is ``count - 1``.
    momentum: :math:`g`, the gradient momentum in the original coordinates
      (equal, in exact arithmetic, to the official momentum kept rotated and
      rotated again at each refresh), float32 or wider, like the params.
    factors: per leaf a tuple, one entry per mode, of the Kronecker factors
      :math:`L_i = \mathrm{EMA}(G_{(i)}G_{(i)}^\top)` (a :math:`0\times d`
      placeholder where the mode is not rotated), like the posterior's
      ``bases``.
    posterior: the :class:`blrax.EigenbasisGaussian` (key, :math:`h'`,
      bases, ess, weight decay).
    accumulator: ``()``, or under :class:`blrax.MultiSteps` the sums over
      the micro-batches of the mean gradient and of the curvature statistic
      (rotated basis): an ``Accumulator(count, gradient, statistic)``.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.evon(0.1, ess=100.0).init(jnp.zeros((4, 3)))
    >>> isinstance(state[0], blrax.ScaleByEVONState)
    True
    >>> print([f.shape for f in state[0].factors])
    [(4, 4), (3, 3)]
  """

  count: jax.Array
  momentum: Any
  factors: Any
  posterior: eigenbasis.EigenbasisGaussian
  accumulator: Any = ()


# ---------------------------------------------------------------------------
# Layout: which modes get a Kronecker factor.
# ---------------------------------------------------------------------------


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
  """The official ``merge_dims`` rule (SOAP's): walk the sizes left to
  right, multiplying consecutive ones into a group while the product stays
  ``<= max_dim``; a size that would push it over closes the group (if it is
  larger than 1) and starts the next one, or is emitted on its own (if the
  group is still 1). The last group is emitted if larger than 1, or if
  nothing was (a scalar becomes ``(1,)``)."""
  merged, group = [], 1
  for size in shape:
    if group * size > max_dim:
      if group > 1:
        merged.append(group)
        group = size
      else:
        merged.append(size)
        group = 1
    else:
      group *= size
  if group > 1 or not merged:
    merged.append(group)
  return tuple(merged)


def modes(shape: tuple[int, ...], max_dim: int, precondition_1d: bool,
          merge_dims: bool) -> tuple[tuple[int, bool], ...]:
  """``(size, rotated)`` per mode of a leaf: a scalar has no mode; a vector
  one, rotated with ``precondition_1d``; a tensor one per axis (or per
  merged group). A mode is rotated when its size is in ``[2, max_dim]`` (a
  size-1 factor's basis is the trivial ``[[1]]``)."""
  shape = tuple(shape)
  if not shape:
    return ()
  if len(shape) == 1:
    return ((shape[0], precondition_1d and 2 <= shape[0] <= max_dim),)
  sizes = merged_shape(shape, max_dim) if merge_dims else shape
  return tuple((d, 2 <= d <= max_dim) for d in sizes)


# ---------------------------------------------------------------------------
# Bases: the first eigh, the QR power iteration, and a fixed null space.
# ---------------------------------------------------------------------------


def _normalised(matrix: jax.Array) -> jax.Array:
  """``matrix / max|matrix|`` (1 if that is 0 or not finite): eigenvectors
  and QR factors are scale-free, and this keeps huge factors finite."""
  scale = jnp.max(jnp.abs(matrix))
  return matrix / jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def fixed_start(n: int, dtype: Any) -> jax.Array:
  r"""A fixed, generic :math:`n\times n` matrix (entries in [-0.5, 0.5)),
  made by integer hashing: bitwise the same in every program, eager, jitted
  or sharded. The start from which a null space is completed."""
  i = jnp.arange(n, dtype=jnp.uint32)[:, None]
  j = jnp.arange(n, dtype=jnp.uint32)[None, :]
  x = (i * jnp.uint32(0x9E3779B1) + j * jnp.uint32(0x85EBCA77)
       + jnp.uint32(0x27D4EB2F))
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  x = x ^ (x >> 16)
  return (x >> 8).astype(dtype) * (2.0 ** -24) - 0.5


def _rank_tolerance(n: int, dtype: Any) -> float:
  """Relative size below which a direction counts as null: ``n * eps``."""
  return max(n, 1) * float(jnp.finfo(dtype).eps)


def _complete(vectors: jax.Array, null: jax.Array, start: jax.Array
              ) -> jax.Array:
  """``vectors`` with its ``null`` columns replaced by an orthonormal
  completion: the QR (Gram-Schmidt, in column order) of ``vectors`` with
  those columns taken from ``start``, each new column's sign that of its
  start column. The other columns are kept as they are; with no null column
  ``vectors`` is returned unchanged."""
  a = jnp.where(null[None, :], start, vectors)
  q, _ = jnp.linalg.qr(a)
  sign = jnp.sign(jnp.sum(q * start, axis=0))
  q = q * jnp.where(sign == 0, 1.0, sign).astype(q.dtype)
  completed = jnp.where(null[None, :], q, vectors)
  return jnp.where(jnp.any(null), completed, vectors)


def _canonical_eigenvectors(vectors: jax.Array) -> jax.Array:
  """Each column's largest-magnitude entry made positive."""
  largest = jnp.take_along_axis(
      vectors, jnp.argmax(jnp.abs(vectors), axis=0)[None], axis=0)
  return vectors * jnp.where(largest < 0, -1.0, 1.0).astype(vectors.dtype)


def initial_basis(factor: jax.Array, old: jax.Array, dtype: Any,
                  canonical_signs: bool = False) -> jax.Array:
  r"""Eigenvectors of a Kronecker factor, by decreasing eigenvalue.

  ``eigh`` of :math:`L/\max|L| + 10^{-30}I` in ``dtype`` (float32 in the
  official code), LAPACK's column signs (or, with ``canonical_signs``, each
  column's largest entry positive). The eigenvectors of eigenvalues below
  :math:`n\,\varepsilon_{\text{dtype}}\lambda_{\max}` (a null space, as in
  the first factor of a non-square matrix) are replaced by the completion
  of the others from :func:`fixed_start`: LAPACK fills a null space
  arbitrarily, differently in each program. ``old`` is kept if the result
  is not finite.
  """
  n = factor.shape[0]
  a = _normalised(factor).astype(dtype) + EIGH_JITTER * jnp.eye(n, dtype=dtype)
  values, vectors = jnp.linalg.eigh(a, symmetrize_input=False)
  values, vectors = values[::-1], vectors[:, ::-1]
  if canonical_signs:
    vectors = _canonical_eigenvectors(vectors)
  null = values <= _rank_tolerance(n, dtype) * values[0]
  vectors = _complete(vectors, null, fixed_start(n, dtype))
  vectors = vectors.astype(old.dtype)
  return jnp.where(jnp.all(jnp.isfinite(vectors)), vectors, old)


def qr_refresh(factor: jax.Array, basis: jax.Array, dtype: Any,
               canonical_signs: bool = False) -> jax.Array:
  r"""One power iteration: :math:`Q \leftarrow \mathrm{qr}(LQ)` in ``dtype``
  (float32 in the official code), columns in their old order (no re-sort).

  LAPACK's signs, or with ``canonical_signs`` a non-negative diagonal of
  :math:`R`. Where :math:`L` is rank-deficient, the images :math:`Lq_j` of
  the later columns depend on the earlier ones (:math:`|R_{jj}|` below
  :math:`n\,\varepsilon_{\text{dtype}}` times the largest): their QR
  columns would be rounding noise, a different direction in each program.
  Such a column is replaced by :math:`q_j` itself (which a second QR makes
  orthogonal to the columns before it), signed like :math:`q_j`. ``basis``
  is kept if the result is not finite.
  """
  n = factor.shape[0]
  start = basis.astype(dtype)
  image = _normalised(factor).astype(dtype) @ start
  q, r = jnp.linalg.qr(image)
  size = jnp.abs(jnp.diagonal(r))
  dependent = size <= _rank_tolerance(n, dtype) * jnp.max(size)
  # Only a rank-deficient image needs the second QR (under vmap, cond runs
  # both branches and selects, as jnp.where would).
  q, r = jax.lax.cond(
      jnp.any(dependent),
      lambda: tuple(jnp.linalg.qr(jnp.where(dependent[None, :], start, image))),
      lambda: (q, r))
  if canonical_signs:
    diagonal = jnp.sign(jnp.diagonal(r))
    q = q * jnp.where(diagonal == 0, 1.0, diagonal).astype(q.dtype)
  sign = jnp.sign(jnp.sum(q * start, axis=0))
  q = jnp.where(dependent[None, :] & (sign < 0), -q, q)
  q = q.astype(basis.dtype)
  return jnp.where(jnp.all(jnp.isfinite(q)), q, basis)


def eigh_refresh(factor: jax.Array, basis: jax.Array, dtype: Any,
                 canonical_signs: bool = False) -> jax.Array:
  """The ``refresh="eigh"`` option: a full :func:`initial_basis` at every
  refresh (by decreasing eigenvalue; ``basis`` kept if not finite)."""
  return initial_basis(factor, basis, dtype, canonical_signs)


# ---------------------------------------------------------------------------
# Whitening.
# ---------------------------------------------------------------------------


def newton_schulz(matrix: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
  r"""Muon's quintic Newton-Schulz iteration toward the polar factor
  :math:`UV^\top` of :math:`G = USV^\top`.

  On the wide orientation (transposed when rows > cols): :math:`X =
  G/\max(\|G\|_F, 10^{-7})`, then five times :math:`A = XX^\top,\
  X \leftarrow aX + (bA + cA^2)X` with :math:`(a, b, c) = (3.4445, -4.7750,
  2.0315)`. In ``dtype``: its operands are rounded to ``dtype`` after each
  matrix product (accumulated in float32 or wider) and after each
  elementwise expression (evaluated in float32 or wider), as the official
  ``torch.compile``'d bfloat16 function does. The singular vectors are kept;
  each singular value :math:`s` maps to :math:`p^{\circ 5}(s/\|G\|_F)`,
  :math:`p(x) = ax + bx^3 + cx^5`, in about [0.68, 1.14] for
  :math:`s/\|G\|_F \gtrsim 2\cdot 10^{-3}`. Returns ``dtype``.
  """
  a, b, c = NS_COEFFICIENTS
  wide = matrix.shape[0] <= matrix.shape[1]
  acc = jnp.promote_types(dtype, jnp.float32)
  x = (matrix if wide else matrix.T).astype(dtype)
  # ||x||_F without overflow: on x / max|x|.
  scale = jnp.max(jnp.abs(x)).astype(acc)
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  y = x.astype(acc) / scale
  norm = (jnp.sqrt(jnp.sum(jnp.square(y))) * scale).astype(dtype)
  floor = jnp.maximum(norm.astype(acc) / scale, NS_NORM_FLOOR / scale)
  x = (y / floor).astype(dtype)
  dot = lambda u, v: jnp.matmul(u, v, preferred_element_type=acc).astype(dtype)
  for _ in range(NS_STEPS):
    gram = dot(x, x.T)
    poly = (b * gram.astype(acc) + c * dot(gram, gram).astype(acc)
            ).astype(dtype)
    x = (a * x.astype(acc) + dot(poly, x).astype(acc)).astype(dtype)
  return x if wide else x.T


def whitening(update: jax.Array, eps: Any, dtype: Any = jnp.bfloat16
              ) -> jax.Array:
  r"""The official whitening of an update (in the original coordinates).

  A vector (or a scalar) is divided by :math:`\max(\|u\|_2,
  \varepsilon)`: it moves by exactly the learning rate. A tensor with two
  or more axes is viewed as the matrix (everything but the last axis)
  :math:`\times` (last axis) and replaced by :func:`newton_schulz` of it in
  ``dtype``: for a matrix this equals the official first-axis view
  (Newton-Schulz commutes with the transpose); for a Flax/JAX convolution
  kernel :math:`(k_h, k_w, c_{in}, c_{out})` it is the official view of the
  PyTorch kernel :math:`(c_{out}, c_{in}, k_h, k_w)`, transposed. Returns
  ``update``'s dtype.
  """
  if update.ndim <= 1:
    scale = jnp.max(jnp.abs(update)) if update.size else 1.0
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(update / scale))) * scale
    return update / jnp.maximum(curvature_lib.finite(norm), eps)
  matrix = update.reshape(-1, update.shape[-1])
  return newton_schulz(matrix, dtype).reshape(update.shape).astype(
      update.dtype)


# ---------------------------------------------------------------------------
# The transformation.
# ---------------------------------------------------------------------------


def _check_hyperparams(b1, eps, clip_radius, rescale_lr, debias, debias_beta2,
                       price_clip_ratio, shampoo_beta, precondition_frequency,
                       precondition_1d, merge_dims, whiten_update, refresh,
                       reproject_curvature, canonical_signs) -> None:
  """EVON's own hyperparameters (the shared ones: ``engine.configure``)."""
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_nonnegative("eps", eps)
  validation.check_positive("clip_radius", clip_radius, allow_inf=True)
  if price_clip_ratio is not None:
    validation.check_nonnegative("price_clip_ratio", price_clip_ratio,
                                 allow_inf=True)
  for name, flag in (("rescale_lr", rescale_lr), ("debias", debias),
                     ("debias_beta2", debias_beta2),
                     ("precondition_1d", precondition_1d),
                     ("merge_dims", merge_dims), ("whiten", whiten_update),
                     ("reproject_curvature", reproject_curvature),
                     ("canonical_signs", canonical_signs)):
    validation.check_flag(name, flag)
  if shampoo_beta is not None:
    validation.check_unit_interval("shampoo_beta", shampoo_beta)
  if not validation.is_traced(precondition_frequency):
    validation.check_integer("precondition_frequency", precondition_frequency,
                             low=1, high=2**31)
  if refresh not in REFRESH_RULES:
    raise ValueError(f"`refresh` must be one of {REFRESH_RULES}, got "
                     f"refresh={refresh!r}.")


def _check_dtype(name: str, dtype: Any) -> Any:
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a floating dtype, got {name}="
                     f"{dtype!r}.")
  return dtype


def _check_isotropic(decay: Any) -> None:
  """EVON's prior must be one scalar per leaf: an isotropic Gaussian is the
  same in every rotated basis, a per-element precision is not."""
  for path, value in jax.tree_util.tree_flatten_with_path(decay)[0]:
    if jnp.ndim(value) > 0:
      raise ValueError(
          "EVON's `weight_decay` (and `weight_decay_mask`) must give one "
          "scalar per leaf (the prior N(0, I/(ess*weight_decay)) must be "
          "isotropic to stay diagonal in the rotated basis), got an array of "
          f"shape {jnp.shape(value)} at {jax.tree_util.keystr(path)}: "
          f"weight_decay={value}.")


def _mode_gram(x: jax.Array, mode: int) -> jax.Array:
  r""":math:`X_{(i)}X_{(i)}^\top` of the mode-``mode`` unfolding."""
  unfolded = jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
  return unfolded @ unfolded.T


def scale_by_evon(
    ess: jax.typing.ArrayLike,
    *,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.9999,
    weight_decay: Any = 1e-6,
    eps: jax.typing.ArrayLike = 1e-10,
    shampoo_beta: float | None = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    merge_dims: bool = False,
    whiten: bool = True,
    whiten_dtype: Any = jnp.bfloat16,
    basis_dtype: Any = jnp.float32,
    debias: bool = True,
    debias_beta2: bool = False,
    price_clip_ratio: float | None = None,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = False,
    refresh: str = "qr",
    reproject_curvature: bool = False,
    canonical_signs: bool = True,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""EVON's update direction, before the learning rate.

  The gradients passed to ``update`` must be taken at
  :func:`blrax.sample_params` (``mc_samples`` of them along a leading axis
  when ``mc_samples > 1``); ``params`` must be the mean :math:`M`. Per leaf,
  with :math:`\mathcal{R}` the rotation by the bases of the draw,
  :math:`E_s` the draw's noise (rotated basis), :math:`\bar G =
  \mathrm{mean}_s G_s` and :math:`t` the step (``count - 1``: the first
  call does not count):

  *First call*: :math:`L_i \leftarrow (1-\beta_s)\bar G_{(i)}\bar
  G_{(i)}^\top`, :math:`Q_i \leftarrow` eigenvectors of :math:`L_i` by
  decreasing eigenvalue; the direction is 0, :math:`g` and :math:`h'` stay.

  *Every later call*:

  .. math::

    \hat h' &= \mathrm{mean}_s\ \mathcal{R}(G_s)\odot E_s
      \sqrt{\lambda(h'+\delta)}
      \ \ (\text{Price; clipped to } \pm r(h'+\varepsilon)
      \text{ with } r = \texttt{price\_clip\_ratio}) \\
    h' &\leftarrow \beta_2 h' + (1-\beta_2)\,\hat h'
      + \tfrac12 (1-\beta_2)^2 (h' - \hat h')^2 / (h' + \delta + \varepsilon)
      \\
    g &\leftarrow \beta_1 g + (1-\beta_1)\,\bar G, \qquad
    U = \mathcal{R}^{-1}\Big(\mathrm{clip}\Big(\frac{\mathcal{R}\big(g/
      (1-\beta_1^t) + \delta M\big)}{h' + \delta + \varepsilon}, \pm\xi
      \Big)\Big) \\
    \Delta &= \mathcal{W}(U)\,/\,c_2 \qquad (c_2 = 1-\beta_2^t
      \text{ with } \texttt{debias\_beta2}, \text{ else } 1) \\
    L_i &\leftarrow \beta_s L_i + (1-\beta_s)\,\bar G_{(i)}\bar
      G_{(i)}^\top; \quad \text{if } t \bmod f = 0:\ Q_i \leftarrow
      \mathrm{qr}(L_i Q_i)

  with :math:`\beta_s` = ``shampoo_beta`` (default :math:`\beta_2`),
  :math:`f` = ``precondition_frequency``, :math:`\mathcal{W}` the whitening
  (a vector divided by its L2 norm, a tensor through Newton-Schulz, see
  below; the identity with ``whiten=False``). The refresh comes
  after the direction (a refreshing call's step uses the old bases, the new
  factors already hold its gradient); :math:`h'` keeps its index (entry
  :math:`(i, j, \dots)` stays attached to column :math:`i` of :math:`Q_1`,
  :math:`j` of :math:`Q_2`, ...); the momentum, kept in the original
  coordinates, needs no carrying. The draw of the next step is
  :math:`\theta = M + \mathcal{R}^{-1}(\sigma\odot E)` with :math:`\sigma =
  1/\sqrt{\lambda(h'+\delta)}`.

  **Whitening and the learning rate.** With ``whiten=True`` (the default,
  as in the official code) the step's size no longer depends on the
  gradient's, :math:`h'` or :math:`\delta`: every vector moves by exactly
  the learning rate (L2 norm) and every matrix by the learning rate times a
  matrix with the update's singular vectors and singular values in about
  [0.7, 1.1], as in Muon. So the learning rate is a step length (official
  default 3e-3), not IVON's (0.1-0.2 with ``rescale_lr``), and the mean
  does not settle closer to a minimum than about one step: anneal it, or
  use ``whiten=False`` (IVON's step, in the eigenbasis) where the mean must
  converge, e.g. on a linear or logistic regression. The posterior
  (:math:`h'`, :math:`\sigma`) is the same either way.

  **Shapes.** A leaf of shape :math:`(d_1..d_k)`, :math:`k \ge 2`, gets one
  factor per axis (with ``merge_dims``, per group of consecutive axes, by
  the official greedy rule, applied to the axes in
  their order); a mode of size 1 or above ``max_precond_dim`` is not
  rotated. A vector gets a factor only with ``precondition_1d``; a scalar
  never.

  **Determinism.** A null space of a factor (the first factor of a
  non-square matrix, a dead unit) has no defined eigenvectors: LAPACK fills
  it differently in each program, and one power iteration keeps whatever
  it is given. Here it is completed from a fixed matrix (an integer hash;
  in a refresh, a column :math:`q_j` whose image :math:`Lq_j` depends on
  the earlier ones keeps itself), so a run depends on its key only, eager,
  jitted or sharded; where the factors have no null space the bases are
  the official ones.

  Like IVON's, ``update`` accepts ``hessian=``: a pytree like the params,
  each leaf the curvature **in the rotated basis** of the state passed to
  ``update`` (e.g. :math:`\mathrm{diag}(\mathcal{R}\,H\,\mathcal{R}^{-1})`;
  ``posterior.rotate`` maps to that basis). It replaces :math:`\hat h'`;
  with ``ess = inf`` (no noise) it is the only curvature source, and the
  step is a deterministic SOAP-like method.

  Args:
    ess: effective sample size :math:`\lambda` (training-set size, times
      augmentation, over temperature). Sets the posterior variance.
    hess_init: initial curvature :math:`h_0` (> 0).
    b1: momentum decay :math:`\beta_1`.
    b2: curvature decay :math:`\beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar, or a pytree like the params of one scalar per leaf (the prior
      must be isotropic per leaf to stay diagonal in the rotated basis; an
      array per element raises a ValueError).
    eps: :math:`\varepsilon`, in the step's and the positivity correction's
      denominators, the Price clip and the vector whitening (not in
      :math:`\sigma`).
    shampoo_beta: decay :math:`\beta_s` of the Kronecker factors; None
      (default) means :math:`\beta_2`, as in the official code.
    precondition_frequency: :math:`f`, refresh the bases when :math:`t
      \bmod f = 0` (calls :math:`f+1, 2f+1, \dots`). May be traced.
    max_precond_dim: largest mode that gets a factor (a static int).
    precondition_1d: give vectors a factor (a static bool; off by default, as
      in SOAP and the official code; on for a linear model).
    merge_dims: group consecutive axes before assigning factors (static).
    whiten: whiten the update (static; see above).
    whiten_dtype: the dtype of Newton-Schulz (static; bfloat16 as official,
      float32 or float64 for a more exact polar factor).
    basis_dtype: the dtype of the eigh and QR of the bases (static; float32
      as official whatever the params, float64 under x64 for an exact run).
    debias: divide the momentum by :math:`1 - \beta_1^t` (the official
      ``correct_bias``).
    debias_beta2: with ``debias``, divide the step by :math:`1 - \beta_2^t`
      (off by default, as official).
    price_clip_ratio: None (default), or :math:`r`: clip the Price estimate
      to :math:`\pm r(h'+\varepsilon)` when :math:`r > 0`.
    clip_radius: elementwise clip :math:`\xi` of the rotated direction (a
      blrax extension; none by default).
    rescale_lr: multiply the direction by :math:`h_0 + \delta` (IVON's
      convention; off by default, as official).
    refresh: ``"qr"`` (default, official: one power iteration per refresh)
      or ``"eigh"`` (a full eigendecomposition per refresh, by decreasing
      eigenvalue). See ``docs/evon_algorithm.md`` for the measurements.
    reproject_curvature: at a refresh, carry :math:`h'` into the new basis
      as the diagonal of the old curvature matrix instead of keeping its
      index (off by default, as official).
    canonical_signs: fix the column signs of the bases (largest entry of an
      eigenvector positive, non-negative diagonal of :math:`R`; on by
      default). LAPACK's eigenvector signs flip with last-bit changes of the
      factor, so without this a data-parallel run draws different weights
      from a one-device run with the same key. ``False`` keeps the
      LAPACK or cuSOLVER signs, as the official code. The signs change which
      weights a key draws, never their distribution or the mean's step for
      a given draw.
    mc_samples: samples per step; ``> 1`` adds a leading axis to the draws
      and grads. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples", "max_precond_dim")``.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the generator of :math:`E` (``"normal"``, ``"hash"``, ``"flip"``
      or a ``blrax.noise`` generator); see :func:`blrax.scale_by_ivon`.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as in ``optax.adamw(mask=)``:
      where False, :math:`\delta = 0` (e.g. no decay on biases and norms).
    prior_mean: None (a zero-mean prior) or the prior mean :math:`M_0`, a
      pytree like the params (e.g. pretrained weights): the step pulls
      towards it with :math:`\delta(M - M_0)`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`blrax.ScaleByEVONState`.

  Examples:
    >>> import jax.numpy as jnp, optax, blrax
    >>> tx = optax.chain(blrax.scale_by_evon(ess=100.0, weight_decay=0.0),
    ...                  optax.scale(-0.1))  # = blrax.evon(0.1, ...)
    >>> state = tx.init(jnp.zeros(2))
    >>> print(blrax.posterior_stddev(state))  # 1 / sqrt(ess * hess_init)
    [0.1 0.1]

  References:
    Minut, Daheim, Miani, Khan, Lin & Möllenhoff, `SOAP-Bubbles: Structured
    Weight Uncertainty for Neural Networks
    <https://arxiv.org/abs/2606.23357>`_, 2026.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  """
  mc_samples, generator, decay_in_state = engine.configure(
      ess=ess, hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      mc_samples=mc_samples, key=key, noise=noise, positive_hess_init=True)
  _check_hyperparams(b1, eps, clip_radius, rescale_lr, debias, debias_beta2,
                     price_clip_ratio, shampoo_beta, precondition_frequency,
                     precondition_1d, merge_dims, whiten, refresh,
                     reproject_curvature, canonical_signs)
  max_dim = validation.check_integer("max_precond_dim", max_precond_dim,
                                     low=1)
  whiten_dtype = _check_dtype("whiten_dtype", whiten_dtype)
  basis_dtype = _check_dtype("basis_dtype", basis_dtype)
  whiten_update = whiten
  rho = 1.0 - b2
  factor_beta = b2 if shampoo_beta is None else shampoo_beta
  new_basis = {"qr": qr_refresh, "eigh": eigh_refresh}[refresh]
  # IVON's step, split around the rotation: its numerator (momentum,
  # debiasing, prior pull) in the original coordinates, its preconditioning
  # (divide by h + delta + eps, clip, rescale) in the rotated basis.
  step = steps_lib.ivon(
      b1, debias=debias, clip_radius=clip_radius, eps=eps,
      scale=(lambda decay: hess_init + decay) if rescale_lr else 1.0)

  def layout(h, p):
    if not gaussian.is_trainable(p):
      return tuple((d, False) for d in h.shape)
    return modes(h.shape, max_dim, precondition_1d, merge_dims)

  def init_fn(params):
    # full_like: sharded like the params; accepts ShapeDtypeStructs.
    curvature = jax.tree.map(
        lambda p: jnp.full_like(p, hess_init, gaussian.state_dtype(
            eigenbasis.real_dtype(p))), params)
    noise_state = generator.init(noise_lib.initial_key(key, mc_samples, params),
                                 curvature)
    decay = weight_decay
    if decay_in_state:
      decay = prior_lib.decay_tree(
          weight_decay, weight_decay_mask, params,
          lambda p: gaussian.state_dtype(eigenbasis.real_dtype(p)))
      _check_isotropic(decay)

    def per_mode(h, p, make):
      return tuple(make(d, h.dtype) if rotated else jnp.zeros((0, d), h.dtype)
                   for d, rotated in layout(h, p))

    eye = lambda d, dtype: jnp.eye(d, dtype=dtype)
    zeros = lambda d, dtype: jnp.zeros((d, d), dtype)
    return ScaleByEVONState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, curvature),
        factors=jax.tree.map(lambda h, p: per_mode(h, p, zeros), curvature,
                             params),
        posterior=eigenbasis.EigenbasisGaussian(
            noise_state=noise_state, curvature=curvature,
            bases=jax.tree.map(lambda h, p: per_mode(h, p, eye), curvature,
                               params),
            ess=gaussian.scalar(ess),
            weight_decay=decay if decay_in_state else gaussian.scalar(decay),
            prior_mean=(() if prior_mean is None else prior_lib.mean_tree(
                prior_mean, params,
                lambda p: gaussian.state_dtype(eigenbasis.real_dtype(p))))))

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    accumulate = bool(extra_args.pop(engine.ACCUMULATE, False))
    del extra_args
    engine.check_state(state, ScaleByEVONState)
    posterior = state.posterior
    engine.check_update(updates, params, posterior.curvature,
                        mc_samples=mc_samples, hessian=hessian, ess=ess,
                        hessian_note=" (in the rotated basis)")
    if hessian is not None:
      gaussian.check_grads(hessian, params, mc_samples, name="hessian")
    engine.check_accumulate(state, accumulate)
    noise_tree = (posterior.noise() if hessian is None
                  else posterior.curvature)
    hessian_tree = posterior.curvature if hessian is None else hessian
    # The bases tree holds a tuple where the curvature holds a leaf.
    tmap = lambda fn, *trees: jax.tree.map(fn, posterior.curvature, *trees)

    # 1. The micro-batch's statistics, linear in its samples: the mean
    # gradient and the curvature statistic in the draw's basis (Price: the
    # rotated gradient times the noise; or the given ``hessian``).
    def statistics(h, mean, grad, e, qs, hess):
      if not gaussian.is_trainable(mean):
        return jnp.zeros_like(h), jnp.zeros_like(h)
      grad = curvature_lib.finite(jnp.asarray(grad).astype(h.dtype))
      if hessian is None:
        rotated = eigenbasis.scaled(
            lambda x: eigenbasis.rotate(x, qs, h.shape), grad)
        statistic = curvature_lib.PRICE.statistic(rotated, e, h)
      else:
        statistic = curvature_lib.hessian_statistic(
            jnp.asarray(hess).astype(h.dtype), h)
      return curvature_lib.finite(curvature_lib.mc_mean(grad, h)), statistic

    stats = tmap(statistics, params, updates, noise_tree, posterior.bases,
                 hessian_tree)
    g_tree, c_tree = (tmap(lambda _, s, i=i: s[i], stats) for i in range(2))
    done, g_tree, c_tree, accumulator = engine.add_micro_batch(
        state, params, g_tree, c_tree, generator, accumulate)
    if done is not None:  # under blrax.MultiSteps, before the last one
      return done

    # The first call only starts the factors and the bases. The step t of
    # the later ones is the count before this call.
    first = state.count == 0
    t = jnp.maximum(state.count, 1)
    scalars = step.scalars(t)
    debias2 = (1.0 - gaussian.scalar(b2) ** t if debias and debias_beta2
               else None)
    anchors = (posterior.curvature if engine.is_absent(posterior.prior_mean)
               else posterior.prior_mean)
    old_decays = posterior.decays()  # the draw's sigma used these
    decays = (old_decays if decay_in_state else
              gaussian.per_leaf(weight_decay, posterior.curvature))

    # 2. Curvature, momentum and direction in the draw's basis; factors.
    def leaf(h, mean, g_bar, c, momentum, qs, fs, decay, old_decay, anchor):
      if not gaussian.is_trainable(mean):
        return jnp.zeros_like(mean), h, momentum, fs
      shape, dtype = h.shape, h.dtype
      mean = jnp.asarray(mean)
      if hessian is None:
        h_hat = curvature_lib.PRICE.curvature(g_bar, c, h, posterior.ess,
                                              old_decay)
        if price_clip_ratio is not None:
          limit = price_clip_ratio * (h + eps)
          h_hat = jnp.where(price_clip_ratio > 0,
                            jnp.clip(h_hat, -limit, limit), h_hat)
      else:
        h_hat = c
      new_h = curvature_lib.positive_ema(h, h_hat, rho, decay, eps)
      offset = mean if engine.is_absent(posterior.prior_mean) else (
          mean.astype(dtype) - anchor)
      numerator, new_momentum = step.numerator(g_bar, momentum, offset,
                                               decay, scalars, dtype)
      rotated = eigenbasis.scaled(
          lambda x: eigenbasis.rotate(x, qs, shape),
          curvature_lib.finite(numerator))
      rotated_step = curvature_lib.finite(
          step.precondition(rotated, new_h, decay), dtype)
      direction = eigenbasis.scaled(
          lambda x: eigenbasis.unrotate(x, qs, shape), rotated_step)
      if whiten_update:
        direction = whitening(direction, eps, whiten_dtype)
      if debias2 is not None:
        direction = direction / debias2.astype(dtype)
      direction = curvature_lib.finite(direction, mean.dtype).astype(
          mean.dtype)
      # The factors, fed the mean gradient at the draws (also on the first
      # call: from zero, the EMA step is (1 - beta_s) G G^T).
      g_modes = g_bar.reshape(eigenbasis.mode_sizes(qs))
      fs = tuple(
          f if not eigenbasis.is_rotated(f) else curvature_lib.finite(
              f + (1.0 - factor_beta) * (eigenbasis.scaled(
                  lambda x, i=i: _mode_gram(x, i), g_modes, 2) - f)
          ).astype(dtype)
          for i, f in enumerate(fs))
      return (jnp.where(first, jnp.zeros_like(direction), direction),
              jnp.where(first, h, new_h.astype(dtype)),
              jnp.where(first, momentum, new_momentum.astype(dtype)), fs)

    out = tmap(leaf, params, g_tree, c_tree, state.momentum, posterior.bases,
               state.factors, decays, old_decays, anchors)
    directions, h_tree, momentum, factors = (
        tmap(lambda _, o, i=i: o[i], out) for i in range(4))

    # 3. The bases, after the direction: the first eigh on the first call;
    # every f steps a refresh (h' keeps its index, or is re-projected).
    def one_at_a_time(fn):
      # Under jax.vmap (an ensemble, seeds) the eigh/QR run one member after
      # another: batched LAPACK calls inside the refresh's conditional can
      # deadlock XLA's CPU thread pool (measured with 3 members on 2 cores).
      return jax.custom_batching.sequential_vmap(functools.partial(
          fn, dtype=basis_dtype, canonical_signs=canonical_signs))

    def per_basis(fn):
      def each(h, fs, qs):
        return tuple(fn(f, q) if eigenbasis.is_rotated(q) else q
                     for f, q in zip(fs, qs))
      return lambda bases: tmap(each, factors, bases)

    def keep(operands):
      return operands

    def start(operands):
      bases, h_tree = operands
      return per_basis(one_at_a_time(initial_basis))(bases), h_tree

    def refresh_bases(operands):
      bases, h_tree = operands
      new = per_basis(one_at_a_time(new_basis))(bases)
      if reproject_curvature:
        h_tree = jax.tree.map(_reproject, h_tree, bases, new, decays)
      return new, h_tree

    refresh_now = (state.count % precondition_frequency) == 0
    branch = jnp.where(first, 1, jnp.where(refresh_now, 2, 0))
    bases, h_tree = jax.lax.switch(branch, (keep, start, refresh_bases),
                                   (posterior.bases, h_tree))

    new_posterior = engine.advance(posterior, generator, h_tree, ess=ess,
                                   weight_decay=weight_decay,
                                   decay_in_state=decay_in_state, bases=bases)
    return directions, ScaleByEVONState(
        count=optax.safe_increment(state.count), momentum=momentum,
        factors=factors, posterior=new_posterior, accumulator=accumulator)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _reproject(h: jax.Array, old: tuple, new: tuple, decay) -> jax.Array:
  r""":math:`h'` carried into new bases: the diagonal, in the new basis, of
  the old curvature matrix :math:`\mathcal{R}_{old}^{-1}\mathrm{diag}(h')
  \mathcal{R}_{old}`: the mode products with :math:`A_i = (Q_{i,new}^\top
  Q_{i,old})^{\odot 2}` (doubly stochastic, so :math:`h'+\delta>0` stays)."""
  maps = tuple(jnp.square(q_new.T @ q_old) if eigenbasis.is_rotated(q_old)
               else q_old for q_old, q_new in zip(old, new))
  return curvature_lib.bounded(eigenbasis.unrotate(h, maps, h.shape), decay)


def evon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.9999,
    weight_decay: Any = 1e-6,
    eps: jax.typing.ArrayLike = 1e-10,
    shampoo_beta: float | None = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    merge_dims: bool = False,
    whiten: bool = True,
    whiten_dtype: Any = jnp.bfloat16,
    basis_dtype: Any = jnp.float32,
    debias: bool = True,
    debias_beta2: bool = False,
    price_clip_ratio: float | None = None,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = False,
    refresh: str = "qr",
    reproject_curvature: bool = False,
    canonical_signs: bool = True,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The EVON optimizer: IVON in SOAP's eigenbasis, a structured posterior.

  Trains the mean :math:`M` (the params) of a Gaussian whose covariance, per
  weight tensor, is diagonal in the eigenbasis of the gradient's Kronecker
  factors (one per mode): for a matrix,
  :math:`\mathrm{vec}(W) \sim N(\mathrm{vec}M, (Q_R\otimes Q_L)
  \mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes Q_L)^\top)`,
  :math:`\sigma = 1/\sqrt{\lambda(h'+\delta)}`. Each step takes the gradient
  :math:`G` at a draw :math:`\theta = M + Q_L(\sigma\odot E)Q_R^\top` (from
  :func:`blrax.sample_params`) and runs IVON's update on the rotated
  gradient :math:`Q_L^\top G Q_R`, as the official implementation does
  (Minut et al., 2026):

  .. math::

    \hat h' &= (Q_L^\top G Q_R) \odot E\,\sqrt{\lambda(h'+\delta)}, \qquad
    h' \leftarrow \beta_2 h' + (1-\beta_2)\,\hat h'
      + \tfrac12 (1-\beta_2)^2 \frac{(h' - \hat h')^2}{h' + \delta
      + \varepsilon} \\
    g &\leftarrow \beta_1 g + (1-\beta_1) G, \qquad
    M \leftarrow M - \alpha\,\mathcal{W}\Big(Q_L\,
      \frac{Q_L^\top(g/(1-\beta_1^t) + \delta M)Q_R}{h'+\delta+\varepsilon}
      \,Q_R^\top\Big) \\
    L &\leftarrow \beta_s L + (1-\beta_s) GG^\top, \quad
    R \leftarrow \beta_s R + (1-\beta_s) G^\top G

  with :math:`\mathcal{W}` the Newton-Schulz whitening. The first call only
  starts :math:`L, R` and takes their eigenvectors (by decreasing
  eigenvalue) as :math:`Q_L, Q_R`; every ``precondition_frequency`` steps
  after the mean update one QR power iteration :math:`Q \leftarrow
  \mathrm{qr}(LQ)` refreshes them, and :math:`h'` keeps its index. Tensors
  with more axes get one factor per axis. See :func:`blrax.scale_by_evon`
  for the full rule, the options and the determinism of the bases.

  **The learning rate is a step length.** With ``whiten=True`` (default)
  every matrix moves by about ``learning_rate`` in spectral norm and every
  vector by exactly ``learning_rate``, whatever the gradient's size (the
  official default is 3e-3; IVON's learning rates are far too large here).
  For posterior inference on a small model whose mean must converge
  (linear or logistic regression), use ``whiten=False`` (IVON's step in the
  eigenbasis, learning rate about 0.1), ``precondition_1d=True`` for
  vector weights, and a curvature memory ``b2`` well below the number of
  steps (e.g. 0.999 for a few thousand): then the posterior is the
  full-covariance Gaussian of the model (``tests/test_evon.py``: within
  15% of ``blrax.von(covariance="full")`` and of the closed form).

  :func:`blrax.posterior_stddev` gives the marginal stddev of each weight;
  :func:`blrax.sample_posterior` draws with the full structured covariance.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda` (usually the training-set size).
    hess_init: initial curvature :math:`h_0` (> 0).
    b1: momentum decay :math:`\beta_1`.
    b2: curvature decay :math:`\beta_2` (close to 1).
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar or one scalar per leaf (a pytree like the params).
    eps: :math:`\varepsilon` of the denominators and the vector whitening.
    shampoo_beta: decay of the Kronecker factors (None: ``b2``).
    precondition_frequency: refresh the bases every this many steps.
    max_precond_dim: modes larger than this are not rotated (static).
    precondition_1d: a factor for vectors up to ``max_precond_dim``
      (default off; on for linear and logistic regression).
    merge_dims: group consecutive axes before assigning factors (static).
    whiten: whiten the update (Newton-Schulz; vectors normalised).
    whiten_dtype: dtype of Newton-Schulz (bfloat16, as official).
    basis_dtype: dtype of the eigh and QR of the bases (float32, as official).
    debias: debias the momentum as Adam does.
    debias_beta2: also divide the step by :math:`1-\beta_2^t`.
    price_clip_ratio: None, or :math:`r`: clip the Price estimate to
      :math:`\pm r(h'+\varepsilon)`.
    clip_radius: elementwise clip :math:`\xi` of the rotated direction.
    rescale_lr: multiply the learning rate by :math:`h_0 + \delta`.
    refresh: ``"qr"`` (one power iteration, official) or ``"eigh"``.
    reproject_curvature: carry :math:`h'` into a new basis as a matrix.
    canonical_signs: fix the bases' column signs (default; ``False``: the
      LAPACK or cuSOLVER signs, as official).
    mc_samples: weight samples per step (leading axis of draws and grads).
      Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples", "max_precond_dim")``.
    key: PRNG key or int seed of the weight noise, kept in the state.
    noise: ``"normal"`` (default), ``"hash"`` or ``"flip"``.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of them): where False, :math:`\delta = 0`.
    prior_mean: None (a zero-mean prior) or the prior mean :math:`M_0`, a
      pytree like the params (e.g. pretrained weights).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` accepts
    an optional ``hessian=`` keyword (curvature in the rotated basis, see
    :func:`blrax.scale_by_evon`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> loss = lambda w: jnp.sum((w @ jnp.ones(2) - 1.0) ** 2)
    >>> params = jnp.zeros((3, 2))
    >>> opt = blrax.evon(learning_rate=0.05, ess=1e4, whiten=False, key=0)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   theta = blrax.sample_params(params, state)
    ...   updates, state = opt.update(jax.grad(loss)(theta), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> print(jnp.round(params @ jnp.ones(2), 1))
    [1. 1. 1.]

  References:
    Minut, Daheim, Miani, Khan, Lin & Möllenhoff, `SOAP-Bubbles: Structured
    Weight Uncertainty for Neural Networks
    <https://arxiv.org/abs/2606.23357>`_, 2026.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  return engine.with_learning_rate(
      scale_by_evon(
          ess=ess, hess_init=hess_init, b1=b1, b2=b2,
          weight_decay=weight_decay, eps=eps, shampoo_beta=shampoo_beta,
          precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
          merge_dims=merge_dims, whiten=whiten, whiten_dtype=whiten_dtype,
          basis_dtype=basis_dtype, debias=debias, debias_beta2=debias_beta2,
          price_clip_ratio=price_clip_ratio, clip_radius=clip_radius,
          rescale_lr=rescale_lr, refresh=refresh,
          reproject_curvature=reproject_curvature,
          canonical_signs=canonical_signs, mc_samples=mc_samples, key=key,
          noise=noise, weight_decay_mask=weight_decay_mask,
          prior_mean=prior_mean),
      learning_rate)
