r"""Vadam: Adam with weight perturbation (Khan et al., 2018)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import prior as prior_lib

ScaleByVadamState = engine.ScaleByBLRState


def resolve_batch_size(batch_size: Any, ess: Any, stacklevel: int = 3) -> Any:
  r"""``batch_size``, or 1 with a ``UserWarning`` when it was left out (None)
  and there is a posterior (a finite or traced ``ess``): then
  :math:`\bar g^2` underestimates the curvature about ``M``-fold near a
  minimum and the posterior comes out about :math:`\sqrt M` too wide.
  With ``ess = inf`` (no noise, the Adam limit) 1 is Adam exactly."""
  if batch_size is not None:
    return batch_size
  if validation.concrete_float(ess) != float("inf"):
    warnings.warn(
        "vadam: batch_size not given, so it is 1: Vadam's curvature "
        "batch_size * g_bar^2 then estimates the per-example Gauss-Newton "
        "diagonal about M-fold too small for a minibatch of M examples, and "
        "the posterior is about sqrt(M) too wide. Pass batch_size=M (the "
        "examples each gradient averages over), or batch_size=1 to mean it.",
        UserWarning, stacklevel=stacklevel)
  return 1


def scale_by_vadam(
    ess: jax.typing.ArrayLike,
    *,
    batch_size: Any = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Vadam's direction, before the learning rate.

  With gradients :math:`\hat g_s` at :math:`\theta_s = m + \epsilon_s /
  \sqrt{\lambda(h+\delta)}`, :math:`\bar g` their mean and :math:`M` the
  batch size:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    h \leftarrow \beta_2 h + (1-\beta_2)\, M \bar g^2 \\
    \hat h &= \beta_2^t h_0 + (h - \beta_2^t h_0)/(1-\beta_2^t), \qquad
    \Delta = \frac{g / (1-\beta_1^t)}{\sqrt{\hat h} + \delta}

  The engine's parts: squared-gradient estimator (scaled by :math:`M`),
  plain EMA, Adam-like step. The posterior precision is
  :math:`\lambda(h+\delta)`. With ``ess = inf`` and ``hess_init = 0`` there
  is no noise and this is Adam on :math:`\bar\ell + \tfrac\delta2\|m\|^2`
  with :math:`\epsilon = \delta` (and its second moment times :math:`M`).

  Args:
    ess: effective sample size :math:`\lambda`.
    batch_size: :math:`M`, the minibatch size the gradients average over.
      Left out it is 1, with a ``UserWarning`` unless ``ess = inf`` (the
      curvature would be about :math:`M` times too small).
      :math:`E[M\bar g^2] = E_i[g_i^2] + (M-1)(E_i g_i)^2`, so
      :math:`M\bar g^2` estimates the per-example Gauss-Newton diagonal (what
      VOGN uses) where the full gradient vanishes; :math:`\bar g^2` alone is
      about :math:`M` times too small there.
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    hess_init: initial :math:`h` (>= 0; ``hess_init + weight_decay > 0``).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.noise.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as ``optax.adamw(mask=...)``:
      where False, :math:`\delta = 0` (no prior pull, e.g. biases).
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the prior term becomes :math:`\delta(m-m_0)`
      (a previous task's posterior mean, for continual learning).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> tx = blrax.scale_by_vadam(ess=1000.0, batch_size=32)
    >>> state = tx.init(jnp.zeros(3))
    >>> print(state.posterior.curvature)  # h starts at hess_init
    [1. 1. 1.]

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
  """
  batch_size = resolve_batch_size(batch_size, ess)
  validation.check_state_scale("batch_size", batch_size, positive=True)
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_unit_interval("b2", b2, include_one=False)
  prior_lib.check(weight_decay, weight_decay_mask, prior_mean)
  if weight_decay_mask is not None:  # Else the engine checks it.
    # Leaves the mask excludes have no prior precision: hess_init alone
    # must be > 0.
    engine.check_curvature_floor(hess_init, weight_decay, ess,
                                 weight_decay_mask)
  return engine.scale_by_blr(
      estimator=curvature.squared_gradient(batch_size),
      precision=curvature.ema, step=steps.adam(b1, b2, hess_init), ess=ess,
      hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      mc_samples=mc_samples, key=key, noise=noise,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean)


def vadam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    batch_size: Any = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Vadam: variational Adam, the BLR with a squared-gradient curvature.

  Adam's update taken at a weight sample
  :math:`\theta = m + \epsilon/\sqrt{\lambda(h+\delta)}`, with learning rate
  :math:`\alpha` and batch size :math:`M`:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    h \leftarrow \beta_2 h + (1-\beta_2)\, M\bar g^2 \\
    m &\leftarrow m - \alpha\, \frac{g/(1-\beta_1^t)}{\sqrt{\hat h} + \delta},
      \qquad \hat h = \beta_2^t h_0 + \frac{h - \beta_2^t h_0}{1-\beta_2^t}

  Cheap (Adam's cost plus the draw), with the crudest curvature of the
  family. The defaults (``hess_init=1``, ``b2=0.99999``, as IVON's) keep the
  posterior width near :math:`1/\sqrt{\lambda h_0}` for runs much shorter than
  :math:`1/(1-\beta_2)` steps; with Adam's ``hess_init=0, b2=0.999`` and
  ``ess`` = N the squared-gradient curvature of a trained network is tiny
  and the posterior too wide to predict with (see the README).

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule. Start at
      0.1-0.3 with the defaults (the step is about :math:`\alpha` times the
      momentum while :math:`h \approx h_0 = 1`).
    ess: effective sample size :math:`\lambda`.
    batch_size: :math:`M`, scales :math:`\bar g^2` into an estimate of the
      per-example Gauss-Newton diagonal (see :func:`scale_by_vadam`). Pass
      the batch size: left out it is 1, with a ``UserWarning`` unless
      ``ess = inf`` (Adam's limit, where 1 is Adam's own second moment).
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``; also
      Adam's :math:`\epsilon`.
    hess_init: initial :math:`h`.
    mc_samples: samples per step. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.noise.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one), as ``optax.adamw(mask=...)``:
      where False, :math:`\delta = 0` (no prior pull, e.g. biases).
    prior_mean: None (a zero-mean prior), or the prior mean :math:`m_0`, a
      pytree like the params: the prior term becomes :math:`\delta(m-m_0)`
      (a previous task's posterior mean, for continual learning).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    Without noise (``ess=inf``) and with ``hess_init=0``, a step is Adam's:

    >>> import jax.numpy as jnp, optax, blrax
    >>> grads, params = jnp.array([0.5, -2.0]), jnp.zeros(2)
    >>> vadam = blrax.vadam(0.1, ess=jnp.inf, hess_init=0.0, b2=0.999,
    ...                     weight_decay=1e-8)
    >>> adam = optax.adam(0.1, eps=1e-8)
    >>> u_vadam, _ = vadam.update(grads, vadam.init(params), params)
    >>> u_adam, _ = adam.update(grads, adam.init(params), params)
    >>> print(jnp.allclose(u_vadam, u_adam))
    True

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
  """
  return engine.with_learning_rate(
      scale_by_vadam(ess, batch_size=resolve_batch_size(batch_size, ess),
                     b1=b1, b2=b2,
                     weight_decay=weight_decay, hess_init=hess_init,
                     mc_samples=mc_samples, key=key, noise=noise,
                     weight_decay_mask=weight_decay_mask,
                     prior_mean=prior_mean),
      learning_rate)
