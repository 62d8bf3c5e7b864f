r"""VON: Variational Online Newton, with diagonal or full covariance."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import full as full_gaussian
from blrax._src.posteriors import prior as prior_lib

COVARIANCES = ("diag", "full")


class ScaleByFullVONState(NamedTuple):
  """State of the full-covariance VON transform (:func:`scale_by_full_von`).

  Attributes:
    count: number of updates so far (int32).
    posterior: the :class:`blrax.FullGaussian`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.von(0.1, ess=100.0, covariance="full")
    >>> state = opt.init(jnp.zeros(2))
    >>> isinstance(state[0], blrax.ScaleByFullVONState)
    True
    >>> state[0].posterior.curvature.shape
    (2, 2)
  """

  count: jax.Array
  posterior: full_gaussian.FullGaussian


ScaleByVONState = engine.ScaleByBLRState


DEFAULT_MAX_DIM = 16384
"""The ``max_dim`` of ``covariance="full"`` when it is left out (None)."""


def _max_dim(max_dim: Any, covariance: str) -> int | None:
  """``max_dim`` as a Python int (None: the default).

  Left out (None) it is not a hyperparameter of ``optax.inject_hyperparams``
  (which injects numbers only), so it needs no ``static_args``. A diagonal
  posterior never uses it: a traced one is then ignored.
  """
  if max_dim is None:
    return DEFAULT_MAX_DIM
  if covariance == "diag" and validation.is_traced(max_dim):
    return None
  return validation.check_integer("max_dim", max_dim, low=1)


def _check_dim(dim: int, max_dim: int) -> None:
  # dim == 0 is allowed here: optax.tree.map_params inits with a leafless
  # placeholder. update refuses it.
  if dim > max_dim:
    raise ValueError(
        f"covariance='full' needs a {dim}x{dim} matrix "
        f"({dim * dim * 4 / 2**30:.1f} GiB in float32) and an O(D^3) "
        f"factorisation per step; D={dim} exceeds max_dim={max_dim}. Use "
        "covariance='diag', or raise max_dim if you mean it.")


def _full_params(params):
  """Params as arrays; a full Gaussian is over real floating-point leaves only."""
  def leaf(p):
    if isinstance(p, jax.ShapeDtypeStruct):
      return p
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise ValueError(
          f"covariance='full' needs real floating-point params, got a "
          f"{p.dtype} leaf: keep ints out of the optimizer (e.g. "
          "optax.masked or optax.partition) or use covariance='diag', which "
          "leaves int leaves unchanged.")
    return p
  return jax.tree.map(leaf, params)


def _full_hessian_shape(hessian, dim, mc_samples):
  want = (dim, dim) if mc_samples == 1 else (mc_samples, dim, dim)
  if not hasattr(hessian, "shape") or tuple(hessian.shape) != want:
    raise ValueError(
        f"`hessian` for covariance='full' must be a matrix of shape {want} "
        f"(ravel_pytree order), got shape {getattr(hessian, 'shape', None)}.")


def scale_by_von(
    ess: jax.typing.ArrayLike,
    *,
    covariance: str = "diag",
    hess_init: jax.typing.ArrayLike = 1.0,
    b2: jax.typing.ArrayLike = 0.9999,
    weight_decay: Any = 1e-4,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    max_dim: int | None = None,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VON's Newton-like direction, before the learning rate.

  With :math:`\rho = 1-\beta_2`, gradients :math:`\hat g_s` at the draws
  :math:`\theta_s` of :func:`blrax.sample_params`, :math:`\bar g` their mean:

  .. math::

    S &\leftarrow (1-\rho) S + \rho \hat H
      \ [+\ \tfrac12\rho^2 (S-\hat H)(S+\delta I)^{-1}(S-\hat H)] \\
    \Delta &= (S + \delta I)^{-1} (\bar g + \delta m)

  :math:`\hat H` is the ``hessian=`` passed to ``update`` (diag: a pytree like
  the params; full: a ``(D, D)`` matrix in ``ravel_pytree`` order), averaged
  over samples, or else the Price estimator: diag
  :math:`\hat h = \mathrm{mean}_s \hat g_s\epsilon_s/\sigma`, full
  :math:`\hat H = \mathrm{mean}_s\,\mathrm{sym}(\hat g_s(\theta_s-m)^\top P)`.
  The bracketed correction (Lin et al., 2020) is applied to the Price
  estimator only; it keeps :math:`S + \delta I` positive definite. A given
  ``hessian`` must keep :math:`S+\delta I` positive definite itself (use a
  Gauss-Newton matrix for non-convex losses).

  Args:
    ess: effective sample size :math:`\lambda`; ``inf`` gives no noise (then
      ``hessian=`` is required, and the method is damped Newton).
    covariance: ``"diag"`` or ``"full"`` (params flattened with
      ``ravel_pytree``; for small models).
    hess_init: initial curvature (:math:`S = h_0 I` for full).
    b2: curvature decay; the curvature step is :math:`\rho = 1 - \beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    max_dim: largest parameter count accepted with ``covariance="full"``
      (None: 16384). A Python int, not a hyperparameter: leave it out under
      ``optax.inject_hyperparams`` (or pass ``static_args=("max_dim",)``).
    noise: ``"normal"``, or (diag only) ``"hash"`` or ``"flip"`` /
      ``blrax.noise.flip_noise(...)``: cheaper generators, see :func:`blrax.ivon`.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as ``optax.adamw(mask=...)``:
      where False, :math:`\delta = 0` (no prior pull, e.g. biases).
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the prior term becomes :math:`\delta(m-m_0)`
      (a previous task's posterior mean, for continual learning).
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`), or
      the number of updates' worth of data that ``hess_init`` counts as,
      :math:`n_0`: the step is :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))`,
      so the curvature is the running mean of the estimates (and
      ``hess_init``) until the EMA takes over.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (with
    ``covariance="full"``, :func:`scale_by_full_von`'s).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> tx = blrax.scale_by_von(100.0, covariance="full")
    >>> print(tx.init(jnp.zeros(2)).posterior.curvature)  # S = hess_init * I
    [[1. 0.]
     [0. 1.]]

  References:
    Khan & Rue, `The Bayesian Learning Rule
    <https://arxiv.org/abs/2107.04562>`_, JMLR 2023.
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, 2018.
    Lin, Schmidt & Khan, `Handling the Positive-Definite Constraint in the
    Bayesian Learning Rule <https://arxiv.org/abs/2002.10060>`_, ICML 2020.
  """
  if not isinstance(covariance, str) or covariance not in COVARIANCES:
    raise ValueError(f"`covariance` must be one of {COVARIANCES}, got "
                     f"covariance={covariance!r}.")
  max_dim = _max_dim(max_dim, covariance)
  validation.check_state_scale("hess_init", hess_init, positive=True)
  if covariance == "full":
    if weight_decay_mask is not None:
      raise ValueError(
          "covariance='full' takes one scalar `weight_decay`; "
          f"weight_decay_mask={weight_decay_mask!r} is for the diagonal "
          "posterior.")
    return scale_by_full_von(ess, hess_init=hess_init, b2=b2,
                             weight_decay=weight_decay, mc_samples=mc_samples,
                             key=key, max_dim=max_dim, noise=noise,
                             prior_mean=prior_mean,
                             hess_init_steps=hess_init_steps)
  return engine.scale_by_blr(
      estimator=curvature.PRICE, precision=curvature.positive_ema,
      hessian_precision=curvature.ema, step=steps.newton(), ess=ess,
      hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      mc_samples=mc_samples, key=key, noise=noise, accepts_hessian=True,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      hess_init_steps=hess_init_steps)


def scale_by_full_von(
    ess: jax.typing.ArrayLike,
    *,
    hess_init: jax.typing.ArrayLike = 1.0,
    b2: jax.typing.ArrayLike = 0.9999,
    weight_decay: Any = 1e-4,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    max_dim: int | None = None,
    noise: str = "normal",
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Full-covariance VON (see :func:`scale_by_von`), its own transform.

  The same estimator interface as the diagonal engine, on a
  :class:`blrax.FullGaussian`: the Price estimator
  (``full_gaussian.price_curvature``) or a given ``(D, D)`` ``hessian=``,
  the positivity-corrected or plain EMA, and the Newton step. A step whose
  new :math:`S+\delta I` is not numerically positive definite (its Cholesky
  factor is not finite, e.g. a float32 curvature with a condition number
  near 1e8) keeps the previous curvature, so the state stays finite.

  Args:
    ess: effective sample size :math:`\lambda`; ``inf`` gives no noise (then
      ``hessian=`` is required).
    hess_init: initial curvature, :math:`S = h_0 I`.
    b2: curvature decay; the curvature step is :math:`\rho = 1 - \beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess`` (one
      scalar: the prior precision is :math:`\lambda\delta I`).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    max_dim: largest parameter count :math:`D` accepted (None: 16384).
    noise: ``"normal"`` (or a :class:`blrax.noise.NormalNoise`), the only
      generator for a full covariance.
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the Newton step solves for
      :math:`\bar g + \delta(m - m_0)`.
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`), or
      the number of updates' worth of data that ``hess_init`` counts as,
      :math:`n_0`: the step is :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))`,
      so the curvature is the running mean of the estimates (and
      ``hess_init``) until the EMA takes over.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByFullVONState`; ``update`` accepts a ``(D, D)``
    ``hessian=`` (``(mc_samples, D, D)`` when ``mc_samples > 1``).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> tx = blrax.scale_by_full_von(ess=4.0, weight_decay=0.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> print(blrax.posterior_stddev(state)["w"])  # 1 / sqrt(ess * hess_init)
    [0.5 0.5]
  """
  if not (isinstance(noise, noise_lib.NormalNoise) or (
      isinstance(noise, str) and noise == "normal")):
    raise ValueError("`noise` must be 'normal' with covariance='full', got "
                     f"noise={noise!r}.")
  validation.check_state_scale("ess", ess, positive=True, allow_inf=True)
  validation.check_state_scale("hess_init", hess_init, positive=True)
  validation.check_unit_interval("b2", b2)
  if prior_lib.is_per_leaf(weight_decay):
    raise ValueError(
        "covariance='full' takes one scalar `weight_decay` (the prior "
        f"precision is weight_decay * I), got weight_decay={weight_decay!r}.")
  validation.check_state_scale("weight_decay", weight_decay)
  prior_lib.check(weight_decay, None, prior_mean)
  mc_samples = validation.check_mc_samples(mc_samples)
  max_dim = _max_dim(max_dim, "full")
  if not validation.is_traced(key):
    noise_lib.canonicalize_key(key)
  if hess_init_steps is not None:
    validation.check_state_scale("hess_init_steps", hess_init_steps)

  def init_fn(params):
    params = _full_params(params)
    template = full_gaussian.shape_template(params)
    dim = full_gaussian.dimension(template)
    _check_dim(dim, max_dim)
    dtype = gaussian.state_dtype(
        jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params)
        else jnp.float32)
    posterior = full_gaussian.FullGaussian(
        key=noise_lib.key_data(
            noise_lib.initial_key(key, mc_samples, params)),
        curvature=hess_init * jnp.eye(dim, dtype=dtype),
        ess=gaussian.scalar(ess),
        weight_decay=gaussian.scalar(weight_decay),
        template=template,
        prior_mean=(() if prior_mean is None else full_gaussian.flatten(
            prior_lib.mean_tree(prior_mean, params,
                                lambda p: dtype)).astype(dtype)))
    return ScaleByFullVONState(count=jnp.zeros([], jnp.int32),
                               posterior=posterior)

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    del extra_args
    gaussian.check_grads(updates, params, mc_samples)
    params, updates = _full_params(params), jax.tree.map(jnp.asarray, updates)
    gaussian.check_params(params, jax.tree.map(
        lambda t: jax.ShapeDtypeStruct(t.shape[1:], t.dtype),
        state.posterior.template))
    if hessian is None and validation.concrete_float(ess) == math.inf:
      raise ValueError(
          "ess=inf means no weight noise, so the Price curvature estimate is "
          "undefined: pass the curvature as `update(..., hessian=...)`.")
    posterior = state.posterior
    rho = curvature.step_size(b2, optax.safe_increment(state.count),
                              hess_init_steps)
    s_old = posterior.curvature
    dim = s_old.shape[0]
    if dim == 0:
      raise ValueError("covariance='full' needs params with at least one "
                       "entry, got params of total size 0.")
    grads = full_gaussian.flatten(updates, 0 if mc_samples == 1 else 1)
    grads = curvature.finite(grads.astype(s_old.dtype).reshape(-1, dim))
    mean = full_gaussian.flatten(params).astype(s_old.dtype)
    eye = jnp.eye(dim, dtype=s_old.dtype)
    a = s_old + weight_decay * eye
    chol_old = jnp.linalg.cholesky(a)
    if hessian is None:
      estimate = curvature.finite(full_gaussian.price_curvature(
          grads, posterior.noise().reshape(-1, dim), posterior.precision()))
      # S + dI <- (A + C'A^-1 C)/2 with A = S + dI, C = (1-rho)A + rho(H + dI):
      # the correction of Lin et al. (2020) as a PD matrix plus a Gram
      # matrix, positive definite even when H is huge and indefinite.
      c = (1.0 - rho) * a + rho * (estimate + weight_decay * eye)
      x = jax.scipy.linalg.solve_triangular(chol_old, c, lower=True)
      s_new = 0.5 * (a + x.T @ x) - weight_decay * eye
    else:
      _full_hessian_shape(hessian, dim, mc_samples)
      if jnp.iscomplexobj(hessian):
        raise ValueError("`hessian` must be real, got a complex matrix.")
      estimate = curvature.finite(curvature.finite(jnp.asarray(
          hessian, s_old.dtype)).reshape(-1, dim, dim).mean(0))
      s_new = (1.0 - rho) * s_old + rho * estimate
    s_new = 0.5 * (s_new + s_new.T)
    chol_new = jnp.linalg.cholesky(s_new + weight_decay * eye)
    new_posterior = posterior.advanced(s_new, ess, weight_decay)
    # Keep the old curvature where the new one is not numerically PD in the
    # state's precision: both this step's solve and the next draw's
    # factorisation (of P = ess (S + dI)) must succeed.
    # (With ess = inf there is no draw: only the solve matters.)
    # NaN inputs are not rescued: like the diagonal variants, they show.
    ok = jnp.any(jnp.isnan(estimate)) | jnp.all(jnp.isfinite(chol_new)) & (
        ~jnp.isfinite(new_posterior.ess)
        | jnp.all(jnp.isfinite(jnp.linalg.cholesky(new_posterior.precision()))))
    s_new = jnp.where(ok, s_new, s_old)
    chol = jnp.where(ok, chol_new, chol_old)
    # Solved for the rhs scaled to at most 1, then saturated: a 1e38
    # gradient would otherwise overflow inside the solve into inf - inf.
    if not (isinstance(posterior.prior_mean, tuple) and not posterior.prior_mean):
      mean = mean - posterior.prior_mean
    rhs = curvature.finite(curvature.finite(grads.mean(0)) + weight_decay * mean)
    scale = jnp.max(jnp.abs(rhs))
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    direction = curvature.finite(
        scale * jax.scipy.linalg.cho_solve((chol, True), rhs / scale))
    direction = full_gaussian.unflatten(posterior.template, direction)
    direction = jax.tree.map(
        lambda d, p: curvature.finite(d, p.dtype).astype(p.dtype),
        direction, params)
    return direction, ScaleByFullVONState(
        count=optax.safe_increment(state.count),
        posterior=posterior.advanced(s_new, ess, weight_decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def von(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    covariance: str = "diag",
    hess_init: jax.typing.ArrayLike = 1.0,
    b2: jax.typing.ArrayLike = 0.9999,
    weight_decay: Any = 1e-4,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    max_dim: int | None = None,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Variational Online Newton: the BLR for a Gaussian, Newton-like.

  For :math:`q = N(m, (\lambda(S+\delta I))^{-1})` the BLR natural-gradient
  step with step size :math:`\rho = 1-\beta_2` for the precision and
  :math:`\alpha` for the mean is

  .. math::

    S &\leftarrow (1-\rho) S + \rho\, E_q[\nabla^2 \bar\ell] \\
    m &\leftarrow m - \alpha (S + \delta I)^{-1} (E_q[\nabla \bar\ell] + \delta m)

  with the expectations estimated at draws from :func:`blrax.sample_params`
  (see :func:`scale_by_von` for the estimators). With ``ess = inf``, an exact
  Hessian and :math:`\alpha = \rho = 1` (``b2=0``) one step is Newton's method.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda`.
    covariance: ``"diag"`` or ``"full"``.
    hess_init: initial curvature.
    b2: curvature decay (:math:`\rho = 1 - \beta_2`).
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    mc_samples: samples per step. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise.
    max_dim: largest parameter count accepted with ``covariance="full"``
      (None: 16384). A Python int, not a hyperparameter: leave it out under
      ``optax.inject_hyperparams`` (or pass ``static_args=("max_dim",)``).
    noise: ``"normal"``, or (diag only) ``"hash"`` or ``"flip"`` /
      ``blrax.noise.flip_noise(...)``: cheaper generators, see :func:`blrax.ivon`.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as ``optax.adamw(mask=...)``:
      where False, :math:`\delta = 0` (no prior pull, e.g. biases).
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the prior term becomes :math:`\delta(m-m_0)`
      (a previous task's posterior mean, for continual learning).
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`, the
      published algorithm), or the number of updates' worth of data that
      ``hess_init`` counts as, :math:`n_0`: the curvature step is
      :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` accepts
    ``hessian=``.

  Examples:
    One step of Newton's method on the quadratic
    :math:`\tfrac12 p^\top A p - b^\top p` (gradient :math:`Ap - b`,
    Hessian :math:`A`) lands on its minimum:

    >>> import jax.numpy as jnp, blrax
    >>> a = jnp.array([[3.0, 1.0], [1.0, 2.0]]); b = jnp.array([1.0, -1.0])
    >>> opt = blrax.von(1.0, ess=jnp.inf, covariance="full", b2=0.0,
    ...                 weight_decay=0.0)
    >>> params = jnp.zeros(2); state = opt.init(params)
    >>> updates, state = opt.update(a @ params - b, state, params, hessian=a)
    >>> print(jnp.allclose(params + updates, jnp.linalg.solve(a, b)))
    True

  References:
    Khan & Rue, `The Bayesian Learning Rule
    <https://arxiv.org/abs/2107.04562>`_, JMLR 2023.
  """
  return engine.with_learning_rate(
      scale_by_von(ess, covariance=covariance, hess_init=hess_init, b2=b2,
                   weight_decay=weight_decay, mc_samples=mc_samples, key=key,
                   max_dim=max_dim, noise=noise,
                   weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
                   hess_init_steps=hess_init_steps),
      learning_rate)
