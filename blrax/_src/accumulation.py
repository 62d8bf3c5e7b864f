r"""Gradient accumulation in which every micro-batch gets its own posterior draw.

``optax.MultiSteps`` averages the gradients of :math:`k` micro-batches and
calls the inner optimizer once; the inner state (so the noise key) advances
only then, so all :math:`k` micro-batches share one weight draw.
:class:`MultiSteps` instead gives micro-batch :math:`i` its own draw
:math:`\theta_i = m + \sigma\epsilon_i` and averages, per leaf, the
estimator's statistics over the micro-batches before the one curvature and
mean update:

.. math::

  \bar g = \frac1k \sum_i \bar g_i, \qquad
  c = \frac1k \sum_i c_i \quad (\text{Price: } c_i =
  \mathrm{mean}_s\,\hat g_{i,s}\epsilon_{i,s}), \qquad
  \hat h = \hat h(\bar g, c),

which is one step with ``mc_samples = k`` (times the inner ``mc_samples``)
in which sample :math:`i` sees micro-batch :math:`i`. It holds two
params-sized sums (one more buffer than ``optax.MultiSteps``), never
:math:`k` of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import engine, evon, lookup, validation


class MultiStepsState(NamedTuple):
  """State of :class:`blrax.MultiSteps`.

  Attributes:
    mini_step: micro-batches accumulated in the current step (int32).
    gradient_step: updates emitted so far (int32).
    inner_state: the inner optimizer's state; its blrax states carry the
      micro-batch sums (``ScaleByBLRState.accumulator``).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), every_k_schedule=4)
    >>> state = opt.init(jnp.zeros(3))
    >>> print(int(state.mini_step), int(state.gradient_step))
    0 0
    >>> print(state.inner_state[0].accumulator.gradient)  # the sum of g_bar
    [0. 0. 0.]
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_state: Any


# The states that can sum micro-batches (an ``accumulator`` field).
_ACCUMULATING = (engine.ScaleByBLRState, evon.ScaleByEVONState)


def _is_blr(x: Any) -> bool:
  return type(x) in _ACCUMULATING


def _blr_states(tree: Any) -> list[Any]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_blr) if _is_blr(x)]


class MultiSteps(optax.GradientTransformationExtraArgs):
  r"""Accumulates ``every_k_schedule`` micro-batches, each at its own draw.

  The analogue of ``optax.MultiSteps`` for blrax optimizers. Call
  :func:`blrax.sample_params` before every micro-batch: it returns that
  micro-batch's draw :math:`\theta_i = m + \sigma\epsilon_i`, and ``update``
  regenerates :math:`\epsilon_i`. Updates are zero until the :math:`k`-th
  micro-batch; then the inner optimizer steps once with, per leaf,

  .. math::

    \bar g = \tfrac1k \textstyle\sum_i \bar g_i, \qquad
    c = \tfrac1k \textstyle\sum_i c_i, \qquad \hat h = \hat h(\bar g, c),

  where :math:`c_i` is the estimator's statistic of micro-batch :math:`i`
  (IVON/VON: :math:`\hat g_i\epsilon_i`; VOGN: the mean squared per-example
  gradient; a given ``hessian=``: itself; Vadam: :math:`\bar g_i`, so its
  ``batch_size`` is the whole accumulated batch). This equals one step
  with ``mc_samples = k`` in which sample :math:`i` sees micro-batch
  :math:`i`. An inner ``mc_samples = S`` works too (each micro-batch carries
  :math:`S` draws, as ``update`` expects).

  Transforms chained before the blrax one (e.g. gradient clipping) see each
  micro-batch; those after it (the learning rate and its schedule) run once
  per step. Memory: two params-sized sums, one more than
  ``optax.MultiSteps``. The diagonal optimizers (IVON, VON, Vadam, VOGN)
  and EVON (its statistic is the Price product in the rotated basis, which
  stays fixed between updates; the Kronecker factors see the averaged
  gradient) are supported; others are refused at ``init``.

  Args:
    opt: the optimizer to wrap (a blrax optimizer, possibly inside optax
      wrappers or chains).
    every_k_schedule: :math:`k`, an int >= 1, or a function of the number of
      emitted updates returning it (as ``optax.MultiSteps``).

  Attributes:
    init: ``params -> MultiStepsState``; the inner state gets the sums.
    update: ``(grads, state, params, **extra_args) -> (updates, state)``;
      zero updates until the :math:`k`-th micro-batch.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (this class is one)
    whose state is a :class:`MultiStepsState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> opt = blrax.MultiSteps(blrax.ivon(0.1, ess=100.0), every_k_schedule=2)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> loss = lambda p, x: jnp.sum((p - x) ** 2)
    >>> for x in (1.0, 3.0):  # two micro-batches, two draws, one update
    ...   theta = blrax.sample_params(params, state)
    ...   updates, state = opt.update(jax.grad(loss)(theta, x), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(int(state.gradient_step), params.shape)
    1 (2,)

  References:
    Shen et al., `Variational Learning is Effective for Large Deep Networks
    <https://arxiv.org/abs/2402.17641>`_, ICML 2024 (gradient accumulation
    with a draw per micro-batch, in their GPT-2 runs).
  """

  __slots__ = ()

  def __new__(cls, opt: optax.GradientTransformation,
              every_k_schedule: int | Callable[[jax.Array], jax.Array]):
    if not callable(every_k_schedule):
      validation.check_integer("every_k_schedule", every_k_schedule, low=1)
    inner = optax.with_extra_args_support(opt)

    def k_at(step):
      return (every_k_schedule(step) if callable(every_k_schedule)
              else every_k_schedule)

    def init_fn(params):
      inner_state = inner.init(params)
      found = len(lookup.find_posteriors(inner_state))
      blr = _blr_states(inner_state)
      if not blr or found != len(blr):
        raise ValueError(
            "blrax.MultiSteps accumulates the diagonal blrax optimizers (ivon, "
            "von, vadam, vogn) and evon; `opt` holds "
            f"{found - len(blr) if blr else 'no'} posterior(s) it cannot "
            "accumulate (for others use optax.MultiSteps: one draw per step).")
      inner_state = jax.tree.map(
          lambda x: engine.with_accumulator(x) if _is_blr(x) else x,
          inner_state, is_leaf=_is_blr)
      return MultiStepsState(mini_step=jnp.zeros([], jnp.int32),
                             gradient_step=jnp.zeros([], jnp.int32),
                             inner_state=inner_state)

    def update_fn(updates, state, params=None, **extra_args):

      def emit(_):
        new_updates, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args)
        return new_updates, MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=optax.safe_increment(state.gradient_step),
            inner_state=inner_state)

      def accumulate(_):
        _, accumulated = inner.update(
            updates, state.inner_state, params,
            **{engine.ACCUMULATE: True}, **extra_args)
        # Only the blrax states take in the micro-batch (sums, next draw);
        # the rest of the chain (schedules, counters) waits for the step.
        inner_state = jax.tree.map(
            lambda old, new: new if _is_blr(old) else old,
            state.inner_state, accumulated, is_leaf=_is_blr)
        shapes = jax.eval_shape(emit, None)[0]
        return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                MultiStepsState(mini_step=optax.safe_increment(state.mini_step),
                                gradient_step=state.gradient_step,
                                inner_state=inner_state))

      k = k_at(state.gradient_step)
      return jax.lax.cond(state.mini_step + 1 >= k, emit, accumulate, None)

    return super().__new__(cls, init_fn, update_fn)
