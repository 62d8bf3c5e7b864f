r"""The contracts between the posterior types, the optimizers and the functions.

Every blrax optimizer keeps, somewhere in its optax state, a **posterior**: a
Gaussian :math:`q(\theta) = N(m, \Sigma)` around the params :math:`m`, whose
precision is :math:`\lambda(H + \delta)` (``ess`` :math:`\lambda`, a
curvature :math:`H` in the type's own form: a diagonal, a matrix, an
eigenbasis with a diagonal) and whose next draw comes from a noise state.
The posterior functions (:func:`blrax.sample_params`,
:func:`blrax.posterior_stddev`, :func:`blrax.posterior_health`,
:func:`blrax.merge_posteriors`, :class:`blrax.MultiSteps`, checkpoints, the
predictive) find posteriors **by these protocols**, never by a list of
types, so a new posterior family works with all of them by implementing
:class:`Posterior`, and a new optimizer by keeping its posterior in a state
that implements :class:`PosteriorState` (and :class:`AccumulatingState`, to
sum micro-batches).

Posterior trees have the params' structure, with ``optax.MaskedNode`` holes
where a wrapper (``optax.masked``, ``optax.partition``) left a param out.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import optax


@runtime_checkable
class Posterior(Protocol):
  r"""What every posterior type provides (a ``NamedTuple`` of arrays).

  Implemented by :class:`blrax.DiagonalGaussian`, :class:`blrax.FullGaussian`
  and :class:`blrax.EigenbasisGaussian`.

  Attributes:
    ess: :math:`\lambda`, a float scalar.
    weight_decay: :math:`\delta`, a float scalar, or per leaf (a tree like
      the params; :class:`blrax.FullGaussian`: a ``(D,)`` vector over its
      flattened params).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> from blrax._src import base
    >>> state = blrax.ivon(0.1, ess=10.0).init(jnp.zeros(2))
    >>> isinstance(blrax.find_posteriors(state)[0], base.Posterior)
    True
  """

  ess: jax.Array
  weight_decay: Any

  @property
  def mc_samples(self) -> int:
    """Draws per update (the leading axis of :func:`blrax.sample_params`)."""

  def stddev(self) -> Any:
    r"""The marginal :math:`\sigma` per weight, a tree like the params."""

  def offset(self, noise: Any | None = None) -> Any:
    r"""The draw the next update expects minus the mean, :math:`\theta - m`."""

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    """``num_samples`` fresh offsets from ``key`` (a leading axis)."""

  def curvature_diagonal(self) -> Any:
    """The diagonal of the curvature :math:`H`, like the params."""

  def decays(self) -> Any:
    r""":math:`\delta` per leaf, a tree like the params."""

  @classmethod
  def merge(cls, posteriors: list[Any], means: list[Any],
            prior_precision: Any, prior_mean: Any) -> tuple[Any, Any]:
    """Bayes' rule over shards: ``(merged mean, merged posterior)``
    (:func:`blrax.merge_posteriors`); raises ``ValueError`` where the type
    cannot be merged in closed form."""


@runtime_checkable
class PosteriorState(Protocol):
  """An optimizer state that owns a posterior and counts its updates.

  Attributes:
    count: updates so far (int32).
    posterior: a :class:`Posterior`.
  """

  count: jax.Array
  posterior: Any


@runtime_checkable
class AccumulatingState(PosteriorState, Protocol):
  """A :class:`PosteriorState` that can sum micro-batches
  (:class:`blrax.MultiSteps`).

  Attributes:
    accumulator: an empty tuple, or the micro-batch sums
      (``engine.Accumulator``).
  """

  accumulator: Any


# The members of each protocol (typing keeps its own list private before 3.12).
_MEMBERS = {
    Posterior: ("ess", "weight_decay", "mc_samples", "stddev", "offset",
                "sample_offsets", "curvature_diagonal", "decays", "merge"),
    PosteriorState: ("count", "posterior"),
    AccumulatingState: ("count", "posterior", "accumulator"),
}


def _implements(protocol: type, x: Any) -> bool:
  # On the type, not the instance: a property is not evaluated (a state of
  # placeholders, under eval_shape or a mask, may not be able to).
  return isinstance(x, tuple) and all(
      hasattr(type(x), name) or name in getattr(type(x), "_fields", ())
      for name in _MEMBERS[protocol])


def is_posterior(x: Any) -> bool:
  """Whether ``x`` implements :class:`Posterior`."""
  return _implements(Posterior, x)


def is_posterior_state(x: Any) -> bool:
  """Whether ``x`` is an optimizer state that owns a posterior."""
  return _implements(PosteriorState, x) and is_posterior(x.posterior)


def is_accumulating(x: Any) -> bool:
  """Whether ``x`` is a posterior state that can sum micro-batches."""
  return _implements(AccumulatingState, x) and is_posterior(x.posterior)


def is_hole(x: Any) -> bool:
  """An ``optax.MaskedNode``: a param a wrapper left out."""
  return isinstance(x, optax.MaskedNode)


def find(tree: Any, predicate) -> list[Any]:
  """The nodes of ``tree`` for which ``predicate`` holds, in tree order
  (not looking inside them)."""
  return [x for x in jax.tree.leaves(tree, is_leaf=predicate) if predicate(x)]


def unwrap_nnx(tree: Any) -> Any:
  """``tree`` without flax ``nnx.Variable`` wrappers (an ``nnx.Optimizer``'s
  state), or ``tree`` itself when it has none."""
  try:  # Imported lazily: flax is an optional extra.
    from flax import nnx
  except ImportError:
    return tree
  if any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))):
    return nnx.as_pure(tree)
  return tree
