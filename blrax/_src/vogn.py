r"""VOGN: Variational Online Gauss-Newton (Khan et al., 2018; Osawa et al., 2019)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import fast_noise, gaussian, validation


class ScaleByVOGNState(NamedTuple):
  """State of :func:`scale_by_vogn`.

  Attributes:
    count: number of updates so far (int32).
    momentum: :math:`g`, EMA of :math:`\\bar g + \\delta m`.
    posterior: diagonal Gaussian whose curvature :math:`s` is the EMA of
      per-example squared gradients (a Gauss-Newton diagonal).
  """

  count: jax.Array
  momentum: Any
  posterior: gaussian.DiagonalGaussian


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
  """
  grad = jax.vmap(jax.grad(example_loss), in_axes=(None,) + (0,) * len(batch))
  if mc_samples > 1:
    grad = jax.vmap(grad, in_axes=(0,) + (None,) * len(batch))
  return grad(params, *batch)


def _check_per_example(grads, params, mc_samples):
  if params is None:
    raise ValueError("blrax optimizers need `params` (the posterior mean) in "
                     "`update`.")
  lead = 2 if mc_samples > 1 else 1
  g_leaves, p_leaves = jax.tree.leaves(grads), jax.tree.leaves(params)
  if jax.tree.structure(grads) != jax.tree.structure(params):
    raise ValueError("`grads` must have the structure of params (per-example "
                     "gradients, e.g. from blrax.per_example_grads).")
  for g, p in zip(g_leaves, p_leaves):
    ok = g.ndim == p.ndim + lead and tuple(g.shape[lead:]) == tuple(p.shape)
    if mc_samples > 1:
      ok = ok and g.shape[0] == mc_samples
    if not ok:
      want = ("(mc_samples, batch) + " if mc_samples > 1 else "(batch,) + ")
      raise ValueError(
          f"`grads` leaf has shape {tuple(g.shape)}; VOGN needs per-example "
          f"gradients of shape {want}{tuple(p.shape)} (mc_samples="
          f"{mc_samples}); see blrax.per_example_grads.")


def scale_by_vogn(
    ess: jax.typing.ArrayLike,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""VOGN's direction, before the learning rate.

  ``update`` takes per-example gradients :math:`g_i` at the draw (leading
  batch axis; sample axis before it when ``mc_samples > 1``):

  .. math::

    \bar g &= \mathrm{mean}_i\, g_i, \qquad \hat h = \mathrm{mean}_i\, g_i^2 \\
    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    s \leftarrow \beta_2 s + (1-\beta_2)\,\hat h \\
    \Delta &= g / (s + \delta)

  Args:
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    hess_init: initial :math:`s` (> 0).
    mc_samples: samples per step.
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Khan et al., `Fast and Scalable Bayesian Deep Learning by
    Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
    Osawa et al., `Practical Deep Learning with Bayesian Principles
    <https://arxiv.org/abs/1906.02506>`_, NeurIPS 2019.
  """
  validation.check_positive("ess", ess)
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_nonnegative("weight_decay", weight_decay)
  validation.check_positive("hess_init", hess_init)
  mc_samples = validation.check_mc_samples(mc_samples)
  posterior_type = fast_noise.posterior_type(noise)

  def init_fn(params):
    posterior = gaussian.init_diagonal_gaussian(
        params, key=key, curvature_init=hess_init, ess=ess,
        weight_decay=weight_decay, mc_samples=mc_samples,
        posterior_type=posterior_type)
    return ScaleByVOGNState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, posterior.curvature),
        posterior=posterior)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check_per_example(updates, params, mc_samples)

    def leaf(grads, mean, s, momentum):
      grads = grads.astype(s.dtype).reshape((-1,) + s.shape)
      momentum = b1 * momentum + (1.0 - b1) * (
          jnp.mean(grads, axis=0) + weight_decay * mean.astype(s.dtype))
      s = b2 * s + (1.0 - b2) * jnp.mean(jnp.square(grads), axis=0)
      return (momentum / (s + weight_decay)).astype(mean.dtype), s, momentum

    posterior = state.posterior
    # params first: its leaves, not the per-example grads', give the shapes.
    direction, curvature, momentum = gaussian.map_leaves(
        lambda m, g, h, mu: leaf(g, m, h, mu), 3,
        params, updates, posterior.curvature, state.momentum)
    return direction, ScaleByVOGNState(
        count=optax.safe_increment(state.count), momentum=momentum,
        posterior=posterior.advanced(curvature, ess, weight_decay))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vogn(
    learning_rate: optax.ScalarOrSchedule,
    ess: jax.typing.ArrayLike,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    mc_samples: int = 1,
    key: int | jax.Array = 0,
    noise: str | fast_noise.FlipNoise = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""VOGN: the BLR with a per-example Gauss-Newton curvature.

  ``update`` takes per-example gradients at the draw of
  :func:`blrax.sample_params` (see :func:`blrax.per_example_grads`); with
  :math:`\bar g` their mean and :math:`\hat h` the mean of their squares:

  .. math::

    g &\leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    s \leftarrow \beta_2 s + (1-\beta_2)\,\hat h \\
    m &\leftarrow m - \alpha\, g / (s + \delta)

  The posterior is :math:`N(m, 1/(\lambda(s+\delta)))`. Per-example gradients
  cost about a batch-size factor in memory, so VOGN suits small models; the
  Gauss-Newton curvature is always positive and better than Vadam's.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule.
    ess: effective sample size :math:`\lambda`.
    b1: momentum decay.
    b2: curvature decay.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    hess_init: initial :math:`s` (> 0).
    mc_samples: samples per step. Under ``optax.inject_hyperparams`` pass
      ``static_args=("mc_samples",)``.
    key: PRNG key or int seed of the weight noise.
    noise: ``"normal"`` (threefry normals), ``"hash"`` or ``"flip"`` /
      ``blrax.flip_noise(...)`` (cheaper generators; see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Osawa et al., `Practical Deep Learning with Bayesian Principles
    <https://arxiv.org/abs/1906.02506>`_, NeurIPS 2019.
  """
  validation.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_vogn(ess, b1=b1, b2=b2, weight_decay=weight_decay,
                    hess_init=hess_init, mc_samples=mc_samples, key=key,
                     noise=noise),
      optax.scale_by_learning_rate(learning_rate))
