r"""The diagonal-Gaussian posterior shared by every diagonal BLR variant.

All diagonal variants (IVON, diagonal VON, Vadam, VOGN) keep the same
variational family, in the normalised form of Shen et al. (2024):

.. math::

  q(\theta) = \mathcal{N}\big(m,\ \mathrm{diag}(\sigma^2)\big), \qquad
  \sigma = \frac{1}{\sqrt{\lambda\,(h + \delta)}},

where the mean :math:`m` is the params, :math:`h` a curvature estimate kept in
the optimizer state, :math:`\lambda` the effective sample size (``ess``) and
:math:`\delta` the weight decay (prior precision divided by :math:`\lambda`).
A draw is :math:`\theta = m + \sigma\epsilon`, :math:`\epsilon\sim\mathcal{N}(0,I)`.

This module holds that family as the state :class:`DiagonalGaussian`, the
noise it draws from its own key, and the per-element curvature estimators the
variants combine. It imports no variant.

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

from blrax._src import lookup


def canonicalize_key(key: int | jax.Array) -> jax.Array:
  """Returns a typed PRNG key from an int, an int array, or a (typed/raw) key.

  The decision is made on the dtype, not ``isinstance(key, int)``, because
  ``optax.inject_hyperparams`` hands an int ``key`` back as an int32 array.
  """
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key
  ):
    return key
  key = jnp.asarray(key)
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  if not jnp.issubdtype(key.dtype, jnp.integer) or key.shape != ():
    raise ValueError(
        "`key` must be an int, an integer scalar array or a PRNG key, got "
        f"key={key!r}."
    )
  return jax.random.key(key)


def state_dtype(dtype: Any) -> jnp.dtype:
  """Curvature and momentum dtype: at least float32 whatever the params use.

  A bfloat16 EMA with ``b2 = 0.99999`` would never move (the increment is
  below bf16 resolution), so low-precision params get float32 state.
  """
  return jnp.promote_types(dtype, jnp.float32)


def initial_key(key: int | jax.Array, mc_samples: int) -> jax.Array:
  """A scalar key for one sample per step, or ``mc_samples`` keys.

  The shape of the key array is how the state records ``mc_samples``: the
  state then holds arrays only, and ``sample_params`` needs no hyperparameter.
  """
  key = canonicalize_key(key)
  return key if mc_samples == 1 else jax.random.split(key, mc_samples)


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(noise key, next key) for a scalar key or a batch of keys."""
  if key.ndim == 0:
    keys = jax.random.split(key)
    return keys[0], keys[1]
  keys = jax.vmap(jax.random.split)(key)
  return keys[:, 0], keys[:, 1]


def standard_normal_like(key: jax.Array, tree: Any) -> Any:
  """:math:`\\epsilon \\sim N(0, I)` like ``tree``; leading axis if key is batched.

  ``optax.MaskedNode`` holes in ``tree`` stay holes (they get no noise).
  """

  def draw(k):
    return optax.tree.random_like(k, tree, jax.random.normal)

  return draw(key) if key.ndim == 0 else jax.vmap(draw)(key)


def stddev(curvature: jax.Array, ess: jax.Array, weight_decay: jax.Array):
  r""":math:`\sigma = 1/\sqrt{\lambda (h + \delta)}` for one leaf.

  Exactly 0 when ``ess = inf`` (a point mass), even where :math:`h+\delta=0`.
  """
  return jnp.where(jnp.isinf(ess), 0.0,
                   jax.lax.rsqrt(ess * (curvature + weight_decay)))


def price_curvature(grads, noise, curvature, ess, weight_decay):
  r"""Price/Stein estimate :math:`\hat h = \mathrm{mean}_s\,\hat g_s \epsilon_s/\sigma`.

  Equal to :math:`\hat g \odot (\theta - m)\,\lambda(h+\delta)` but computed from
  :math:`\epsilon`, which avoids the cancellation in :math:`\theta - m`.
  Unbiased for :math:`E_q[\mathrm{diag}\,\nabla^2 \bar\ell]` with Gaussian noise.
  ``grads`` and ``noise`` carry the Monte-Carlo axis first when batched.
  """
  inverse_stddev = jnp.sqrt(ess * (curvature + weight_decay))
  product = grads * noise
  if product.ndim > curvature.ndim:
    product = jnp.mean(product, axis=0)
  return product * inverse_stddev


def positive_ema(curvature, estimate, rho, weight_decay):
  r"""Curvature EMA with the correction that keeps it positive.

  .. math::

    h \leftarrow (1-\rho) h + \rho \hat h
      + \tfrac{1}{2}\rho^2 (h - \hat h)^2 / (h + \delta)

  This is the Riemannian-gradient step of Lin et al. (2020) used by IVON.
  It is evaluated in the equivalent form
  :math:`h + \delta \leftarrow \tfrac12 (a + c^2/a)` with
  :math:`a = h + \delta` and :math:`c = (1-\rho)a + \rho(\hat h + \delta)`,
  a sum of positive terms: the textbook form cancels catastrophically when
  :math:`|\rho \hat h| \gg h` (large ``ess``, large gradients) and can then
  round to a negative :math:`h`. Guarantees :math:`h+\delta \ge (h_{old}+\delta)/2`.

  References:
    Lin, Schmidt & Khan, `Handling the Positive-Definite Constraint in the
    Bayesian Learning Rule <https://arxiv.org/abs/2002.10060>`_, ICML 2020.
  """
  a = curvature + weight_decay
  c = (1.0 - rho) * a + rho * (estimate + weight_decay)
  return 0.5 * (a + jnp.square(c) / a) - weight_decay


def map_leaves(fn, num_outputs: int, tree: Any, *rest: Any) -> tuple:
  """``jax.tree.map`` for a per-leaf ``fn`` returning ``num_outputs`` arrays.

  Returns ``num_outputs`` trees shaped like ``tree`` (holes stay holes). The
  variants write their whole update as one such function, so that XLA fuses
  it into one elementwise pass per leaf.
  """
  out = jax.tree.map(fn, tree, *rest)
  return tuple(jax.tree.map(lambda _, t, i=i: t[i], tree, out)
               for i in range(num_outputs))


def mc_mean(x: jax.Array, like: jax.Array) -> jax.Array:
  """Mean over the leading Monte-Carlo axis, if ``x`` has one beyond ``like``."""
  return jnp.mean(x, axis=0) if x.ndim > like.ndim else x


def scalar(value: Any) -> jax.Array:
  """A hyperparameter kept in the state: a float32 scalar (float64 under x64)."""
  return jnp.asarray(value, jnp.result_type(float))


def _hole(x) -> bool:
  return isinstance(x, optax.MaskedNode)


class DiagonalGaussianMethods:
  """What every diagonal posterior state does with its fields.

  A mixin for ``NamedTuple`` states that have at least the fields ``key``,
  ``curvature``, ``ess`` and ``weight_decay`` (see :class:`DiagonalGaussian`);
  a noise generator that keeps more state (``fast_noise``) adds fields and
  overrides :meth:`noise`, :meth:`advanced` and :meth:`create`.
  """

  __slots__ = ()

  @classmethod
  def create(cls, key, curvature, ess, weight_decay):
    """The state at initialisation (``key`` as from :func:`initial_key`)."""
    return cls(key=key, curvature=curvature, ess=ess, weight_decay=weight_decay)

  @property
  def mc_samples(self) -> int:
    return 1 if self.key.ndim == 0 else self.key.shape[0]

  def noise(self) -> Any:
    """The standard-normal draw this state's next update expects.

    With ``ess = inf`` the posterior is a point mass and the draw is skipped
    (zeros). The ``lax.cond`` on that runtime flag also has a cost purpose:
    its output is materialised once, so XLA's CSE can share one draw between
    ``sample_params`` and ``update`` instead of fusing (recomputing) the
    normal transform into each of their consumers.
    """
    # For CSE to merge the two calls, their conditionals must have identical
    # operands: so the key is split inside the branch (the state's key is the
    # operand), and the zeros are 0 * h (XLA never merges operand-less tuples).
    return jax.lax.cond(
        jnp.isfinite(self.ess),
        lambda: self.normal_like(split_key(self.key)[0], self.curvature),
        lambda: jax.tree.map(
            lambda h: jnp.broadcast_to(0.0 * h, self.key.shape + h.shape),
            self.curvature),
    )

  def next_key(self) -> jax.Array:
    return split_key(self.key)[1]

  def advanced(self, curvature: Any, ess: Any, weight_decay: Any):
    """The posterior after an update: next key, new curvature and
    hyperparameters (the current ones, which ``inject_hyperparams`` may have
    changed). Keeps the posterior's type."""
    return self._replace(key=self.next_key(), curvature=curvature,
                         ess=scalar(ess), weight_decay=scalar(weight_decay))

  def normal_like(self, key: jax.Array, tree: Any) -> Any:
    """Fresh standard normals like ``tree`` (subclasses may be cheaper)."""
    return standard_normal_like(key, tree)

  def curvature_diagonal(self) -> Any:
    """:math:`h`, like the params (for diagnostics)."""
    return self.curvature

  def stddev(self) -> Any:
    """:math:`\\sigma` like the params, with holes where masked."""
    return jax.tree.map(
        lambda h: stddev(h, self.ess, self.weight_decay), self.curvature
    )

  def offset(self, noise: Any | None = None) -> Any:
    """:math:`\\sigma\\epsilon`, by default with the state's own noise."""
    noise = self.noise() if noise is None else noise
    return jax.tree.map(lambda s, e: s * e, self.stddev(), noise)

  def sample_offsets(self, key: jax.Array, num_samples: int) -> Any:
    """``num_samples`` fresh draws of :math:`\\sigma\\epsilon` from ``key``."""
    keys = jax.random.split(key, num_samples)
    return self.offset(self.normal_like(keys, self.curvature))


class _DiagonalGaussianFields(NamedTuple):
  key: jax.Array
  curvature: Any
  ess: jax.Array
  weight_decay: jax.Array


@lookup.register_posterior
class DiagonalGaussian(_DiagonalGaussianFields, DiagonalGaussianMethods):
  r"""A diagonal Gaussian :math:`N(m, 1/(\lambda(h+\delta)))` around the params.

  Attributes:
    key: typed PRNG key of the next draw; an array of ``mc_samples`` keys when
      the optimizer draws several samples per step.
    curvature: :math:`h`, a pytree like the params (``optax.MaskedNode`` where
      a wrapper masked a param out), float32 or wider.
    ess: :math:`\lambda`, the effective sample size, a float scalar.
    weight_decay: :math:`\delta`, the prior precision over :math:`\lambda`.
  """

  __slots__ = ()


def init_diagonal_gaussian(
    params: Any,
    *,
    key: int | jax.Array,
    curvature_init: Any,
    ess: Any,
    weight_decay: Any,
    mc_samples: int,
    posterior_type: type | None = None,
) -> DiagonalGaussian:
  """Builds the posterior state; only maps over ``params`` (shapes suffice).

  ``posterior_type`` may be a subclass of :class:`DiagonalGaussian` with
  another noise generator.
  """
  # full_like (not full) so that under an explicit-sharding mesh the state is
  # sharded like the params; it also accepts ShapeDtypeStructs.
  curvature = jax.tree.map(
      lambda p: jnp.full_like(p, curvature_init, state_dtype(p.dtype)), params
  )
  return (posterior_type or DiagonalGaussian).create(
      key=initial_key(key, mc_samples),
      curvature=curvature,
      ess=scalar(ess),
      weight_decay=scalar(weight_decay),
  )


def check_grads(grads: Any, params: Any, mc_samples: int, name: str = "grads"):
  """Raises ``ValueError`` unless each leaf is ``(mc_samples,) + param.shape``.

  With ``mc_samples == 1`` the leading axis is absent.
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
    want = prefix + tuple(p.shape)
    if tuple(g.shape) != want:
      raise ValueError(
          f"`{name}` leaf has shape {tuple(g.shape)}, expected {want} "
          f"(mc_samples={mc_samples}: "
          + ("no leading sample axis" if mc_samples == 1
             else "leading axis of size mc_samples, e.g. from "
             "jax.vmap(jax.grad(loss))")
          + ")."
      )
