r"""bSAM: Bayesian sharpness-aware minimisation (Möllenhoff & Khan, 2023).

SAM's max-loss is the optimal convex relaxation (the Fenchel biconjugate) of
the expected loss in the variational objective; natural-gradient steps on
that relaxed objective give bSAM, an Adam-like SAM whose optimizer state is a
diagonal Gaussian posterior :math:`q = N(m, 1/(N s))`. In blrax's normalised
form the precision is :math:`\lambda(h+\delta)` with :math:`s = h + \delta`,
so the posterior is a :class:`blrax.DiagonalGaussian` and
:func:`blrax.sample_params`, :func:`blrax.posterior_stddev` and
:func:`blrax.sample_posterior` work unchanged.

A step needs two gradients: :math:`g` at the draw :func:`blrax.sample_params`
and :math:`g_\epsilon` at the adversarial point :math:`m + \rho g/s` of the
*mean*. ``update`` takes the first as its ``updates`` and the second either
through ``grad_fn`` (called inside ``update``, as in
``optax.contrib.sam(..., opaque_mode=True)``) or as ``adversarial_grads``
(computed by the caller at :func:`bsam_adversarial_params`).

References:
  Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
  <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import curvature as curvature_lib
from blrax._src import engine, gaussian, lookup, validation
from blrax._src import noise as noise_lib


class ScaleByBSAMState(NamedTuple):
  r"""State of :func:`scale_by_bsam` (and :func:`bsam`).

  Attributes:
    count: number of updates so far (int32).
    momentum: :math:`g_m`, float32 or wider, like the params.
    rho: :math:`\rho`, the radius of the adversarial step, a float scalar
      (kept so that :func:`bsam_adversarial_params` needs no
      hyperparameters).
    posterior: the :class:`blrax.DiagonalGaussian`
      :math:`N(m, 1/(\lambda(h+\delta)))`; bSAM's :math:`s` is
      :math:`h + \delta`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> state = blrax.bsam(0.1, ess=100.0, rho=0.01).init(jnp.zeros(2))
    >>> isinstance(state[0], blrax.ScaleByBSAMState)  # state[1]: the lr's
    True
    >>> print(state[0].rho, state[0].posterior.curvature)
    0.01 [1. 1.]
  """

  count: jax.Array
  momentum: Any
  rho: jax.Array
  posterior: gaussian.DiagonalGaussian


def _check_hyperparams(ess, rho, b1, b2, damping, weight_decay,
                       hess_init) -> None:
  validation.check_state_scale("ess", ess, positive=True, allow_inf=True)
  validation.check_nonnegative("rho", rho)
  validation.check_unit_interval("b1", b1, include_one=False)
  validation.check_unit_interval("b2", b2)
  validation.check_state_scale("damping", damping)
  validation.check_state_scale("weight_decay", weight_decay)
  validation.check_state_scale("hess_init", hess_init)
  h, d = (validation.concrete_float(hess_init),
          validation.concrete_float(weight_decay))
  if h is not None and d is not None and h + d <= 0:
    raise ValueError(
        "`hess_init` + `weight_decay` (bSAM's initial s) must be > 0: the "
        f"step divides by it; got hess_init={hess_init!r}, "
        f"weight_decay={weight_decay!r}.")


def _adversarial_leaf(mean, grad, curvature, weight_decay, rho):
  r""":math:`m + \rho g / s` for one leaf, in the params' dtype (saturated)."""
  if not gaussian.is_trainable(mean):
    return mean
  mean = jnp.asarray(mean)
  s = curvature + weight_decay
  step = curvature_lib.finite(rho * (curvature_lib.finite(
      grad.astype(curvature.dtype)) / s))
  point = mean.astype(curvature.dtype) + step
  return curvature_lib.finite(point, mean.dtype).astype(mean.dtype)


def _adversarial_tree(params, grads, state: ScaleByBSAMState) -> Any:
  posterior = state.posterior
  return jax.tree.map(
      lambda p, g, h: _adversarial_leaf(p, g, h, posterior.weight_decay,
                                        state.rho.astype(h.dtype)),
      params, grads, posterior.curvature)


def scale_by_bsam(
    ess: jax.typing.ArrayLike,
    *,
    rho: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 0.1,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM's direction, before the learning rate.

  ``update(grads, state, params, grad_fn=...)`` or ``update(grads, state,
  params, adversarial_grads=...)``: ``grads`` is :math:`g`, the gradient of the
  mean minibatch loss at the draw :math:`\theta = m + e`,
  :math:`e \sim N(0, 1/(\lambda s))` (:func:`blrax.sample_params`);
  ``params`` is the mean :math:`m`. With :math:`s = h + \delta`:

  .. math::

    \epsilon &= \rho\, g / s, \qquad g_\epsilon = \nabla\bar\ell(m + \epsilon)
      \\
    g_m &\leftarrow \beta_1 g_m + (1-\beta_1)(g_\epsilon + \delta m) \\
    s &\leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| + \delta + \gamma) \\
    \Delta &= g_m / s \quad \text{(new } s\text{)}

  :math:`g_\epsilon` is ``grad_fn(m + epsilon)`` or the given
  ``adversarial_grads`` (taken at :func:`bsam_adversarial_params`). The
  adversarial point is taken from the mean, not from the draw (Algorithm 1
  of the paper). The new :math:`s` is stored as :math:`h = s - \delta`
  (clipped to the finite range of ``curvature.bounded``), so the posterior
  :math:`N(m, 1/(\lambda(h+\delta)))` is the paper's :math:`N(m, 1/(N s))`.
  The step divides by the updated :math:`s`; the authors' released code
  divides by :math:`s` before its update (a difference of order
  :math:`1-\beta_2` per step). One draw per step: the
  paper's m-sharpness (the batch split into sub-batches, each with its own
  draw and adversary) is left to the caller.

  Limits: with ``ess=inf`` (no noise) and ``b2=1`` (a fixed preconditioner
  :math:`s_0`) a step is SAM (unnormalised ascent :math:`\rho g/s_0`) with
  heavy-ball momentum, preconditioned by :math:`1/s_0`; with ``rho=0`` the
  mean moves along the gradient at the mean (the delta method) and, with
  ``b1=0`` and ``ess=inf``, the step is diagonal VON with the curvature
  target :math:`\sqrt{s}|g| + \gamma`.

  Args:
    ess: effective sample size :math:`\lambda` (the paper's :math:`N`), or
      ``inf`` for no noise.
    rho: :math:`\rho \ge 0`, the radius of the adversarial step.
    b1: momentum decay :math:`\beta_1`, in [0, 1).
    b2: precision decay :math:`\beta_2`, in [0, 1]; 1 keeps :math:`s` fixed.
    damping: :math:`\gamma \ge 0`, added to the precision target.
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    hess_init: initial :math:`h_0`; :math:`s_0 = h_0 + \delta` (> 0).
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator (``"normal"``, ``"hash"``, ``"flip"``
      or ``blrax.flip_noise(...)``; see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByBSAMState`.

  Raises:
    ValueError: a hyperparameter out of range (naming it and its value); in
      ``update``, neither or both of ``grad_fn`` and ``adversarial_grads``, or
      gradients not shaped like the params.

  Examples:
    >>> import jax, jax.numpy as jnp, blrax
    >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
    >>> tx = blrax.scale_by_bsam(ess=jnp.inf, rho=0.5, b1=0.0, b2=1.0,
    ...                          weight_decay=0.0, hess_init=2.0)
    >>> m = jnp.array([1.0, -2.0])
    >>> direction, _ = tx.update(jax.grad(loss)(m), tx.init(m), m,
    ...                          grad_fn=jax.grad(loss))
    >>> print(direction)  # g_eps / s = (m + rho m / 2) / 2
    [ 0.625 -1.25 ]

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  _check_hyperparams(ess, rho, b1, b2, damping, weight_decay, hess_init)
  if not validation.is_traced(key):
    noise_lib.canonicalize_key(key)
  generator = noise_lib.generator(noise)

  def init_fn(params):
    posterior = gaussian.init_diagonal_gaussian(
        params, key=key, curvature_init=hess_init, ess=ess,
        weight_decay=weight_decay, mc_samples=1, generator=generator)
    return ScaleByBSAMState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(jnp.zeros_like, posterior.curvature),
        rho=gaussian.scalar(rho), posterior=posterior)

  def update_fn(updates, state, params=None, *,
                grad_fn: Callable[[Any], Any] | None = None,
                adversarial_grads: Any = None, **extra_args):
    del extra_args
    gaussian.check_grads(updates, params, 1)
    gaussian.check_params(params, state.posterior.curvature)
    if (grad_fn is None) == (adversarial_grads is None):
      raise ValueError(
          "bSAM's update needs the gradient at the adversarial point: pass "
          "exactly one of `grad_fn` (called at m + rho g / s) or "
          "`adversarial_grads` (taken at blrax.bsam_adversarial_params), got "
          f"grad_fn={grad_fn!r} and adversarial_grads "
          f"{'given' if adversarial_grads is not None else 'None'}.")
    # The new rho (under inject_hyperparams) already moves this step.
    state = state._replace(rho=jnp.asarray(rho, state.rho.dtype))
    if grad_fn is not None:
      if not callable(grad_fn):
        raise validation.ArgumentTypeError(
            f"`grad_fn` must be callable, got grad_fn={grad_fn!r}.")
      adversarial_grads = grad_fn(_adversarial_tree(params, updates, state))
    gaussian.check_grads(adversarial_grads, params, 1,
                         name="adversarial_grads")
    posterior = state.posterior
    old_delta = posterior.weight_decay

    def leaf(mean, grad, adv_grad, h, momentum):
      if not gaussian.is_trainable(mean):  # an int counter: left as it is.
        return jnp.zeros_like(mean), h, momentum
      mean, dtype = jnp.asarray(mean), h.dtype
      delta = jnp.asarray(weight_decay, dtype)
      s = h + old_delta.astype(dtype)
      magnitude = curvature_lib.finite(
          jnp.sqrt(s) * jnp.abs(curvature_lib.finite(grad.astype(dtype))))
      # s' - delta = b2 h + (1-b2)(sqrt(s)|g| + gamma) + b2 (delta_old - delta):
      # exact, and without the cancellation of (s' - delta) when delta >> h.
      h = curvature_lib.bounded(
          b2 * h + (1.0 - b2) * (magnitude + damping)
          + b2 * (old_delta.astype(dtype) - delta), delta)
      adv_grad = curvature_lib.finite(adv_grad.astype(dtype))
      momentum = curvature_lib.finite(
          b1 * momentum + (1.0 - b1) * (adv_grad
                                        + delta * mean.astype(dtype)))
      direction = momentum / (h + delta)
      return (curvature_lib.finite(direction, mean.dtype).astype(mean.dtype),
              h.astype(dtype), momentum.astype(dtype))

    out = jax.tree.map(leaf, params, updates, adversarial_grads,
                       posterior.curvature, state.momentum)
    direction, curvature, momentum = (
        jax.tree.map(lambda _, t, i=i: t[i], params, out) for i in range(3))
    new_posterior = posterior._replace(
        noise_state=generator.advance(posterior.noise_state, after=curvature),
        curvature=curvature, ess=jnp.asarray(ess, posterior.ess.dtype),
        weight_decay=jnp.asarray(weight_decay, posterior.weight_decay.dtype))
    return direction, ScaleByBSAMState(
        count=optax.safe_increment(state.count), momentum=momentum,
        rho=state.rho, posterior=new_posterior)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: jax.typing.ArrayLike,
    rho: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 0.1,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    hess_init: jax.typing.ArrayLike = 1.0,
    key: int | jax.Array = 0,
    noise: str | noise_lib.Generator = "normal",
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM: sharpness-aware minimisation with a Gaussian posterior.

  Algorithm 1 of Möllenhoff & Khan (2023). With :math:`g` the minibatch
  gradient at the draw :math:`\theta = m + e`, :math:`e \sim N(0, 1/(\lambda
  s))`, learning rate :math:`\alpha` and :math:`s = h + \delta`:

  .. math::

    \epsilon &= \rho\, g / s, \qquad g_\epsilon = \nabla\bar\ell(m + \epsilon)
      \\
    g_m &\leftarrow \beta_1 g_m + (1-\beta_1)(g_\epsilon + \delta m) \\
    s &\leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| + \delta + \gamma) \\
    m &\leftarrow m - \alpha\, g_m / s

  Two gradient evaluations per step, as SAM. The loop (``loss`` the mean
  minibatch loss):

  .. code-block:: python

    theta = blrax.sample_params(params, opt_state)
    grads = jax.grad(loss)(theta, batch)
    updates, opt_state = opt.update(
        grads, opt_state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    params = optax.apply_updates(params, updates)

  ``grad_fn`` is called once, inside ``update``, at :math:`m + \epsilon`
  (one argument, unlike ``optax.contrib.sam``'s ``grad_fn(params, i)``).
  Where a function cannot be passed (model state such as batch statistics,
  NNX models), compute the point with :func:`bsam_adversarial_params` and
  pass ``adversarial_grads=`` instead. Inside ``optax.chain`` the extra
  arguments reach bSAM unchanged; transforms chained *before* bSAM see only
  ``grads``, not :math:`g_\epsilon`.

  Args:
    learning_rate: :math:`\alpha`, a float or an optax schedule. The step is
      :math:`\alpha g_m/s` and :math:`s` starts near 1, so start near SGD's
      learning rates (the paper uses 0.1-0.5 on ResNets).
    ess: effective sample size :math:`\lambda` (the paper's :math:`N`, the
      training-set size), or ``inf`` for no weight noise.
    rho: :math:`\rho \ge 0`, the radius of the adversarial step (the paper
      uses 1e-4 to 1e-2; ``rho=0`` drops the adversary).
    b1: momentum decay :math:`\beta_1`, in [0, 1).
    b2: precision decay :math:`\beta_2`, in [0, 1].
    damping: :math:`\gamma \ge 0`, added to the precision target (paper:
      0.1).
    weight_decay: :math:`\delta`, prior precision divided by ``ess``.
    hess_init: initial :math:`h_0`; the paper's :math:`s_0 = h_0 + \delta`.
    key: PRNG key (or int seed) of the weight noise; kept in the state.
    noise: the weight-noise generator (see :func:`blrax.ivon`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`: :func:`scale_by_bsam`
    followed by the learning rate. Under ``optax.inject_hyperparams`` the
    numeric arguments may be injected.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, blrax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = blrax.bsam(0.1, ess=100.0, rho=0.01)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   theta = blrax.sample_params(params, opt_state)
    ...   updates, opt_state = opt.update(jax.grad(loss)(theta), opt_state,
    ...                                   params, grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), opt_state
    >>> params = jnp.zeros(2)
    >>> opt_state = opt.init(params)
    >>> for _ in range(100):
    ...   params, opt_state = step(params, opt_state)
    >>> print(jnp.round(params, 1))
    [1. 1.]
    >>> blrax.posterior_stddev(opt_state).shape
    (2,)

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  return engine.with_learning_rate(
      scale_by_bsam(ess, rho=rho, b1=b1, b2=b2, damping=damping,
                    weight_decay=weight_decay, hess_init=hess_init, key=key,
                    noise=noise),
      learning_rate)


def _is_bsam_state(x: Any) -> bool:
  return isinstance(x, ScaleByBSAMState)


def bsam_adversarial_params(params: Any, opt_state: Any, grads: Any) -> Any:
  r"""bSAM's adversarial point :math:`m + \rho g / s`, for the second gradient.

  For loops that cannot pass ``grad_fn`` to ``update``: take the gradient at
  this point yourself and pass it as ``adversarial_grads``.

  .. code-block:: python

    theta = blrax.sample_params(params, opt_state)
    grads = jax.grad(loss)(theta, batch)
    point = blrax.bsam_adversarial_params(params, opt_state, grads)
    adversarial_grads = jax.grad(loss)(point, batch)
    updates, opt_state = opt.update(grads, opt_state, params,
                                    adversarial_grads=adversarial_grads)

  Args:
    params: the posterior mean :math:`m`.
    opt_state: the state of :func:`blrax.bsam` (or :func:`scale_by_bsam`),
      possibly inside optax wrappers; :math:`\rho` and :math:`s` come from
      its :class:`ScaleByBSAMState`, found by type (so a :math:`\rho`
      changed under ``optax.inject_hyperparams`` reaches this point one
      update later than ``grad_fn``'s).
    grads: :math:`g`, the gradient at :func:`blrax.sample_params`.

  Returns:
    A pytree like ``params``, in the params' dtypes. Params a mask left out
    of the optimizer, and int leaves, are returned unchanged.

  Raises:
    ValueError: if ``opt_state`` holds no bSAM state or more than one, or
      ``grads`` or ``params`` do not match it.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.bsam(0.1, ess=100.0, rho=0.5, hess_init=2.0,
    ...                  weight_decay=0.0)
    >>> params = jnp.zeros(2)
    >>> point = blrax.bsam_adversarial_params(params, opt.init(params),
    ...                                       jnp.array([1.0, -4.0]))
    >>> print(point)  # 0 + 0.5 * g / 2
    [ 0.25 -1.  ]

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  opt_state = lookup._unwrap_nnx(opt_state)  # pylint: disable=protected-access
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_bsam_state)
           if _is_bsam_state(x)]
  if len(found) != 1:
    raise ValueError(
        "`opt_state` must hold exactly one bSAM state (from blrax.bsam), "
        f"found {len(found)}.")
  state = found[0]
  hole = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  curvature = state.posterior.curvature
  # Where a mask left a hole, the param stays as it is.
  covered = jax.tree.map(lambda h, p: optax.MaskedNode() if hole(h) else p,
                         curvature, params, is_leaf=hole)
  gaussian.check_params(covered, curvature)
  gaussian.check_grads(grads, params, 1)
  rho = state.rho
  return jax.tree.map(
      lambda h, p, g: p if hole(h) else _adversarial_leaf(
          p, g, h, state.posterior.weight_decay, rho.astype(h.dtype)),
      curvature, params, grads, is_leaf=hole)
