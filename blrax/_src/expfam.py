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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln


@dataclasses.dataclass(frozen=True)
class ExponentialFamily:
  """An exponential family over a flat natural parameter vector.

  Attributes:
    name: for display.
    log_partition: :math:`A(\\eta)`, a scalar function of the flat ``eta``.
    sufficient_statistics: :math:`T(\\theta)` as a flat vector.
    sampler: ``(key, eta, shape) -> samples`` with ``shape`` leading axes.
    to_natural: the usual parameters (e.g. ``alpha, beta``) to ``eta``.
    from_natural: ``eta`` to the usual parameters, as a tuple.
  """

  name: str
  log_partition: Callable[[jax.Array], jax.Array]
  sufficient_statistics: Callable[[jax.Array], jax.Array]
  sampler: Callable[..., jax.Array]
  to_natural: Callable[..., jax.Array]
  from_natural: Callable[[jax.Array], tuple]

  def mean_params(self, eta: jax.Array) -> jax.Array:
    """:math:`\\mu = \\nabla A(\\eta) = E_q[T(\\theta)]`."""
    return jax.grad(self.log_partition)(eta)

  def fisher(self, eta: jax.Array) -> jax.Array:
    """:math:`F(\\eta) = \\nabla^2 A(\\eta)`, the Fisher information."""
    return jax.hessian(self.log_partition)(eta)

  def kl(self, eta_q: jax.Array, eta_p: jax.Array) -> jax.Array:
    """:math:`\\mathrm{KL}(q\\|p)`, the Bregman divergence of :math:`A`."""
    return (self.log_partition(eta_p) - self.log_partition(eta_q)
            - jnp.dot(eta_p - eta_q, self.mean_params(eta_q)))

  def sample(self, key: jax.Array, eta: jax.Array, shape=()) -> jax.Array:
    return self.sampler(key, eta, tuple(shape))


def natural_gradient(family: ExponentialFamily, eta: jax.Array,
                     objective: Callable[[jax.Array], jax.Array]) -> jax.Array:
  r""":math:`\nabla_\mu` of ``objective(mu)``, computed as :math:`F^{-1}\nabla_\eta`.

  ``objective`` is a function of the mean parameters (for instance an
  expected log-likelihood in closed form). The pseudo-inverse handles
  over-complete parameterisations such as the full Gaussian's
  :math:`D\times D` block, whose antisymmetric directions carry no curvature.
  """
  grad_eta = jax.grad(lambda e: objective(family.mean_params(e)))(eta)
  return jnp.linalg.pinv(family.fisher(eta), hermitian=True) @ grad_eta


def blr_step(family: ExponentialFamily, eta: jax.Array, prior_eta: jax.Array,
             expected_log_lik: Callable[[jax.Array], jax.Array],
             rho: float = 1.0) -> jax.Array:
  r"""One BLR step :math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 +
  \nabla_\mu \mathcal{L}(\mu))`.

  Args:
    family: the posterior family.
    eta: current natural parameter.
    prior_eta: the prior's natural parameter :math:`\eta_0` (same family).
    expected_log_lik: :math:`\mathcal{L}(\mu) = E_q[\sum_i\log p(y_i|\theta)]`
      as a function of the mean parameters.
    rho: step size; ``1`` gives the exact posterior for conjugate models.

  Returns:
    The new natural parameter.
  """
  return ((1.0 - rho) * eta
          + rho * (prior_eta + natural_gradient(family, eta, expected_log_lik)))


# --- Families ---------------------------------------------------------------


def _beta_params(eta):
  return eta[0] + 1.0, eta[1] + 1.0


def beta() -> ExponentialFamily:
  """Beta(alpha, beta) on (0, 1): T = (log x, log(1-x)), eta = (alpha-1, beta-1)."""

  def log_partition(eta):
    a, b = _beta_params(eta)
    return gammaln(a) + gammaln(b) - gammaln(a + b)

  return ExponentialFamily(
      name="beta",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.stack([jnp.log(x), jnp.log1p(-x)], -1),
      sampler=lambda key, eta, shape: jax.random.beta(key, *_beta_params(eta),
                                                      shape),
      to_natural=lambda a, b: jnp.stack([jnp.asarray(a) - 1.0,
                                         jnp.asarray(b) - 1.0]),
      from_natural=_beta_params,
  )


def gamma() -> ExponentialFamily:
  """Gamma(shape alpha, rate beta): T = (log x, x), eta = (alpha-1, -beta)."""

  def params(eta):
    return eta[0] + 1.0, -eta[1]

  def log_partition(eta):
    a, b = params(eta)
    return gammaln(a) - a * jnp.log(b)

  def sampler(key, eta, shape):
    a, b = params(eta)
    return jax.random.gamma(key, a, shape) / b

  return ExponentialFamily(
      name="gamma",
      log_partition=log_partition,
      sufficient_statistics=lambda x: jnp.stack([jnp.log(x), x], -1),
      sampler=sampler,
      to_natural=lambda a, b: jnp.stack([jnp.asarray(a) - 1.0, -jnp.asarray(b)]),
      from_natural=params,
  )


def dirichlet() -> ExponentialFamily:
  """Dirichlet(alpha) on the simplex: T = log x, eta = alpha - 1."""

  def log_partition(eta):
    a = eta + 1.0
    return jnp.sum(gammaln(a)) - gammaln(jnp.sum(a))

  return ExponentialFamily(
      name="dirichlet",
      log_partition=log_partition,
      sufficient_statistics=jnp.log,
      sampler=lambda key, eta, shape: jax.random.dirichlet(key, eta + 1.0, shape),
      to_natural=lambda alpha: jnp.asarray(alpha) - 1.0,
      from_natural=lambda eta: (eta + 1.0,),
  )


def gaussian(dim: int) -> ExponentialFamily:
  r"""Full-covariance :math:`N(m, \Sigma)` on :math:`R^D`.

  :math:`T = (x, \mathrm{vec}(xx^\top))`, :math:`\eta = (\Lambda m,
  \mathrm{vec}(-\tfrac12\Lambda))` with :math:`\Lambda = \Sigma^{-1}`; the mean
  parameters are :math:`(m, \mathrm{vec}(\Sigma + mm^\top))`.
  """

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
    precision = jnp.linalg.inv(cov)
    return jnp.concatenate([precision @ mean, (-0.5 * precision).ravel()])

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
  )


def diagonal_gaussian(dim: int) -> ExponentialFamily:
  r""":math:`N(m, \mathrm{diag}(v))`: :math:`T = (x, x^2)`,
  :math:`\eta = (m/v, -1/(2v))`, mean parameters :math:`(m, m^2 + v)`."""

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
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    return jnp.concatenate([mean / var, -0.5 / var])

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
  )
