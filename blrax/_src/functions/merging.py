r"""Bayes' rule as arithmetic on Gaussian posteriors: merging and carrying over.

For Gaussians, Bayes' rule adds natural parameters. A posterior
:math:`q_k = N(m_k, \Lambda_k^{-1})` trained on data :math:`D_k` from a prior
:math:`N(m_{0k}, \Lambda_{0k}^{-1})` is, in natural parameters, the prior plus
the (Gaussian approximation of the) likelihood of :math:`D_k`:

.. math::

  \Lambda_k = \Lambda_{0k} + \Lambda^{\mathrm{lik}}_k, \qquad
  \Lambda_k m_k = \Lambda_{0k} m_{0k} + b^{\mathrm{lik}}_k .

So the likelihood of each shard is its posterior minus its prior, and

- **merging** posteriors trained separately on shards is a prior plus the
  shards' likelihoods (:func:`merge_posteriors`);
- **continual learning** uses one task's posterior as the next one's prior
  (:func:`posterior_as_prior`).

Both are exact for conjugate models (linear regression with a Gaussian
likelihood, whose likelihood is exactly Gaussian), and the variational
approximations of the Bayesian Learning Rule otherwise.

In blrax units a posterior has precision :math:`\Lambda = \lambda(h+\delta)`
(``ess`` :math:`\lambda`, curvature :math:`h`, weight decay :math:`\delta`):
its prior precision is :math:`\lambda\delta` and its likelihood precision
:math:`\lambda h`, so :math:`h` is the curvature *per example*.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blrax._src import base, validation
from blrax._src.functions import lookup
from blrax._src.posteriors import diagonal as gaussian
from blrax._src.posteriors import merge_rules


def _hole(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_posterior(x: Any) -> bool:
  return base.is_posterior(x)


def _covered(params: Any, posterior: Any) -> Any:
  """The params leaves a posterior covers (holes elsewhere)."""
  shapes = jax.eval_shape(posterior.stddev)
  return jax.tree.map(lambda s, p: optax.MaskedNode() if _hole(s) else p,
                      shapes, params, is_leaf=_hole)


def _check_finite_ess(posteriors: Sequence[Any]) -> None:
  for k, p in enumerate(posteriors):
    ess = validation.concrete_float(p.ess)
    if ess is not None and not (math.isfinite(ess) and ess > 0):
      raise ValueError(
          f"`opt_states[{k}]` has ess={ess}: a posterior to combine needs a "
          "finite ess > 0 (ess=inf is a point mass, no precision to add).")


def _check_prior(name: str, value: Any, like: Any, *,
                 nonnegative: bool) -> Any:
  """A scalar or a tree like ``like`` of finite (non-negative) numbers."""
  if merge_rules.is_scalar(value):
    if nonnegative:
      validation.check_state_scale(name, value)
    else:
      validation.check_range(name, value)
    return gaussian.scalar(value)
  if jax.tree.structure(value) != jax.tree.structure(like):
    raise ValueError(
        f"`{name}` must be a scalar or a pytree like the params, got "
        f"{name}={value!r}.")
  for leaf, ref in zip(jax.tree.leaves(value), jax.tree.leaves(like)):
    if np.shape(leaf) not in ((), np.shape(ref)):
      raise ValueError(f"`{name}` leaf has shape {np.shape(leaf)}, expected "
                       f"{np.shape(ref)} or ().")
    if validation.is_traced(leaf):
      continue
    array = np.asarray(leaf)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
      raise ValueError(f"`{name}` must be real, got {name}={value!r}.")
    if not np.all(np.isfinite(array)) or (nonnegative and np.any(array < 0)):
      raise ValueError(
          f"`{name}` must be finite{' and >= 0' if nonnegative else ''}, got "
          f"{name}={value!r}.")
  return value


def merge_posteriors(
    params_list: Sequence[Any],
    opt_states: Sequence[Any],
    *,
    prior_precision: Any | None = None,
    prior_mean: Any | None = None,
) -> tuple[Any, Any]:
  r"""Merges posteriors trained separately on K data shards: Bayes' rule.

  Shard :math:`k` was trained from a prior :math:`N(m_0, \Lambda_0^{-1})`
  to a Gaussian posterior :math:`N(m_k, \Lambda_k^{-1})` with
  :math:`\Lambda_k = \lambda_k(h_k + \delta_k)` (its ``ess``
  :math:`\lambda_k = N_k`, the shard size). Since each posterior is the prior
  times the shard's likelihood, the posterior of all the data adds natural
  parameters, counting the prior once:

  .. math::

    \Lambda &= \sum_k \Lambda_k - (K-1)\Lambda_0
             = \Lambda_0 + \textstyle\sum_k \lambda_k h_k, \\
    m &= \Lambda^{-1}\Big(\sum_k \Lambda_k m_k - (K-1)\Lambda_0 m_0\Big).

  (Elementwise for :class:`blrax.DiagonalGaussian`, with matrices
  :math:`\Lambda_k = \lambda_k(S_k + \mathrm{diag}(\delta_k))` for
  :class:`blrax.FullGaussian`, whose prior is diagonal.) More generally
  each shard's own prior :math:`\lambda_k\delta_k` (and prior mean, if its
  state keeps one) is divided out and the merged prior :math:`\Lambda_0` is
  multiplied in once, so shards trained under different priors merge
  exactly too when ``prior_precision`` is given.

  **The merged state.** It represents :math:`N = \sum_k N_k` examples:

  .. math::

    \lambda = \sum_k \lambda_k, \qquad
    \delta = \Lambda_0 / \lambda, \qquad
    h = \sum_k \tfrac{\lambda_k}{\lambda}\, h_k ,

  so :math:`\lambda(h + \delta) = \Lambda` (the right :math:`\sigma`), the
  curvature stays a per-example average (the ess-weighted mean of the
  shards'), and the prior is unchanged. It is what joint training with
  ``ess=N`` and ``weight_decay=Λ0/N`` aims at: continue training it with an
  optimizer built with those values.

  Exact for Bayesian linear regression (a quadratic loss, trained to
  convergence with the exact Hessian, or closed-form shard posteriors; for a
  diagonal posterior, with a diagonal Hessian). For other models each shard's
  Gaussian is an approximation of its likelihood, and the merge is the
  product of those approximations.

  Args:
    params_list: the K posterior means (params), pytrees of one structure.
    opt_states: the K optimizer states (same optimizer, same structure), each
      holding the posterior(s) found by :func:`blrax.find_posteriors`.
      Several posteriors in one state (``optax.partition``) merge one by one.
    prior_precision: :math:`\Lambda_0`, the prior precision of the merged
      posterior (a scalar, or a pytree like the params for posteriors whose
      weight decay is per element: a diagonal :math:`\Lambda_0`, also for
      :class:`blrax.FullGaussian`). Default: the shards' common prior
      precision :math:`\lambda_k\delta_k`; a ``ValueError`` if they differ.
    prior_mean: :math:`m_0`, a pytree like the params. Default: the shards'
      common prior mean (zero unless their states keep one).

  Returns:
    ``(params, opt_state)``: the merged mean :math:`m`, and a copy of
    ``opt_states[0]`` (an ``nnx.Optimizer`` state unwrapped to a plain optax
    state) whose posteriors are the merged ones, so
    :func:`blrax.posterior_stddev`, :func:`blrax.sample_params` and
    :func:`blrax.sample_posterior` work on it. The rest of that state (step
    count, momentum, PRNG key) is shard 0's. Params that no posterior covers
    (frozen by a mask) are averaged over the shards (int leaves: shard 0's).

  Raises:
    ValueError: if the lists are empty or of different lengths, the states
      differ in structure or posterior types, a shard has ``ess`` = inf, the
      shards' priors differ and ``prior_precision`` is not given, a
      ``prior_precision`` varies within a leaf whose state keeps one scalar
      weight decay, or (full covariance) the merged precision is not
      positive definite.

  Examples:
    Two shards, each with prior precision 2 and likelihood precision
    ``ess * h``: precisions add, the prior counted once.

    >>> import jax.numpy as jnp, blrax
    >>> opt = lambda n: blrax.ivon(0.1, ess=n, hess_init=1.0,
    ...                            weight_decay=2.0 / n)
    >>> s1 = opt(10.0).init(jnp.zeros(1))   # precision 10 * (1 + 0.2) = 12
    >>> s2 = opt(30.0).init(jnp.zeros(1))   # precision 30 * (1 + 2/30) = 32
    >>> params, state = blrax.merge_posteriors(
    ...     [jnp.array([1.0]), jnp.array([3.0])], [s1, s2])
    >>> print(round(float(params[0]), 4))  # (12 * 1 + 32 * 3) / (12 + 32 - 2)
    2.5714
    >>> sigma = float(blrax.posterior_stddev(state)[0])
    >>> print(round(sigma ** -2, 3))  # precision 12 + 32 - 2
    42.0
    >>> post = blrax.find_posteriors(state)[0]
    >>> print(post.ess, post.weight_decay, post.curvature)  # N, L0/N, mean h
    40.0 0.05 [1.]

  References:
    Tresp, `A Bayesian Committee Machine
    <https://doi.org/10.1162/089976600300014908>`_, Neural Computation 2000.
    Khan & Rue, `The Bayesian Learning Rule
    <https://arxiv.org/abs/2107.04562>`_, JMLR 2023.
    Daheim et al., `Model Merging by Uncertainty-Based Gradient Matching
    <https://arxiv.org/abs/2310.12808>`_, ICLR 2024.
  """
  params_list, opt_states = list(params_list), list(opt_states)
  if not params_list or len(params_list) != len(opt_states):
    raise ValueError(
        "`params_list` and `opt_states` must be non-empty lists of one "
        f"length, got {len(params_list)} params and {len(opt_states)} states.")
  opt_states = [base.unwrap_nnx(s) for s in opt_states]
  found = [lookup.find_posteriors(s) for s in opt_states]
  params_def = jax.tree.structure(params_list[0])
  for k, (params, posts) in enumerate(zip(params_list, found)):
    if jax.tree.structure(params) != params_def:
      raise ValueError(
          f"`params_list[{k}]` has structure {jax.tree.structure(params)}, "
          f"`params_list[0]` has {params_def}.")
    if [type(p) for p in posts] != [type(p) for p in found[0]]:
      raise ValueError(
          f"`opt_states[{k}]` holds posteriors "
          f"{[type(p).__name__ for p in posts]}, `opt_states[0]` holds "
          f"{[type(p).__name__ for p in found[0]]}.")
    try:
      lookup.check_covers(params, posts)
    except ValueError as error:
      raise ValueError(f"`params_list[{k}]` and `opt_states[{k}]`: {error}") \
          from None
  state_def = jax.tree.structure(opt_states[0], is_leaf=_is_posterior)
  for k, state in enumerate(opt_states):
    if jax.tree.structure(state, is_leaf=_is_posterior) != state_def:
      raise ValueError(f"`opt_states[{k}]` has another structure than "
                       "`opt_states[0]` (merge states of one optimizer).")

  if prior_precision is not None:
    prior_precision = _check_prior("prior_precision", prior_precision,
                                   params_list[0], nonnegative=True)
  if prior_mean is not None:
    prior_mean = _check_prior("prior_mean", prior_mean, params_list[0],
                              nonnegative=False)

  merged_means, merged_posteriors = [], []
  for j in range(len(found[0])):
    posts = [f[j] for f in found]
    _check_finite_ess(posts)
    shapes = jax.eval_shape(posts[0].stddev)
    for k, post in enumerate(posts[1:], start=1):
      if jax.eval_shape(post.stddev) != shapes:
        raise ValueError(f"`opt_states[{k}]` has a posterior of other shapes "
                         "than `opt_states[0]`.")
    covered = [_covered(p, posts[0]) for p in params_list]
    restrict = lambda tree: tree if tree is None or merge_rules.is_scalar(tree) else (  # noqa: E731
        _covered(tree, posts[0]))
    mean, posterior = type(posts[0]).merge(posts, covered,
                                           restrict(prior_precision),
                                           restrict(prior_mean))
    merged_means.append(mean)
    merged_posteriors.append(posterior)

  def fill(*leaves):
    first = jnp.asarray(leaves[0])
    if not gaussian.is_trainable(first):
      return first
    return sum(jnp.asarray(x) for x in leaves) / len(leaves)

  averaged = jax.tree.map(fill, *params_list)
  params = lookup.merge_covering(
      params_list[0], merged_means, lambda p: None)
  params = jax.tree.map(
      lambda p, m, a: a if m is None else jnp.asarray(m).astype(
          jnp.result_type(p)), params_list[0], params, averaged,
      is_leaf=lambda x: x is None)
  remaining = iter(merged_posteriors)
  state = jax.tree.map(lambda x: next(remaining) if _is_posterior(x) else x,
                       opt_states[0], is_leaf=_is_posterior)
  return params, state


def posterior_as_prior(
    params: Any, opt_state: Any, ess: jax.typing.ArrayLike
) -> tuple[Any, Any]:
  r"""The next task's prior from this task's posterior (continual learning).

  A diagonal posterior :math:`N(m, 1/(\lambda(h+\delta)))` trained with
  ``ess`` :math:`\lambda` becomes the prior of an optimizer with ``ess``
  :math:`\lambda'` (the next task's size). blrax writes a prior as
  ``prior_mean`` :math:`m_0` and ``weight_decay`` :math:`\delta'` with
  prior precision :math:`\lambda'\delta'`, so

  .. math::

    m_0 = m, \qquad \delta' = \frac{\lambda\,(h + \delta)}{\lambda'}
    \quad\text{(per element)},

  and the next posterior has precision :math:`\lambda'(h' + \delta') =
  \lambda' h' + \lambda(h+\delta)`: the precisions of the tasks add, as in
  Bayes' rule (variational continual learning, Nguyen et al. 2018). Exact in
  sequence for conjugate models (linear regression with a diagonal Hessian);
  for others, each step keeps the Gaussian approximation of the tasks so far.

  Args:
    params: the posterior mean :math:`m` (the trained params).
    opt_state: the state of a blrax optimizer with a diagonal posterior
      (:class:`blrax.DiagonalGaussian`), possibly nested in wrappers.
    ess: :math:`\lambda'`, the ``ess`` the next task's optimizer will use.

  Returns:
    ``(prior_mean, weight_decay)``: pytrees like ``params``, to pass as
    ``prior_mean=`` and ``weight_decay=`` to the next task's
    :func:`blrax.ivon` (or ``von``, ``vadam``, ``vogn``). Params outside
    every posterior (masked out) get their own value as the mean and weight
    decay 0 (no prior information); so do int leaves.

  Raises:
    ValueError: if ``ess`` is not a finite number > 0, the posterior is a
      :class:`blrax.FullGaussian` (a diagonal optimizer cannot take its
      full precision as a prior), or its ess is infinite (a point mass).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> opt = blrax.ivon(0.1, ess=100.0, hess_init=3.0, weight_decay=1.0)
    >>> params = jnp.array([0.5, -1.0])
    >>> mean, decay = blrax.posterior_as_prior(params, opt.init(params),
    ...                                        ess=50.0)
    >>> print(mean, decay)  # 100 * (3 + 1) / 50
    [ 0.5 -1. ] [8. 8.]

  References:
    Nguyen, Li, Bui & Turner, `Variational Continual Learning
    <https://arxiv.org/abs/1710.10628>`_, ICLR 2018.
    Khan & Rue, `The Bayesian Learning Rule
    <https://arxiv.org/abs/2107.04562>`_, JMLR 2023.
  """
  validation.check_state_scale("ess", ess, positive=True)
  posteriors = lookup.find_posteriors(opt_state)
  lookup.check_covers(params, posteriors)
  decays = []
  for posterior in posteriors:
    if not isinstance(posterior, gaussian.DiagonalGaussian):
      raise ValueError(
          f"`opt_state` holds a {type(posterior).__name__} posterior: "
          "posterior_as_prior makes a diagonal prior (prior_mean, "
          "per-element weight_decay), and this posterior's precision is not "
          "diagonal (a full covariance's ess * (S + diag(weight_decay)) has "
          "off-diagonal terms a prior cannot hold); train with a diagonal "
          "optimizer, or build the prior by hand.")
    _check_finite_ess([posterior])
    wd = merge_rules.leafwise(posterior.weight_decay, posterior.curvature)
    decays.append(jax.tree.map(
        lambda h, d, p=posterior: p.ess * (h + d) / ess, posterior.curvature,
        wd))
  decay = lookup.merge_covering(params, decays, lambda p: None)

  def leaf(p, d):
    p = jnp.asarray(p)
    if d is None or not gaussian.is_trainable(p):
      return jnp.zeros(p.shape, gaussian.state_dtype(
          p.dtype if gaussian.is_trainable(p) else jnp.float32))
    return d

  decay = jax.tree.map(leaf, params, decay, is_leaf=lambda x: x is None)
  mean = jax.tree.map(jnp.asarray, params)
  return mean, decay
