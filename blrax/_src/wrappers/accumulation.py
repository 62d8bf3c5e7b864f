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
params-sized sums (one more buffer than ``optax.MultiSteps``; full-covariance
VON: a ``(D,)`` and a ``(D, D)`` sum), never :math:`k` of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import base, validation
from blrax._src.engine import skeleton as engine
from blrax._src.functions import lookup
from blrax._src.posteriors import diagonal as gaussian


class MultiStepsState(NamedTuple):
  """State of :class:`blrax.MultiSteps`.

  Attributes:
    mini_step: micro-batches accumulated in the current step (int32).
    gradient_step: updates emitted so far (int32).
    inner_state: the inner optimizer's state; its blrax states carry the
      micro-batch sums (``ScaleByBLRState.accumulator``).
    acc_grads: the running mean of the gradients of the params no blrax
      state takes (the plain optax part of an ``optax.partition``), like
      ``optax.MultiStepsState.acc_grads``, with ``optax.MaskedNode()`` at
      the params a blrax state accumulates itself (all of them for a plain
      blrax optimizer: no buffer).
    hessian_given: whether this step's micro-batches came with
      ``hessian=`` (a bool array; one step cannot mix both).

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
  acc_grads: Any = ()
  hessian_given: Any = ()


_is_blr = base.is_accumulating  # a state that can sum micro-batches


def _blr_states(tree: Any) -> list[Any]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_blr) if _is_blr(x)]


def _hole(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _holds_posterior(x: Any) -> bool:
  return base.is_posterior_state(x)


def _check_inner(inner_state: Any, every_k_schedule: Any) -> None:
  """Raises ``ValueError`` unless every posterior is one MultiSteps sums."""
  if any(isinstance(x, MultiStepsState) for x in jax.tree.leaves(
      inner_state, is_leaf=lambda x: isinstance(x, MultiStepsState))):
    outer = ("this schedule's" if callable(every_k_schedule)
             else f"{every_k_schedule}")
    raise ValueError(
        "`opt` is already a blrax.MultiSteps: nested accumulation is not "
        "supported; use one blrax.MultiSteps whose every_k_schedule is the "
        f"product of the two (here {outer} times the inner one's).")
  found = lookup.find_posteriors(inner_state)  # none: the usual error
  blr = _blr_states(inner_state)
  if len(found) == len(blr):
    return
  others = [x for x in jax.tree.leaves(inner_state, is_leaf=_holds_posterior)
            if _holds_posterior(x) and not _is_blr(x)]
  names = ", ".join(sorted({f"{type(x).__name__} (a "
                            f"{type(x.posterior).__name__} posterior)"
                            for x in others})) or "a posterior"
  raise ValueError(
      f"blrax.MultiSteps cannot accumulate {names}: it sums per-micro-batch "
      "statistics, which the blrax optimizers (ivon, von with either "
      "covariance, vadam, vogn, bsam, evon) keep in an `accumulator` field "
      "of their state, and this state has none. Use "
      "optax.MultiSteps (it averages the gradients; the k micro-batches "
      "share one weight draw) or a larger batch per step.")


def _free(inner_state: Any, params: Any) -> Any:
  """Bools like ``params``: True where no blrax state takes the gradient
  (and the param is a float), so that MultiSteps must average it."""
  free = jax.tree.map(gaussian.is_trainable, params)
  for blr in _blr_states(inner_state):
    covered = jax.eval_shape(blr.posterior.stddev)
    try:
      free = jax.tree.map(lambda f, c: f and _hole(c), free, covered)
    except ValueError:  # another structure than the params: it covers all.
      return jax.tree.map(lambda _: False, params)
  return free


def _buffer(free: Any, params: Any) -> Any:
  """Zeros where ``free``, holes elsewhere (no memory for the blrax part)."""
  return jax.tree.map(lambda f, p: jnp.zeros_like(p) if f else
                      optax.MaskedNode(), free, params)


def _advance(old: Any, new: Any) -> Any:
  """The inner state after a micro-batch: the blrax states (sums, draw) and
  the NaN-skip counters of ``apply_if_finite`` advance; the rest of the
  chain (schedules, counters) waits for the step."""
  is_node = lambda x: _is_blr(x) or isinstance(x, optax.ApplyIfFiniteState)  # noqa: E731

  def pick(o, n):
    if _is_blr(o):
      return n
    if isinstance(o, optax.ApplyIfFiniteState):
      return n._replace(inner_state=_advance(o.inner_state, n.inner_state))
    return o

  return jax.tree.map(pick, old, new, is_leaf=is_node)


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
  (IVON/VON: :math:`\hat g_i\epsilon_i`; full-covariance VON: the ``(D, D)``
  :math:`\mathrm{sym}(\hat g_i (L\epsilon_i)^\top)`; VOGN: the mean
  squared per-example gradient; a given ``hessian=``: itself; Vadam:
  :math:`\bar g_i`, so its ``batch_size`` is the whole accumulated batch).
  This equals one step with ``mc_samples = k`` in which sample :math:`i`
  sees micro-batch :math:`i`. An inner ``mc_samples = S`` works too (each
  micro-batch carries :math:`S` draws, as ``update`` expects).

  Transforms chained before the blrax one (e.g. gradient clipping) see each
  micro-batch; those after it (the learning rate and its schedule) run once
  per step. Memory: two params-sized sums, one more than
  ``optax.MultiSteps`` (full-covariance VON: a ``(D,)`` gradient sum and a
  ``(D, D)`` curvature sum, the size of its state). All blrax optimizers are
  supported: the diagonal ones (IVON, VON, Vadam, VOGN, bSAM: each
  micro-batch gets its own adversary, the paper's m-sharpness), EVON (its
  statistic is the Price product in the rotated basis, which stays fixed
  between updates; the Kronecker factors see the averaged gradient) and
  full-covariance VON (its Price estimate
  :math:`\mathrm{mean}_s\,\mathrm{sym}(\hat g_s (L\epsilon_s)^\top)`, or
  the given ``(D, D)`` ``hessian=``, is linear in the samples, and
  :math:`L` stays fixed between updates). A ``MultiSteps`` nested in another
  is refused at ``init`` (use one with the product of the two
  ``every_k_schedule``).

  Plain optax transforms beside the blrax one (``optax.partition``) get
  the average gradient of the :math:`k` micro-batches, as under
  ``optax.MultiSteps`` (one more buffer, for their params only). An inner
  :func:`blrax.apply_if_finite` skips a non-finite micro-batch (the step
  averages the others) and counts it. All micro-batches of a step must
  come with ``hessian=`` or all without: a mix raises ``ValueError``
  (under ``jit``, where it cannot raise, the updates are NaN).
  ``has_updated(state)`` is True right after an update, as in
  ``optax.MultiSteps``.

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
      # The step counters are int32.
      validation.check_integer("every_k_schedule", every_k_schedule, low=1,
                               high=2**31)
    inner = optax.with_extra_args_support(opt)

    def k_at(step):
      return (every_k_schedule(step) if callable(every_k_schedule)
              else every_k_schedule)

    def init_fn(params):
      inner_state = inner.init(params)
      _check_inner(inner_state, every_k_schedule)
      inner_state = jax.tree.map(
          lambda x: engine.with_accumulator(x) if _is_blr(x) else x,
          inner_state, is_leaf=_is_blr)
      return MultiStepsState(mini_step=jnp.zeros([], jnp.int32),
                             gradient_step=jnp.zeros([], jnp.int32),
                             inner_state=inner_state,
                             acc_grads=_buffer(_free(inner_state, params),
                                               params),
                             hessian_given=jnp.zeros([], bool))

    def update_fn(updates, state, params=None, **extra_args):
      extra_args.pop(engine.ACCUMULATE, None)
      if params is None:
        raise ValueError("blrax.MultiSteps needs `params` (the posterior "
                         "mean) in `update`, got params=None.")
      given = extra_args.get("hessian") is not None
      # The grads of the params no blrax state takes: their running mean,
      # as optax.MultiSteps keeps it (the blrax states sum their own).
      free = _free(state.inner_state, params)
      mean_grads = jax.tree.map(
          lambda f, g, acc: acc + (jnp.asarray(g) - acc) / (
              state.mini_step + 1).astype(acc.dtype) if f else g,
          free, updates, state.acc_grads, is_leaf=_hole)
      for g, acc in zip(jax.tree.leaves(updates), jax.tree.leaves(
          mean_grads, is_leaf=_hole)):
        if not _hole(acc) and jnp.shape(g) != jnp.shape(acc):
          raise ValueError(
              "`grads` of a plain optax part beside the blrax one must have "
              f"the params' shape {jnp.shape(acc)}, got {jnp.shape(g)}.")
      mixed = (state.mini_step > 0) & (state.hessian_given != given)
      if not validation.is_traced(mixed) and bool(mixed):
        raise ValueError(
            f"`hessian`: this micro-batch {'came with' if given else 'lacks'} "
            f"hessian= but the {int(state.mini_step)} before it in this step "
            f"{'did not' if given else 'did'}; the micro-batches of one "
            "step must all pass hessian= or all leave it out (their "
            "curvature statistics do not mix).")

      def emit(_):
        grads = jax.tree.map(lambda f, g, m: m if f else g, free, updates,
                             mean_grads)
        new_updates, inner_state = inner.update(
            grads, state.inner_state, params, **extra_args)
        return new_updates, MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=optax.safe_increment(state.gradient_step),
            inner_state=inner_state,
            acc_grads=jax.tree.map(jnp.zeros_like, state.acc_grads),
            hessian_given=jnp.zeros([], bool))

      def accumulate(_):
        _, accumulated = inner.update(
            updates, state.inner_state, params,
            **{engine.ACCUMULATE: True}, **extra_args)
        shapes = jax.eval_shape(emit, None)[0]
        return (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                MultiStepsState(
                    mini_step=optax.safe_increment(state.mini_step),
                    gradient_step=state.gradient_step,
                    inner_state=_advance(state.inner_state, accumulated),
                    acc_grads=jax.tree.map(
                        lambda acc, m: acc if _hole(acc) else m.astype(
                            acc.dtype), state.acc_grads, mean_grads,
                        is_leaf=_hole),
                    hessian_given=jnp.asarray(given)))

      k = k_at(state.gradient_step)
      new_updates, new_state = jax.lax.cond(state.mini_step + 1 >= k, emit,
                                            accumulate, None)
      if validation.is_traced(mixed):  # under jit: NaN, not a silent mix
        new_updates = jax.tree.map(
            lambda u: u * jnp.where(mixed, jnp.nan, 1).astype(u.dtype)
            if jnp.issubdtype(u.dtype, jnp.inexact) else u, new_updates)
      return new_updates, new_state

    return super().__new__(cls, init_fn, update_fn)

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """Whether the last ``update`` emitted an update (as ``optax.MultiSteps``).

    Args:
      state: a :class:`MultiStepsState`.

    Returns:
      A bool array: True after the :math:`k`-th micro-batch of a step.
    """
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformation:
    """This transformation as a plain ``optax.GradientTransformation``."""
    return optax.GradientTransformation(init=self.init, update=self.update)
