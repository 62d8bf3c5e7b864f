r"""VOGN: Variational Online Gauss-Newton (Khan et al., 2018; Osawa et al., 2019)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature
from blrax._src.engine import skeleton as engine
from blrax._src.engine import steps
from blrax._src.noise import generators as noise_lib

ScaleByVOGNState = engine.ScaleByBLRState


def per_example_grads(
    example_loss: Callable[..., jax.Array],
    params: Any,
    *batch: Any,
    mc_samples: int = 1,
) -> Any:
  """Gradients of ``example_loss(params, *example)`` for each example.

  Args:
    example_loss: the loss of one example (inputs without a batch axis).
    params: the params, or the draw of :func:`blrax.sample_params` (with a
      leading axis of size ``mc_samples`` when ``mc_samples > 1``).
    *batch: arrays whose leading axis is the batch.
    mc_samples: as given to :func:`vogn`.

  Returns:
    A pytree like ``params`` with a leading batch axis (after the sample axis
    when ``mc_samples > 1``): what :func:`vogn`'s ``update`` takes.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> loss = lambda w, x, y: 0.5 * (x @ w - y) ** 2
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 0.0])
    >>> print(blrax.per_example_grads(loss, jnp.ones(2), x, y))
    [[0. 0.]
     [0. 4.]]
  """
  mc_samples = validation.check_mc_samples(mc_samples)
  grad = jax.vmap(jax.grad(example_loss), in_axes=(None,) + (0,) * len(batch))
  if mc_samples > 1:
    grad = jax.vmap(grad, in_axes=(0,) + (None,) * len(batch))
  return grad(params, *batch)


def scale_by_vogn(
    ess: jax.typing.ArrayLike,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VOGN's direction, before the learning rate.

  ``update`` takes per-example gradients :math:`g_{s,i}` at the draws
  (leading batch axis; the sample axis before it when ``mc_samples > 1``):

  .. math::

    \bar g &= \mathrm{mean}_{s,i}\, g_{s,i}, \qquad
      \hat h = \mathrm{mean}_{s,i}\, g_{s,i}^2 \\
    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    h \leftarrow \beta_2 h + (1-\beta_2)\,\hat h \\
    \Delta &= g / (h + \delta)

  The engine's parts: per-example-squared estimator, plain EMA, VOGN step.

  Args:
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    hess_init: initial :math:`h` (> 0).
    mc_samples: samples per step.
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.noise.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).
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
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.scale_by_vogn(ess=1000.0, hess_init=0.5).init(jnp.zeros(2))
    >>> print(state.posterior.curvature)  # h starts at hess_init
    [0.5 0.5]

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
    Osawa et al., `Practical Deep Learning with Bayesian Principles
    <https://arxiv.org/abs/1906.02506>`_, NeurIPS 2019.
  """
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_state_scale("hess_init", hess_init, positive=True)
  return engine.scale_by_blr(
      estimator=curvature.PER_EXAMPLE_SQUARED, precision=curvature.ema,
      step=steps.vogn(b1), ess=ess, hess_init=hess_init, b2=b2,
      weight_decay=weight_decay, mc_samples=mc_samples, key=key, noise=noise,
      accepts_hessian=True,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      hess_init_steps=hess_init_steps)


def vogn(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99999,
    weight_decay: Any = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VOGN: the BLR with a per-example Gauss-Newton curvature.

  ``update`` takes per-example gradients at the draw of
  :func:`blrax.sample_params` (see :func:`blrax.per_example_grads`); with
  :math:`\bar g` their mean and :math:`\hat h` the mean of their squares:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    h \leftarrow \beta_2 h + (1-\beta_2)\,\hat h \\
    m &\leftarrow m - \alpha\, g / (h + \delta)

  The posterior is :math:`N(m, 1/(\lambda(h+\delta)))`. Per-example gradients
  cost about a batch-size factor in memory, so VOGN suits small models; the
  Gauss-Newton curvature is always positive and better than Vadam's.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``:
      a scalar, or a pytree like the params (per-leaf precisions).
    hess_init: initial :math:`h` (> 0).
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
    hess_init_steps: None (a constant curvature step :math:`1-\beta_2`, the
      published algorithm), or the number of updates' worth of data that
      ``hess_init`` counts as, :math:`n_0`: the curvature step is
      :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax, blrax
    >>> loss = lambda w, x, y: 0.5 * (x @ w - y) ** 2  # of one example
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 0.0])
    >>> opt = blrax.vogn(0.1, ess=2.0)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> theta = blrax.sample_params(params, state)
    >>> grads = blrax.per_example_grads(loss, theta, x, y)  # batch axis first
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> grads.shape, params.shape
    ((2, 2), (2,))

  References:
    Osawa et al., `Practical Deep Learning with Bayesian Principles
    <https://arxiv.org/abs/1906.02506>`_, NeurIPS 2019.
  """
  return engine.with_learning_rate(
      scale_by_vogn(ess, b1=b1, b2=b2, weight_decay=weight_decay,
                    hess_init=hess_init, mc_samples=mc_samples, key=key,
                    noise=noise, weight_decay_mask=weight_decay_mask,
                    prior_mean=prior_mean, hess_init_steps=hess_init_steps),
      learning_rate)
