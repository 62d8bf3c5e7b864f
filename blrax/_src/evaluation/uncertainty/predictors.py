"""Predictors: functions of inputs whose arrays are traced by jit.

A predictor maps a batch of inputs to member log-probabilities ``(S, n, k)``
(or, for :func:`blrax.uncertainty.regression_report`, a predictive ``(mean,
variance)``); see the package docstring (``__init__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from blrax._src import validation
from blrax._src.evaluation import prediction_inputs
from blrax._src.functions import lookup

_TypeError = validation.ArgumentTypeError


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
  """A function of inputs, with its arrays kept apart so jit can trace them.

  ``predictor(inputs)`` is ``fn(args, inputs)``, jit-compiled with ``fn``
  static and ``args`` traced (so params are arguments of the compiled
  program, not constants baked into it); :func:`report` compiles ``fn``
  with its statistics the same way, once per predictor and batch shape.

  Attributes:
    fn: ``fn(args, inputs)``: member log-probabilities ``(S, n, k)`` for
      :func:`report`, or a predictive ``(mean, variance)`` for
      :func:`regression_report`.
    args: a pytree of arrays (params, optimizer state, keys).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from blrax.uncertainty import Predictor
    >>> predictor = Predictor(lambda w, x: jax.nn.log_softmax(x @ w)[None],
    ...                       jnp.eye(2))
    >>> predictor(jnp.ones((3, 2))).shape
    (1, 3, 2)
  """

  fn: Callable[[Any, Any], Any]
  args: Any = ()

  def __call__(self, inputs):
    return _apply(self.fn, self.args, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn, args, inputs):
  return fn(args, inputs)


class _Plain:
  """``fn(args, inputs) = f(inputs)``; hashable by ``f`` so jit reuses it."""

  def __init__(self, f):
    self.f = f

  def __call__(self, _, inputs):
    return self.f(inputs)

  def __hash__(self):
    return hash(self.f)

  def __eq__(self, other):
    return isinstance(other, _Plain) and other.f is self.f


def as_predictor(predictor: Any) -> Predictor:
  """``predictor`` as a :class:`Predictor`: a plain function ``inputs ->
  outputs`` is wrapped (jit reuses its compilation for the same function).

  Args:
    predictor: a :class:`Predictor` or a function of inputs.

  Returns:
    A :class:`Predictor`.
  """
  if isinstance(predictor, Predictor):
    return predictor
  if not callable(predictor):
    raise _TypeError(
        "`predictor` must be a Predictor or a function inputs -> member "
        f"log-probabilities, got predictor={predictor!r}.")
  return Predictor(_Plain(predictor), ())


def check_members(out: Any) -> jax.Array:
  """A predictor's output as member log-probabilities ``(S, n, k)``.

  Args:
    out: ``(S, n, k)``, or ``(n, k)`` read as ``S = 1``, real numbers.

  Returns:
    ``out`` with a member axis, in at least float32; the shape and dtype are
    checked (``ValueError``, ``ArgumentTypeError``), not the values.
  """
  out = jnp.asarray(out)
  if out.ndim == 2:
    out = out[None]
  if out.ndim != 3 or out.shape[-1] < 2 or out.shape[0] < 1:
    raise ValueError(
        "the predictor must return member log-probabilities of shape "
        f"(S, n, k) (or (n, k)) with k >= 2 classes, got shape {out.shape}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise _TypeError(
        f"the predictor must return real log-probabilities, got {out.dtype}.")
  return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def _log_softmax(apply_fn, params, inputs):
  logits = apply_fn(params, inputs)
  prediction_inputs.check_logits(logits)
  return jax.nn.log_softmax(logits, axis=-1)


def point_predictor(apply_fn: Callable[[Any, Any], jax.Array],
                    params: Any) -> Predictor:
  r"""The predictive of one set of params (``S = 1``): :math:`\log
  \mathrm{softmax} f(x, \theta)`.

  Use it for a deterministic network, or for a blrax posterior's mean.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits`` (last axis: classes);
      for an NNX model ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    params: the params, or an NNX model (see :mod:`blrax.predictive`).

  Returns:
    A :class:`Predictor` of member log-probabilities ``(1, n, k)``.

  Raises:
    TypeError: ``apply_fn`` is not callable (the error is also a
      ``ValueError``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import point_predictor
    >>> predictor = point_predictor(lambda w, x: x @ w, jnp.eye(3))
    >>> predictor(jnp.ones((2, 3))).shape
    (1, 2, 3)
  """
  apply_fn, params, _ = prediction_inputs.functional(apply_fn, params, None)
  prediction_inputs.check_apply_fn(apply_fn, returns="logits")
  return Predictor(
      lambda p, inputs: _log_softmax(apply_fn, p, inputs)[None], params)


def ensemble_predictor(apply_fn: Callable[[Any, Any], jax.Array],
                       params_list: Any) -> Predictor:
  r"""The predictive of an ensemble: members :math:`\log\mathrm{softmax}
  f(x, \theta_s)`, :math:`s = 1, \dots, S`.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``.
    params_list: a non-empty sequence of params with one tree structure
      and the same leaf shapes (they are stacked and evaluated with
      ``jax.vmap``).

  Returns:
    A :class:`Predictor` of member log-probabilities ``(S, n, k)``.

  Raises:
    TypeError: ``apply_fn`` is not callable.
    ValueError: an empty ``params_list``, or members of different
      structures or shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import ensemble_predictor
    >>> members = [jnp.eye(3), 2 * jnp.eye(3)]
    >>> ensemble_predictor(lambda w, x: x @ w, members)(jnp.ones((5, 3))).shape
    (2, 5, 3)
  """
  prediction_inputs.check_apply_fn(apply_fn, returns="logits")
  try:
    members = list(params_list)
  except TypeError as e:
    raise _TypeError("`params_list` must be a sequence of params, got "
                     f"params_list={params_list!r}.") from e
  if not members:
    raise ValueError("`params_list` must hold at least one member, got "
                     "params_list=[].")
  structure = jax.tree.structure(members[0])
  for i, member in enumerate(members):
    if jax.tree.structure(member) != structure:
      raise ValueError(
          f"`params_list[{i}]` has a different tree structure from "
          f"params_list[0]: {jax.tree.structure(member)} vs {structure}.")
  try:
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  except (TypeError, ValueError) as e:
    raise ValueError("`params_list` members must have the same leaf shapes "
                     f"and dtypes: {e}") from e

  def fn(stacked, inputs):
    return jax.vmap(lambda p: _log_softmax(apply_fn, p, inputs))(stacked)

  return Predictor(fn, stacked)


def posterior_predictor(apply_fn: Callable[[Any, Any], jax.Array],
                        key: Any, params: Any, opt_state: Any,
                        num_samples: int = 32,
                        chunk_size: int | None = None) -> Predictor:
  r"""The predictive of a blrax posterior: ``num_samples`` draws
  :math:`\theta_s \sim q`, the same for every batch.

  The draws are those of :func:`blrax.predictive.predictive_log_probs` with
  the same key (``jax.random.split(key, num_samples)``, one draw per key), so
  the BMA of the members equals it. They are regenerated from the fixed keys
  at every call and evaluated ``chunk_size`` at a time (``jax.lax.map``), so
  memory holds ``chunk_size`` draws of the params, plus the
  ``(S, n, k)`` output.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``; for an NNX model
      ``apply_fn(model, inputs)`` or None (``model(inputs)``).
    key: PRNG key of the draws: an int seed, a ``jax.random.PRNGKey`` or a
      ``jax.random.key``.
    params: the posterior mean, or an NNX model (see
      :mod:`blrax.predictive`).
    opt_state: the state of a blrax optimizer (possibly wrapped, or an NNX
      optimizer's ``opt_state``).
    num_samples: :math:`S`, a Python or NumPy int ``>= 1``.
    chunk_size: draws evaluated together, a divisor of ``num_samples``;
      ``None``: all at once.

  Returns:
    A :class:`Predictor` of member log-probabilities ``(S, n, k)``.

  Raises:
    TypeError: ``apply_fn`` not callable, ``key`` not a key, non-int counts
      (the errors are also ``ValueError``).
    ValueError: counts below 1, a ``chunk_size`` that does not divide
      ``num_samples``, an ``opt_state`` without a blrax posterior.

  Examples:
    >>> import jax.numpy as jnp
    >>> import blrax
    >>> from blrax.uncertainty import posterior_predictor
    >>> w = jnp.eye(3)
    >>> state = blrax.ivon(0.1, ess=100).init(w)
    >>> predictor = posterior_predictor(lambda w, x: x @ w, 0, w, state,
    ...                                 num_samples=4, chunk_size=2)
    >>> predictor(jnp.ones((5, 3))).shape
    (4, 5, 3)
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, False)
  keys, _ = prediction_inputs.draw_keys(key, num_samples, chunk_size)
  lookup.find_posteriors(opt_state)  # Raises now if there is none.

  def fn(args, inputs):
    keys, params, opt_state = args

    def one(k):
      theta = jax.tree.map(lambda x: x[0],
                           lookup.sample_posterior(k, params, opt_state, 1))
      return _log_softmax(apply_fn, theta, inputs)

    out = jax.lax.map(jax.vmap(one), keys)
    return out.reshape((-1,) + out.shape[2:])

  return Predictor(fn, (keys, params, opt_state))
