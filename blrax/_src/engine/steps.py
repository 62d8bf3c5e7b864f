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
            :math:`\mathrm{clip}((g/(1-\beta_1^t) + \delta m)/(h+\delta
            +\varepsilon), \pm\xi)\,(h_0+\delta)`
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

from blrax._src import validation
from blrax._src.engine import estimators as curvature_lib
from blrax._src.posteriors import diagonal as gaussian


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
    numerator: for a step that is a preconditioned numerator (IVON's), its
      first half, ``(g_bar, momentum, mean, weight_decay, scalars, dtype) ->
      (numerator, momentum)``, so that a structured posterior (EVON) can
      rotate the numerator before the second half; None otherwise.
    precondition: the second half, ``(numerator, curvature, weight_decay) ->
      direction``, elementwise in the basis where the curvature is diagonal;
      ``leaf`` is the two halves composed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> step = engine.newton_step()
    >>> direction, _ = step.leaf(jnp.array(2.0), jnp.array(3.0), None,
    ...                          jnp.array(1.0), 1.0, step.scalars(1))
    >>> print(direction)  # (g + delta m) / (h + delta)
    0.75
  """

  name: str
  leaf: Callable
  scalars: Callable[[Any], tuple] = lambda count: ()
  uses_momentum: bool = True
  numerator: Callable | None = None
  precondition: Callable | None = None


def ivon(b1, *, debias: bool, clip_radius, scale, eps=0.0) -> Step:
  r"""IVON's step: momentum of the gradient, debiased, prior term after, clip.

  .. math::

    g \leftarrow \beta_1 g + (1-\beta_1)\bar g, \qquad
    \Delta = \mathrm{clip}\Big(\frac{g/(1-\beta_1^t) + \delta m}
      {h+\delta+\varepsilon}, \pm\xi\Big)\, c

  Args:
    b1: momentum decay :math:`\beta_1`.
    debias: divide the momentum by :math:`1-\beta_1^t`.
    clip_radius: :math:`\xi` (``math.inf``: no clipping).
    scale: :math:`c`, a number (:math:`h_0+\delta` when ``rescale_lr``), or a
      function of the leaf's :math:`\delta` when the weight decay is per leaf.
    eps: :math:`\varepsilon` in the denominator (0, IVON's, by default;
      EVON's official code uses 1e-10).

  Returns:
    A :class:`Step` that keeps a momentum.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> step = engine.ivon_step(0.9, debias=True, clip_radius=jnp.inf,
    ...                         scale=1.0)
    >>> direction, momentum = step.leaf(
    ...     jnp.array(1.0), jnp.array(1.0), jnp.array(0.0), jnp.array(0.0),
    ...     0.0, step.scalars(1))
    >>> print(round(float(direction), 4), round(float(momentum), 4))
    1.0 0.1
  """

  def scalars(count):
    # In the widest float in use: b1**t in low precision rounds to 1.
    return (1.0 - gaussian.scalar(b1) ** count if debias
            else gaussian.scalar(1.0),)

  def numerator(g_bar, momentum, mean, weight_decay, scalars, dtype):
    (debias_factor,) = scalars
    momentum = b1 * momentum + (1.0 - b1) * g_bar
    return (momentum / debias_factor.astype(dtype)
            + weight_decay * mean.astype(dtype)), momentum

  def precondition(numerator, curvature, weight_decay):
    denominator = curvature + weight_decay
    if validation.concrete_float(eps) != 0.0:  # keeps IVON's graph as it was
      denominator = denominator + eps
    direction = jnp.clip(numerator / denominator, -clip_radius, clip_radius)
    return direction * (scale(weight_decay) if callable(scale) else scale)

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    top, momentum = numerator(g_bar, momentum, mean, weight_decay, scalars,
                              curvature.dtype)
    return precondition(top, curvature, weight_decay), momentum

  return Step("ivon", leaf, scalars, numerator=numerator,
              precondition=precondition)


def newton() -> Step:
  r"""VON's step: the Newton direction of the prior-regularised loss,
  :math:`\Delta = (\bar g + \delta m)/(h + \delta)` (no momentum).

  Returns:
    A :class:`Step` without momentum.

  Examples:
    >>> from blrax import engine
    >>> engine.newton_step().uses_momentum
    False
  """

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

  Args:
    b1: momentum decay :math:`\beta_1`.
    b2: the curvature's decay :math:`\beta_2` (for the debiasing).
    hess_init: :math:`h_0`, the curvature's initial value.

  Returns:
    A :class:`Step` that keeps a momentum.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> step = engine.adam_step(0.9, 0.999, hess_init=0.0)
    >>> direction, _ = step.leaf(jnp.array(2.0), jnp.array(0.004),
    ...                          jnp.array(0.0), jnp.array(0.0), 0.0,
    ...                          step.scalars(1))
    >>> print(round(float(direction), 4))  # Adam's first step: sign(g)
    1.0
  """

  def scalars(count):
    decay2 = gaussian.scalar(b2) ** count
    return (1.0 - gaussian.scalar(b1) ** count, 1.0 - decay2,
            decay2 * hess_init)

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    debias1, debias2, prior = (x.astype(curvature.dtype) for x in scalars)
    # Saturated, as VOGN's: delta * m can overflow for huge params.
    momentum = curvature_lib.finite(b1 * momentum + (1.0 - b1) * (
        g_bar + weight_decay * mean.astype(curvature.dtype)))
    second_moment = prior + (curvature - prior) / debias2
    direction = (momentum / debias1) / (jnp.sqrt(second_moment) + weight_decay)
    return direction, momentum

  return Step("adam", leaf, scalars)


def vogn(b1) -> Step:
  r"""VOGN's (and bSAM's) step: momentum of the prior-regularised gradient
  over :math:`h + \delta` (Newton-like, no debiasing).

  .. math::

    g \leftarrow \beta_1 g + (1-\beta_1)(\bar g + \delta m), \qquad
    \Delta = g/(h+\delta)

  The momentum is saturated at the dtype's largest finite value.

  Args:
    b1: momentum decay :math:`\beta_1`.

  Returns:
    A :class:`Step` that keeps a momentum.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> step = engine.vogn_step(0.5)
    >>> direction, momentum = step.leaf(
    ...     jnp.array(2.0), jnp.array(1.0), jnp.array(0.0), jnp.array(0.0),
    ...     0.0, step.scalars(1))
    >>> print(direction, momentum)
    1.0 1.0
  """

  def leaf(g_bar, curvature, momentum, mean, weight_decay, scalars):
    del scalars
    momentum = curvature_lib.finite(b1 * momentum + (1.0 - b1) * (
        g_bar + weight_decay * mean.astype(curvature.dtype)))
    return momentum / (curvature + weight_decay), momentum

  return Step("vogn", leaf)
