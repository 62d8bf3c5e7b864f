r"""bSAM: Bayesian sharpness-aware minimisation (Möllenhoff & Khan, 2023).

SAM's max-loss is the optimal convex relaxation (the Fenchel biconjugate) of
the expected loss in the variational objective; natural-gradient steps on
that relaxed objective give bSAM, an Adam-like SAM whose optimizer state is a
diagonal Gaussian posterior :math:`q = N(m, 1/(N s))`. In blrax's normalised
form the precision is :math:`\lambda(h+\delta)` with :math:`s = h + \delta`,
so the posterior is a :class:`blrax.DiagonalGaussian` and
:func:`blrax.sample_params`, :func:`blrax.posterior_stddev` and
:func:`blrax.sample_posterior` work unchanged.

A step needs two gradients: :math:`g` at the draw :func:`blrax.sample_params`
and :math:`g_\epsilon` at the adversarial point :math:`m + \rho g/s` of the
*mean*. ``update`` takes the first as its ``updates`` and the second either
through ``grad_fn`` (called inside ``update``, as in
``optax.contrib.sam(..., opaque_mode=True)``) or as ``adversarial_grads``
(computed by the caller at :func:`bsam_adversarial_params`).

bSAM is a configuration of the diagonal engine (:func:`blrax.engine.scale_by_blr`):
the estimator ``curvature.gradient_magnitude(damping)``
(:math:`\hat h = \sqrt{h+\delta}\,\mathrm{mean}_s|\hat g_s| + \gamma`), the
plain EMA as its precision update, VOGN's step (momentum of
:math:`g + \delta(m - m_0)`, over :math:`h + \delta`) and the engine's
``step_gradient`` hook, which replaces :math:`\bar g` by the gradient at the
adversarial point. It therefore has the engine's features: ``mc_samples``,
per-leaf ``weight_decay``, ``weight_decay_mask``, ``prior_mean`` and
:class:`blrax.MultiSteps`.

References:
  Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
  <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import base, validation
from blrax._src.engine import estimators as curvature_lib
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import prior as prior_lib


class ScaleByBSAMState(NamedTuple):
  r"""State of :func:`scale_by_bsam` (and :func:`bsam`).

  The engine's state (:class:`blrax.ScaleByBLRState`) with :math:`\rho`.

  Attributes:
    count: number of updates so far (int32).
    momentum: :math:`g_m`, float32 or wider, like the params.
    rho: :math:`\rho`, the radius of the adversarial step, a float scalar
      (kept so that :func:`bsam_adversarial_params` needs no
      hyperparameters).
    posterior: the :class:`blrax.DiagonalGaussian`
      :math:`N(m, 1/(\lambda(h+\delta)))`; bSAM's :math:`s` is
      :math:`h + \delta`.
    accumulator: the micro-batch sums under :class:`blrax.MultiSteps`, else
      an empty tuple.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.bsam(0.1, ess=100.0, rho=0.01).init(jnp.zeros(2))
    >>> isinstance(state[0], blrax.ScaleByBSAMState)  # state[1]: the lr's
    True
    >>> print(state[0].rho, state[0].posterior.curvature)
    0.01 [1. 1.]
  """

  count: jax.Array
  momentum: Any
  rho: jax.Array
  posterior: gaussian.DiagonalGaussian
  accumulator: Any = ()


def _check_initial_s(hess_init, decays, where: str = "") -> None:
  """:math:`s_0 = h_0 + \\delta > 0` wherever both are concrete."""
  h = validation.concrete_float(hess_init)
  if h is None or h > 0:
    return
  for decay in decays:
    if validation.is_traced(decay):
      continue
    lowest = float(jnp.min(jnp.asarray(decay))) if jnp.size(decay) else 1.0
    if h + lowest <= 0:
      raise ValueError(
          "`hess_init` + `weight_decay` (bSAM's initial s) must be > 0: the "
          f"step divides by it; got hess_init={hess_init!r}, "
          f"weight_decay={lowest!r}{where}.")


def _check_hyperparams(ess, rho, b1, b2, damping, weight_decay,
                       weight_decay_mask, hess_init) -> None:
  validation.check_state_scale("ess", ess, positive=True, allow_inf=True)
  validation.check_nonnegative("rho", rho)
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_unit_interval("b2", b2)
  validation.check_state_scale("damping", damping)
  prior_lib.check(weight_decay, weight_decay_mask, None)
  validation.check_state_scale("hess_init", hess_init)
  if weight_decay_mask is None:  # with a mask: checked at init
    where = " at a leaf" if prior_lib.is_per_leaf(weight_decay) else ""
    _check_initial_s(hess_init, jax.tree.leaves(weight_decay), where)


def _adversarial_leaf(mean, g_bar, curvature, weight_decay, rho):
  r""":math:`m + \rho \bar g / s` for one leaf, in the params' dtype
  (saturated); ``g_bar`` is finite, in the state's dtype."""
  if not gaussian.is_trainable(mean):
    return mean
  mean = jnp.asarray(mean)
  s = curvature + weight_decay
  step = curvature_lib.finite(rho * (g_bar / s))
  point = mean.astype(curvature.dtype) + step
  return curvature_lib.finite(point, mean.dtype).astype(mean.dtype)


def _adversarial_tree(params, g_bar, state: ScaleByBSAMState) -> Any:
  posterior = state.posterior
  return jax.tree.map(
      lambda p, g, h, d: _adversarial_leaf(p, g, h, d,
                                           state.rho.astype(h.dtype)),
      params, g_bar, posterior.curvature, posterior.decays())


def _has_holes(params: Any) -> bool:
  hole = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return any(hole(x) for x in jax.tree.leaves(params, is_leaf=hole))


def _step_gradient(params, g_bar, state, args) -> Any:
  r"""The engine's ``step_gradient``: :math:`g_\epsilon`, the gradient at
  :math:`m + \rho\bar g/s` (from ``grad_fn`` or ``adversarial_grads``)."""
  grad_fn, adversarial_grads = args["grad_fn"], args["adversarial_grads"]
  if (grad_fn is None) == (adversarial_grads is None):
    raise ValueError(
        "bSAM's update needs the gradient at the adversarial point: pass "
        "exactly one of `grad_fn` (called at m + rho g / s) or "
        "`adversarial_grads` (taken at blrax.bsam_adversarial_params), got "
        f"grad_fn={grad_fn!r} and adversarial_grads "
        f"{'given' if adversarial_grads is not None else 'None'}.")
  if grad_fn is not None:
    if not callable(grad_fn):
      raise validation.ArgumentTypeError(
          f"`grad_fn` must be callable, got grad_fn={grad_fn!r}.")
    if _has_holes(params):
      raise ValueError(
          "`grad_fn`: inside optax.masked or optax.partition bSAM sees only "
          "the params it covers (optax.MaskedNode at the others), so it "
          "cannot call grad_fn at a complete point. Take the point with "
          "blrax.bsam_adversarial_params(params, opt_state, grads) (the "
          "params bSAM does not cover stay as they are), pass its gradient as "
          "`adversarial_grads=`, and build the wrapper with "
          "mask_compatible_extra_args=True (optax.masked(..., "
          "mask_compatible_extra_args=True) or optax.partition(..., "
          "mask_compatible_extra_args=True)) so that it is masked like the "
          "params.")
    adversarial_grads = grad_fn(_adversarial_tree(params, g_bar, state))
  gaussian.check_grads(adversarial_grads, params, 1,
                       name="adversarial_grads")
  return adversarial_grads


def scale_by_bsam(
    ess: jax.typing.ArrayLike,
    *,
    rho: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 0.1,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM's direction, before the learning rate.

  ``update(grads, state, params, grad_fn=...)`` or ``update(grads, state,
  params, adversarial_grads=...)``: ``grads`` are :math:`\hat g_s`, the
  gradients of the mean minibatch loss at the draws :math:`\theta_s = m +
  e_s`, :math:`e_s \sim N(0, 1/(\lambda s))` (:func:`blrax.sample_params`;
  a leading axis of ``mc_samples`` when it is > 1); ``params`` is the mean
  :math:`m`. With :math:`s = h + \delta` (the :math:`\delta` of the draw),
  :math:`\bar g = \mathrm{mean}_s \hat g_s` and :math:`c =
  \mathrm{mean}_s |\hat g_s|`:

  .. math::

    \epsilon &= \rho\, \bar g / s, \qquad
      g_\epsilon = \nabla\bar\ell(m + \epsilon) \\
    g_m &\leftarrow \beta_1 g_m + (1-\beta_1)(g_\epsilon + \delta(m - m_0))
      \\
    h &\leftarrow \beta_2 h + (1-\beta_2)(\sqrt{s}\,c + \gamma) \\
    \Delta &= g_m / (h + \delta) \quad \text{(new } h\text{)}

  With one draw and a fixed :math:`\delta` the curvature update is the
  paper's :math:`s \leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| +
  \delta + \gamma)`. :math:`g_\epsilon` is ``grad_fn(m + epsilon)`` or the
  given ``adversarial_grads`` (taken at :func:`bsam_adversarial_params`).
  The adversarial point is taken from the mean, not from the draw
  (Algorithm 1 of the paper); with several draws, from their mean gradient.
  :math:`\delta` and :math:`m_0` are per leaf with ``weight_decay`` a
  pytree, ``weight_decay_mask`` or ``prior_mean`` (:math:`m_0 = 0` by
  default). The new :math:`h` is clipped to the finite range of
  ``curvature.bounded``, so the posterior :math:`N(m, 1/(\lambda(h+\delta)))`
  is the paper's :math:`N(m, 1/(N s))`. The step divides by the updated
  :math:`s`; the authors' released code divides by :math:`s` before its
  update (a difference of order :math:`1-\beta_2` per step). A
  ``weight_decay`` changed under ``optax.inject_hyperparams`` acts on
  :math:`s = h + \delta` at once (the EMA is of :math:`h`, the data part).

  The paper's m-sharpness (the batch split into sub-batches, each with its
  own draw and adversary) is :class:`blrax.MultiSteps`: each micro-batch's
  :math:`g_\epsilon` and :math:`c` are averaged before the one update.

  Limits: with ``ess=inf`` (no noise) and ``b2=1`` (a fixed preconditioner
  :math:`s_0`) a step is SAM (unnormalised ascent :math:`\rho g/s_0`) with
  heavy-ball momentum, preconditioned by :math:`1/s_0`; with ``rho=0`` the
  mean moves along the gradient at the mean (the delta method) and, with
  ``b1=0`` and ``ess=inf``, the step is diagonal VON with the curvature
  target :math:`\sqrt{s}|g| + \gamma`.

  Args:
    ess: effective sample size :math:`\lambda` (the paper's :math:`N`), or
      ``inf`` for no noise.
    rho: :math:`\rho \ge 0`, the radius of the adversarial step.
    b1: momentum decay :math:`\beta_1`, in [0, 1).
    b2: precision decay :math:`\beta_2`, in [0, 1]; 1 keeps :math:`s` fixed.
    damping: :math:`\gamma \ge 0`, added to the precision target.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar, or a pytree like the params (per-leaf precisions).
    hess_init: initial :math:`h_0`; :math:`s_0 = h_0 + \delta` (> 0).
    mc_samples: draws per step (their gradients along a leading axis).
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator (``"normal"``, ``"hash"``, ``"flip"``
      or ``blrax.noise.flip_noise(...)``; see :func:`blrax.ivon`).
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one): where False, :math:`\delta = 0`.
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params.
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`, the
      published algorithm), or the number of updates' worth of data that
      ``hess_init`` counts as, :math:`n_0`: the curvature step is
      :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))` in place of
      :math:`1-\beta_2` (see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByBSAMState`.

  Raises:
    ValueError: a hyperparameter out of range (naming it and its value); in
      ``update``, neither or both of ``grad_fn`` and ``adversarial_grads``,
      ``grad_fn`` inside ``optax.masked``/``optax.partition`` (use
      ``adversarial_grads``), ``hessian=``, or gradients not shaped like the
      params.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> tx = blrax.scale_by_bsam(ess=jnp.inf, rho=0.5, b1=0.0, b2=1.0,
    ...                          weight_decay=0.0, hess_init=2.0)
    >>> m = jnp.array([1.0, -2.0])
    >>> direction, _ = tx.update(jax.grad(loss)(m), tx.init(m), m,
    ...                          grad_fn=jax.grad(loss))
    >>> print(direction)  # g_eps / s = (m + rho m / 2) / 2
    [ 0.625 -1.25 ]

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  _check_hyperparams(ess, rho, b1, b2, damping, weight_decay,
                     weight_decay_mask, hess_init)
  blr = engine.scale_by_blr(
      estimator=curvature_lib.gradient_magnitude(damping),
      precision=curvature_lib.ema, step=steps.vogn(b1), ess=ess,
      hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      mc_samples=mc_samples, key=key, noise=noise,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      hess_init_steps=hess_init_steps, step_gradient=_step_gradient,
      step_gradient_args=("grad_fn", "adversarial_grads"))

  def init_fn(params):
    state = blr.init(params)
    if weight_decay_mask is not None:
      _check_initial_s(hess_init, jax.tree.leaves(state.posterior.decays()),
                       " (weight_decay_mask sets it to 0 where False)")
    return ScaleByBSAMState(count=state.count, momentum=state.momentum,
                            rho=gaussian.scalar(rho), posterior=state.posterior)

  def update_fn(updates, state, params=None, **extra_args):
    engine.check_state(state, ScaleByBSAMState)
    # The new rho (under inject_hyperparams) already moves this step.
    state = state._replace(rho=jnp.asarray(rho, state.rho.dtype))
    return blr.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    rho: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 0.1,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM: sharpness-aware minimisation with a Gaussian posterior.

  Algorithm 1 of Möllenhoff & Khan (2023). With :math:`g` the minibatch
  gradient at the draw :math:`\theta = m + e`, :math:`e \sim N(0, 1/(\lambda
  s))`, learning rate :math:`\alpha` and :math:`s = h + \delta`:

  .. math::

    \epsilon &= \rho\, g / s, \qquad g_\epsilon = \nabla\bar\ell(m + \epsilon)
      \\
    g_m &\leftarrow \beta_1 g_m + (1-\beta_1)(g_\epsilon + \delta (m - m_0)) \\
    s &\leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| + \delta + \gamma) \\
    m &\leftarrow m - \alpha\, g_m / s

  (:math:`m_0 = 0` unless ``prior_mean`` is given.) With ``mc_samples > 1``,
  :math:`g` is the mean of the draws' gradients in :math:`\epsilon` and
  :math:`|g|` the mean of their magnitudes (:func:`scale_by_bsam` gives the
  update in :math:`h = s - \delta`, as it is kept).

  Two gradient evaluations per step, as SAM. The loop (``loss`` the mean
  minibatch loss):

  .. code-block:: python

    theta = blrax.sample_params(params, opt_state)
    grads = jax.grad(loss)(theta, batch)
    updates, opt_state = opt.update(
        grads, opt_state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    params = optax.apply_updates(params, updates)

  ``grad_fn`` is called once, inside ``update``, at :math:`m + \epsilon`
  (one argument, unlike ``optax.contrib.sam``'s ``grad_fn(params, i)``).
  Where a function cannot be passed (model state such as batch statistics,
  NNX models), compute the point with :func:`bsam_adversarial_params` and
  pass ``adversarial_grads=`` instead. Inside ``optax.chain`` the extra
  arguments reach bSAM unchanged; transforms chained *before* bSAM see only
  ``grads``, not :math:`g_\epsilon`.

  Wrappers: :class:`blrax.MultiSteps` gives each micro-batch its own draw
  and adversary (the paper's m-sharpness; pass each micro-batch's
  ``grad_fn``) and averages :math:`g_\epsilon` and :math:`|g|` before one
  update; :func:`blrax.apply_if_finite` takes ``grad_fn`` and also skips an
  update whose adversarial gradient is not finite. Inside ``optax.masked`` or
  ``optax.partition`` bSAM sees only the params it covers, so ``grad_fn``
  (which needs a complete point) raises ``ValueError``: pass
  ``adversarial_grads=`` taken at :func:`bsam_adversarial_params` and build
  the wrapper with ``mask_compatible_extra_args=True``.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule. The step is
      :math:`\alpha g_m/s` and :math:`s` starts near 1, so start near SGD's
      learning rates (the paper uses 0.1-0.5 on ResNets).
    ess: effective sample size :math:`\lambda` (the paper's :math:`N`, the
      training-set size), or ``inf`` for no weight noise.
    rho: :math:`\rho \ge 0`, the radius of the adversarial step (the paper
      uses 1e-4 to 1e-2; ``rho=0`` drops the adversary).
    b1: momentum decay :math:`\beta_1`, in [0, 1).
    b2: precision decay :math:`\beta_2`, in [0, 1].
    damping: :math:`\gamma \ge 0`, added to the precision target (paper:
      0.1).
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar, or a pytree like the params (per-leaf precisions).
    hess_init: initial :math:`h_0`; the paper's :math:`s_0 = h_0 + \delta`.
    mc_samples: draws per step (their gradients along a leading axis); the
      adversarial point uses their mean gradient. Under
      ``optax.inject_hyperparams`` pass ``static_args=("mc_samples",)``.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator (see :func:`blrax.ivon`).
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as ``optax.adamw(mask=...)``:
      where False, :math:`\delta = 0` (then ``hess_init`` must be > 0).
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the prior term becomes :math:`\delta(m-m_0)`.
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`, the
      published algorithm), or the number of updates' worth of data that
      ``hess_init`` counts as, :math:`n_0`: the curvature step is
      :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))` in place of
      :math:`1-\beta_2` (see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`: :func:`scale_by_bsam`
    followed by the learning rate. Under ``optax.inject_hyperparams`` the
    numeric arguments may be injected.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = blrax.bsam(0.1, ess=100.0, rho=0.01)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   theta = blrax.sample_params(params, opt_state)
    ...   updates, opt_state = opt.update(jax.grad(loss)(theta), opt_state,
    ...                                   params, grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), opt_state
    >>> params = jnp.zeros(2)
    >>> opt_state = opt.init(params)
    >>> for _ in range(100):
    ...   params, opt_state = step(params, opt_state)
    >>> print(jnp.round(params, 1))
    [1. 1.]
    >>> blrax.posterior_stddev(opt_state).shape
    (2,)

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  return engine.with_learning_rate(
      scale_by_bsam(ess, rho=rho, b1=b1, b2=b2, damping=damping,
                    weight_decay=weight_decay, hess_init=hess_init,
                    mc_samples=mc_samples, key=key, noise=noise,
                    weight_decay_mask=weight_decay_mask,
                    prior_mean=prior_mean, hess_init_steps=hess_init_steps),
      learning_rate)


def _is_bsam_state(x: Any) -> bool:
  return isinstance(x, ScaleByBSAMState)


def bsam_adversarial_params(params: Any, opt_state: Any, grads: Any) -> Any:
  r"""bSAM's adversarial point :math:`m + \rho \bar g / s`, for the second gradient.

  For loops that cannot pass ``grad_fn`` to ``update``: take the gradient at
  this point yourself and pass it as ``adversarial_grads``.

  .. code-block:: python

    theta = blrax.sample_params(params, opt_state)
    grads = jax.grad(loss)(theta, batch)
    point = blrax.bsam_adversarial_params(params, opt_state, grads)
    adversarial_grads = jax.grad(loss)(point, batch)
    updates, opt_state = opt.update(grads, opt_state, params,
                                    adversarial_grads=adversarial_grads)

  Args:
    params: the posterior mean :math:`m`.
    opt_state: the state of :func:`blrax.bsam` (or :func:`scale_by_bsam`),
      possibly inside optax wrappers; :math:`\rho` and :math:`s` come from
      its :class:`ScaleByBSAMState`, found by type (so a :math:`\rho`
      changed under ``optax.inject_hyperparams`` reaches this point one
      update later than ``grad_fn``'s).
    grads: :math:`g`, the gradient at :func:`blrax.sample_params` (with
      ``mc_samples > 1``, one per draw along a leading axis: their mean
      :math:`\bar g` is used).

  Returns:
    A pytree like ``params``, in the params' dtypes. Params a mask left out
    of the optimizer, and int leaves, are returned unchanged.

  Raises:
    ValueError: if ``opt_state`` holds no bSAM state or more than one, or
      ``grads`` or ``params`` do not match it.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.bsam(0.1, ess=100.0, rho=0.5, hess_init=2.0,
    ...                  weight_decay=0.0)
    >>> params = jnp.zeros(2)
    >>> point = blrax.bsam_adversarial_params(params, opt.init(params),
    ...                                       jnp.array([1.0, -4.0]))
    >>> print(point)  # 0 + 0.5 * g / 2
    [ 0.25 -1.  ]

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  opt_state = base.unwrap_nnx(opt_state)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_bsam_state)
           if _is_bsam_state(x)]
  if len(found) != 1:
    raise ValueError(
        "`opt_state` must hold exactly one bSAM state (from blrax.bsam), "
        f"found {len(found)}.")
  state = found[0]
  hole = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  curvature = state.posterior.curvature
  covered = jax.tree.map(lambda h, p: optax.MaskedNode() if hole(h) else p,
                         curvature, params, is_leaf=hole)
  gaussian.check_params(covered, curvature)
  gaussian.check_grads(grads, params, state.posterior.mc_samples)

  def leaf(h, decay, p, g):
    if hole(h) or not gaussian.is_trainable(p):  # left out, or an int
      return p
    # The engine's g_bar: the mean over the draws, saturated.
    g_bar = curvature_lib.finite(curvature_lib.mc_mean(
        jnp.asarray(g).astype(h.dtype), h))
    return _adversarial_leaf(p, g_bar, h, decay, state.rho.astype(h.dtype))

  return jax.tree.map(leaf, curvature, state.posterior.decays(), params, grads,
                      is_leaf=hole)
