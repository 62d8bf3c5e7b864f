r"""The linearised (GLM) predictive of a blrax posterior.

The network is replaced by its first-order Taylor expansion at the posterior
mean :math:`m`,

.. math::

  f_{\text{lin}}(x, \theta) = f(x, m) + J(x)\,(\theta - m),
  \qquad J(x) = \partial f(x, \theta) / \partial\theta \big|_{\theta = m},

and the posterior :math:`q(\theta) = N(m, \Sigma)` is pushed through it
(Immer, Korzepa & Bauer, 2021). Its outputs are Gaussian:
:math:`f_{\text{lin}}(x) \sim N\big(f(x, m),\, J(x)\Sigma J(x)^\top\big)`.

**Sampled** (``method="sampled"``, any posterior): draws
:math:`\theta_s - m \sim q` are pushed through one ``jax.linearize`` of
``lambda p: apply_fn(p, inputs)`` at :math:`m`, i.e. Jacobian-vector products
:math:`f(x, m) + J(x)(\theta_s - m)`. The draws are those of
:func:`blrax.predictive.predictive_log_probs` with the same key
(``jax.random.split(key, num_samples)``, one draw per key), evaluated
``chunk_size`` at a time with ``jax.lax.map``: memory is constant in the
number of draws. For a model linear in its params the result equals the
ordinary Bayesian model average, draw for draw. Classification returns the
log of the model average, :math:`\mathrm{logsumexp}_s \log\mathrm{softmax}
f_{\text{lin}}(x, \theta_s) - \log S`; regression the mean and variance over
draws (plus the noise).

**Closed form** (diagonal and full posteriors): the output variances are

.. math::

  v_k(x) = \big(J(x)\Sigma J(x)^\top\big)_{kk} = g_k^\top \Sigma\, g_k,
  \qquad g_k = \partial f_k(x, m) / \partial\theta,

which for a diagonal posterior, :math:`\Sigma = \mathrm{diag}(\sigma^2)`,
is :math:`v_k(x) = \sum_i (\partial f_k(x, m)/\partial \theta_i)^2
\sigma_i^2`; a :class:`blrax.FullGaussian` uses its dense covariance, and
several posteriors (``optax.partition``) add their blocks.

They are computed one output element :math:`k` at a time (``jax.lax.map``)
from per-example vector-Jacobian products (``jax.vmap`` over examples), so
memory is :math:`O(n \cdot P)` for :math:`n` examples and :math:`P` params,
not :math:`O(n \cdot K \cdot P)` (plus the :math:`D \times D` covariance of
a full posterior over :math:`D` params); the cost is :math:`K` backward
passes. For
classification (``method="probit"``) the predictive is the multi-class probit
approximation (MacKay, 1992),

.. math::

  p(y = k \mid x) \approx \mathrm{softmax}_k\Big(
    \frac{f(x, m)}{\sqrt{1 + \frac{\pi}{8} v(x)}}\Big),

for regression (``method="closed_form"``) the mean is :math:`f(x, m)` and the
variance :math:`v(x) + \sigma^2_{\text{noise}}`. Eigenbasis posteriors
(:class:`blrax.EigenbasisGaussian`, EVON) are refused by the closed forms
with a ``ValueError``: use ``method="sampled"`` for them.

The closed forms read the leading axis of every ``inputs`` leaf as the batch
axis and need ``apply_fn`` to treat examples independently (eval mode: no
batch statistics, no dropout); each example is evaluated as a batch of one.
The sampled form makes no such assumption.

Models and arguments are those of :mod:`blrax.predictive`: a params pytree
with ``apply_fn(params, inputs)``, or a Flax NNX model (with its
``nnx.Optimizer``); int and bool leaves are held fixed. A wrong ``method``,
a count below 1 or params that do not match the posterior raise a
``ValueError`` naming the argument.

References:
  Immer, Korzepa & Bauer, `Improving predictions of Bayesian neural nets via
  local linearization <https://arxiv.org/abs/2008.08400>`_, AISTATS 2021.
  MacKay, `The Evidence Framework Applied to Classification Networks
  <https://doi.org/10.1162/neco.1992.4.5.720>`_, Neural Computation 1992.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from blrax._src import validation
from blrax._src.evaluation import prediction_inputs, uncertainty
from blrax._src.functions import lookup
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import full as full_gaussian

_TypeError = validation.ArgumentTypeError

_CLASSIFICATION = ("sampled", "probit")
_REGRESSION = ("sampled", "closed_form")


def _hole(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _method(method: Any, allowed: tuple[str, ...]) -> str:
  if not isinstance(method, str) or method not in allowed:
    raise ValueError(
        f"`method` must be one of {', '.join(map(repr, allowed))}, got "
        f"method={method!r}.")
  return method


def _prepare(apply_fn, key, params, opt_state, num_samples, chunk_size,
             sampled):
  """Checked ``(apply_fn, key, params, opt_state)``; key is None unless
  ``sampled``."""
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  if sampled and key is None:
    raise _TypeError("`key` is required with method='sampled', got key=None.")
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, not sampled)
  # The checks of the draws, for the closed forms too.
  prediction_inputs.check_draw_counts(num_samples, chunk_size)
  lookup.find_posteriors(opt_state)  # Raises now if there is none.
  return apply_fn, key, params, opt_state


class _Trainable:
  """The float leaves of ``params`` as a list, and back (ints held fixed)."""

  def __init__(self, params):
    self.leaves, self.treedef = jax.tree.flatten(params)
    self.mask = [gaussian.is_trainable(x) for x in self.leaves]

  def select(self, tree):
    leaves = self.treedef.flatten_up_to(tree)
    return [x for x, t in zip(leaves, self.mask) if t]

  def rebuild(self, trainable):
    it = iter(trainable)
    return jax.tree.unflatten(
        self.treedef, [next(it) if t else x for x, t in zip(self.leaves,
                                                              self.mask)])


def _map_draws(apply_fn, keys, params, opt_state, inputs, reduce):
  """``reduce(outputs)`` per chunk of keys, ``outputs`` being
  :math:`f(x, m) + J(x)(\\theta_s - m)` for the chunk's draws (stacked)."""
  parts = _Trainable(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  f = lambda trainable: apply_fn(parts.rebuild(trainable), inputs)
  out, f_jvp = jax.linearize(f, parts.select(params))

  def offset(k):  # A draw around zero is the offset theta - m itself.
    return parts.select(jax.tree.map(
        lambda x: x[0], lookup.sample_posterior(k, zeros, opt_state, 1)))

  def chunk(chunk_keys):
    return reduce(jax.vmap(lambda k: out + f_jvp(offset(k)))(chunk_keys))

  return out, jax.lax.map(chunk, keys)


def _batch_size(inputs) -> int:
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(inputs)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "the closed forms need `inputs` whose leaves share a leading batch "
        f"axis, got leaf shapes {[jnp.shape(x) for x in jax.tree.leaves(inputs)]}.")
  return sizes.pop()


def _quadratic_forms(params, opt_state):
  """One function per posterior: per-example gradients (a list like the
  trainable leaves, each with a leading batch axis) -> ``g^T Sigma g``."""
  posteriors = lookup.find_posteriors(opt_state)
  other = [type(p).__name__ for p in posteriors
           if not isinstance(p, (gaussian.DiagonalGaussian,
                                 full_gaussian.FullGaussian))]
  if other:
    raise ValueError(
        "the closed-form linearised predictive needs DiagonalGaussian or "
        f"FullGaussian posteriors, but `opt_state` holds {', '.join(other)}: "
        "use method='sampled'.")
  lookup.check_covers(params, posteriors)
  parts = _Trainable(params)
  forms = []
  for posterior in posteriors:
    if isinstance(posterior, gaussian.DiagonalGaussian):
      # sigma^2 where this posterior covers the leaf, None in its holes.
      variances = [None if _hole(s) else jnp.square(s)
                   for s in parts.select(posterior.stddev())]

      def diagonal(grads, variances=variances):
        return sum(jnp.sum((jnp.square(g) * v).reshape(g.shape[0], -1), 1)
                   for g, v in zip(grads, variances) if v is not None)

      forms.append(diagonal)
    else:  # Sigma over the covered leaves, flattened in tree order.
      covered = [not _hole(t) for t in parts.select(
          posterior.template)]
      covariance = posterior.covariance()

      def full(grads, covered=covered, covariance=covariance):
        flat = jnp.concatenate(
            [g.reshape(g.shape[0], -1) for g, c in zip(grads, covered) if c],
            axis=1).astype(covariance.dtype)
        return jnp.sum((flat @ covariance) * flat, axis=1)

      forms.append(full)
  return forms


def _output_variance(apply_fn, params, opt_state, inputs):
  r"""``(f(x, m), diag(J Sigma J^T))``, both shaped like the outputs."""
  forms = _quadratic_forms(params, opt_state)
  n = _batch_size(inputs)
  parts = _Trainable(params)
  mean = apply_fn(params, inputs)
  if jnp.ndim(mean) < 1 or jnp.shape(mean)[0] != n:
    raise ValueError(
        "the closed forms need `apply_fn` to return outputs with the batch "
        f"axis of `inputs` ({n}) first, got shape {jnp.shape(mean)}.")
  if not any(parts.mask):
    return mean, jnp.zeros(jnp.shape(mean), jnp.result_type(mean, float))

  def one(trainable, example):  # One example, as a batch of one.
    batch = jax.tree.map(lambda x: x[None], example)
    return apply_fn(parts.rebuild(trainable), batch)[0]

  # One copy of the params per example: the VJP gives per-example gradients.
  copies = [jnp.broadcast_to(p, (n,) + jnp.shape(p))
            for p in parts.select(params)]
  out, f_vjp = jax.vjp(lambda c: jax.vmap(one)(c, inputs), copies)
  shape = out.shape[1:]
  size = math.prod(shape)

  def element(k):  # g_k^T Sigma g_k per example, g_k = d f_k / d theta.
    cotangent = jnp.broadcast_to(
        jax.nn.one_hot(k, size, dtype=out.dtype).reshape(shape), out.shape)
    (grads,) = f_vjp(cotangent)
    return sum(form(grads) for form in forms)

  per_element = jax.lax.map(element, jnp.arange(size))  # (size, n)
  return mean, per_element.T.reshape(mean.shape)


def _probit_log_softmax(logits, variance):
  return jax.nn.log_softmax(logits / jnp.sqrt(1.0 + math.pi / 8 * variance),
                            axis=-1)


def linearized_log_probs(
    apply_fn: Callable[[Any, Any], jax.Array],
    key: Any,
    params: Any,
    opt_state: Any,
    inputs: Any,
    num_samples: int = 32,
    chunk_size: int | None = None,
    method: str = "sampled",
) -> jax.Array:
  r"""Log class probabilities of the linearised (GLM) predictive.

  ``method="sampled"``: :math:`\log\frac1S\sum_s\mathrm{softmax}\big(f(x, m)
  + J(x)(\theta_s - m)\big)`, :math:`\theta_s \sim q`, with the draws of
  :func:`blrax.predictive.predictive_log_probs` for the same key.
  ``method="probit"`` (diagonal or full posteriors): :math:`\log
  \mathrm{softmax}\big(f(x, m) / \sqrt{1 + \frac{\pi}{8} v(x)}\big)` with
  :math:`v_k(x) = (J\Sigma J^\top)_{kk}`, for a diagonal posterior
  :math:`\sum_i (\partial f_k / \partial\theta_i)^2 \sigma_i^2`.
  The sampled form is exact for the linearised model up to Monte Carlo error;
  the probit form is a deterministic approximation (no key needed).

  References:
    Immer, Korzepa & Bauer, `Improving predictions of Bayesian neural nets
    via local linearization <https://arxiv.org/abs/2008.08400>`_, AISTATS
    2021. MacKay, `The Evidence Framework Applied to Classification Networks
    <https://doi.org/10.1162/neco.1992.4.5.720>`_, Neural Computation 1992.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits`` (last axis: classes); for
      an NNX model ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key of the draws (an int seed, a legacy ``jax.random.PRNGKey``
      or a typed ``jax.random.key``); unused (may be None) with
      ``method="probit"``.
    params: the posterior mean :math:`m`: a params pytree, an ``nnx.Module``
      or an ``nnx.State`` of the whole model.
    opt_state: the state of a blrax optimizer (possibly wrapped), or the
      ``nnx.Optimizer`` holding it.
    inputs: passed to ``apply_fn`` unchanged; for ``"probit"`` every leaf
      has a leading batch axis and ``apply_fn`` treats examples
      independently.
    num_samples: draws :math:`S`, a Python or NumPy int ``>= 1`` (checked,
      unused by ``"probit"``).
    chunk_size: draws evaluated together (a divisor of ``num_samples``);
      ``None`` evaluates all at once.
    method: ``"sampled"`` or ``"probit"``.

  Returns:
    Log-probabilities shaped like the logits.

  Raises:
    TypeError: as :func:`blrax.predictive.predictive_log_probs` (the errors
      are also ``ValueError``).
    ValueError: an unknown ``method``, counts below 1, a ``chunk_size`` that
      does not divide ``num_samples``, params that do not match the
      posterior, logits with fewer than 2 classes, or ``"probit"`` with an
      eigenbasis (EVON) posterior.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> state = blrax.ivon(0.1, ess=10.0).init(params)
    >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"]
    >>> x = jnp.ones((4, 3))
    >>> sampled = blrax.predictive.linearized_log_probs(
    ...     apply_fn, 0, params, state, x, num_samples=8)
    >>> probit = blrax.predictive.linearized_log_probs(
    ...     apply_fn, None, params, state, x, method="probit")
    >>> sampled.shape, probit.shape
    ((4, 2), (4, 2))
  """
  method = _method(method, _CLASSIFICATION)
  apply_fn, key, params, opt_state = _prepare(
      apply_fn, key, params, opt_state, num_samples, chunk_size,
      method == "sampled")
  if method == "probit":
    logits, variance = _output_variance(apply_fn, params, opt_state, inputs)
    prediction_inputs.check_logits(logits)
    return _probit_log_softmax(logits, variance)
  keys, num_samples = prediction_inputs.draw_keys(key, num_samples,
                                                  chunk_size)

  def reduce(logits):
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1), axis=0)

  logits, chunks = _map_draws(apply_fn, keys, params, opt_state, inputs,
                              reduce)
  prediction_inputs.check_logits(logits)
  return jax.nn.logsumexp(chunks, axis=0) - jnp.log(num_samples)


def linearized_probs(apply_fn, key, params, opt_state, inputs, num_samples=32,
                     chunk_size=None, method="sampled") -> jax.Array:
  r"""Class probabilities of the linearised predictive; see
  :func:`linearized_log_probs`.

  Args:
    apply_fn: as in :func:`linearized_log_probs`.
    key: as in :func:`linearized_log_probs`.
    params: as in :func:`linearized_log_probs` (an NNX model works).
    opt_state: as in :func:`linearized_log_probs`.
    inputs: as in :func:`linearized_log_probs`.
    num_samples: as in :func:`linearized_log_probs`.
    chunk_size: as in :func:`linearized_log_probs`.
    method: ``"sampled"`` or ``"probit"``.

  Returns:
    Probabilities shaped like the logits; the checks and errors of
    :func:`linearized_log_probs`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0),
    ...                           wrt=nnx.Param)
    >>> probs = blrax.predictive.linearized_probs(
    ...     None, None, model, optimizer, jnp.ones((4, 3)), method="probit")
    >>> probs.shape
    (4, 2)
  """
  return jnp.exp(linearized_log_probs(apply_fn, key, params, opt_state, inputs,
                                      num_samples, chunk_size, method))


def linearized_mean_variance(
    apply_fn: Callable[[Any, Any], jax.Array],
    key: Any,
    params: Any,
    opt_state: Any,
    inputs: Any,
    num_samples: int = 32,
    chunk_size: int | None = None,
    noise_variance: Any = None,
    method: str = "sampled",
) -> tuple[jax.Array, jax.Array]:
  r"""Mean and variance of the linearised predictive of a regression output.

  ``method="closed_form"`` (diagonal or full posteriors): mean
  :math:`f(x, m)`, variance :math:`\mathrm{diag}(J\Sigma J^\top) +
  \sigma^2_{\text{noise}}`, for a diagonal posterior
  :math:`\sum_i (\partial f / \partial\theta_i)^2\sigma_i^2 +
  \sigma^2_{\text{noise}}` per output. ``method="sampled"``: the mean and
  variance (divided by :math:`S`) of :math:`f(x, m) + J(x)(\theta_s - m)` over
  the draws of :func:`blrax.predictive.predictive_mean_variance` for the same
  key, plus the noise.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; for an NNX model
      ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key of the draws; unused (may be None) with
      ``method="closed_form"``.
    params: the posterior mean: a params pytree, an ``nnx.Module`` or an
      ``nnx.State`` of the whole model.
    opt_state: the state of a blrax optimizer (possibly wrapped), or the
      ``nnx.Optimizer`` holding it.
    inputs: passed to ``apply_fn`` unchanged; for ``"closed_form"`` every
      leaf has a leading batch axis and ``apply_fn`` treats examples
      independently.
    num_samples: draws :math:`S`, a Python or NumPy int ``>= 1`` (checked,
      unused by ``"closed_form"``).
    chunk_size: draws evaluated together (a divisor of ``num_samples``).
    noise_variance: observation noise :math:`\sigma^2_{\text{noise}} \ge 0`: a
      scalar or an array broadcasting to the output shape. Left out, it is 0
      with a ``UserWarning``, as in
      :func:`blrax.predictive.predictive_mean_variance`; pass ``0.0`` for the
      epistemic variance on purpose.
    method: ``"sampled"`` or ``"closed_form"``.

  Returns:
    ``(mean, variance)``, each shaped like the outputs.

  Raises:
    TypeError: as :func:`blrax.predictive.predictive_mean_variance`.
    ValueError: an unknown ``method``, the errors of
      :func:`blrax.predictive.predictive_mean_variance`, or
      ``"closed_form"`` with an eigenbasis (EVON) posterior.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.ones(3)}
    >>> state = blrax.ivon(0.1, ess=10.0, hess_init=1.0,
    ...                    weight_decay=0.0).init(params)
    >>> mean, var = blrax.predictive.linearized_mean_variance(
    ...     lambda p, x: jnp.sin(x @ p["w"]), None, params, state,
    ...     jnp.zeros((2, 3)), noise_variance=0.1, method="closed_form")
    >>> print(mean, var)  # f = 0, J = x cos(0) = x = 0: only the noise
    [0. 0.] [0.1 0.1]
  """
  method = _method(method, _REGRESSION)
  apply_fn, key, params, opt_state = _prepare(
      apply_fn, key, params, opt_state, num_samples, chunk_size,
      method == "sampled")
  noise_variance, noise_ok = prediction_inputs.check_noise_variance(
      prediction_inputs.default_noise_variance(noise_variance,
                                               "linearized_mean_variance"))

  def finish(mean, variance):
    return prediction_inputs.add_noise_variance(mean, variance, noise_variance,
                                                noise_ok)

  if method == "closed_form":
    return finish(*_output_variance(apply_fn, params, opt_state, inputs))
  keys, num_samples = prediction_inputs.draw_keys(key, num_samples,
                                                  chunk_size)

  def reduce(out):
    mean = jnp.mean(out, axis=0)
    return mean, jnp.sum(jnp.square(out - mean), axis=0)

  _, (means, deviations) = _map_draws(apply_fn, keys, params, opt_state,
                                      inputs, reduce)
  mean = jnp.mean(means, axis=0)  # Chunks of equal sizes, combined exactly.
  total = (jnp.sum(deviations, axis=0)
           + keys.shape[1] * jnp.sum(jnp.square(means - mean), axis=0))
  return finish(mean, total / num_samples)


def linearized_predictor(apply_fn: Callable[[Any, Any], jax.Array],
                         key: Any, params: Any, opt_state: Any,
                         num_samples: int = 32,
                         chunk_size: int | None = None,
                         method: str = "sampled") -> uncertainty.Predictor:
  r"""The linearised predictive of a blrax posterior, for
  :func:`blrax.uncertainty.report`.

  ``method="sampled"``: members :math:`\log\mathrm{softmax}\big(f(x, m) +
  J(x)(\theta_s - m)\big)`, ``(S, n, k)``, with the draws of
  :func:`blrax.uncertainty.posterior_predictor` for the same key (the same
  :math:`S` networks for every batch); their BMA is
  :func:`blrax.predictive.linearized_log_probs`. ``method="probit"``
  (diagonal or full posteriors): one member, ``(1, n, k)``, the probit
  approximation (so the report's mutual information is 0).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``; for an NNX model
      ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key of the draws; unused (may be None) with
      ``method="probit"``.
    params: the posterior mean, or an NNX model (see
      :mod:`blrax.predictive`).
    opt_state: the state of a blrax optimizer (possibly wrapped, or an NNX
      optimizer's ``opt_state``).
    num_samples: :math:`S`, a Python or NumPy int ``>= 1``.
    chunk_size: draws evaluated together, a divisor of ``num_samples``.
    method: ``"sampled"`` or ``"probit"``.

  Returns:
    A :class:`blrax.uncertainty.Predictor` of member log-probabilities.

  Raises:
    TypeError: as :func:`blrax.uncertainty.posterior_predictor`.
    ValueError: as :func:`blrax.predictive.linearized_log_probs`.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from blrax.uncertainty import linearized_predictor
    >>> w = jnp.eye(3)
    >>> state = blrax.ivon(0.1, ess=100).init(w)
    >>> predictor = linearized_predictor(lambda w, x: jnp.tanh(x @ w), 0, w,
    ...                                  state, num_samples=4, chunk_size=2)
    >>> predictor(jnp.ones((5, 3))).shape
    (4, 5, 3)
  """
  method = _method(method, _CLASSIFICATION)
  apply_fn, key, params, opt_state = _prepare(
      apply_fn, key, params, opt_state, num_samples, chunk_size,
      method == "sampled")

  if method == "probit":
    _quadratic_forms(params, opt_state)  # Raises now for EVON, bad params.

    def probit(args, inputs):
      logits, variance = _output_variance(apply_fn, *args, inputs)
      prediction_inputs.check_logits(logits)
      return _probit_log_softmax(logits, variance)[None]

    return uncertainty.Predictor(probit, (params, opt_state))
  keys, num_samples = prediction_inputs.draw_keys(key, num_samples,
                                                  chunk_size)

  def sampled(args, inputs):
    keys, params, opt_state = args
    logits, out = _map_draws(apply_fn, keys, params, opt_state, inputs,
                             lambda z: jax.nn.log_softmax(z, axis=-1))
    prediction_inputs.check_logits(logits)
    return out.reshape((-1,) + out.shape[2:])

  return uncertainty.Predictor(sampled, (keys, params, opt_state))
