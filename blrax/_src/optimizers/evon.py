r"""EVON: IVON in the eigenbasis of SOAP's Kronecker preconditioner.

A structured Gaussian posterior, per weight matrix :math:`W \in
\mathbb{R}^{m\times n}`:

.. math::

  \mathrm{vec}(W) \sim \mathcal{N}\big(\mathrm{vec}(M),\
    (Q_R\otimes Q_L)\,\mathrm{diag}(\mathrm{vec}\,\sigma^2)\,
    (Q_R\otimes Q_L)^\top\big), \qquad
  \sigma = \frac{1}{\sqrt{\lambda(h' + \delta)}},

with :math:`Q_L` (:math:`m\times m`) and :math:`Q_R` (:math:`n\times n`)
orthogonal: a draw is :math:`W = M + Q_L(\sigma\odot E)Q_R^\top`,
:math:`E\sim N(0, I)`. The bases are the eigenvectors of the Kronecker
factors :math:`L = \mathrm{EMA}(GG^\top)` and :math:`R =
\mathrm{EMA}(G^\top G)` of the gradients, as in SOAP (Vyas et al., 2024);
in the rotated coordinates :math:`W' = Q_L^\top W Q_R` the posterior is
diagonal, and IVON's machinery runs there unchanged. The covariance is not
diagonal, at about SOAP's cost (a few :math:`m\times m` and :math:`n\times n`
matrix products per step, an eigendecomposition every
``precondition_frequency`` steps).

Shapes. A leaf of shape :math:`(d_1, \dots, d_k)` is seen as the matrix
:math:`(d_1\cdots d_{k-1}) \times d_k` (a vector :math:`(d)` as
:math:`d\times 1`, a scalar as :math:`1\times 1`). A side gets a basis when
its dimension is between 2 and ``max_precond_dim`` (for vectors, only with
``precondition_1d``); otherwise that side is the identity (diagonal), and
nothing of its size is stored. So a vector of size :math:`d \le`
``max_precond_dim`` has, with ``precondition_1d=True``, a full
:math:`d\times d` basis: its posterior is a full-covariance Gaussian with
eigenbasis :math:`Q_L` (on linear regression it converges to the exact
posterior).

The paper by Minut et al. (2026) names the method; the equations here are
written from the description of SOAP and of IVON (:func:`blrax.ivon`).

References:
  Minut, Daheim, Miani, Khan, Lin & Möllenhoff, *SOAP-Bubbles: Structured
  Weight Uncertainty for Neural Networks*, arXiv 2606.23357, 2026.
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024.
  Shen et al., `Variational Learning is Effective for Large Deep Networks
  <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
"""

from __future__ import annotations

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


class ScaleByEVONState(NamedTuple):
  r"""State of :func:`blrax.scale_by_evon`.

  Attributes:
    count: number of updates so far (int32).
    momentum: :math:`g`, the gradient momentum in the original coordinates
      (as SOAP keeps it), float32 or wider, like the params.
    left_factor: :math:`L = \mathrm{EMA}(GG^\top)` per leaf (``(0, 0)``
      where the left side is the identity).
    right_factor: :math:`R = \mathrm{EMA}(G^\top G)` per leaf.
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
    >>> print(state[0].left_factor.shape, state[0].right_factor.shape)
    (4, 4) (3, 3)
  """

  count: jax.Array
  momentum: Any
  left_factor: Any
  right_factor: Any
  posterior: eigenbasis.EigenbasisGaussian
  accumulator: Any = ()


def _check_hyperparams(b1, clip_radius, rescale_lr, debias, shampoo_beta,
                       precondition_frequency, precondition_1d) -> None:
  """EVON's own hyperparameters (the shared ones: ``engine.configure``)."""
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_positive("clip_radius", clip_radius, allow_inf=True)
  validation.check_flag("rescale_lr", rescale_lr)
  validation.check_flag("debias", debias)
  validation.check_unit_interval("shampoo_beta", shampoo_beta)
  validation.check_flag("precondition_1d", precondition_1d)
  if not validation.is_traced(precondition_frequency):
    validation.check_integer("precondition_frequency", precondition_frequency,
                             low=1, high=2**31)


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


def _side_sizes(shape, max_dim, precondition_1d) -> tuple[int, int]:
  """Sizes of the stored (left, right) bases; 0 where a side is identity."""
  rows, cols = eigenbasis.matrix_shape(shape)
  if len(shape) == 1 and not precondition_1d:
    return 0, 0
  side = lambda d: d if 2 <= d <= max_dim else 0
  return side(rows), side(cols)


def _eigenbasis(factor: jax.Array, old: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric factor (``old`` kept if they are not
  finite, e.g. after NaN gradients)."""
  scale = jnp.max(jnp.abs(factor))
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  factor = factor / scale  # eigenvectors are scale-free; this avoids overflow
  _, vectors = jnp.linalg.eigh(0.5 * (factor + factor.T))
  # eigh's column signs are arbitrary and differ between backends and
  # shardings; the draw M + Q_L(sigma E)Q_R^T depends on them, so fix the
  # largest entry of each column positive: one run on one device or many.
  largest = jnp.take_along_axis(
      vectors, jnp.argmax(jnp.abs(vectors), axis=0)[None], axis=0)
  vectors = vectors * jnp.where(largest < 0, -1.0, 1.0).astype(vectors.dtype)
  return jnp.where(jnp.all(jnp.isfinite(vectors)), vectors, old)


def _reproject(h: jax.Array, shape, old_left, old_right, new_left,
               new_right) -> jax.Array:
  r""":math:`h'` carried into a new basis: the diagonal, in the new basis, of
  the curvature matrix :math:`(Q_R\otimes Q_L)\mathrm{diag}(h')(Q_R\otimes
  Q_L)^\top` of the old one, :math:`A h' B^\top` with :math:`A = (Q_{L,new}^\top
  Q_{L,old})^{\odot 2}`, :math:`B = (Q_{R,new}^\top Q_{R,old})^{\odot 2}`."""
  h = h.reshape(eigenbasis.matrix_shape(shape))
  if new_left.size:
    h = jnp.matmul(jnp.square(jnp.matmul(new_left.T, old_left)), h)
  if new_right.size:
    h = jnp.matmul(h, jnp.square(jnp.matmul(new_right.T, old_right)).T)
  return h.reshape(shape)


def scale_by_evon(
    ess: jax.typing.ArrayLike,
    *,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = True,
    debias: bool = True,
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    precondition_1d: bool = False,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""EVON's preconditioned direction, before the learning rate.

  The gradients passed to ``update`` must be taken at
  :func:`blrax.sample_params` (``mc_samples`` of them along a leading axis
  when ``mc_samples > 1``); ``params`` must be the mean :math:`M`. Per leaf,
  viewed as an :math:`m\times n` matrix, with :math:`E_s` the noise of the
  draw (rotated basis), :math:`Q_L, Q_R` the bases of the draw and
  :math:`t` the new step count:

  .. math::

    G'_s &= Q_L^\top \hat G_s Q_R, \qquad
      \hat h' = \mathrm{mean}_s\ G'_s \odot E_s / \sigma
      \quad(\text{Price, in the rotated basis}) \\
    h' &\leftarrow \beta_2 h' + (1-\beta_2)\,\hat h'
      + \tfrac12 (1-\beta_2)^2 (h' - \hat h')^2 / (h' + \delta) \\
    \bar G &= \mathrm{mean}_s\ \hat G_s, \qquad
      g \leftarrow \beta_1 g + (1-\beta_1)\,\bar G
      \quad(\text{original basis, as in SOAP}) \\
    L &\leftarrow \beta_s L + (1-\beta_s)\,\bar G\bar G^\top, \qquad
      R \leftarrow \beta_s R + (1-\beta_s)\,\bar G^\top\bar G \\
    &\text{if } (t-1) \bmod f = 0:\ Q_L, Q_R \leftarrow
      \mathrm{eigh}(L), \mathrm{eigh}(R);\quad
      h' \leftarrow A h' B^\top \\
    \Delta &= Q_L\,\mathrm{clip}\Big(\frac{Q_L^\top(g/(1-\beta_1^t)
      + \delta M) Q_R}{h' + \delta}, -\xi, \xi\Big)\,Q_R^\top
      \cdot (h_0 + \delta)

  with :math:`\beta_s` = ``shampoo_beta``, :math:`f` =
  ``precondition_frequency`` and :math:`A = (Q_{L,new}^\top Q_{L,old})^{\odot
  2}`, :math:`B = (Q_{R,new}^\top Q_{R,old})^{\odot 2}` (elementwise squares).
  The draw of the next step is :math:`\theta = M + Q_L(\sigma\odot E)
  Q_R^\top` with :math:`\sigma = 1/\sqrt{\lambda(h'+\delta)}`.

  When the basis is refreshed, the momentum needs nothing (it lives in the
  original coordinates). The curvature is carried exactly as a matrix: the
  new :math:`h'` is the diagonal, in the new basis, of the old curvature
  matrix :math:`(Q_R\otimes Q_L)\mathrm{diag}(h')(Q_R\otimes Q_L)^\top`
  (:math:`A, B` are doubly stochastic, so :math:`h'+\delta > 0` stays true
  and :math:`\delta` carries over unchanged). This is the best estimate of
  the rotated Hessian diagonal :math:`\mathrm{diag}(Q^\top H Q)` that
  :math:`h'` tracks, and it is exact when the new basis only permutes or
  flips the old one (``eigh`` orders and signs its vectors arbitrarily).

  Like IVON's, ``update`` accepts ``hessian=``: a pytree like the params,
  each leaf the curvature **in the rotated basis** of the state passed to
  ``update`` (e.g. :math:`\mathrm{diag}(Q^\top H Q)`; ``posterior.rotate``
  maps to that basis). It replaces :math:`\hat h'`; with ``ess = inf`` (no
  noise) it is the only curvature source, and the step is a deterministic
  SOAP-like method: Newton in the eigenbasis of the gradient's Kronecker
  factors.

  Shapes: a leaf of shape :math:`(d_1..d_k)` is the matrix
  :math:`(d_1\cdots d_{k-1})\times d_k`; a side of dimension 1 or above
  ``max_precond_dim`` is the identity (diagonal, nothing stored); a vector
  :math:`(d)` is :math:`d\times 1` and gets a full :math:`d\times d` basis
  when ``precondition_1d`` and :math:`d \le` ``max_precond_dim``.

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
    clip_radius: elementwise clip :math:`\xi` of the step in the rotated
      basis.
    rescale_lr: multiply the step by :math:`h_0 + \delta`.
    debias: divide the momentum by :math:`1 - \beta_1^t`.
    shampoo_beta: decay :math:`\beta_s` of the Kronecker factors.
    precondition_frequency: :math:`f`, refresh the bases every :math:`f`
      steps (first at step 1). May be traced.
    max_precond_dim: largest side that gets a basis (a static int).
    precondition_1d: give vectors a full basis (a static bool; off by
      default, as in SOAP: an eigendecomposition per bias vector costs more
      than it gives in a deep network; turn it on for a linear model).
    mc_samples: samples per step; ``> 1`` adds a leading axis to the draws
      and grads. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples", "max_precond_dim")``.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the generator of :math:`E` (``"normal"``, ``"hash"``, ``"flip"``
      or a ``blrax.noise`` generator); see :func:`blrax.scale_by_ivon`.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as in ``optax.adamw(mask=)``:
      where False, :math:`\delta = 0` (e.g. no decay on biases and norms).
    prior_mean: None (a zero-mean prior) or the prior mean :math:`m_0`, a
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
  _check_hyperparams(b1, clip_radius, rescale_lr, debias, shampoo_beta,
                     precondition_frequency, precondition_1d)
  max_dim = validation.check_integer("max_precond_dim", max_precond_dim,
                                     low=1)
  rho = 1.0 - b2
  # IVON's step, split around the rotation: its numerator (momentum,
  # debiasing, prior pull) in the original coordinates, its preconditioning
  # (divide by h + delta, clip, rescale) in the rotated basis.
  step = steps_lib.ivon(
      b1, debias=debias, clip_radius=clip_radius,
      scale=(lambda decay: hess_init + decay) if rescale_lr else 1.0)

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

    def sides(h, p, make):
      sizes = ((0, 0) if not gaussian.is_trainable(p) else
               _side_sizes(h.shape, max_dim, precondition_1d))
      return tuple(make(d, h.dtype) for d in sizes)

    eye = lambda d, dtype: jnp.eye(d, dtype=dtype)
    zeros = lambda d, dtype: jnp.zeros((d, d), dtype)
    bases = jax.tree.map(lambda h, p: sides(h, p, eye), curvature, params)
    factors = jax.tree.map(lambda h, p: sides(h, p, zeros), curvature, params)
    pick = lambda tree, i: jax.tree.map(lambda _, t: t[i], curvature, tree)
    return ScaleByEVONState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, curvature),
        left_factor=pick(factors, 0), right_factor=pick(factors, 1),
        posterior=eigenbasis.EigenbasisGaussian(
            noise_state=noise_state, curvature=curvature,
            left=pick(bases, 0), right=pick(bases, 1),
            ess=gaussian.scalar(ess),
            weight_decay=decay if decay_in_state else gaussian.scalar(decay),
            prior_mean=(() if prior_mean is None else prior_lib.mean_tree(
                prior_mean, params,
                lambda p: gaussian.state_dtype(eigenbasis.real_dtype(p))))))

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    accumulate = bool(extra_args.pop(engine.ACCUMULATE, False))
    del extra_args
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

    # 1. The micro-batch's statistics, linear in its samples: the mean
    # gradient and the curvature statistic in the draw's basis (Price: the
    # rotated gradient times the noise; or the given ``hessian``).
    def statistics(mean, grad, eps, h, ql, qr, hess):
      if not gaussian.is_trainable(mean):
        return jnp.zeros_like(h), jnp.zeros_like(h)
      shape, dtype = h.shape, h.dtype
      grad = curvature_lib.finite(jnp.asarray(grad).astype(dtype))
      if hessian is None:
        rotated = eigenbasis.scaled(lambda x: eigenbasis.rotate_matrix(x, ql, qr),
                        eigenbasis.as_matrix(grad, shape)).reshape(grad.shape)
        statistic = curvature_lib.PRICE.statistic(rotated, eps, h)
      else:
        statistic = curvature_lib.hessian_statistic(
            jnp.asarray(hess).astype(dtype), h)
      return curvature_lib.finite(curvature_lib.mc_mean(grad, h)), statistic

    stats = jax.tree.map(statistics, params, updates, noise_tree,
                         posterior.curvature, posterior.left, posterior.right,
                         hessian_tree)
    g_tree, c_tree = (jax.tree.map(lambda _, t, i=i: t[i], params, stats)
                      for i in range(2))
    done, g_tree, c_tree, accumulator = engine.add_micro_batch(
        state, params, g_tree, c_tree, generator, accumulate)
    if done is not None:  # under blrax.MultiSteps, before the last one
      return done

    count = optax.safe_increment(state.count)
    scalars = step.scalars(count)
    anchors = (posterior.curvature if engine.is_absent(posterior.prior_mean)
               else posterior.prior_mean)
    old_decays = posterior.decays()  # the draw's sigma used these
    decays = (old_decays if decay_in_state else
              gaussian.per_leaf(weight_decay, posterior.curvature))

    # 2. Curvature in the draw's basis, momentum, Kronecker factors.
    def first(mean, g_bar, c, h, momentum, lf, rf, decay, old_decay, anchor):
      if not gaussian.is_trainable(mean):
        return h, momentum, lf, rf, jnp.zeros_like(h)
      shape, dtype = h.shape, h.dtype
      h_hat = (curvature_lib.PRICE.curvature(g_bar, c, h, posterior.ess,
                                             old_decay)
               if hessian is None else c)
      h = curvature_lib.positive_ema(h, h_hat, rho, decay)
      mean = jnp.asarray(mean)
      offset = mean if engine.is_absent(posterior.prior_mean) else (
          mean.astype(dtype) - anchor)
      numerator, momentum = step.numerator(g_bar, momentum, offset, decay,
                                           scalars, dtype)
      g2 = g_bar.reshape(eigenbasis.matrix_shape(shape))
      if lf.size:
        lf = curvature_lib.finite(shampoo_beta * lf + (1.0 - shampoo_beta)
                                  * eigenbasis.scaled(lambda x: x @ x.T, g2, 2))
      if rf.size:
        rf = curvature_lib.finite(shampoo_beta * rf + (1.0 - shampoo_beta)
                                  * eigenbasis.scaled(lambda x: x.T @ x, g2, 2))
      return (h.astype(dtype), momentum.astype(dtype), lf.astype(dtype),
              rf.astype(dtype), numerator)

    out = jax.tree.map(first, params, g_tree, c_tree, posterior.curvature,
                       state.momentum, state.left_factor, state.right_factor,
                       decays, old_decays, anchors)
    h_tree, momentum, left_factor, right_factor, numerators = (
        jax.tree.map(lambda _, t, i=i: t[i], params, out) for i in range(5))

    # 3. Every f steps (first at step 1): new bases, h' carried over.
    def refresh(operands):
      h_tree, old_left, old_right = operands

      def leaf(h, lf, rf, ql, qr, decay):
        new_l = _eigenbasis(lf, ql) if ql.size else ql
        new_r = _eigenbasis(rf, qr) if qr.size else qr
        h = _reproject(h, h.shape, ql, qr, new_l, new_r)
        return curvature_lib.bounded(h, decay), new_l, new_r

      out = jax.tree.map(leaf, h_tree, left_factor, right_factor, old_left,
                         old_right, decays)
      return tuple(jax.tree.map(lambda _, t, i=i: t[i], h_tree, out)
                   for i in range(3))

    operands = (h_tree, posterior.left, posterior.right)
    h_tree, left, right = jax.lax.cond(
        (count - 1) % precondition_frequency == 0, refresh, lambda x: x,
        operands)

    # 4. IVON's preconditioning in the (new) rotated basis.
    def direction(mean, h, ql, qr, numerator, decay):
      if not gaussian.is_trainable(mean):
        return jnp.zeros_like(mean)
      mean = jnp.asarray(mean)
      shape, dtype = h.shape, h.dtype
      rotated = eigenbasis.scaled(
          lambda x: eigenbasis.rotate_matrix(x, ql, qr),
          curvature_lib.finite(numerator).reshape(
              eigenbasis.matrix_shape(shape)))
      rotated_step = step.precondition(rotated, h.reshape(rotated.shape),
                                       decay)
      out = eigenbasis.scaled(
          lambda x: eigenbasis.unrotate_matrix(x, ql, qr),
          curvature_lib.finite(rotated_step, dtype)).reshape(shape)
      return curvature_lib.finite(out, mean.dtype).astype(mean.dtype)

    directions = jax.tree.map(direction, params, h_tree, left, right,
                              numerators, decays)
    new_posterior = engine.advance(posterior, generator, h_tree, ess=ess,
                                   weight_decay=weight_decay,
                                   decay_in_state=decay_in_state, left=left,
                                   right=right)
    return directions, ScaleByEVONState(
        count=count, momentum=momentum, left_factor=left_factor,
        right_factor=right_factor, posterior=new_posterior,
        accumulator=accumulator)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def evon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = True,
    debias: bool = True,
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    precondition_frequency: int = 10,
    max_precond_dim: int = 1024,
    precondition_1d: bool = False,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The EVON optimizer: IVON in SOAP's eigenbasis, a structured posterior.

  Trains the mean :math:`M` (the params) of a Gaussian whose covariance, per
  weight matrix, is diagonal in the eigenbasis :math:`Q_L, Q_R` of the
  gradient's Kronecker factors:
  :math:`\mathrm{vec}(W) \sim N(\mathrm{vec}M, (Q_R\otimes Q_L)
  \mathrm{diag}(\mathrm{vec}\,\sigma^2)(Q_R\otimes Q_L)^\top)`,
  :math:`\sigma = 1/\sqrt{\lambda(h'+\delta)}`. Each step takes the gradient
  :math:`G` at a draw :math:`\theta = M + Q_L(\sigma\odot E)Q_R^\top` (from
  :func:`blrax.sample_params`) and runs IVON's update on the rotated
  gradient :math:`Q_L^\top G Q_R`:

  .. math::

    \hat h' &= (Q_L^\top G Q_R) \odot E / \sigma, \qquad
    h' \leftarrow \beta_2 h' + (1-\beta_2)\,\hat h'
      + \tfrac12 (1-\beta_2)^2 (h' - \hat h')^2 / (h' + \delta) \\
    g &\leftarrow \beta_1 g + (1-\beta_1) G, \qquad
    L \leftarrow \beta_s L + (1-\beta_s) GG^\top, \quad
    R \leftarrow \beta_s R + (1-\beta_s) G^\top G \\
    M &\leftarrow M - \alpha (h_0+\delta)\, Q_L\,\mathrm{clip}\Big(
      \frac{Q_L^\top(g/(1-\beta_1^t) + \delta M)Q_R}{h'+\delta},
      -\xi, \xi\Big) Q_R^\top

  with :math:`Q_L, Q_R` the eigenvectors of :math:`L, R`, refreshed every
  ``precondition_frequency`` steps (and :math:`h'` carried into the new
  basis, see :func:`blrax.scale_by_evon`). On a linear-regression (or any
  quadratic) loss of a vector parameter with ``precondition_1d=True``, the
  fixed point is the exact full-covariance posterior
  :math:`(\lambda(H+\delta I))^{-1}`.

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
    clip_radius: elementwise clip :math:`\xi` of the rotated step.
    rescale_lr: multiply the learning rate by :math:`h_0 + \delta`.
    debias: debias the momentum as Adam does.
    shampoo_beta: decay :math:`\beta_s` of the Kronecker factors (SOAP's).
    precondition_frequency: refresh the eigenbases every this many steps.
    max_precond_dim: sides larger than this stay diagonal (static).
    precondition_1d: full basis for vectors up to ``max_precond_dim``
      (default off, as in SOAP; on for linear and logistic regression).
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
    >>> opt = blrax.evon(learning_rate=0.05, ess=1e4, key=0)
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
  """
  return engine.with_learning_rate(
      scale_by_evon(
          ess=ess, hess_init=hess_init, b1=b1, b2=b2,
          weight_decay=weight_decay, clip_radius=clip_radius,
          rescale_lr=rescale_lr, debias=debias, shampoo_beta=shampoo_beta,
          precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
          mc_samples=mc_samples, key=key, noise=noise,
          weight_decay_mask=weight_decay_mask, prior_mean=prior_mean),
      learning_rate)
