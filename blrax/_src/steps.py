r"""Steps: how a diagonal BLR variant turns gradient and curvature into a direction.

Each step is a small frozen value holding its hyperparameters. Per update it
computes a few scalars from the step count (``scalars``), then, per leaf,
``leaf(g_bar, h, momentum, m, delta, scalars) -> (direction, momentum)``
with :math:`h` the *new* curvature. The learning rate is applied after
(``optax.scale_by_learning_rate``), so directions are descent directions.

==========  ==================================================================
step        direction :math:`\Delta` (and momentum :math:`g`)
==========  ==================================================================
``ivon``    :math:`g \leftarrow \beta_1 g + (1-\beta_1)\bar g`;
            :math:`\mathrm{clip}((g/(1-\beta_1^t) + \delta m)/(h+\delta),
            \pm\xi)\,(h_0+\delta)`
``newton``  :math:`(\bar g + \delta m)/(h + \delta)` (no momentum)
``adam``    :math:`g \leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m)`;
            :math:`(g/(1-\beta_1^t)) / (\sqrt{\hat h} + \delta)`,
            :math:`\hat h = \beta_2^t h_0 + (h-\beta_2^t h_0)/(1-\beta_2^t)`
``vogn``    :math:`g \leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m)`;
            :math:`g/(h + \delta)`
==========  ==================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from blrax._src import curvature as curvature_lib
from blrax._src import gaussian


@dataclasses.dataclass(frozen=True)
class Step:
  """A step rule: configuration, kept in the optimizer's closure.

  Attributes:
    name: for messages.
    leaf: ``(g_bar, curvature, momentum, mean, weight_decay, scalars) ->
      (direction, momentum)`` for one leaf, where ``mean`` is
      :math:`m - m_0` (the prior's pull is :math:`\\delta(m - m_0)`) and
      ``momentum`` is None when the step keeps none.
    scalars: ``count -> tuple`` of per-update scalars (debiasing factors).
    uses_momentum: whether the state keeps a params-sized momentum.
  """

  name: str
  leaf: Callable
  scalars: Callable[[Any], tuple] = lambda count: ()
  uses_momentum: bool = True


def ivon(b1, *, debias: bool, clip_radius, scale) -> Step:
  """IVON's step: momentum of the gradient, debiased, prior term after, clip,
  rescaled by ``scale`` (:math:`h_0+\\delta` when ``rescale_lr``; a function
  of the leaf's :math:`\\delta` when the weight decay is per leaf)."""

  def scalars(count):
    # In the widest float in use: b1**t in low precision rounds to 1.
    return (1.0 - gaussian.scalar(b1) ** count if debias
            else gaussian.scalar(1.0),)

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    (debias_factor,) = scalars
    momentum = b1 * momentum + (1.0 - b1) * g_bar
    direction = (momentum / debias_factor.astype(curvature.dtype)
                 + weight_decay * mean.astype(curvature.dtype))
    direction = jnp.clip(direction / (curvature + weight_decay),
                         -clip_radius, clip_radius)
    return direction * (scale(weight_decay) if callable(scale) else scale), momentum

  return Step("ivon", leaf, scalars)


def newton() -> Step:
  """VON's step: the Newton direction of the prior-regularised loss."""

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    del momentum, scalars
    direction = ((g_bar + weight_decay * mean.astype(curvature.dtype))
                 / (curvature + weight_decay))
    return direction, None

  return Step("newton", leaf, uses_momentum=False)


def adam(b1, b2, hess_init) -> Step:
  r"""Vadam's step: Adam on the prior-regularised gradient, with the
  curvature as its second moment and :math:`\delta` as its epsilon.

  The curvature starts at :math:`h_0` (not Adam's 0), so only its data part
  is debiased: :math:`\hat h = \beta_2^t h_0 + (h - \beta_2^t h_0)/(1 -
  \beta_2^t)`, Adam's :math:`h/(1-\beta_2^t)` when :math:`h_0 = 0`.
  (Debiasing all of :math:`h` would inflate :math:`h_0` by
  :math:`1/(1-\beta_2^t)`, e.g. 1e5 at step 1 with :math:`\beta_2 =
  0.99999`.)
  """

  def scalars(count):
    decay2 = gaussian.scalar(b2) ** count
    return (1.0 - gaussian.scalar(b1) ** count, 1.0 - decay2,
            decay2 * hess_init)

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    debias1, debias2, prior = (x.astype(curvature.dtype) for x in scalars)
    momentum = b1 * momentum + (1.0 - b1) * (
        g_bar + weight_decay * mean.astype(curvature.dtype))
    second_moment = prior + (curvature - prior) / debias2
    direction = (momentum / debias1) / (jnp.sqrt(second_moment) + weight_decay)
    return direction, momentum

  return Step("adam", leaf, scalars)


def vogn(b1) -> Step:
  """VOGN's (and bSAM's) step: momentum of the prior-regularised gradient
  over :math:`h + \\delta` (Newton-like, no debiasing). The momentum is
  saturated at the dtype's largest finite value."""

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    del scalars
    momentum = curvature_lib.finite(b1 * momentum + (1.0 - b1) * (
        g_bar + weight_decay * mean.astype(curvature.dtype)))
    return momentum / (curvature + weight_decay), momentum

  return Step("vogn", leaf)
