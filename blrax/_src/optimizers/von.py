r"""VON: Variational Online Newton, with diagonal or full covariance."""

from __future__ import annotations

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
    accumulator: ``()``, or under :class:`blrax.MultiSteps` the sums over
      the micro-batches of the mean gradient (``(D,)``) and of the curvature
      estimate (``(D, D)``): an ``Accumulator(count, gradient, statistic)``.

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
  accumulator: Any = ()

  def empty_accumulator(self) -> engine.Accumulator:
    """Zero sums for :class:`blrax.MultiSteps`: a ``(D,)`` gradient and a
    ``(D, D)`` curvature estimate."""
    s = self.posterior.curvature
    return engine.Accumulator(count=jnp.zeros([], jnp.int32),
                              gradient=jnp.zeros(s.shape[:1], s.dtype),
                              statistic=jnp.zeros_like(s))


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
  :math:`\theta_s` of :func:`blrax.sample_params`, :math:`\bar g` their mean,
  :math:`D_\delta = \mathrm{diag}(\delta)` the weight decay (:math:`\delta I`
  for a scalar, per coordinate for a per-leaf ``weight_decay`` or a mask) and
  :math:`m_0` the prior mean:

  .. math::

    S &\leftarrow (1-\rho) S + \rho \hat H
      \ [+\ \tfrac12\rho^2 (S-\hat H)(S+D_\delta)^{-1}(S-\hat H)] \\
    \Delta &= (S + D_\delta)^{-1} (\bar g + D_\delta (m - m_0))

  :math:`\hat H` is the ``hessian=`` passed to ``update`` (diag: a pytree like
  the params; full: a ``(D, D)`` matrix in ``ravel_pytree`` order), averaged
  over samples, or else the Price estimator: diag
  :math:`\hat h = \mathrm{mean}_s \hat g_s\epsilon_s/\sigma`, full
  :math:`\hat H = \mathrm{mean}_s\,\mathrm{sym}(\hat g_s(\theta_s-m)^\top P)`.
  The bracketed correction (Lin et al., 2020) is applied to the Price
  estimator only; it keeps :math:`S + D_\delta` positive definite. A given
  ``hessian`` must keep :math:`S+D_\delta` positive definite itself (use a
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
    return scale_by_full_von(ess, hess_init=hess_init, b2=b2,
                             weight_decay=weight_decay, mc_samples=mc_samples,
                             key=key, max_dim=max_dim, noise=noise,
                             weight_decay_mask=weight_decay_mask,
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
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Full-covariance VON (see :func:`scale_by_von`), its own transform.

  On a :class:`blrax.FullGaussian` :math:`N(m, (\lambda(S+D_\delta))^{-1})`
  over the params flattened to :math:`D` coordinates, with
  :math:`D_\delta = \mathrm{diag}(\delta)` (:math:`\delta I` for a scalar
  ``weight_decay``), :math:`\rho = 1-\beta_2`, gradients :math:`\hat g_s` at
  the draws :math:`\theta_s = m + L^{-\top}\epsilon_s`
  (:math:`LL^\top = \lambda(S+D_\delta)`) and :math:`\bar g` their mean:

  .. math::

    \hat H &= \mathrm{mean}_s\,\mathrm{sym}(\hat g_s (L\epsilon_s)^\top)
      \quad(\text{Price; or the mean of the given } \texttt{hessian=}) \\
    A &= S + D_\delta, \quad C = (1-\rho) A + \rho(\hat H + D_\delta),
      \quad S + D_\delta \leftarrow \tfrac12 (A + C^\top A^{-1} C) \\
    \Delta &= (S + D_\delta)^{-1}(\bar g + D_\delta(m - m_0))

  (the positivity correction of Lin et al., 2020, for Price; with a given
  ``hessian=`` the plain EMA :math:`S \leftarrow (1-\rho) S + \rho\hat H`).
  A step whose new :math:`S+D_\delta` is not numerically positive definite
  (its Cholesky factor is not finite, e.g. a float32 curvature with a
  condition number near 1e8) keeps the previous curvature, so the state
  stays finite.

  Under :class:`blrax.MultiSteps` each micro-batch adds its :math:`\bar g`
  (a ``(D,)`` sum) and its :math:`\hat H` (a ``(D, D)`` sum; both are linear
  in the samples) and gets its own draw; the last one steps with their
  means: one step with ``mc_samples = k`` in which sample :math:`i` sees
  micro-batch :math:`i`.

  Args:
    ess: effective sample size :math:`\lambda`; ``inf`` gives no noise (then
      ``hessian=`` is required).
    hess_init: initial curvature, :math:`S = h_0 I`.
    b2: curvature decay; the curvature step is :math:`\rho = 1 - \beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar (:math:`D_\delta = \delta I`), or a pytree like the params of
      scalars or arrays broadcastable to each leaf (kept in the state as a
      ``(D,)`` vector in ``ravel_pytree`` order).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    max_dim: largest parameter count :math:`D` accepted (None: 16384).
    noise: ``"normal"`` (or a :class:`blrax.noise.NormalNoise`), the only
      generator for a full covariance.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one): where False, :math:`\delta = 0`.
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the Newton step solves for
      :math:`\bar g + D_\delta(m - m_0)`.
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
    >>> tx = blrax.scale_by_full_von(ess=4.0, weight_decay={"w": 3.0, "b": 0.0})
    >>> state = tx.init({"w": jnp.zeros(2), "b": jnp.zeros(())})
    >>> print(state.posterior.weight_decay)  # ravel_pytree order: b, w
    [0. 3. 3.]
    >>> print(blrax.posterior_stddev(state)["w"])  # 1 / sqrt(4 * (1 + 3))
    [0.25 0.25]
  """
  if not (isinstance(noise, noise_lib.NormalNoise) or (
      isinstance(noise, str) and noise == "normal")):
    raise ValueError("`noise` must be 'normal' with covariance='full', got "
                     f"noise={noise!r}.")
  mc_samples, _, decay_in_state = engine.configure(
      ess=ess, hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      mc_samples=mc_samples, key=key, noise=noise,
      hess_init_steps=hess_init_steps, positive_hess_init=True)
  max_dim = _max_dim(max_dim, "full")

  def init_fn(params):
    params = _full_params(params)
    template = full_gaussian.shape_template(params)
    dim = full_gaussian.dimension(template)
    _check_dim(dim, max_dim)
    dtype = gaussian.state_dtype(
        jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params)
        else jnp.float32)
    if decay_in_state:  # per coordinate, (D,) in ravel_pytree order
      decays = prior_lib.decay_tree(weight_decay, weight_decay_mask, params,
                                    lambda p: dtype)
      decay = full_gaussian.flatten(jax.tree.map(
          lambda d, p: jnp.broadcast_to(d, p.shape), decays,
          params)).astype(dtype)
    else:
      decay = gaussian.scalar(weight_decay)
    posterior = full_gaussian.FullGaussian(
        key=noise_lib.key_data(
            noise_lib.initial_key(key, mc_samples, params)),
        curvature=hess_init * jnp.eye(dim, dtype=dtype),
        ess=gaussian.scalar(ess), weight_decay=decay, template=template,
        prior_mean=(() if prior_mean is None else full_gaussian.flatten(
            prior_lib.mean_tree(prior_mean, params,
                                lambda p: dtype)).astype(dtype)))
    return ScaleByFullVONState(count=jnp.zeros([], jnp.int32),
                               posterior=posterior)

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    accumulate = bool(extra_args.pop(engine.ACCUMULATE, False))
    del extra_args
    engine.check_state(state, ScaleByFullVONState)
    posterior = state.posterior
    engine.check_update(updates, params, jax.tree.map(
        lambda t: jax.ShapeDtypeStruct(t.shape[1:], t.dtype),
        posterior.template), mc_samples=mc_samples, hessian=hessian, ess=ess)
    engine.check_accumulate(state, accumulate)
    params, updates = _full_params(params), jax.tree.map(jnp.asarray, updates)
    s_old = posterior.curvature
    dim = s_old.shape[0]
    if dim == 0:
      raise ValueError("covariance='full' needs params with at least one "
                       "entry, got params of total size 0.")
    grads = full_gaussian.flatten(updates, 0 if mc_samples == 1 else 1)
    grads = curvature.finite(grads.astype(s_old.dtype).reshape(-1, dim))
    # 1. The micro-batch's statistics, linear in its samples: the mean
    # gradient and the curvature estimate (Price, or the given hessian).
    # The draw's factor of S + D (its sqrt(ess) multiple is P's).
    chol_draw = posterior.factor()
    if hessian is None:
      estimate = curvature.finite(full_gaussian.price_curvature(
          grads, posterior.noise().reshape(-1, dim), chol_draw, posterior.ess))
    else:
      _full_hessian_shape(hessian, dim, mc_samples)
      if jnp.iscomplexobj(hessian):
        raise ValueError("`hessian` must be real, got a complex matrix.")
      estimate = curvature.finite(curvature.finite(jnp.asarray(
          hessian, s_old.dtype)).reshape(-1, dim, dim).mean(0))
    g_bar = curvature.finite(grads.mean(0))
    done, g_bar, estimate, accumulator = engine.add_micro_batch(
        state, params, g_bar, estimate, None, accumulate,
        next_draw=lambda p: p._replace(key=p.next_key()))
    if done is not None:  # under blrax.MultiSteps, before the last one
      return done

    # 2. The curvature, with D = diag(delta) (delta I for a scalar).
    decay = posterior.weight_decay if decay_in_state else weight_decay
    decays = full_gaussian.decay_matrix(decay, dim, s_old.dtype)
    rho = curvature.step_size(b2, optax.safe_increment(state.count),
                              hess_init_steps)
    a = s_old + decays
    # The same factor, unless inject_hyperparams changed weight_decay since.
    chol_old = jax.lax.cond(jnp.all(decays == posterior.decay_matrix()),
                            lambda: chol_draw, lambda: jnp.linalg.cholesky(a))
    if hessian is None:
      # S + D <- (A + C'A^-1 C)/2 with A = S + D, C = (1-rho)A + rho(H + D):
      # the correction of Lin et al. (2020) as a PD matrix plus a Gram
      # matrix, positive definite even when H is huge and indefinite.
      c = (1.0 - rho) * a + rho * (estimate + decays)
      x = jax.scipy.linalg.solve_triangular(chol_old, c, lower=True)
      s_new = 0.5 * (a + x.T @ x) - decays
    else:
      s_new = (1.0 - rho) * s_old + rho * estimate
    s_new = 0.5 * (s_new + s_new.T)
    chol_new = jnp.linalg.cholesky(s_new + decays)
    # Keep the old curvature where the new one is not numerically PD in the
    # state's precision: its factor serves this step's solve and the next
    # draw, which divides by its diagonal.
    # NaN inputs are not rescued: like the diagonal variants, they show.
    ok = jnp.any(jnp.isnan(estimate)) | (
        jnp.all(jnp.isfinite(chol_new)) & jnp.all(jnp.diag(chol_new) > 0))
    s_new = jnp.where(ok, s_new, s_old)
    chol = jnp.where(ok, chol_new, chol_old)
    # 3. The Newton step (S + D)^-1 (g_bar + D (m - m0)), solved for the rhs
    # scaled to at most 1, then saturated: a 1e38 gradient would otherwise
    # overflow inside the solve into inf - inf.
    mean = full_gaussian.flatten(params).astype(s_old.dtype)
    if not engine.is_absent(posterior.prior_mean):
      mean = mean - posterior.prior_mean
    rhs = curvature.finite(g_bar + decay * mean)
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
        posterior=posterior.advanced(s_new, ess, decay),
        accumulator=accumulator)

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

  For :math:`q = N(m, (\lambda(S+D_\delta))^{-1})`, :math:`D_\delta =
  \mathrm{diag}(\delta)` (:math:`\delta I` for a scalar weight decay) and a
  prior :math:`N(m_0, (\lambda D_\delta)^{-1})`, the BLR natural-gradient
  step with step size :math:`\rho = 1-\beta_2` for the precision and
  :math:`\alpha` for the mean is

  .. math::

    S &\leftarrow (1-\rho) S + \rho\, E_q[\nabla^2 \bar\ell] \\
    m &\leftarrow m - \alpha (S + D_\delta)^{-1} (E_q[\nabla \bar\ell]
      + D_\delta (m - m_0))

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
