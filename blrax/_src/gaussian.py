r"""The diagonal-Gaussian posterior shared by every diagonal BLR variant.

All diagonal variants (IVON, diagonal VON, Vadam, VOGN) keep the same
variational family, in the normalised form of Shen et al. (2024):

.. math::

  q(\theta) = \mathcal{N}\big(m,\ \mathrm{diag}(\sigma^2)\big), \qquad
  \sigma = \frac{1}{\sqrt{\lambda\,(h + \delta)}},

where the mean :math:`m` is the params, :math:`h` a curvature estimate kept in
the optimizer state, :math:`\lambda` the effective sample size (``ess``) and
:math:`\delta` the weight decay (prior precision divided by :math:`\lambda`).
A draw is :math:`\theta = m + \sigma\epsilon`, with :math:`\epsilon` from the
noise generator whose state the posterior holds (``noise.py``).

This module is the core: it imports no variant and no API module; the
posterior functions (``lookup.py``) find its states by type.

References:
  Shen et al., `Variational Learning is Effective for Large Deep Networks
  <https://arxiv.org/abs/2402.17641>`_, ICML 2024.
  Khan & Rue, `The Bayesian Learning Rule <https://arxiv.org/abs/2107.04562>`_,
  JMLR 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from blrax._src import noise as noise_lib


def state_dtype(dtype: Any) -> jnp.dtype:
  """Curvature and momentum dtype: at least float32 whatever the params use.

  A bfloat16 EMA with ``b2 = 0.99999`` would never move (the increment is
  below bf16 resolution), so low-precision params get float32 state.
  """
  return jnp.promote_types(dtype, jnp.float32)


def scalar(value: Any) -> jax.Array:
  """A hyperparameter kept in the state: a float32 scalar (float64 under x64)."""
  return jnp.asarray(value, jnp.result_type(float))


def stddev(curvature: jax.Array, ess: jax.Array, weight_decay: jax.Array):
  r""":math:`\sigma = 1/\sqrt{\lambda (h + \delta)}` for one leaf.

  Exactly 0 when ``ess = inf`` (a point mass), even where :math:`h+\delta=0`.
  """
  return jnp.where(jnp.isinf(ess), 0.0,
                   jax.lax.rsqrt(ess * (curvature + weight_decay)))


class DiagonalGaussian(NamedTuple):
  r"""A diagonal Gaussian :math:`N(m, 1/(\lambda(h+\delta)))` around the params.

  Attributes:
    noise_state: the state of the noise generator (``blrax.noise``): the
      PRNG key of the next draw (``mc_samples`` keys when the optimizer draws
      several samples per step), and whatever else the generator keeps.
    curvature: :math:`h`, a pytree like the params (``optax.MaskedNode`` where
      a wrapper masked a param out), float32 or wider.
    ess: :math:`\lambda`, the effective sample size, a float scalar.
    weight_decay: :math:`\delta`, the prior precision over :math:`\lambda`.
  """

  noise_state: Any
  curvature: Any
  ess: jax.Array
  weight_decay: jax.Array

  @property
  def key(self) -> jax.Array:
    return self.noise_state.key

  @property
  def mc_samples(self) -> int:
    return 1 if self.key.ndim == 0 else self.key.shape[0]

  def noise(self) -> Any:
    """The standard-normal :math:`\\epsilon` this state's next update expects
    (zeros when ``ess = inf``: the posterior is a point mass)."""
    return self.noise_state.draw(self.curvature, jnp.isfinite(self.ess))

  def stddev(self) -> Any:
    """:math:`\\sigma` like the params, with holes where masked."""
    return jax.tree.map(lambda h: stddev(h, self.ess, self.weight_decay),
                        self.curvature)

  def curvature_diagonal(self) -> Any:
    """:math:`h`, like the params (for diagnostics)."""
    return self.curvature

  def offset(self, noise: Any | None = None) -> Any:
    """:math:`\\sigma\\epsilon`, by default with the state's own noise."""
    noise = self.noise() if noise is None else noise
    return jax.tree.map(lambda s, e: s * e, self.stddev(), noise)

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    """``num_samples`` fresh draws of :math:`\\sigma\\epsilon` from ``key``."""
    return self.offset(self.noise_state.fresh(key, self.curvature, num_samples))


def init_diagonal_gaussian(params: Any, *, key: int | jax.Array,
                           curvature_init: Any, ess: Any, weight_decay: Any,
                           mc_samples: int,
                           generator: noise_lib.Generator) -> DiagonalGaussian:
  """Builds the posterior state; only maps over ``params`` (shapes suffice)."""
  # full_like (not full) so that under an explicit-sharding mesh the state is
  # sharded like the params; it also accepts ShapeDtypeStructs.
  curvature = jax.tree.map(
      lambda p: jnp.full_like(p, curvature_init, state_dtype(p.dtype)), params)
  return DiagonalGaussian(
      noise_state=generator.init(noise_lib.initial_key(key, mc_samples),
                                 curvature),
      curvature=curvature, ess=scalar(ess), weight_decay=scalar(weight_decay))


def _hole(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_grads(grads: Any, params: Any, mc_samples: int, name: str = "grads",
                batch_axis: bool = False):
  """Raises ``ValueError`` unless each leaf is ``(mc_samples,) + param.shape``.

  With ``mc_samples == 1`` the sample axis is absent; with ``batch_axis``
  (per-example gradients) a batch axis of any size follows it.
  """
  if params is None:
    raise ValueError(
        "blrax optimizers need `params` (the posterior mean) in `update`."
    )
  grads_def = jax.tree.structure(grads, is_leaf=_hole)
  params_def = jax.tree.structure(params, is_leaf=_hole)
  if grads_def != params_def:
    raise ValueError(
        f"`{name}` must have the structure of params; got {grads_def} for "
        f"params {params_def}."
    )
  prefix = () if mc_samples == 1 else (mc_samples,)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    shape = tuple(g.shape)
    if batch_axis and len(shape) == len(prefix) + 1 + p.ndim:
      shape = shape[:len(prefix)] + shape[len(prefix) + 1:]
    elif batch_axis:
      shape = None
    want = prefix + tuple(p.shape)
    if shape != want:
      expected = (str(want) if not batch_axis else
                  "(" + ", ".join(map(str, prefix + ("batch",) + p.shape)) + ")")
      hint = ("per-example gradients with a batch axis after the sample axis, "
              "see blrax.per_example_grads" if batch_axis else
              "no leading sample axis" if mc_samples == 1 else
              "leading axis of size mc_samples, e.g. from "
              "jax.vmap(jax.grad(loss))")
      raise ValueError(
          f"`{name}` leaf has shape {tuple(g.shape)}, expected {expected} "
          f"(mc_samples={mc_samples}: {hint}).")
