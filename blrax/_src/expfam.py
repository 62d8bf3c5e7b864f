r"""Exponential families and the Bayesian Learning Rule on them.

A family :math:`q_\eta(\theta) = h(\theta)\exp(\langle\eta, T(\theta)\rangle -
A(\eta))` is given here by its log-partition :math:`A` over a flat natural
parameter :math:`\eta`. Everything else follows by autodiff:

- mean parameters :math:`\mu = \nabla A(\eta) = E_q[T(\theta)]`;
- Fisher information :math:`F(\eta) = \nabla^2 A(\eta)`;
- KL divergence as the Bregman divergence of :math:`A`:
  :math:`\mathrm{KL}(q_1\|q_2) = A(\eta_2) - A(\eta_1) -
  \langle\eta_2-\eta_1, \mu_1\rangle`;
- the natural gradient :math:`\nabla_\mu \mathcal{L} = F(\eta)^{-1}
  \nabla_\eta \mathcal{L}` (the chain rule through :math:`\mu(\eta)`).

The BLR step (Khan & Rue, 2023) for a prior :math:`\eta_0` and an expected
log-likelihood :math:`\mathcal{L}(\mu) = E_q[\sum_i \log p(y_i\mid\theta)]`:

.. math::

  \eta \leftarrow (1-\rho)\,\eta + \rho\,(\eta_0 + \nabla_\mu \mathcal{L}).

For a conjugate pair :math:`\mathcal{L}` is linear in :math:`\mu`,
:math:`\mathcal{L} = \sum_i\langle\tilde\eta_i, \mu\rangle + c`, so one step with
:math:`\rho = 1` gives :math:`\eta_0 + \sum_i \tilde\eta_i`: Bayes' rule is the
addition of natural gradients.

References:
  Khan & Rue, `The Bayesian Learning Rule <https://arxiv.org/abs/2107.04562>`_,
  JMLR 2023.
  Khan, `Information Geometry of Variational Bayes
  <https://arxiv.org/abs/2509.15641>`_, 2025.

Checks. A natural parameter must have the family's shape (a wrong shape, or
a non-numeric value, always raises) and lie in its domain (e.g. Beta:
:math:`\eta > -1`). Concrete parameters outside the domain raise
``ValueError`` naming the argument and its value; under ``jax.jit`` (or
``grad``/``vmap``) they cannot be inspected, and every result computed from
them (log-partition, mean parameters, Fisher, KL, samples, usual parameters)
is NaN instead of a finite wrong number. The usual parameters given to
``to_natural`` are checked the same way (e.g. Beta needs ``alpha, beta > 0``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from blrax._src import validation
from blrax._src.noise import generators as noise

# A TypeError that is also a ValueError, as blrax raises for wrong types.
_TypeError = validation.ArgumentTypeError


def _traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _show(x: Any) -> str:
  x = jax.lax.stop_gradient(x)  # Under eager grad: the concrete primal.
  if _traced(x):
    return f"<traced {x.dtype}{list(x.shape)}>"
  return np.array2string(np.asarray(x), threshold=12, precision=4)


def _as_float(name: str, value: Any) -> jax.Array:
  """``value`` as a real floating array (ints and bool arrays are cast; a
  Python bool, which is no number here, is refused)."""
  if isinstance(value, (bool, np.bool_)):
    raise _TypeError(
        f"`{name}` must be a real number, got {name}={value!r} (bool).")
  try:
    array = jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise _TypeError(
        f"`{name}` must be an array of real numbers, got {name}={value!r}."
    ) from e
  if array.dtype == jnp.bool_ or jnp.issubdtype(array.dtype, jnp.integer):
    return array.astype(jnp.result_type(float))
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise _TypeError(
        f"`{name}` must be real, got {name}={value!r} of dtype {array.dtype}.")
  return array


def _require(name: str, value: jax.Array, ok: jax.Array, want: str) -> jax.Array:
  """Raises ``ValueError`` if a concrete ``ok`` is false; returns ``ok``."""
  ok = jnp.all(ok)
  if not _traced(ok) and not bool(ok):
    raise ValueError(f"`{name}` must be {want}, got {name}={_show(value)}.")
  return ok


def _require_shape(name: str, value: jax.Array, shape: tuple) -> None:
  if value.shape != shape:
    raise ValueError(
        f"`{name}` must have shape {shape}, got {name}.shape={value.shape}.")


def _nan_unless(ok: jax.Array, tree: Any) -> Any:
  """NaN where ``ok`` is false. A product, not ``jnp.where``: so gradients
  are NaN too (``where`` would give them a plausible 0)."""
  return jax.tree.map(lambda x: x * jnp.where(ok, 1.0, jnp.nan), tree)


def _dim(dim: Any) -> int:
  if isinstance(dim, (bool, np.bool_)) or _traced(dim):
    raise _TypeError(f"`dim` must be an int >= 1, got dim={dim!r}.")
  try:
    number = operator.index(dim)
  except TypeError as e:
    raise _TypeError(f"`dim` must be an int >= 1, got dim={dim!r}.") from e
  if number < 1:
    raise ValueError(f"`dim` must be an int >= 1, got dim={dim!r}.")
  return number


def _sample_shape(shape: Any) -> tuple[int, ...]:
  """An int or a sequence of ints >= 0, as a tuple."""
  items = (shape,) if not isinstance(shape, (tuple, list)) else shape
  try:
    if any(isinstance(s, (bool, np.bool_)) for s in items):
      raise TypeError
    out = tuple(operator.index(s) for s in items)
  except TypeError as e:
    raise _TypeError(
        f"`shape` must be an int or a tuple of ints, got shape={shape!r}."
    ) from e
  if any(s < 0 for s in out):
    raise ValueError(f"`shape` must be >= 0, got shape={shape!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class ExponentialFamily:
  """An exponential family over a flat natural parameter vector.

  ``log_partition`` and ``from_natural`` are wrapped at construction to check
  their argument with :meth:`check_natural` (the unchecked function stays
  available as ``.unchecked``); so are :meth:`mean_params`, :meth:`fisher`,
  :meth:`kl` and :meth:`sample`.

  Attributes:
    name: for display.
    log_partition: :math:`A(\\eta)`, a scalar function of the flat ``eta``.
    sufficient_statistics: :math:`T(\\theta)` as a flat vector.
    sampler: ``(key, eta, shape) -> samples`` with ``shape`` leading axes.
    to_natural: the usual parameters (e.g. ``alpha, beta``) to ``eta``.
    from_natural: ``eta`` to the usual parameters, as a tuple.
    natural_shape: the shape of ``eta``, ``None`` for a free length (at
      least 1); ``None`` skips the shape check.
    natural_domain: ``eta -> bool`` scalar, true inside the domain of
      :math:`A`; ``None`` checks finiteness only.
    domain_text: the domain in words, for error messages.

  Examples:
    >>> import blrax
    >>> family = blrax.expfam.gamma()
    >>> eta = family.to_natural(2.0, 0.5)  # shape alpha = 2, rate beta = 0.5
    >>> print(eta)
    [ 1.  -0.5]
    >>> print(family.mean_params(eta)[1])  # E[x] = alpha / beta
    4.0
  """

  name: str
  log_partition: Callable[[jax.Array], jax.Array]
  sufficient_statistics: Callable[[jax.Array], jax.Array]
  sampler: Callable[..., jax.Array]
  to_natural: Callable[..., jax.Array]
  from_natural: Callable[[jax.Array], tuple]
  natural_shape: tuple[int | None, ...] | None = None
  natural_domain: Callable[[jax.Array], jax.Array] | None = None
  domain_text: str = "finite"

  def __post_init__(self):
    for field in ("log_partition", "from_natural"):
      raw = getattr(getattr(self, field), "unchecked", getattr(self, field))

      def checked(eta, raw=raw):
        eta, ok = _checked(self, eta)
        return _nan_unless(ok, raw(eta))

      checked.unchecked = raw
      checked.__doc__ = raw.__doc__
      object.__setattr__(self, field, checked)

  def check_natural(self, eta: Any, name: str = "eta") -> jax.Array:
    """Checks a natural parameter; returns it as a float array.

    Args:
      eta: the natural parameter.
      name: the argument name for error messages.

    Returns:
      ``eta`` as an array; all NaN if it is traced and outside the domain.

    Raises:
      TypeError: ``eta`` is not real-valued.
      ValueError: ``eta`` has the wrong shape, or is concrete and outside the
        domain (or not finite).
    """
    return _checked(self, eta, name)[0]

  def mean_params(self, eta: jax.Array) -> jax.Array:
    """:math:`\\mu = \\nabla A(\\eta) = E_q[T(\\theta)]`.

    Args:
      eta: the natural parameter (checked as by :meth:`check_natural`).

    Returns:
      The mean parameters, shaped like ``eta``; NaN if ``eta`` is invalid
      (traced).
    """
    eta, ok = _checked(self, eta)
    return _nan_unless(ok, jax.grad(self.log_partition.unchecked)(eta))

  def fisher(self, eta: jax.Array) -> jax.Array:
    """:math:`F(\\eta) = \\nabla^2 A(\\eta)`, the Fisher information.

    Args:
      eta: the natural parameter (checked as by :meth:`check_natural`).

    Returns:
      A ``(k, k)`` matrix for ``eta`` of shape ``(k,)``; NaN if ``eta`` is
      invalid (traced).
    """
    eta, ok = _checked(self, eta)
    return _nan_unless(ok, jax.hessian(self.log_partition.unchecked)(eta))

  def kl(self, eta_q: jax.Array, eta_p: jax.Array) -> jax.Array:
    """:math:`\\mathrm{KL}(q\\|p)`, the Bregman divergence of :math:`A`.

    Args:
      eta_q: the natural parameter of :math:`q`.
      eta_p: the natural parameter of :math:`p`.

    Returns:
      A scalar; NaN if either parameter is invalid (traced). Concrete invalid
      ones raise ``ValueError``.
    """
    eta_q, ok_q = _checked(self, eta_q, "eta_q")
    eta_p, ok_p = _checked(self, eta_p, "eta_p")
    raw = self.log_partition.unchecked
    value = (raw(eta_p) - raw(eta_q)
             - jnp.dot(eta_p - eta_q, jax.grad(raw)(eta_q)))
    return _nan_unless(ok_q & ok_p, value)

  def sample(self, key: Any, eta: jax.Array, shape=()) -> jax.Array:
    """Draws from :math:`q_\\eta`.

    Args:
      key: an int seed, a legacy ``PRNGKey`` or a typed key.
      eta: the natural parameter.
      shape: leading sample axes, an int or a tuple of ints.

    Returns:
      Samples with leading axes ``shape``; NaN if ``eta`` is invalid (traced).
    """
    eta, ok = _checked(self, eta)
    samples = self.sampler(noise.canonicalize_key(key), eta,
                           _sample_shape(shape))
    return _nan_unless(ok, samples)


def _check_shape(family: ExponentialFamily, eta: Any, name: str) -> jax.Array:
  """``eta`` as a float array of ``family.natural_shape``; raises if not."""
  eta = _as_float(name, eta)
  want = family.natural_shape
  if want is not None and (
      eta.ndim != len(want) or eta.size == 0
      or any(w is not None and s != w for s, w in zip(eta.shape, want))):
    text = "(" + ", ".join("k" if w is None else str(w) for w in want) + (
        ",)" if len(want) == 1 else ")")
    raise ValueError(
        f"`{name}` of {family.name} must have shape {text}, got "
        f"{name}.shape={eta.shape}.")
  return eta


def _checked(family: ExponentialFamily, eta: Any, name: str = "eta"):
  """(``eta`` with NaN if invalid, validity); concrete invalid raises."""
  eta = _check_shape(family, eta, name)
  ok = jnp.all(jnp.isfinite(eta))
  if family.natural_domain is not None:
    ok &= family.natural_domain(eta)
  ok = _require(name, eta, ok,
                f"a natural parameter of {family.name} ({family.domain_text})")
  return _nan_unless(ok, eta), ok


def natural_gradient(family: ExponentialFamily, eta: jax.Array,
                     objective: Callable[[jax.Array], jax.Array]) -> jax.Array:
  r""":math:`\nabla_\mu` of ``objective(mu)``, computed as :math:`F^{-1}\nabla_\eta`.

  ``objective`` is a function of the mean parameters (for instance an
  expected log-likelihood in closed form). The pseudo-inverse handles
  over-complete parameterisations such as the full Gaussian's
  :math:`D\times D` block, whose antisymmetric directions carry no curvature.
  ``eta`` is checked as in :meth:`ExponentialFamily.check_natural`.

  Args:
    family: the family of ``eta``.
    eta: the natural parameter at which to differentiate.
    objective: a scalar function of the mean parameters :math:`\mu`.

  Returns:
    :math:`\nabla_\mu` ``objective``, shaped like ``eta``; NaN for an
    invalid traced ``eta``.

  Examples:
    A function linear in :math:`\mu` has its coefficients as natural
    gradient:

    >>> import jax, jax.numpy as jnp, blrax
    >>> family = blrax.expfam.diagonal_gaussian(1)
    >>> eta = family.to_natural(jnp.array([1.0]), jnp.array([0.5]))
    >>> objective = lambda mu: 3.0 * mu[0] - mu[1]
    >>> grad = jax.jit(blrax.expfam.natural_gradient, static_argnums=(0, 2))(
    ...     family, eta, objective)
    >>> print(jnp.round(grad, 4))
    [ 3. -1.]
  """
  if not isinstance(family, ExponentialFamily):
    raise _TypeError(
        f"`family` must be an ExponentialFamily, got family={family!r}.")
  if not callable(objective):
    raise _TypeError(f"`objective` must be a function of mu, got {objective!r}.")
  eta, ok = _checked(family, eta)
  grad_eta = jax.grad(lambda e: objective(family.mean_params(e)))(eta)
  return _nan_unless(
      ok, jnp.linalg.pinv(family.fisher(eta), hermitian=True) @ grad_eta)


def blr_step(family: ExponentialFamily, eta: jax.Array, prior_eta: jax.Array,
             expected_log_lik: Callable[[jax.Array], jax.Array],
             rho: float = 1.0) -> jax.Array:
  r"""One BLR step :math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 +
  \nabla_\mu \mathcal{L}(\mu))`.

  Args:
    family: the posterior family.
    eta: current natural parameter (checked: shape and domain).
    prior_eta: the prior's natural parameter :math:`\eta_0` (same family and
      shape). Only its shape and finiteness are checked: improper priors
      (e.g. a zero Gaussian precision) are allowed.
    expected_log_lik: :math:`\mathcal{L}(\mu) = E_q[\sum_i\log p(y_i|\theta)]`
      as a function of the mean parameters.
    rho: step size, finite and ``>= 0``; ``1`` gives the exact posterior for
      conjugate models. Steps with ``rho > 1`` may leave the domain.

  Returns:
    The new natural parameter; NaN under ``jit`` when ``eta``, ``prior_eta``
    or ``rho`` is invalid (concrete invalid values raise ``ValueError``).

  Examples:
    The mean :math:`\theta` of unit-variance Gaussian data ``y = (1, 2, 3)``
    under a prior :math:`N(0, 1)`. The expected log-likelihood
    :math:`\sum_i (y_i E[\theta] - E[\theta^2]/2)` is linear in
    :math:`\mu = (E[\theta], E[\theta^2])`, so one step with ``rho=1`` is
    Bayes' rule, the posterior :math:`N(1.5, 0.25)`:

    >>> import jax, jax.numpy as jnp, blrax
    >>> family = blrax.expfam.diagonal_gaussian(1)
    >>> prior = family.to_natural(jnp.zeros(1), jnp.ones(1))
    >>> y = jnp.array([1.0, 2.0, 3.0])
    >>> log_lik = lambda mu: jnp.sum(y) * mu[0] - 0.5 * len(y) * mu[1]
    >>> step = jax.jit(
    ...     lambda eta: blrax.expfam.blr_step(family, eta, prior, log_lik))
    >>> mean, var = family.from_natural(step(prior))
    >>> print(jnp.round(mean, 4), jnp.round(var, 4))
    [1.5] [0.25]
  """
  if not isinstance(family, ExponentialFamily):
    raise _TypeError(
        f"`family` must be an ExponentialFamily, got family={family!r}.")
  eta, ok = _checked(family, eta)
  prior_eta = _check_shape(family, prior_eta, "prior_eta")
  if prior_eta.shape != eta.shape:
    raise ValueError(
        f"`prior_eta` must have the shape of eta {eta.shape}, got "
        f"prior_eta.shape={prior_eta.shape}.")
  ok &= _require("prior_eta", prior_eta, jnp.isfinite(prior_eta), "finite")
  rho = _as_float("rho", rho)
  _require_shape("rho", rho, ())
  ok &= _require("rho", rho, jnp.isfinite(rho) & (rho >= 0), "finite and >= 0")
  new = ((1.0 - rho) * eta
         + rho * (prior_eta + natural_gradient(family, eta, expected_log_lik)))
  return _nan_unless(ok, new)


# --- Families ---------------------------------------------------------------


def _positive_scalar(name: str, value: Any) -> tuple[jax.Array, jax.Array]:
  value = _as_float(name, value)
  _require_shape(name, value, ())
  return value, _require(name, value, jnp.isfinite(value) & (value > 0),
                         "finite and > 0")


def _beta_params(eta):
  return eta[0] + 1.0, eta[1] + 1.0


def beta() -> ExponentialFamily:
  """Beta(alpha, beta) on (0, 1): T = (log x, log(1-x)), eta = (alpha-1, beta-1).

  ``eta`` has shape ``(2,)`` and ``eta > -1`` (``alpha, beta > 0``).

  Returns:
    The :class:`ExponentialFamily`; ``to_natural(alpha, beta)`` and
    ``from_natural(eta) -> (alpha, beta)``.

  Examples:
    >>> import blrax
    >>> family = blrax.expfam.beta()
    >>> print(family.to_natural(2.0, 3.0))
    [1. 2.]
  """

  def log_partition(eta):
    a, b = _beta_params(eta)
    return gammaln(a) + gammaln(b) - gammaln(a + b)

  def to_natural(alpha, beta_):
    (alpha, ok_a), (beta_, ok_b) = (_positive_scalar("alpha", alpha),
                                    _positive_scalar("beta", beta_))
    return _nan_unless(ok_a & ok_b, jnp.stack([alpha - 1.0, beta_ - 1.0]))

  return ExponentialFamily(
      name="beta",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.stack([jnp.log(x), jnp.log1p(-x)], -1),
      sampler=lambda key, eta, shape: jax.random.beta(key, *_beta_params(eta),
                                                      shape),
      to_natural=to_natural,
      from_natural=_beta_params,
      natural_shape=(2,),
      natural_domain=lambda eta: jnp.all(eta > -1.0),
      domain_text="alpha = eta[0] + 1 > 0 and beta = eta[1] + 1 > 0",
  )


def gamma() -> ExponentialFamily:
  """Gamma(shape alpha, rate beta): T = (log x, x), eta = (alpha-1, -beta).

  ``eta`` has shape ``(2,)``, ``eta[0] > -1`` and ``eta[1] < 0``.

  Returns:
    The :class:`ExponentialFamily`; ``to_natural(alpha, beta)`` and
    ``from_natural(eta) -> (alpha, beta)``.

  Examples:
    >>> import blrax
    >>> family = blrax.expfam.gamma()
    >>> eta = family.to_natural(2.0, 0.5)
    >>> print(eta, [float(p) for p in family.from_natural(eta)])
    [ 1.  -0.5] [2.0, 0.5]
  """

  def params(eta):
    return eta[0] + 1.0, -eta[1]

  def log_partition(eta):
    a, b = params(eta)
    return gammaln(a) - a * jnp.log(b)

  def sampler(key, eta, shape):
    a, b = params(eta)
    return jax.random.gamma(key, a, shape) / b

  def to_natural(alpha, beta_):
    (alpha, ok_a), (beta_, ok_b) = (_positive_scalar("alpha", alpha),
                                    _positive_scalar("beta", beta_))
    return _nan_unless(ok_a & ok_b, jnp.stack([alpha - 1.0, -beta_]))

  return ExponentialFamily(
      name="gamma",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.stack([jnp.log(x), x], -1),
      sampler=sampler,
      to_natural=to_natural,
      from_natural=params,
      natural_shape=(2,),
      natural_domain=lambda eta: (eta[0] > -1.0) & (eta[1] < 0.0),
      domain_text="shape alpha = eta[0] + 1 > 0 and rate beta = -eta[1] > 0",
  )


def dirichlet() -> ExponentialFamily:
  """Dirichlet(alpha) on the simplex: T = log x, eta = alpha - 1.

  ``eta`` has shape ``(k,)``, ``k >= 1``, and ``eta > -1`` (``alpha > 0``).

  Returns:
    The :class:`ExponentialFamily`; ``to_natural(alpha)`` and
    ``from_natural(eta) -> (alpha,)``.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> family = blrax.expfam.dirichlet()
    >>> print(family.to_natural(jnp.array([1.0, 2.0, 3.0])))
    [0. 1. 2.]
  """

  def log_partition(eta):
    a = eta + 1.0
    return jnp.sum(gammaln(a)) - gammaln(jnp.sum(a))

  def to_natural(alpha):
    alpha = _as_float("alpha", alpha)
    if alpha.ndim != 1 or alpha.size == 0:
      raise ValueError(
          f"`alpha` must have shape (k,) with k >= 1, got alpha.shape={alpha.shape}.")
    ok = _require("alpha", alpha, jnp.isfinite(alpha) & (alpha > 0),
                  "finite and > 0")
    return _nan_unless(ok, alpha - 1.0)

  return ExponentialFamily(
      name="dirichlet",
      log_partition=log_partition,
      sufficient_statistics=jnp.log,
      sampler=lambda key, eta, shape: jax.random.dirichlet(key, eta + 1.0, shape),
      to_natural=to_natural,
      from_natural=lambda eta: (eta + 1.0,),
      natural_shape=(None,),
      natural_domain=lambda eta: jnp.all(eta > -1.0),
      domain_text="alpha = eta + 1 > 0",
  )


def _is_positive_definite(matrix: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(jnp.linalg.cholesky(matrix)))


def gaussian(dim: int) -> ExponentialFamily:
  r"""Full-covariance :math:`N(m, \Sigma)` on :math:`R^D`.

  :math:`T = (x, \mathrm{vec}(xx^\top))`, :math:`\eta = (\Lambda m,
  \mathrm{vec}(-\tfrac12\Lambda))` with :math:`\Lambda = \Sigma^{-1}`; the mean
  parameters are :math:`(m, \mathrm{vec}(\Sigma + mm^\top))`. ``eta`` has
  shape ``(D + D*D,)`` and its symmetrised precision block must be positive
  definite. ``to_natural(mean, cov)`` needs ``mean`` of shape ``(D,)`` and a
  symmetric (to a relative ``sqrt(eps)``) positive definite ``cov``.

  Args:
    dim: :math:`D`, the dimension (an int >= 1).

  Returns:
    The :class:`ExponentialFamily`; ``to_natural(mean, cov)`` and
    ``from_natural(eta) -> (mean, cov)``.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> family = blrax.expfam.gaussian(2)
    >>> eta = family.to_natural(jnp.array([1.0, -1.0]), 2.0 * jnp.eye(2))
    >>> eta.shape
    (6,)
    >>> mean, cov = family.from_natural(eta)
    >>> print(mean)
    [ 1. -1.]
  """
  dim = _dim(dim)

  def split(eta):
    eta2 = eta[dim:].reshape(dim, dim)
    return eta[:dim], 0.5 * (eta2 + eta2.T)

  def log_partition(eta):
    eta1, eta2 = split(eta)
    precision = -2.0 * eta2
    chol = jnp.linalg.cholesky(precision)
    mean = jax.scipy.linalg.cho_solve((chol, True), eta1)
    return 0.5 * jnp.dot(eta1, mean) - jnp.sum(jnp.log(jnp.diag(chol)))

  def from_natural(eta):
    eta1, eta2 = split(eta)
    cov = jnp.linalg.inv(-2.0 * eta2)
    return cov @ eta1, cov

  def to_natural(mean, cov):
    mean, cov = _as_float("mean", mean), _as_float("cov", cov)
    _require_shape("mean", mean, (dim,))
    _require_shape("cov", cov, (dim, dim))
    ok = _require("mean", mean, jnp.isfinite(mean), "finite")
    tol = jnp.sqrt(jnp.finfo(cov.dtype).eps) * jnp.max(jnp.abs(cov))
    ok &= _require("cov", cov, jnp.all(jnp.abs(cov - cov.T) <= tol)
                   & _is_positive_definite(cov),
                   "symmetric positive definite")
    precision = jnp.linalg.inv(cov)
    return _nan_unless(
        ok, jnp.concatenate([precision @ mean, (-0.5 * precision).ravel()]))

  def sampler(key, eta, shape):
    mean, cov = from_natural(eta)
    return jax.random.multivariate_normal(key, mean, cov, shape)

  return ExponentialFamily(
      name=f"gaussian({dim})",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.concatenate(
          [x, jnp.einsum("...i,...j->...ij", x, x).reshape(x.shape[:-1] + (-1,))],
          -1),
      sampler=sampler,
      to_natural=to_natural,
      from_natural=from_natural,
      natural_shape=(dim + dim * dim,),
      natural_domain=lambda eta: _is_positive_definite(-2.0 * split(eta)[1]),
      domain_text="precision -(E + E^T) positive definite, E = "
                  f"eta[{dim}:].reshape({dim}, {dim})",
  )


def diagonal_gaussian(dim: int) -> ExponentialFamily:
  r""":math:`N(m, \mathrm{diag}(v))`: :math:`T = (x, x^2)`,
  :math:`\eta = (m/v, -1/(2v))`, mean parameters :math:`(m, m^2 + v)`.

  ``eta`` has shape ``(2D,)`` with ``eta[D:] < 0``; ``to_natural(mean, var)``
  needs shapes ``(D,)`` and ``var > 0``.

  Args:
    dim: :math:`D`, the dimension (an int >= 1).

  Returns:
    The :class:`ExponentialFamily`; ``to_natural(mean, var)`` and
    ``from_natural(eta) -> (mean, var)``.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> family = blrax.expfam.diagonal_gaussian(2)
    >>> print(family.to_natural(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.5])))
    [ 1.   4.  -0.5 -1. ]
  """
  dim = _dim(dim)

  def split(eta):
    return eta[:dim], eta[dim:]

  def log_partition(eta):
    eta1, eta2 = split(eta)
    return jnp.sum(-eta1**2 / (4.0 * eta2) - 0.5 * jnp.log(-2.0 * eta2))

  def from_natural(eta):
    eta1, eta2 = split(eta)
    var = -0.5 / eta2
    return eta1 * var, var

  def to_natural(mean, var):
    mean, var = _as_float("mean", mean), _as_float("var", var)
    _require_shape("mean", mean, (dim,))
    _require_shape("var", var, (dim,))
    ok = _require("mean", mean, jnp.isfinite(mean), "finite")
    ok &= _require("var", var, jnp.isfinite(var) & (var > 0), "finite and > 0")
    return _nan_unless(ok, jnp.concatenate([mean / var, -0.5 / var]))

  def sampler(key, eta, shape):
    mean, var = from_natural(eta)
    return mean + jnp.sqrt(var) * jax.random.normal(key, shape + (dim,), mean.dtype)

  return ExponentialFamily(
      name=f"diagonal_gaussian({dim})",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.concatenate([x, x**2], -1),
      sampler=sampler,
      to_natural=to_natural,
      from_natural=from_natural,
      natural_shape=(2 * dim,),
      natural_domain=lambda eta: jnp.all(split(eta)[1] < 0.0),
      domain_text=f"eta[{dim}:] = -1/(2 var) < 0",
  )
