r"""Curvature: the estimators of :math:`\nabla^2\bar\ell` and the precision updates.

An **estimator** turns the gradients at the draw into the mean gradient
:math:`\bar g` and a curvature target :math:`\hat h`, per leaf. All estimate
the diagonal of the Hessian of the *mean* minibatch loss :math:`\bar\ell` (the
per-example scale that :math:`h` lives on; the posterior precision is
:math:`\lambda(h+\delta)`):

============================  ==============================================
estimator                     :math:`\hat h`
============================  ==============================================
:data:`PRICE`                 :math:`\mathrm{mean}_s\,\hat g_s\epsilon_s/\sigma`
                              (Price/Stein; unbiased for
                              :math:`E_q[\mathrm{diag}\nabla^2\bar\ell]`)
``hessian=`` (any variant     :math:`\mathrm{mean}_s H_s`, given by the user
that accepts it)              (exact or Gauss-Newton diagonal)
:func:`squared_gradient`      :math:`M\,\bar g^2` for a batch of :math:`M`:
                              unbiased for the per-example Gauss-Newton
                              :math:`E_i[g_i^2]` where the full gradient is 0
:data:`PER_EXAMPLE_SQUARED`   :math:`\mathrm{mean}_{s,i}\,g_{s,i}^2`
                              (Gauss-Newton / empirical Fisher)
:func:`gradient_magnitude`    :math:`\sqrt{h+\delta}\,\mathrm{mean}_s|\hat g_s|
                              + \gamma` (bSAM's target; not a Hessian
                              estimate)
============================  ==============================================

A **precision update** moves :math:`h` towards :math:`\hat h` with step
:math:`\rho`: :func:`ema` (plain) or :func:`positive_ema` (with the
correction of Lin et al. (2020) that keeps :math:`h+\delta>0` whatever the
sign of :math:`\hat h`).

Both are **safe for any finite gradients**: estimates are saturated at the
dtype's largest finite value (:func:`finite`), and the new curvature is
clipped to :math:`h+\delta \ge \sqrt{\text{tiny}}`, :math:`h \le
\sqrt{\text{max}}` (:func:`bounded`; 1e-19 and 2e19 in float32), so
:math:`h` and :math:`\sigma` stay finite and positive.

References:
  Khan & Rue, `The Bayesian Learning Rule <https://arxiv.org/abs/2107.04562>`_,
  JMLR 2023.
  Lin, Schmidt & Khan, `Handling the Positive-Definite Constraint in the
  Bayesian Learning Rule <https://arxiv.org/abs/2002.10060>`_, ICML 2020.
  Khan et al., `Fast and Scalable Bayesian Deep Learning by
  Weight-Perturbation in Adam <https://arxiv.org/abs/1806.04854>`_, ICML 2018.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from blrax._src import validation
from blrax._src.numerics import bounded, finite, limits  # noqa: F401


def mc_mean(x: jax.Array, like: jax.Array) -> jax.Array:
  """Mean over the leading Monte-Carlo axis, if ``x`` has one beyond ``like``."""
  return jnp.mean(x, axis=0) if x.ndim > like.ndim else x


@dataclasses.dataclass(frozen=True)
class Estimator:
  r"""A curvature estimator: configuration, kept in the optimizer's closure.

  An estimate is made in two parts so that micro-batches can be averaged
  before it (:class:`blrax.MultiSteps`): per leaf, ``statistic`` reduces the
  gradients at the draw (and their noise) to one array :math:`c` that is
  *linear* in the samples, so the mean of :math:`c` over micro-batches is
  the :math:`c` of all their samples together; ``curvature`` then turns
  :math:`(\bar g, c)` into :math:`\hat h`.

  Attributes:
    name: for messages.
    statistic: ``(grads, noise, curvature) -> c`` for one leaf; ``grads``
      carry the sample axis (and the batch axis for per-example estimators)
      first; ``curvature`` (the leaf's :math:`h`) gives the shape.
    curvature: ``(g_bar, c, curvature, ess, weight_decay) -> h_hat``.
    uses_noise: whether ``statistic`` reads the noise (Price); without noise
      (``ess = inf``) such an estimator is undefined.
    per_example: whether ``grads`` carry a batch axis after the sample axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> g_bar, h_hat = engine.PER_EXAMPLE_SQUARED.estimate(
    ...     jnp.array([[1.0], [3.0]]), None, jnp.zeros(1), 10.0, 0.0)
    >>> print(g_bar, h_hat)  # mean and mean square of two examples
    [2.] [5.]
  """

  name: str
  statistic: Callable
  curvature: Callable
  uses_noise: bool = False
  per_example: bool = False

  def mean_gradient(self, grads, curvature):
    r""":math:`\bar g`: the mean over the sample (and batch) axes."""
    if self.per_example:
      return finite(jnp.mean(_flat_examples(grads, curvature), axis=0))
    return finite(mc_mean(grads, curvature))

  def estimate(self, grads, noise, curvature, ess, weight_decay):
    r"""``(g_bar, h_hat)`` for one leaf, in one go."""
    g_bar = self.mean_gradient(grads, curvature)
    c = self.statistic(grads, noise, curvature)
    return g_bar, self.curvature(g_bar, c, curvature, ess, weight_decay)


def _flat_examples(grads, curvature):
  # Sample and batch axes flattened into one (explicit size: a leaf may be
  # zero-size).
  count = math.prod(grads.shape[:grads.ndim - curvature.ndim])
  return grads.reshape((count,) + curvature.shape)


def _price_statistic(grads, noise, curvature):
  product = finite(grads * noise)  # so the mean cannot meet inf - inf
  return mc_mean(product, curvature)


def _price_curvature(g_bar, statistic, curvature, ess, weight_decay):
  del g_bar
  big = jnp.finfo(curvature.dtype).max
  inverse_stddev = jnp.sqrt(jnp.minimum(ess * (curvature + weight_decay), big))
  return finite(statistic * inverse_stddev)


def price_curvature(grads, noise, curvature, ess, weight_decay):
  r"""Price/Stein estimate :math:`\hat h = \mathrm{mean}_s\,\hat g_s \epsilon_s/\sigma`.

  Equal to :math:`\hat g \odot (\theta - m)\,\lambda(h+\delta)` but computed from
  :math:`\epsilon`, which avoids the cancellation in :math:`\theta - m`.
  Unbiased for :math:`E_q[\mathrm{diag}\,\nabla^2 \bar\ell]` with Gaussian noise.
  ``grads`` and ``noise`` carry the Monte-Carlo axis first when batched.
  """
  return _price_curvature(None, _price_statistic(grads, noise, curvature),
                          curvature, ess, weight_decay)


PRICE = Estimator("price", _price_statistic, _price_curvature,
                  uses_noise=True)


def squared_gradient(batch_size: float = 1.0) -> Estimator:
  r"""The squared mean gradient, scaled by the batch size: :math:`M\bar g^2`.

  For a minibatch of :math:`M` independent examples,
  :math:`E[M\bar g^2] = E_i[g_i^2] + (M-1)(E_i g_i)^2`: the per-example
  Gauss-Newton diagonal where the full gradient vanishes (near a minimum),
  more elsewhere. Unscaled (:math:`M = 1`), :math:`\bar g^2` underestimates
  the curvature by about the batch size near a minimum. Its statistic is
  :math:`\bar g` itself (under accumulation, :math:`M` is the whole
  accumulated batch).

  Args:
    batch_size: :math:`M`, the examples each gradient averages over.

  Returns:
    An :class:`Estimator` (Vadam's).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> print(engine.squared_gradient(4.0).estimate(
    ...     jnp.array([0.5]), None, jnp.zeros(1), 10.0, 0.0)[1])
    [1.]
  """

  def statistic(grads, noise, curvature):
    del noise
    return finite(mc_mean(grads, curvature))

  def estimate_curvature(g_bar, statistic, curvature, ess, weight_decay):
    del g_bar, curvature, ess, weight_decay
    return finite(batch_size * jnp.square(statistic))

  return Estimator("squared_gradient", statistic, estimate_curvature)


def _per_example_statistic(grads, noise, curvature):
  del noise
  return finite(jnp.mean(jnp.square(_flat_examples(grads, curvature)), axis=0))


def _statistic_is_estimate(g_bar, statistic, curvature, ess, weight_decay):
  del g_bar, curvature, ess, weight_decay
  return statistic


PER_EXAMPLE_SQUARED = Estimator("per_example_squared", _per_example_statistic,
                                _statistic_is_estimate, per_example=True)


def gradient_magnitude(damping=0.0) -> Estimator:
  r"""bSAM's curvature target: :math:`\sqrt{h+\delta}\,\mathrm{mean}_s|\hat g_s|
  + \gamma`.

  The precision target of Möllenhoff & Khan (2023), Algorithm 1, in
  blrax's normalised form :math:`s = h + \delta` (the :math:`\delta` of the
  draw, i.e. before this update): :math:`s \leftarrow \beta_2 s +
  (1-\beta_2)(\sqrt{s}|g| + \delta + \gamma)` is :func:`ema` of :math:`h`
  towards this target. Its statistic :math:`c = \mathrm{mean}_s|\hat g_s|`
  is linear in the samples (micro-batches average); with ``mc_samples > 1``
  it is the mean magnitude, not the magnitude of the mean. Not an estimate
  of the Hessian: :math:`\sqrt{s}|g|` is the natural-gradient target of
  SAM's relaxed objective, and ``damping`` :math:`\gamma \ge 0` keeps it
  away from 0.

  Args:
    damping: :math:`\gamma \ge 0`.

  Returns:
    An :class:`Estimator` (bSAM's).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> estimator = engine.gradient_magnitude(damping=0.1)
    >>> _, h_hat = estimator.estimate(jnp.array([-2.0]), None,
    ...                               jnp.array([3.0]), 10.0, 1.0)
    >>> print(h_hat)  # sqrt(3 + 1) * 2 + 0.1
    [4.1]
  """

  def statistic(grads, noise, curvature):
    del noise
    return finite(mc_mean(jnp.abs(finite(grads)), curvature))

  def estimate_curvature(g_bar, statistic, curvature, ess, weight_decay):
    del g_bar, ess
    return finite(jnp.sqrt(curvature + weight_decay) * statistic) + damping

  return Estimator("gradient_magnitude", statistic, estimate_curvature)


def hessian_statistic(hessian, curvature):
  r"""The statistic of a user-given ``hessian=``: :math:`\mathrm{mean}_s H_s`
  (it is its own curvature estimate)."""
  return finite(mc_mean(finite(hessian), curvature))


def step_size(b2, count, init_steps=None):
  r"""The precision step :math:`\rho_t` of update ``count`` (1 for the first).

  With ``init_steps`` None: :math:`\rho = 1-\beta_2` (the reference IVON).
  Otherwise ``hess_init`` is a prior pseudo-count of :math:`n_0` updates and

  .. math::

    \rho_t = \max\big(1-\beta_2,\ 1/(n_0 + t)\big),

  so until :math:`t \approx 1/(1-\beta_2) - n_0` the curvature is the
  running mean :math:`h_t = (n_0 h_0 + \sum_{s\le t}\hat h_s)/(n_0+t)`
  (up to the positivity correction) and ``hess_init`` keeps the weight
  :math:`n_0/(n_0+t)`; afterwards it is the usual EMA. This is the Adam-style
  debiasing of the EMA, with :math:`h_0` as its prior instead of 0.
  """
  rho = 1.0 - b2
  if init_steps is None:
    return rho
  t = jnp.asarray(count).astype(jnp.result_type(float))
  return jnp.maximum(rho, 1.0 / (init_steps + t))


def init_share(b2, count, init_steps=None):
  r"""The weight that ``hess_init`` still has in :math:`h` after ``count``
  updates: :math:`\prod_{s\le t}(1-\rho_s)` (host-side, float)."""
  count = int(count)
  if init_steps is None:
    return float(b2) ** count
  n0, rho = float(init_steps), 1.0 - float(b2)
  if rho <= 0.0:
    return n0 / (n0 + count) if n0 + count > 0 else 1.0
  # Running mean while 1/(n0+t) > rho, i.e. t < 1/rho - n0; then the EMA.
  switch = max(0, min(count, math.ceil(1.0 / rho - n0) - 1))
  share = n0 / (n0 + switch) if switch > 0 else 1.0
  return share * float(b2) ** (count - switch)


def ema(curvature, estimate, rho, weight_decay):
  r"""Plain EMA :math:`h \leftarrow (1-\rho) h + \rho \hat h`.

  Keeps :math:`h \ge 0` when :math:`\hat h \ge 0` (squared gradients,
  Gauss-Newton); not for the Price estimator, whose :math:`\hat h` can be
  negative. The result is ``bounded``.

  Args:
    curvature: :math:`h`.
    estimate: :math:`\hat h`.
    rho: the step :math:`\rho`.
    weight_decay: :math:`\delta` (for the floor of :math:`h + \delta`).

  Returns:
    The new :math:`h`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> print(engine.ema(jnp.array(1.0), 3.0, 0.25, 0.0))
    1.5
  """
  return bounded((1.0 - rho) * curvature + rho * estimate, weight_decay)


def positive_ema(curvature, estimate, rho, weight_decay, eps=0.0):
  r"""Curvature EMA with the correction that keeps it positive.

  .. math::

    h \leftarrow (1-\rho) h + \rho \hat h
      + \tfrac{1}{2}\rho^2 (h - \hat h)^2 / (h + \delta + \varepsilon)

  This is the Riemannian-gradient step of Lin et al. (2020) used by IVON.
  It is evaluated in the equivalent form
  :math:`h + s \leftarrow \tfrac12 (a + c^2/a)` with :math:`s = \delta +
  \varepsilon`, :math:`a = h + s` and :math:`c = (1-\rho)a + \rho(\hat h
  + s)`, a sum of positive terms: the textbook form cancels catastrophically
  when :math:`|\rho \hat h| \gg h` (large ``ess``, large gradients) and can
  then round to a negative :math:`h`. Guarantees :math:`h+s \ge
  (h_{old}+s)/2`; the result is ``bounded``.

  Args:
    curvature: :math:`h`.
    estimate: :math:`\hat h` (any sign).
    rho: the step :math:`\rho`.
    weight_decay: :math:`\delta`.
    eps: :math:`\varepsilon` (0, IVON's, by default; EVON's official code
      uses 1e-10).

  Returns:
    The new :math:`h` (:math:`h + \delta > 0`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import engine
    >>> print(engine.positive_ema(jnp.array(1.0), -3.0, 0.5, 0.0))
    1.0
  """
  shift = weight_decay
  if validation.concrete_float(eps) != 0.0:  # keeps IVON's graph as it was
    shift = weight_decay + eps
  a = curvature + shift
  c = (1.0 - rho) * a + rho * (estimate + shift)
  # c**2 overflows only where the exact result exceeds the ceiling anyway
  # ((a + c^2/a)/2 >= |c|), so saturating it is exact.
  return bounded(0.5 * (a + jnp.square(c) / a) - shift, weight_decay)
