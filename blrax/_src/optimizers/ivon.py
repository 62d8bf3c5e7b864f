r"""IVON: the Improved Variational Online Newton optimizer."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import prior as prior_lib

ScaleByIVONState = engine.ScaleByBLRState


def _check_hyperparams(hess_init, weight_decay, b1, clip_radius, rescale_lr,
                       debias) -> None:
  validation.check_state_scale("hess_init", hess_init, positive=True)
  if not prior_lib.is_per_leaf(weight_decay):
    validation.check_state_scale("weight_decay", weight_decay)  # used below
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_positive("clip_radius", clip_radius, allow_inf=True)
  validation.check_flag("rescale_lr", rescale_lr)
  validation.check_flag("debias", debias)


def _rescale(hess_init, weight_decay, weight_decay_mask, rescale_lr):
  """The step's factor: :math:`h_0 + \\delta`, per leaf when the decay is."""
  if not rescale_lr:
    return 1.0
  if prior_lib.is_per_leaf(weight_decay) or weight_decay_mask is not None:
    return lambda decay: hess_init + decay
  return hess_init + weight_decay


def scale_by_ivon(
    ess: jax.typing.ArrayLike,
    *,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = True,
    debias: bool = True,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""IVON's preconditioned direction, before the learning rate.

  The gradients passed to ``update`` must be taken at
  :func:`blrax.sample_params` (``mc_samples`` of them along a leading axis
  when ``mc_samples > 1``); ``params`` must be the mean :math:`m`. With
  :math:`\epsilon_s` the noise of that draw and :math:`\sigma` its stddev:

  .. math::

    \bar g &= \mathrm{mean}_s\ \hat g_s, \qquad
      \hat h = \mathrm{mean}_s\ \hat g_s \odot \epsilon_s / \sigma \\
    g &\leftarrow \beta_1 g + (1-\beta_1)\,\bar g \\
    h &\leftarrow \beta_2 h + (1-\beta_2)\,\hat h
      + \tfrac12 (1-\beta_2)^2 (h - \hat h)^2 / (h + \delta) \\
    \Delta &= \mathrm{clip}\Big(\frac{g/(1-\beta_1^t) + \delta m}{h + \delta},
      -\xi, \xi\Big) \cdot (h_0 + \delta)

  The factor :math:`(h_0+\delta)` is applied when ``rescale_lr`` (so the
  learning rate means the same as Adam's), and the debiasing
  :math:`1/(1-\beta_1^t)` when ``debias``. If ``update`` is given the keyword
  ``hessian`` (a pytree like the grads, e.g. an exact or Gauss-Newton diagonal
  at the sample), it replaces the Price estimate :math:`\hat h`; this is how
  ``ess = inf`` (no noise) becomes a deterministic diagonal Newton method.

  Args:
    ess: effective sample size :math:`\lambda` (training-set size, times
      augmentation, over temperature). Sets the posterior variance.
    hess_init: initial curvature :math:`h_0` (> 0).
    b1: momentum decay :math:`\beta_1`.
    b2: curvature decay :math:`\beta_2`; the curvature step is :math:`1-\beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    clip_radius: elementwise clip :math:`\xi` of the preconditioned step.
    rescale_lr: multiply the step by :math:`h_0 + \delta`.
    debias: divide the momentum by :math:`1 - \beta_1^t`.
    mc_samples: samples per step; ``> 1`` adds a leading axis to the draws
      and grads. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator: ``"normal"`` (``jax.random.normal``,
      threefry), ``"hash"`` (a cheaper counter-based generator) or
      ``"flip"`` / ``blrax.noise.flip_noise(refresh_every)`` (random sign flips of
      a stored draw refreshed slice by slice: about 1.3x Adam's step on CPU,
      one more params-sized array of state). See ``blrax/_src/noise/fast.py``
      for what each keeps of the statistics.
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
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax, blrax
    >>> tx = optax.chain(blrax.scale_by_ivon(ess=100.0, weight_decay=0.0),
    ...                  optax.scale(-0.1))  # = blrax.ivon(0.1, ...)
    >>> state = tx.init(jnp.zeros(2))
    >>> print(blrax.posterior_stddev(state))  # 1 / sqrt(ess * hess_init)
    [0.1 0.1]

  References:
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
    Lin, Schmidt & Khan, `Handling the Positive-Definite Constraint in the
    Bayesian Learning Rule <https://arxiv.org/abs/2002.10060>`_, ICML 2020.
  """
  _check_hyperparams(hess_init, weight_decay, b1, clip_radius, rescale_lr,
                     debias)
  return engine.scale_by_blr(
      estimator=curvature.PRICE,
      precision=curvature.positive_ema,
      step=steps.ivon(b1, debias=debias, clip_radius=clip_radius,
                      scale=_rescale(hess_init, weight_decay, weight_decay_mask,
                                     rescale_lr)),
      ess=ess, hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      mc_samples=mc_samples, key=key, noise=noise, accepts_hessian=True,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      hess_init_steps=hess_init_steps)


def ivon(
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
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The IVON optimizer: variational learning at Adam's cost.

  Trains the mean :math:`m` (the params) of a diagonal Gaussian posterior
  :math:`q = N(m, 1/(\lambda(h+\delta)))` by natural-gradient descent on the
  variational objective. Each step takes the gradient at a draw
  :math:`\theta = m + \sigma\epsilon` (from :func:`blrax.sample_params`) and
  updates, with learning rate :math:`\alpha`:

  .. math::

    \bar g &= \mathrm{mean}_s\ \hat g_s, \qquad
      \hat h = \mathrm{mean}_s\ \hat g_s \odot (\theta_s - m)\,\lambda(h+\delta) \\
    g &\leftarrow \beta_1 g + (1-\beta_1)\,\bar g \\
    h &\leftarrow \beta_2 h + (1-\beta_2)\,\hat h
      + \tfrac12 (1-\beta_2)^2 (h - \hat h)^2 / (h + \delta) \\
    m &\leftarrow m - \alpha (h_0+\delta)\,
      \mathrm{clip}\Big(\frac{g/(1-\beta_1^t) + \delta m}{h + \delta},
      -\xi, \xi\Big)

  After training, :func:`blrax.posterior_stddev` gives :math:`\sigma` and
  :func:`blrax.sample_posterior` draws for Bayesian model averaging.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda` (usually the training-set size).
    hess_init: initial curvature :math:`h_0` (> 0); larger means less noise
      at the start.
    b1: momentum decay :math:`\beta_1`.
    b2: curvature decay :math:`\beta_2` (close to 1).
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    clip_radius: elementwise clip :math:`\xi` of the preconditioned step.
    rescale_lr: multiply the learning rate by :math:`h_0 + \delta`.
    debias: debias the momentum as Adam does.
    mc_samples: weight samples per step (leading axis of draws and grads).
      Under ``optax.inject_hyperparams`` pass ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise, kept in the state.
    noise: ``"normal"`` (default, threefry normals), ``"hash"`` or
      ``"flip"`` / ``blrax.noise.flip_noise(refresh_every)``: cheaper generators
      for CPU, see :func:`scale_by_ivon`.
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
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` accepts
    an optional ``hessian=`` keyword (see :func:`scale_by_ivon`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> params = jnp.zeros(3)
    >>> opt = blrax.ivon(learning_rate=0.1, ess=1e4, key=0)
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   theta = blrax.sample_params(params, state)
    ...   updates, state = opt.update(jax.grad(loss)(theta), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> print(jnp.round(params, 1))
    [1. 1. 1.]

  References:
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  """
  return engine.with_learning_rate(
      scale_by_ivon(
          ess=ess, hess_init=hess_init, b1=b1, b2=b2,
          weight_decay=weight_decay, clip_radius=clip_radius,
          rescale_lr=rescale_lr, debias=debias, mc_samples=mc_samples,
          key=key, noise=noise, weight_decay_mask=weight_decay_mask,
          prior_mean=prior_mean, hess_init_steps=hess_init_steps),
      learning_rate)
