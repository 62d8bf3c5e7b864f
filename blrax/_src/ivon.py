r"""IVON: the Improved Variational Online Newton optimizer."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import fast_noise, gaussian, validation


class ScaleByIVONState(NamedTuple):
  """State of :func:`scale_by_ivon`.

  Attributes:
    count: number of updates so far (int32), for the momentum debiasing.
    momentum: :math:`g`, the EMA of the gradients, float32 or wider.
    posterior: the diagonal Gaussian: key, curvature :math:`h`, ess, decay.
  """

  count: jax.Array
  momentum: Any
  posterior: gaussian.DiagonalGaussian


def _check_hyperparams(
    ess, hess_init, b1, b2, weight_decay, clip_radius, mc_samples
) -> int:
  validation.check_positive("ess", ess)
  validation.check_positive("hess_init", hess_init)
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_nonnegative("weight_decay", weight_decay)
  validation.check_positive("clip_radius", clip_radius)
  return validation.check_mc_samples(mc_samples)


def scale_by_ivon(
    ess: jax.typing.ArrayLike,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = True,
    debias: bool = True,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
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
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    clip_radius: elementwise clip :math:`\xi` of the preconditioned step.
    rescale_lr: multiply the step by :math:`h_0 + \delta`.
    debias: divide the momentum by :math:`1 - \beta_1^t`.
    mc_samples: samples per step; ``> 1`` adds a leading axis to the draws
      and grads. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator: ``"normal"`` (``jax.random.normal``,
      threefry), ``"hash"`` (a cheaper counter-based generator) or
      ``"flip"`` / ``blrax.flip_noise(refresh_every)`` (random sign flips of
      a stored draw refreshed slice by slice: about 1.3x Adam's step on CPU,
      one more params-sized array of state). See ``blrax/_src/fast_noise.py``
      for what each keeps of the statistics.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
    Lin, Schmidt & Khan, `Handling the Positive-Definite Constraint in the
    Bayesian Learning Rule <https://arxiv.org/abs/2002.10060>`_, ICML 2020.
  """
  mc_samples = _check_hyperparams(
      ess, hess_init, b1, b2, weight_decay, clip_radius, mc_samples
  )
  posterior_type = fast_noise.posterior_type(noise)

  def init_fn(params):
    posterior = gaussian.init_diagonal_gaussian(
        params,
        key=key,
        curvature_init=hess_init,
        ess=ess,
        weight_decay=weight_decay,
        mc_samples=mc_samples,
        posterior_type=posterior_type,
    )
    momentum = jax.tree.map(jnp.zeros_like, posterior.curvature)
    return ScaleByIVONState(
        count=jnp.zeros([], jnp.int32), momentum=momentum, posterior=posterior
    )

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    del extra_args
    gaussian.check_grads(updates, params, mc_samples)
    if hessian is not None:
      gaussian.check_grads(hessian, params, mc_samples, name="hessian")
    elif validation.concrete_float(ess) == math.inf:
      raise ValueError(
          "ess=inf means no weight noise, so the Price curvature estimate is "
          "undefined: pass the curvature as `update(..., hessian=...)`."
      )
    posterior = state.posterior
    noise = posterior.noise()
    count = optax.safe_increment(state.count)
    # In the widest float in use: b1**t in low precision rounds to 1.
    debias_factor = (1.0 - gaussian.scalar(b1) ** count if debias
                     else gaussian.scalar(1.0))
    scale = hess_init + weight_decay if rescale_lr else 1.0

    def leaf(grad, eps, mean, curvature, momentum, hess):
      grad = grad.astype(curvature.dtype)
      if hess is None:
        estimate = gaussian.price_curvature(
            grad, eps, curvature, posterior.ess, posterior.weight_decay
        )
      else:
        estimate = gaussian.mc_mean(hess.astype(curvature.dtype), curvature)
      momentum = b1 * momentum + (1.0 - b1) * gaussian.mc_mean(grad, curvature)
      curvature = gaussian.positive_ema(curvature, estimate, 1.0 - b2, weight_decay)
      direction = (momentum / debias_factor.astype(curvature.dtype)
                   + weight_decay * mean.astype(curvature.dtype))
      direction = jnp.clip(direction / (curvature + weight_decay),
                           -clip_radius, clip_radius) * scale
      return direction.astype(mean.dtype), curvature, momentum

    hessians = updates if hessian is None else hessian
    direction, curvature, momentum = gaussian.map_leaves(
        lambda g, e, m, h, mu, hs: leaf(g, e, m, h, mu,
                                        None if hessian is None else hs),
        3, updates, noise, params, posterior.curvature, state.momentum, hessians)
    return direction, ScaleByIVONState(
        count=count, momentum=momentum,
        posterior=posterior.advanced(curvature, ess, weight_decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ivon(
    learning_rate: optax.ScalarOrSchedule,
    ess: jax.typing.ArrayLike,
    hess_init: jax.typing.ArrayLike = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    clip_radius: jax.typing.ArrayLike = math.inf,
    rescale_lr: bool = True,
    debias: bool = True,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
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
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    clip_radius: elementwise clip :math:`\xi` of the preconditioned step.
    rescale_lr: multiply the learning rate by :math:`h_0 + \delta`.
    debias: debias the momentum as Adam does.
    mc_samples: weight samples per step (leading axis of draws and grads).
      Under ``optax.inject_hyperparams`` pass ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise, kept in the state.
    noise: ``"normal"`` (default, threefry normals), ``"hash"`` or
      ``"flip"`` / ``blrax.flip_noise(refresh_every)``: cheaper generators
      for CPU, see :func:`scale_by_ivon`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` accepts
    an optional ``hessian=`` keyword (see :func:`scale_by_ivon`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> params = jnp.zeros(3)
    >>> opt = blrax.ivon(learning_rate=0.1, ess=1e4, key=0)
    >>> state = opt.init(params)
    >>> for _ in range(200):
    ...   theta = blrax.sample_params(params, state)
    ...   updates, state = opt.update(jax.grad(loss)(theta), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(jnp.round(params, 1))
    [1. 1. 1.]

  References:
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  """
  validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_ivon(
          ess=ess,
          hess_init=hess_init,
          b1=b1,
          b2=b2,
          weight_decay=weight_decay,
          clip_radius=clip_radius,
          rescale_lr=rescale_lr,
          debias=debias,
          mc_samples=mc_samples,
          key=key,
          noise=noise,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
