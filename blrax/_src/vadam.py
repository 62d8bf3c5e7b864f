r"""Vadam: Adam with weight perturbation (Khan et al., 2018)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import fast_noise, gaussian, validation


class ScaleByVadamState(NamedTuple):
  """State of :func:`scale_by_vadam`.

  Attributes:
    count: number of updates so far (int32), for the debiasing.
    momentum: :math:`g`, EMA of :math:`\\bar g + \\delta m`.
    posterior: diagonal Gaussian whose curvature is :math:`s`, the EMA of
      squared gradients.
  """

  count: jax.Array
  momentum: Any
  posterior: gaussian.DiagonalGaussian


def check_curvature_floor(hess_init: Any, weight_decay: Any, ess: Any) -> None:
  """sigma = 1/sqrt(ess (s + delta)) needs s + delta > 0 unless ess = inf."""
  validation.check_nonnegative("hess_init", hess_init)
  h, d = validation.concrete_float(hess_init), validation.concrete_float(weight_decay)
  e = validation.concrete_float(ess)
  if h is not None and d is not None and h + d <= 0 and e != float("inf"):
    raise ValueError(
        "`hess_init` + `weight_decay` must be > 0 so the initial posterior "
        f"variance is finite, got hess_init={hess_init!r}, "
        f"weight_decay={weight_decay!r}.")


def scale_by_vadam(
    ess: jax.typing.ArrayLike,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 0.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""Vadam's direction, before the learning rate.

  With gradients :math:`\hat g_s` at :math:`\theta_s = m + \epsilon_s /
  \sqrt{\lambda(s+\delta)}` and :math:`\bar g` their mean:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m) \\
    s &\leftarrow \beta_2 s + (1-\beta_2)\, \bar g^2 \\
    \Delta &= \frac{g / (1-\beta_1^t)}{\sqrt{s / (1-\beta_2^t)} + \delta}

  The posterior precision is :math:`\lambda(s+\delta)`. With ``ess = inf``
  there is no noise and this is Adam on :math:`\bar\ell + \tfrac\delta2\|m\|^2`
  with :math:`\epsilon = \delta` (the decay does not enter :math:`s`).

  Args:
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: squared-gradient decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    hess_init: initial :math:`s` (>= 0; ``hess_init + weight_decay > 0``).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
  """
  validation.check_positive("ess", ess)
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_nonnegative("weight_decay", weight_decay)
  check_curvature_floor(hess_init, weight_decay, ess)
  mc_samples = validation.check_mc_samples(mc_samples)
  posterior_type = fast_noise.posterior_type(noise)

  def init_fn(params):
    posterior = gaussian.init_diagonal_gaussian(
        params, key=key, curvature_init=hess_init, ess=ess,
        weight_decay=weight_decay, mc_samples=mc_samples,
        posterior_type=posterior_type)
    return ScaleByVadamState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, posterior.curvature),
        posterior=posterior)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    gaussian.check_grads(updates, params, mc_samples)
    count = optax.safe_increment(state.count)
    debias1 = 1.0 - gaussian.scalar(b1) ** count
    debias2 = 1.0 - gaussian.scalar(b2) ** count

    def leaf(grad, mean, s, momentum):
      grad = gaussian.mc_mean(grad.astype(s.dtype), s)
      decayed = grad + weight_decay * mean.astype(s.dtype)
      momentum = b1 * momentum + (1.0 - b1) * decayed
      s = b2 * s + (1.0 - b2) * jnp.square(grad)
      direction = (momentum / debias1.astype(s.dtype)) / (
          jnp.sqrt(s / debias2.astype(s.dtype)) + weight_decay)
      return direction.astype(mean.dtype), s, momentum

    posterior = state.posterior
    direction, curvature, momentum = gaussian.map_leaves(
        leaf, 3, updates, params, posterior.curvature, state.momentum)
    return direction, ScaleByVadamState(
        count=count, momentum=momentum,
        posterior=posterior.advanced(curvature, ess, weight_decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vadam(
    learning_rate: optax.ScalarOrSchedule,
    ess: jax.typing.ArrayLike,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 0.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""Vadam: variational Adam, the BLR with a squared-gradient curvature.

  Adam's update taken at a weight sample
  :math:`\theta = m + \epsilon/\sqrt{\lambda(s+\delta)}`, with learning rate
  :math:`\alpha`:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    s \leftarrow \beta_2 s + (1-\beta_2)\, \bar g^2 \\
    m &\leftarrow m - \alpha\, \frac{g/(1-\beta_1^t)}{\sqrt{s/(1-\beta_2^t)}
      + \delta}

  Cheap (Adam's cost plus the draw) but the squared-gradient curvature is a
  crude Hessian estimate, so its posterior is usually too wide early on.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: squared-gradient decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``; also
      Adam's :math:`\epsilon`.
    hess_init: initial :math:`s`.
    mc_samples: samples per step. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
  """
  validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_vadam(ess, b1=b1, b2=b2, weight_decay=weight_decay,
                     hess_init=hess_init, mc_samples=mc_samples, key=key,
                     noise=noise),
      optax.scale_by_learning_rate(learning_rate))
