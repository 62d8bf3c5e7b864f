r"""The diagonal BLR engine: one transform, parametrised by its parts.

Every diagonal variant is the natural-gradient step of the BLR for
:math:`q = N(m, 1/(\lambda(h+\delta)))`, assembled from three choices and a
noise generator (docs/engine.md):

.. code-block:: text

  estimator : (grads at the draw [, noise]) -> (g_bar, h_hat)   curvature.py
  precision : (h, h_hat, rho, delta)        -> new h            curvature.py
  step      : (g_bar, new h, momentum, m, t) -> direction        steps.py
  noise     : a generator value; its state lives in the posterior   noise.py

Per update, with :math:`\rho = 1-\beta_2`:

.. math::

  (\bar g, \hat h) = \mathrm{estimator}(\hat g_{1:S}), \quad
  h \leftarrow \mathrm{precision}(h, \hat h, \rho, \delta), \quad
  \Delta = \mathrm{step}(\bar g, h, g, m, t).

A user-given ``hessian=`` (where the variant accepts one) replaces the
estimator's :math:`\hat h` by :math:`\mathrm{mean}_s H_s`. A
``step_gradient`` (bSAM's) replaces :math:`\bar g` by a gradient taken from
another tree, e.g. at an adversarial point. The whole update
is one function per leaf, which XLA fuses into one elementwise pass. The
configuration lives in the closure; the state is plain data:
:class:`blrax.ScaleByBLRState` of arrays, with the posterior
(:class:`blrax.DiagonalGaussian`) inside.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import validation
from blrax._src.engine import estimators as curvature_lib
from blrax._src.engine import steps as steps_lib
from blrax._src.noise import generators as noise_lib
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import prior as prior_lib


class Accumulator(NamedTuple):
  r"""Sums over the micro-batches of one step (:class:`blrax.MultiSteps`).

  Attributes:
    count: micro-batches summed so far (int32).
    gradient: :math:`\sum \bar g`, a pytree like the curvature.
    statistic: :math:`\sum c`, the estimator's statistic (e.g.
      :math:`\mathrm{mean}_s \hat g_s\epsilon_s` for Price), like the
      curvature.
  """

  count: jax.Array
  gradient: Any
  statistic: Any


class ScaleByBLRState(NamedTuple):
  """State of a diagonal BLR transform (:func:`blrax.engine.scale_by_blr`).

  The state of IVON, diagonal VON, Vadam and VOGN (their 0.2 aliases
  ``ScaleByIVONState`` ... are deprecated).

  Attributes:
    count: number of updates so far (int32).
    momentum: the step's momentum, float32 or wider, like the params; an
      empty tuple for steps without momentum (VON).
    posterior: the :class:`blrax.DiagonalGaussian`: noise state (key),
      curvature :math:`h`, ess, weight decay, prior mean.
    accumulator: the micro-batch sums (``Accumulator``) under
      :class:`blrax.MultiSteps`,
      else an empty tuple.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.ivon(0.1, ess=100.0).init(jnp.zeros(2))
    >>> isinstance(state[0], blrax.ScaleByBLRState)  # state[1]: the lr's
    True
    >>> print(state[0].count, state[0].posterior.curvature)
    0 [1. 1.]
  """

  count: jax.Array
  momentum: Any
  posterior: gaussian.DiagonalGaussian
  accumulator: Any = ()


# The extra argument with which blrax.MultiSteps asks for a micro-batch's
# statistics to be accumulated instead of an update.
ACCUMULATE = "blrax_accumulate"


def is_absent(field: Any) -> bool:
  """An optional state field that is not there (an empty tuple)."""
  return isinstance(field, tuple) and not field


def with_accumulator(state: Any) -> Any:
  """``state`` (a blrax state with ``posterior`` and ``accumulator`` fields)
  with zero sums: it now accumulates micro-batches. The sums are like the
  curvature, unless the state's type says otherwise with an
  ``empty_accumulator()`` method (full-covariance VON's)."""
  if hasattr(state, "empty_accumulator"):
    return state._replace(accumulator=state.empty_accumulator())
  zeros = jax.tree.map(jnp.zeros_like, state.posterior.curvature)
  return state._replace(accumulator=Accumulator(
      count=jnp.zeros([], jnp.int32), gradient=zeros, statistic=zeros))


def check_accumulate(state: Any, accumulate: bool) -> None:
  if accumulate and is_absent(state.accumulator):
    raise ValueError(
        "micro-batch accumulation needs the state of blrax.MultiSteps: wrap "
        "the optimizer as blrax.MultiSteps(opt, every_k_schedule=k).")


def add_micro_batch(state: Any, params: Any, g_tree: Any, c_tree: Any,
                    generator: noise_lib.Generator | None, accumulate: bool,
                    *, next_draw: Callable | None = None):
  """Adds a micro-batch's statistics to ``state.accumulator``.

  Returns ``(done, g_tree, c_tree, accumulator)``. Under
  :class:`blrax.MultiSteps`, before the last micro-batch ``done`` is the
  ``(zero updates, state)`` to return (sums kept, the next micro-batch gets a
  fresh draw: ``generator`` advances the posterior's ``noise_state``, or
  ``next_draw(posterior)`` returns the posterior of the next draw); at the
  last one, the statistics are the averages and the sums are reset. Outside
  it, everything passes through.
  """
  accumulator = state.accumulator
  if is_absent(accumulator):
    return None, g_tree, c_tree, accumulator
  total = accumulator.count + 1
  g_tree = jax.tree.map(jnp.add, accumulator.gradient, g_tree)
  c_tree = jax.tree.map(jnp.add, accumulator.statistic, c_tree)
  if accumulate:
    posterior = state.posterior
    posterior = (next_draw(posterior) if next_draw is not None else
                 posterior._replace(noise_state=generator.advance(
                     posterior.noise_state, after=posterior.curvature)))
    return (jax.tree.map(jnp.zeros_like, params), state._replace(
        posterior=posterior,
        accumulator=Accumulator(count=total, gradient=g_tree,
                                statistic=c_tree))), None, None, None
  mean = lambda t: jax.tree.map(lambda x: x / total.astype(x.dtype), t)
  return None, mean(g_tree), mean(c_tree), with_accumulator(state).accumulator


# The skeleton: the stages every family's transform runs (the diagonal engine
# below, EVON, full-covariance VON). Configuration in, checks, accumulation
# (add_micro_batch above), the posterior's advance.


class Setup(NamedTuple):
  """What :func:`configure` returns, for the transform's closure.

  Attributes:
    mc_samples: samples per step (a checked int).
    generator: the noise generator.
    decay_in_state: whether the weight decay is per leaf (a pytree or a
      mask), fixed at ``init`` and read from the state; else a scalar re-read
      from the closure at each update (``inject_hyperparams`` may vary it).
  """

  mc_samples: int
  generator: noise_lib.Generator
  decay_in_state: bool


def check_curvature_floor(hess_init: Any, weight_decay: Any, ess: Any,
                          weight_decay_mask: Any = None) -> None:
  """sigma = 1/sqrt(ess (s + delta)) needs s + delta > 0 unless ess = inf."""
  validation.check_state_scale("hess_init", hess_init)
  h = validation.concrete_float(hess_init)
  if weight_decay_mask is not None:
    d = 0.0  # masked leaves have no prior precision
  elif prior_lib.is_per_leaf(weight_decay):
    leaves = [np.min(np.asarray(x)) for x in jax.tree.leaves(weight_decay)
              if not validation.is_traced(x) and np.size(x)]
    d = float(min(leaves)) if leaves else None
  else:
    d = validation.concrete_float(weight_decay)
  e = validation.concrete_float(ess)
  if h is not None and d is not None and h + d <= 0 and e != float("inf"):
    raise ValueError(
        "`hess_init` + `weight_decay` must be > 0 so the initial posterior "
        f"variance is finite, got hess_init={hess_init!r}, "
        f"weight_decay={weight_decay!r}"
        + ("; with weight_decay_mask, hess_init alone must be > 0 (the "
           "leaves it excludes have no prior precision)."
           if weight_decay_mask is not None else "."))


def _check_parts(estimator: Any, precision: Any, step: Any) -> None:
  """The engine's parts are objects of its modules, not their names."""
  for name, value, ok, what in [
      ("estimator", estimator, isinstance(estimator, curvature_lib.Estimator),
       "an Estimator (engine.PRICE, engine.squared_gradient(n), ...)"),
      ("precision", precision, callable(precision),
       "a precision update (engine.positive_ema, engine.ema, ...)"),
      ("step", step, isinstance(step, steps_lib.Step),
       "a Step (engine.ivon_step(...), engine.newton_step(), ...)"),
  ]:
    if not ok:
      raise ValueError(f"`{name}` must be {what}, got {name}={value!r}.")


def configure(*, ess, hess_init, b2, weight_decay, weight_decay_mask=None,
              prior_mean=None, mc_samples=1, key=0, noise="normal",
              hess_init_steps=None, positive_hess_init=False) -> Setup:
  """The configuration prelude of every family: checks the shared
  hyperparameters (``ValueError`` naming the argument and value) and builds
  the noise generator."""
  validation.check_state_scale("ess", ess, positive=True, allow_inf=True)
  validation.check_state_scale("hess_init", hess_init,
                               positive=positive_hess_init)
  validation.check_unit_interval("b2", b2)
  prior_lib.check(weight_decay, weight_decay_mask, prior_mean)
  if weight_decay_mask is None:  # else per leaf at init, where known
    check_curvature_floor(hess_init, weight_decay, ess)
  mc_samples = validation.check_mc_samples(mc_samples)
  if not validation.is_traced(key):
    noise_lib.canonicalize_key(key)
  generator = noise_lib.generator(noise)
  if hess_init_steps is not None:
    validation.check_state_scale("hess_init_steps", hess_init_steps)
  return Setup(mc_samples, generator, prior_lib.is_per_leaf(weight_decay)
               or weight_decay_mask is not None)


def check_state(state: Any, state_type: type | None = None) -> None:
  """``update``'s ``state`` is this transform's (not another optimizer's):
  a ``state_type``, or (None) any state with a diagonal ``posterior``, as
  the engine's and the states of configurations that extend it (bSAM's)."""
  if state_type is None:
    ok = isinstance(getattr(state, "posterior", None),
                    gaussian.DiagonalGaussian)
  else:
    ok = isinstance(state, state_type)
  if not ok:
    raise ValueError(
        "`state` must be the state that this optimizer's init returned, got "
        f"a {type(state).__name__}.")


def check_update(updates, params, like, *, mc_samples, hessian=None,
                 accepts_hessian=True, estimator_name="Price",
                 uses_noise=True, ess=None, batch_axis=False,
                 hessian_note="") -> None:
  """The update-input checks of every family: grads and params shaped like
  ``like`` (a tree of the params' shapes), ``hessian=`` where accepted, and
  the ``ess=inf`` rule: without weight noise a noise-based estimate is
  undefined, so the curvature must be given."""
  # params against the state first: grads are checked against params.
  gaussian.check_params(params, like)
  gaussian.check_grads(updates, params, mc_samples,
                       batch_axis=batch_axis and hessian is None)
  if hessian is not None:
    if not accepts_hessian:
      raise ValueError(
          f"this optimizer's curvature comes from its {estimator_name} "
          "estimator; it does not take `hessian=`.")
  elif uses_noise and validation.concrete_float(ess) == math.inf:
    raise ValueError(
        "ess=inf means no weight noise, so the Price curvature estimate is "
        f"undefined: pass the curvature{hessian_note} as "
        "`update(..., hessian=...)`.")


def advance(posterior, generator, curvature, *, ess, weight_decay,
            decay_in_state, **fields):
  """The posterior after an update: the next draw's noise state, the new
  curvature, and the current ``ess`` and scalar weight decay (which
  ``inject_hyperparams`` may have changed); ``fields`` replaces any others
  (EVON's bases)."""
  return posterior._replace(
      noise_state=generator.advance(posterior.noise_state, after=curvature),
      curvature=curvature, ess=jnp.asarray(ess, posterior.ess.dtype),
      weight_decay=(posterior.weight_decay if decay_in_state else
                    jnp.asarray(weight_decay, posterior.weight_decay.dtype)),
      **fields)


def scale_by_blr(
    *,
    estimator: curvature_lib.Estimator,
    precision: Callable,
    step: steps_lib.Step,
    ess: jax.typing.ArrayLike,
    hess_init: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    weight_decay: Any,
    mc_samples: int,
    key: int | jax.Array,
    noise: str | noise_lib.Generator,
    hessian_precision: Callable | None = None,
    accepts_hessian: bool = False,
    weight_decay_mask: Any = None,
    prior_mean: Any = None,
    hess_init_steps: float | None = None,
    step_gradient: Callable | None = None,
    step_gradient_args: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  r"""A diagonal-Gaussian BLR transform from its parts (before the learning rate).

  ``update(grads, state, params, *, hessian=None, **extra_args)``: the
  extra arguments named in ``step_gradient_args`` go to ``step_gradient``;
  others are ignored (as in an ``optax.chain``).

  Args:
    estimator: the curvature estimator (``curvature.PRICE``, ...).
    precision: the precision update, ``curvature.positive_ema`` or
      ``curvature.ema``.
    step: the step rule (``steps.ivon(...)``, ``steps.newton()``, ...).
    ess: effective sample size :math:`\lambda`.
    hess_init: initial curvature :math:`h_0`.
    b2: curvature decay; the precision step is :math:`\rho = 1-\beta_2`.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``: a
      scalar, or a pytree like the params (per-leaf prior precisions).
    mc_samples: samples per step (leading axis of draws and grads).
    key: PRNG key or int seed of the weight noise.
    noise: the noise generator (``"normal"``, ``"hash"``, ``"flip"`` or a
      generator value).
    hessian_precision: the precision update for a given ``hessian=``
      (default: ``precision``).
    accepts_hessian: whether ``update`` takes ``hessian=``.
    weight_decay_mask: None, or a pytree of bools like the params (or a
      function of the params returning one): where False, :math:`\delta=0`.
    prior_mean: None (a zero-mean prior) or the prior mean :math:`m_0`, a
      pytree like the params; the step pulls towards it with
      :math:`\delta(m - m_0)`.
    hess_init_steps: None (a constant precision step :math:`\rho = 1-\beta_2`,
      the reference algorithm), or the number of updates' worth of evidence
      that ``hess_init`` counts as, :math:`n_0`: then
      :math:`\rho_t = \max(1-\beta_2, 1/(n_0+t))`.
    step_gradient: None (the step uses :math:`\bar g`), or a function
      ``(params, g_bar, state, args) -> tree`` returning the gradient the
      step uses instead: ``g_bar`` is the batch's :math:`\bar g` (a tree
      like the params, in the state's dtypes; zeros at int params),
      ``state`` the state before the update and ``args`` a dict of the
      extra arguments named in ``step_gradient_args`` (None where not
      passed). The result (a tree like the params) is cast to the state's
      dtypes and saturated; the estimator's curvature sees it as its
      :math:`\bar g`. Under :class:`blrax.MultiSteps` it is called on each
      micro-batch and the results are averaged (bSAM: an adversary per
      micro-batch).
    step_gradient_args: the names of the extra ``update`` arguments that
      ``step_gradient`` takes (bSAM: ``("grad_fn", "adversarial_grads")``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`blrax.ScaleByBLRState` (an ``init`` wrapped by the caller may return
    another ``NamedTuple`` with its fields, such as
    :class:`blrax.ScaleByBSAMState`: ``update`` keeps its other fields).

  Examples:
    Diagonal VON (:func:`blrax.scale_by_von`) from its parts:

    >>> import jax.numpy as jnp, blrax
    >>> from blrax import engine
    >>> tx = engine.scale_by_blr(
    ...     estimator=engine.PRICE, precision=engine.positive_ema,
    ...     step=engine.newton_step(), ess=100.0, hess_init=1.0, b2=0.9999,
    ...     weight_decay=0.0, mc_samples=1, key=0, noise="normal",
    ...     hessian_precision=engine.ema, accepts_hessian=True)
    >>> print(blrax.posterior_stddev(tx.init(jnp.zeros(2))))
    [0.1 0.1]
  """
  _check_parts(estimator, precision, step)
  mc_samples, generator, decay_in_state = configure(
      ess=ess, hess_init=hess_init, b2=b2, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, prior_mean=prior_mean,
      mc_samples=mc_samples, key=key, noise=noise,
      hess_init_steps=hess_init_steps)
  hessian_precision = hessian_precision or precision

  def init_fn(params):
    state_dtype = lambda p: gaussian.state_dtype(gaussian.real_dtype(p))
    decay = (prior_lib.decay_tree(weight_decay, weight_decay_mask, params,
                                  state_dtype)
             if decay_in_state else weight_decay)
    posterior = gaussian.init_diagonal_gaussian(
        params, key=key, curvature_init=hess_init, ess=ess,
        weight_decay=decay, mc_samples=mc_samples, generator=generator,
        prior_mean=(() if prior_mean is None else
                    prior_lib.mean_tree(prior_mean, params, state_dtype)))
    momentum = (jax.tree.map(jnp.zeros_like, posterior.curvature)
                if step.uses_momentum else ())
    return ScaleByBLRState(count=jnp.zeros([], jnp.int32), momentum=momentum,
                           posterior=posterior)

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    accumulate = bool(extra_args.pop(ACCUMULATE, False))
    step_args = {name: extra_args.get(name) for name in step_gradient_args}
    del extra_args
    check_state(state)
    check_update(updates, params, state.posterior.curvature,
                 mc_samples=mc_samples, hessian=hessian,
                 accepts_hessian=accepts_hessian,
                 estimator_name=estimator.name,
                 uses_noise=estimator.uses_noise, ess=ess,
                 batch_axis=estimator.per_example)
    if hessian is not None:
      gaussian.check_grads(hessian, params, mc_samples, name="hessian")
    check_accumulate(state, accumulate)
    posterior = state.posterior
    use_noise = estimator.uses_noise and hessian is None
    noise_tree = posterior.noise() if use_noise else posterior.curvature
    hessian_tree = posterior.curvature if hessian is None else hessian

    # 1. The batch's statistics, per leaf: (g_bar, c), linear in the samples.
    def statistics(mean, grad, eps, h, hess):
      if not gaussian.is_trainable(mean):  # an int counter: left as it is.
        return jnp.zeros_like(h), jnp.zeros_like(h)
      grad = grad.astype(h.dtype)
      if hessian is None:
        return (estimator.mean_gradient(grad, h),
                estimator.statistic(grad, eps, h))
      return (curvature_lib.finite(curvature_lib.mc_mean(grad, h)),
              curvature_lib.hessian_statistic(hess.astype(h.dtype), h))

    # params first: its leaves, not the per-example grads', give the shapes.
    stats = jax.tree.map(statistics, params, updates, noise_tree,
                         posterior.curvature, hessian_tree)
    g_tree, c_tree = (jax.tree.map(lambda _, t, i=i: t[i], params, stats)
                      for i in range(2))
    if step_gradient is not None:  # e.g. bSAM's gradient at the adversary
      g_tree = jax.tree.map(
          lambda p, g, h: (curvature_lib.finite(jnp.asarray(g).astype(h.dtype))
                           if gaussian.is_trainable(p) else jnp.zeros_like(h)),
          params, step_gradient(params, g_tree, state, step_args),
          posterior.curvature)

    done, g_tree, c_tree, accumulator = add_micro_batch(
        state, params, g_tree, c_tree, generator, accumulate)
    if done is not None:  # under blrax.MultiSteps, before the last one
      return done

    count = optax.safe_increment(state.count)
    rho = curvature_lib.step_size(b2, count, hess_init_steps)
    scalars = step.scalars(count)
    old_decays = posterior.decays()  # the draw's sigma used these
    decays = (old_decays if decay_in_state else
              gaussian.per_leaf(weight_decay, posterior.curvature))
    anchors = (posterior.curvature if is_absent(posterior.prior_mean)
               else posterior.prior_mean)

    # 2. Curvature and step, per leaf.
    def leaf(mean, g_bar, c, h, momentum, decay, old_decay, anchor):
      if not gaussian.is_trainable(mean):
        return jnp.zeros_like(mean), h, momentum
      mean, state_dtype = jnp.asarray(mean), h.dtype
      if hessian is None:
        h_hat = estimator.curvature(g_bar, c, h, posterior.ess, old_decay)
        h = precision(h, h_hat, rho, decay)
      else:
        h = hessian_precision(h, c, rho, decay)
      offset = mean if is_absent(posterior.prior_mean) else (
          mean.astype(state_dtype) - anchor)
      direction, momentum = step.leaf(
          g_bar, h, momentum if step.uses_momentum else None, offset,
          decay, scalars)
      # Cast back: under x64, float64 hyperparameters would widen the state.
      if momentum is not None:
        momentum = momentum.astype(state_dtype)
      # Saturated at the params' range (fp16: 65504) before the cast.
      return (curvature_lib.finite(direction, mean.dtype).astype(mean.dtype),
              h.astype(state_dtype), momentum)

    momentum_tree = state.momentum if step.uses_momentum else posterior.curvature
    out = jax.tree.map(leaf, params, g_tree, c_tree, posterior.curvature,
                       momentum_tree, decays, old_decays, anchors)
    direction, curvature, momentum = (
        jax.tree.map(lambda _, t, i=i: t[i], params, out) for i in range(3))
    new_posterior = advance(posterior, generator, curvature, ess=ess,
                            weight_decay=weight_decay,
                            decay_in_state=decay_in_state)
    return direction, state._replace(
        count=count, momentum=momentum if step.uses_momentum else (),
        posterior=new_posterior, accumulator=accumulator)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_learning_rate(
    transform: optax.GradientTransformationExtraArgs,
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  """``transform`` followed by the learning rate, as optax's aliases chain."""
  validation.check_learning_rate(learning_rate)
  return optax.chain(transform, optax.scale_by_learning_rate(learning_rate))
