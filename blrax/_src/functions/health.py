r"""Posterior health: is the posterior the data's, the prior's, or still its init?

Every blrax posterior has precision :math:`\lambda(h_t + \delta)`, and after
:math:`t` updates the curvature EMA still carries the decayed initial value,

.. math::

  h_t = \underbrace{h_0 w_t}_{\text{initialisation}}
        + \underbrace{(h_t - h_0 w_t)}_{\text{data}}, \qquad
  w_t = \prod_{s \le t} (1 - \rho_s),

with :math:`w_t = \beta_2^t` for a constant step :math:`\rho = 1-\beta_2`
and :math:`w_t = n_0/(n_0+t)` while ``hess_init_steps`` :math:`= n_0` makes
the curvature a running mean
(the data part includes IVON's positivity correction). With a constant step,
``b2`` close to 1 and a run shorter than :math:`1/(1-\beta_2)` steps the first
term dominates and :math:`\sigma \approx 1/\sqrt{\lambda h_0 \beta_2^t}`
measures ``hess_init``,
not the data; with a large ``weight_decay`` :math:`\delta` dominates and
:math:`\sigma \approx 1/\sqrt{\lambda\delta}` is the prior. :func:`posterior_health`
measures both shares per leaf and says in words what to change.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings as warnings_lib
from typing import Any

import jax
import numpy as np
import optax

from blrax._src import base, validation
from blrax._src.engine import estimators as curvature
from blrax._src.functions import lookup
from blrax._src.posteriors import diagonal as gaussian

_FIELDS = ("init_share", "data_share", "prior_share", "data_curvature",
           "stddev", "relative_stddev")


@dataclasses.dataclass(frozen=True)
class PosteriorHealth:
  """What :func:`posterior_health` found.

  Attributes:
    steps: updates so far, :math:`t`.
    leaves: per params leaf (``"path/to/leaf"``), medians over its entries:
      ``init_share`` (:math:`\\min(1, h_0 w_t / h)`), ``data_share``
      (:math:`1 -` ``init_share`` where :math:`h > 0`), ``prior_share``
      (:math:`\\min(1, \\delta/(h+\\delta))`), ``data_curvature``
      (:math:`\\max(0, h - h_0 w_t)`), ``stddev`` (:math:`\\sigma`) and
      ``relative_stddev`` (:math:`\\sigma/|m|`).
    overall: the same medians over every entry of every leaf.
    warnings: plain-language findings, each with what to change; empty when
      the posterior is set by the data.

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.ones(2)}
    >>> state = blrax.ivon(0.1, ess=10.0).init(params)
    >>> health = blrax.posterior_health(params, state, hess_init=1.0,
    ...                                 b2=0.99999, warn=False)
    >>> health.steps, health.ok
    (0, False)
  """

  steps: int
  leaves: dict[str, dict[str, float]]
  overall: dict[str, float]
  warnings: tuple[str, ...]

  @property
  def ok(self) -> bool:
    """True when there is nothing to warn about."""
    return not self.warnings

  def __str__(self) -> str:
    names = _FIELDS
    width = max([len(k) for k in self.leaves] + [7])
    lines = [f"posterior health after {self.steps} steps (medians)",
             f"{'leaf':<{width}}  " + "  ".join(f"{n:>15}" for n in names)]
    for name, row in [*self.leaves.items(), ("overall", self.overall)]:
      lines.append(f"{name:<{width}}  "
                   + "  ".join(f"{row[n]:>15.4g}" for n in names))
    lines += [f"! {w}" for w in self.warnings] or ["ok: the data set the curvature."]
    return "\n".join(lines)


def _pure(params: Any, opt_state: Any) -> tuple[Any, Any]:
  """NNX inputs (a model or its state, an ``nnx.Optimizer``) as pure trees."""
  if "flax.nnx" not in sys.modules:  # Only loaded if the caller uses flax.
    return params, opt_state
  from blrax._src.integrations import flax_nnx as flax_integration
  return flax_integration.trained_arrays(params, opt_state)


def _owners(opt_state: Any) -> list[tuple[int, Any]]:
  """(step count, posterior) for every posterior, from its optimizer state."""
  states = base.find(base.unwrap_nnx(opt_state), base.is_posterior_state)
  if not states:
    lookup.find_posteriors(opt_state)  # Raises the usual "no posterior" error.
    raise ValueError("`opt_state` holds a blrax posterior but not the blrax "
                     "optimizer state around it (with its step count).")
  if any(validation.is_traced(s.count) for s in states):
    raise ValueError("posterior_health reads concrete values and returns "
                     "Python numbers: call it outside jax.jit (on the state a "
                     "jitted step returned).")
  return [(int(s.count), s.posterior) for s in states]


def _median(x: np.ndarray) -> float:
  return float(np.median(x)) if x.size else float("nan")


def posterior_health(params: Any, opt_state: Any, *, hess_init: float,
                     b2: float, hess_init_steps: float | None = None,
                     warn: bool = True,
                     share_threshold: float = 0.5) -> PosteriorHealth:
  r"""How much of the posterior is data, prior and initialisation, per leaf.

  For each params leaf (medians over its entries), with :math:`t` the step
  count, :math:`h` the curvature, :math:`\delta` the weight decay and
  :math:`m` the mean:

  - ``init_share`` :math:`= \min(1, h_0 w_t/h)`, the part of the
    curvature that is the decayed ``hess_init``, with :math:`w_t =
    \beta_2^t` (``hess_init_steps=None``) or :math:`\prod_{s\le t}
    (1-\rho_s)`, :math:`\rho_s = \max(1-\beta_2, 1/(n_0+s))`;
  - ``data_share`` :math:`= 1 -` ``init_share``, the data's part;
  - ``prior_share`` :math:`= \min(1, \delta/(h+\delta))`, the prior's part
    of the precision (all of it where :math:`h < 0`);
  - ``data_curvature`` :math:`= \max(0, h - h_0 w_t)`;
  - ``stddev`` :math:`\sigma` and ``relative_stddev`` :math:`\sigma/|m|`.

  It warns (and lists in ``.warnings``) when, over all entries, the median
  ``init_share`` or ``prior_share`` exceeds ``share_threshold`` (the
  posterior is still the initialisation, or the prior), or the median
  ``relative_stddev`` exceeds 1 (draws are mostly noise), each with what to
  change (``b2``, ``hess_init``, ``weight_decay``, ``ess``). Pass the
  ``hess_init``, ``b2`` and ``hess_init_steps`` the optimizer was built with
  (the state keeps none of them); for a full covariance the diagonal of
  :math:`S` is used.

  Args:
    params: the posterior mean (the params being trained).
    opt_state: the state of a blrax optimizer, possibly nested in wrappers,
      or an ``nnx.Optimizer`` (then ``params`` may be the NNX model or its
      state).
    hess_init: the optimizer's ``hess_init`` (:math:`h_0 \ge 0`).
    b2: the optimizer's ``b2`` (in ``[0, 1]``).
    hess_init_steps: the optimizer's ``hess_init_steps`` (None: a constant
      curvature step, as the reference IVON).
    warn: also emit each finding as a ``UserWarning``.
    share_threshold: in ``(0, 1)``; a median share above it is reported.

  Returns:
    A :class:`PosteriorHealth`; ``print`` it for a table.

  Raises:
    ValueError: for a bad ``hess_init``, ``b2`` or ``share_threshold``, params
      that do not match the state, a state with no blrax posterior, or a
      call under ``jax.jit`` (the report is host-side: call it outside).

  Examples:
    >>> import jax.numpy as jnp, blrax
    >>> params = {"w": jnp.ones(3)}
    >>> opt = blrax.ivon(0.1, ess=100.0, hess_init=1.0, b2=0.99999)
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   grads = 2 * blrax.sample_params(params, state)["w"]
    ...   updates, state = opt.update({"w": grads}, state, params)
    >>> health = blrax.posterior_health(params, state, hess_init=1.0,
    ...                                 b2=0.99999, warn=False)
    >>> health.ok, round(health.overall["init_share"], 2)
    (False, 1.0)
    >>> print(health.warnings[0][:42])
    The posterior is still its initialisation:
  """
  validation.check_nonnegative("hess_init", hess_init)
  validation.check_range("b2", b2, low=0.0, high=1.0)
  validation.check_flag("warn", warn)
  validation.check_range("share_threshold", share_threshold, low=0.0,
                         high=1.0, low_open=True, high_open=True)
  if hess_init_steps is not None:
    validation.check_nonnegative("hess_init_steps", hess_init_steps)
  h0, beta = float(hess_init), float(b2)
  params, opt_state = _pure(params, opt_state)
  owners = _owners(opt_state)
  lookup.check_covers(params, [p for _, p in owners])
  steps = max(t for t, _ in owners)
  leaves: dict[str, dict[str, float]] = {}
  pooled: dict[str, list[np.ndarray]] = {}
  ess_values, decay_values, magnitudes = [], [], []
  for index, (t, posterior) in enumerate(owners):
    prefix = "" if index == 0 else f"posterior{index}/"
    decayed = h0 * curvature.init_share(beta, t, hess_init_steps)
    ess_values.append(float(posterior.ess))
    diagonal = posterior.curvature_diagonal()
    # Per-leaf prior precisions (weight_decay as a pytree or a mask).
    decays = posterior.decays()
    flat = jax.tree_util.tree_flatten_with_path(
        (diagonal, posterior.stddev(), params, decays),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    count = len(flat) // 4
    for (path, h), (_, sigma), (_, mean), (_, delta) in zip(
        flat[:count], flat[count:2 * count], flat[2 * count:3 * count],
        flat[3 * count:]):
      if (isinstance(h, optax.MaskedNode) or np.size(h) == 0
          or not gaussian.is_trainable(mean)):  # int leaves: no posterior
        continue
      h = np.asarray(h, np.float64).ravel()
      delta = np.broadcast_to(np.asarray(delta, np.float64), np.shape(
          np.asarray(sigma))).ravel()
      decay_values.append(float(np.median(delta)))
      sigma = np.asarray(sigma, np.float64).ravel()
      mean = np.abs(np.asarray(mean, np.float64).ravel())
      with np.errstate(divide="ignore", invalid="ignore"):
        stats = {
            "init_share": np.where(h > 0, np.minimum(1.0, decayed / h),
                                   1.0 if decayed > 0 else 0.0),
            "data_share": np.where(h > 0, 1.0 - np.minimum(1.0, decayed / h),
                                   0.0),
            # h < 0 (a concave direction) leaves the prior all of h + delta.
            "prior_share": np.where(h + delta > 0, np.minimum(
                1.0, delta / (h + delta)), 0.0),
            "data_curvature": np.maximum(h - decayed, 0.0),
            "stddev": sigma,
            "relative_stddev": np.where(mean > 0, sigma / mean, np.inf),
        }
      name = prefix + (jax.tree_util.keystr(path[1:], simple=True,
                                            separator="/") or "params")
      leaves[name] = {k: _median(v) for k, v in stats.items()}
      for k, v in stats.items():
        pooled.setdefault(k, []).append(v)
      magnitudes.append(mean)
  overall = {k: _median(np.concatenate(pooled[k])) if k in pooled
             else float("nan") for k in _FIELDS}
  ess, delta = max(ess_values), max(decay_values, default=0.0)

  width = lambda precision: (1 / math.sqrt(precision) if precision > 0
                             else float("inf"))
  found = []
  if steps == 0:
    found.append("No update yet: the posterior is its initialisation "
                 "(sigma = 1/sqrt(ess*(hess_init+weight_decay)) = "
                 f"{width(ess * (h0 + delta)):.3g}).")
  elif overall["init_share"] > share_threshold:
    weight = curvature.init_share(beta, steps, hess_init_steps)
    if hess_init_steps is None:
      suggested = max(1.0 - 10.0 / steps, 0.9)  # b2^t = e^-10 where t allows
      remedy = (f"Lower b2 so that 1/(1-b2) is well below the number of steps "
                f"(e.g. b2 = {suggested:.4g} for {steps} steps), or pass "
                "hess_init_steps (hess_init then weighs as that many steps of "
                "data), or train longer")
    else:
      remedy = (f"Lower hess_init_steps (now {float(hess_init_steps):g}) "
                "well below the number of steps, or train longer")
    message = (
        f"The posterior is still its initialisation: after {steps} steps "
        f"hess_init*w_t = {h0 * weight:.3g} is {overall['init_share']:.0%}"
        " of the curvature (median over all weights), so sigma ~ "
        "1/sqrt(ess*hess_init*w_t) measures hess_init, not the data. "
        f"{remedy}; a smaller hess_init also lets the data show sooner.")
    # The data's part of h so far weighs 1 - w_t: debiased, it is the
    # curvature the data alone would give.
    data_alone = (overall["data_curvature"] / (1.0 - weight) if weight < 1.0
                  else 0.0)
    data_width = width(ess * (data_alone + delta))
    magnitude = _median(np.concatenate(magnitudes)) if magnitudes else 0.0
    if math.isinf(ess):
      message += (" (ess = inf: this state is a point mass, e.g. a "
                  "temperature of 0 from calibrate_posterior; pass the "
                  "trained state to see the data's width.)")
    elif weight < 1.0:
      message += (f" The data's curvature alone (median "
                  f"{data_alone:.3g}, debiased) would give sigma ~ "
                  f"{data_width:.3g}")
      if data_width > magnitude:
        # Measured in docs/posterior.md: such a run trains under noise
        # larger than the weights, and small data sets stop learning.
        message += (
            f", wider than the weights (median |mean| {magnitude:.3g}): "
            "the data constrain most weights too little for that posterior "
            "to predict well, and training under its noise can fail on "
            "small data sets. Keeping hess_init as the prior and fitting "
            "the temperature on held-out data (calibrate_posterior) is the "
            "alternative")
      message += "."
    found.append(message)
  if steps and overall["prior_share"] > share_threshold:
    found.append(
        f"The prior dominates: weight_decay = {delta:.3g} is "
        f"{overall['prior_share']:.0%} of the precision h + weight_decay "
        "(median), so sigma ~ 1/sqrt(ess*weight_decay) = "
        f"{width(ess * delta):.3g}"
        " is the prior's width. Lower weight_decay if the data should set the"
        " posterior (or raise ess, if the data set is larger than ess says).")
  if steps and overall["relative_stddev"] > 1.0:
    found.append(
        f"The posterior is wider than the weights: median sigma/|mean| = "
        f"{overall['relative_stddev']:.3g}, so draws are mostly noise. Raise "
        f"ess (now {ess:.3g}; a colder posterior) or check hess_init and b2 "
        "(above).")
  if warn:
    for message in found:
      warnings_lib.warn(message, UserWarning, stacklevel=2)
  return PosteriorHealth(steps=steps, leaves=leaves, overall=overall,
                         warnings=tuple(found))
