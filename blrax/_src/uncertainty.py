r"""One uncertainty report for any predictive, streamed over batches.

A *predictor* maps a batch of inputs to member log-probabilities of shape
``(S, n, k)``: ``S`` members (posterior draws, ensemble members, or ``S = 1``
for a point estimate), ``n`` examples, ``k`` classes. The predictive is the
Bayesian model average (BMA) :math:`\bar p = \frac1S\sum_s p_s`, computed in
log space, :math:`\log\bar p = \mathrm{logsumexp}_s \log p_s - \log S`.
Build one with :func:`posterior_predictor` (a blrax posterior),
:func:`point_predictor` (one set of params, e.g. the posterior mean) or
:func:`ensemble_predictor`; any function ``inputs -> (S, n, k)`` (or
``(n, k)``, read as ``S = 1``) of log-probabilities works too.

:func:`report` runs the predictor over an iterator of ``(inputs, labels)``
batches and, optionally, a second stream of out-of-distribution (OOD)
inputs. Per batch one jit-compiled function turns the predictions into
sufficient statistics (sums, bin counts, histograms), which are added up on
the host in float64: memory is constant in the number of batches, and the
report of a stream does not depend on how it is cut into batches (up to
float32 rounding within a batch). The host keeps :math:`O(kB + G)` numbers
(:math:`B` = ``num_bins``, :math:`G` = ``num_score_bins``: about 4 MB at the
defaults) whatever the length of the stream; a batch needs the predictor's
``(S, n, k)`` output.

**Rank-based metrics on a fixed grid.** AURC, the risk–coverage curve,
equal-mass bins and the OOD metrics (AUROC, AUPR, FPR at 95% TPR) depend on
how examples are ordered by a score. Instead of keeping every score, the
report keeps a histogram of each score :math:`u \ge 0` (higher: more
uncertain) over ``num_score_bins`` cells (default 65536) uniform in
:math:`\log u` from :math:`u_{\max}/10^{12}` to :math:`u_{\max}`; smaller
scores (and 0) go to the first cell. The scores are :math:`1 - \max_c \bar
p_c` (:math:`u_{\max} = 1`; ranking by it is ranking by confidence,
computed in log space so that confidences near 1 keep their resolution),
the entropy and the mutual information (:math:`u_{\max} = \log k`). Two
scores in one cell (within a factor :math:`10^{12/65536} \approx 1.00042`
of each other) count as tied; ties are handled as scikit-learn does (AUROC
counts a tied pair as 1/2, AUPR and FPR@95 take one threshold per distinct
cell) and, for AURC, by the expectation over a random order of the tied
examples. On scores that are already constant per cell the metrics are
exactly those of the per-example scores; otherwise the AUROC differs by at
most half the fraction of (in, out) pairs sharing a cell
(:attr:`OODReport.auroc_tie_bound`). Within-cell sums (confidence, errors)
are exact, so equal-mass bins differ from the exact per-example ones only
where one cell straddles a bin edge.

Conventions: the predicted class is the most probable one (ties to the
lowest index); the confidence is its probability; the Brier score is the
multi-class one, :math:`\sum_c (\bar p_c - [y = c])^2 \in [0, 2]` (twice
scikit-learn's binary ``brier_score_loss``); NLL is not floored. OOD
detection takes OOD as the positive class (AUPR is the average precision of
detecting OOD inputs, "AUPR-Out").

References:
  Guo et al., `On Calibration of Modern Neural Networks
  <https://arxiv.org/abs/1706.04599>`_, ICML 2017.
  Naeini, Cooper & Hauskrecht, `Obtaining Well Calibrated Probabilities Using
  Bayesian Binning <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_,
  AAAI 2015.
  Geifman & El-Yaniv, `Selective Classification for Deep Neural Networks
  <https://arxiv.org/abs/1705.08500>`_, NeurIPS 2017.
  Geifman et al., `Bias-Reduced Uncertainty Estimation for Deep Neural
  Classifiers <https://arxiv.org/abs/1805.08206>`_, ICLR 2019.
  Hendrycks & Gimpel, `A Baseline for Detecting Misclassified and
  Out-of-Distribution Examples in Neural Networks
  <https://arxiv.org/abs/1610.02136>`_, ICLR 2017.
  Depeweg et al., `Decomposition of Uncertainty in Bayesian Deep Learning for
  Efficient and Risk-sensitive Learning <https://arxiv.org/abs/1710.07283>`_,
  ICML 2018.
  Gneiting & Raftery, `Strictly Proper Scoring Rules, Prediction, and
  Estimation <https://doi.org/10.1198/016214506000001437>`_, JASA 2007.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import lookup, prediction_inputs, predictive, validation
from blrax._src.metrics import ROW_SUM_TOLERANCE

_TypeError = validation.ArgumentTypeError

SCORE_SPAN = 1e12
"""The score grid spans ``[u_max / SCORE_SPAN, u_max]`` (log-uniform cells)."""
_LOG_SPAN = math.log(SCORE_SPAN)

SCORES = ("msp", "entropy", "mutual_information")
"""OOD scores: ``1 - max prob`` (Hendrycks & Gimpel's maximum softmax
probability), predictive entropy, mutual information."""


# --------------------------------------------------------------------------
# Predictors.


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


def _as_predictor(predictor: Any) -> Predictor:
  if isinstance(predictor, Predictor):
    return predictor
  if not callable(predictor):
    raise _TypeError(
        "`predictor` must be a Predictor or a function inputs -> member "
        f"log-probabilities, got predictor={predictor!r}.")
  return Predictor(_Plain(predictor), ())


def _check_apply_fn(apply_fn: Any) -> None:
  if not callable(apply_fn):
    raise _TypeError(
        "`apply_fn` must be a function (params, inputs) -> logits, got "
        f"apply_fn={apply_fn!r}.")


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
  _check_apply_fn(apply_fn)
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
  _check_apply_fn(apply_fn)
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


def _entropy(log_probs: jax.Array) -> jax.Array:
  """:math:`-\\sum_c p_c \\log p_c` over the last axis, from log-probs."""
  terms = jnp.where(log_probs > -jnp.inf, jnp.exp(log_probs) * log_probs, 0.0)
  return jnp.maximum(-jnp.sum(terms, axis=-1), 0.0)


def entropy_decomposition(member_log_probs: jax.Array):
  r"""Total, aleatoric and epistemic uncertainty of each example.

  With members :math:`p_s` and their mean :math:`\bar p`:

  .. math::

     \underbrace{H[\bar p]}_{\text{total}} =
     \underbrace{\tfrac1S \textstyle\sum_s H[p_s]}_{\text{aleatoric}} +
     \underbrace{I(y; \theta)}_{\text{epistemic}},

  where the mutual information :math:`I = H[\bar p] - \frac1S\sum_s H[p_s]
  \ge 0` (Jensen) is 0 when all members agree, in particular for
  :math:`S = 1`. Computed from log-probabilities, with the mean in log space;
  the epistemic part is clipped at 0 against rounding.

  Args:
    member_log_probs: ``(S, n, k)`` member log-probabilities (``(n, k)`` is
      read as ``S = 1``).

  Returns:
    ``(total, aleatoric, epistemic)``, each of shape ``(n,)``, in nats.

  Raises:
    ValueError: an input with fewer than 2 or more than 3 axes.

  References:
    Depeweg et al., `Decomposition of Uncertainty in Bayesian Deep Learning
    for Efficient and Risk-sensitive Learning
    <https://arxiv.org/abs/1710.07283>`_, ICML 2018.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax.uncertainty import entropy_decomposition
    >>> members = jnp.log(jnp.array([[[0.99, 0.01]], [[0.01, 0.99]]]))
    >>> total, aleatoric, epistemic = entropy_decomposition(members)
    >>> [round(float(x[0]), 4) for x in (total, aleatoric, epistemic)]
    [0.6931, 0.056, 0.6371]
  """
  return _decompose(_members(member_log_probs))


@jax.jit
def _decompose(member_log_probs):
  scores = _scores(member_log_probs)
  return scores.total, scores.aleatoric, scores.epistemic


# --------------------------------------------------------------------------
# Per-batch statistics (jit-compiled).


def _members(out: Any) -> jax.Array:
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


class _Scores(NamedTuple):
  log_probs: jax.Array   # (n, k) BMA
  top: jax.Array         # (n,) predicted class
  confidence: jax.Array  # (n,) max prob
  log_gap: jax.Array     # (n,) log(1 - max prob), from log-probs
  total: jax.Array
  aleatoric: jax.Array
  epistemic: jax.Array
  ok: jax.Array          # (n,) rows of valid log-probabilities


def _row_tolerance(dtype: Any) -> float:
  """How far exp of a row of log-probabilities of ``dtype`` may sum from 1:
  ``ROW_SUM_TOLERANCE``, or 4 machine epsilons of a 16-bit dtype (the
  rounding of an exact bf16 ``log_softmax`` reaches several 1e-3)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return ROW_SUM_TOLERANCE
  return max(ROW_SUM_TOLERANCE, 4 * float(jnp.finfo(dtype).eps))


def _scores(member_log_probs: jax.Array,
            tolerance: float = ROW_SUM_TOLERANCE) -> _Scores:
  s, _, k = member_log_probs.shape
  log_probs = jax.nn.logsumexp(member_log_probs, axis=0) - jnp.log(s)
  # Every member row is a distribution: exp sums to 1, no NaN, no +inf.
  row_sums = jax.nn.logsumexp(member_log_probs, axis=-1)
  ok = jnp.all(jnp.abs(jnp.expm1(row_sums)) <= tolerance, axis=0)
  top = jnp.argmax(log_probs, axis=-1)
  onehot = jax.nn.one_hot(top, k, dtype=bool)
  log_gap = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, log_probs), axis=-1)
  total = _entropy(log_probs)
  aleatoric = jnp.mean(_entropy(member_log_probs), axis=0)
  epistemic = jnp.maximum(total - aleatoric, 0.0)
  return _Scores(log_probs, top, jnp.exp(jnp.max(log_probs, axis=-1)),
                 log_gap, total, aleatoric, epistemic, ok)


def _cells(log_score: jax.Array, log_top: float, num_cells: int) -> jax.Array:
  """Cell of a score on the log grid over ``[top / SCORE_SPAN, top]``."""
  t = (log_score - (log_top - _LOG_SPAN)) * (num_cells / _LOG_SPAN)
  return jnp.floor(jnp.clip(t, 0.0, num_cells - 1.0)).astype(jnp.int32)


def _score_cells(scores: _Scores, k: int, num_cells: int):
  log_top = math.log(math.log(k))
  return {
      "msp": _cells(scores.log_gap, 0.0, num_cells),
      "entropy": _cells(jnp.log(scores.total), log_top, num_cells),
      "mutual_information": _cells(jnp.log(scores.epistemic), log_top,
                                   num_cells),
  }


def _hist(index, num, weights, dtype=jnp.int32):
  return jnp.zeros(num, dtype).at[index].add(weights.astype(dtype))


_UNLABELLED = ("n", "shape_members", "shape_classes", "bad_rows",
               "confidence", "entropy", "aleatoric", "epistemic",
               "msp_count", "entropy_count", "mutual_information_count")
"""The statistics of an OOD batch (its labels are not used)."""


def _stats(member_log_probs, labels, mask, num_bins, num_score_bins):
  """Sufficient statistics of one batch; rows where ``mask`` is False (the
  padding of a short batch) count for nothing."""
  out_dtype = jnp.result_type(jnp.asarray(member_log_probs))
  member_log_probs = _members(member_log_probs)
  scores = _scores(member_log_probs, _row_tolerance(out_dtype))
  n, k = scores.log_probs.shape
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(
        f"`labels` must have shape ({n},) to match the predictions "
        f"(S, n, k)={member_log_probs.shape}, got labels.shape={labels.shape}.")
  mask = jnp.ones(n, bool) if mask is None else mask
  weight = mask.astype(jnp.float32)
  labels_ok = (labels >= 0) & (labels < k)
  safe = jnp.clip(labels, 0, k - 1)
  log_probs = scores.log_probs
  probs = jnp.exp(log_probs)
  hits = jax.nn.one_hot(safe, k, dtype=probs.dtype)
  correct = (scores.top == safe) & mask
  conf = scores.confidence

  def total(x):  # masked sum; where() also drops NaN of padded rows
    return jnp.sum(jnp.where(mask, x, 0.0))

  index = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0,
                   num_bins - 1)
  cw_index = (jnp.clip(jnp.ceil(probs * num_bins).astype(jnp.int32) - 1, 0,
                       num_bins - 1)
              + num_bins * jnp.arange(k, dtype=jnp.int32))
  cells = _score_cells(scores, k, num_score_bins)
  stats = {
      "n": jnp.sum(mask, dtype=jnp.int32),
      "shape_members": jnp.asarray(member_log_probs.shape[0], jnp.int32),
      "shape_classes": jnp.asarray(k, jnp.int32),
      "bad_rows": jnp.sum(~scores.ok & mask, dtype=jnp.int32),
      "confidence": total(conf),
      "entropy": total(scores.total),
      "aleatoric": total(scores.aleatoric),
      "epistemic": total(scores.epistemic),
      "bad_labels": jnp.sum(~labels_ok & mask, dtype=jnp.int32),
      "correct": jnp.sum(correct, dtype=jnp.int32),
      "nll": -total(jnp.take_along_axis(log_probs, safe[:, None], 1)[:, 0]),
      "brier": total(jnp.sum(jnp.square(probs - hits), axis=1)),
      "bin_count": _hist(index, num_bins, mask),
      "bin_confidence": _hist(index, num_bins, conf * weight, jnp.float32),
      "bin_correct": _hist(index, num_bins, correct),
      "classwise_gap": _hist(cw_index.ravel(), k * num_bins,
                             ((hits - probs) * weight[:, None]).ravel(),
                             jnp.float32),
      "msp_correct": _hist(cells["msp"], num_score_bins, correct),
      "msp_confidence": _hist(cells["msp"], num_score_bins, conf * weight,
                              jnp.float32),
  }
  for name, cell in cells.items():
    stats[f"{name}_count"] = _hist(cell, num_score_bins, mask)
  return stats


@functools.partial(jax.jit, static_argnames=("fn", "num_bins",
                                             "num_score_bins"))
def _batch(fn, args, inputs, labels, mask, num_bins, num_score_bins):
  return _stats(fn(args, inputs), labels, mask, num_bins, num_score_bins)


def _pad(inputs, labels, size):
  """Pads a short batch to ``size`` rows by repeating its last example.

  So a stream whose last batch is smaller needs one compilation. Returns
  ``(inputs, labels, mask)``; inputs whose leaves do not all have the
  batch as leading axis are left alone (mask all True).
  """
  n = labels.shape[0]
  leaves = jax.tree.leaves(inputs)
  if (n == 0 or n >= size or not leaves
      or any(np.ndim(x) == 0 or np.shape(x)[0] != n for x in leaves)):
    return inputs, labels, jnp.ones(n, bool)
  extra = size - n
  pad = lambda x: jnp.concatenate(  # noqa: E731
      [jnp.asarray(x), jnp.repeat(jnp.asarray(x)[-1:], extra, axis=0)])
  return (jax.tree.map(pad, inputs), pad(labels),
          jnp.arange(size) < n)


# --------------------------------------------------------------------------
# From the summed statistics to metrics (host, float64).


def _harmonic(m: np.ndarray) -> np.ndarray:
  r""":math:`H_m = \sum_{i=1}^m 1/i` for integer arrays ``m >= 0``."""
  m = np.asarray(m, np.float64)
  table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 65))])
  x = np.maximum(m, 1.0)
  inv2 = 1.0 / (x * x)
  big = (np.log(x) + np.euler_gamma + 0.5 / x
         - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252)))
  return np.where(m < 64, table[np.minimum(m, 64).astype(np.int64)], big)


def _aurc(count: np.ndarray, errors: np.ndarray) -> float:
  r"""Area under the risk–coverage curve, cells in order of acceptance.

  With examples accepted one by one, :math:`\mathrm{AURC} = \frac1n
  \sum_{m=1}^n r_m`, :math:`r_m` the error rate of the first :math:`m`.
  Examples in one cell are accepted in a random order and :math:`r_m`
  replaced by its expectation: after :math:`i` of the :math:`c` examples of
  a cell holding :math:`e` errors, preceded by :math:`M` examples with
  :math:`E` errors, the expected error count is :math:`E + i e / c`, and
  :math:`\sum_{i=1}^{c} \frac{E + i a}{M + i} = a c + (E - a M)(H_{M+c} -
  H_M)` with :math:`a = e/c`.
  """
  count = np.asarray(count, np.float64)
  errors = np.asarray(errors, np.float64)
  before = np.cumsum(count) - count
  errors_before = np.cumsum(errors) - errors
  nz = count > 0
  c, e, m, eb = count[nz], errors[nz], before[nz], errors_before[nz]
  a = e / c
  terms = a * c + (eb - a * m) * (_harmonic(m + c) - _harmonic(m))
  return float(np.sum(terms) / np.sum(count))


def _optimal_aurc(n: int, correct: int) -> float:
  """AURC of a ranking that accepts every correct example first."""
  errors = n - correct
  return float((errors - correct * (_harmonic(n) - _harmonic(correct))) / n)


def _risk_coverage(count, errors):
  count = np.asarray(count, np.float64)
  nz = count > 0
  accepted = np.cumsum(count)[nz]
  return accepted / count.sum(), np.cumsum(errors)[nz] / accepted


def _equal_mass_ece(count, correct, confidence, num_bins) -> float:
  """ECE over equal-mass bins from cells in ascending confidence order.

  A cell goes to the bin of its examples' mean rank, floor(r B / n) with
  r = (2 before + count - 1) / 2: the exact per-example bins whenever no
  cell straddles a bin edge.
  """
  count = np.asarray(count, np.int64)
  n = int(count.sum())
  before = np.cumsum(count) - count
  nz = count > 0
  index = np.minimum(((2 * before + count - 1) * num_bins) // (2 * n),
                     num_bins - 1)[nz]
  gap = (np.bincount(index, np.asarray(correct, np.float64)[nz], num_bins)
         - np.bincount(index, np.asarray(confidence, np.float64)[nz], num_bins))
  return float(np.sum(np.abs(gap)) / n)


class Detection(NamedTuple):
  """OOD detection by one score; OOD is the positive class.

  Attributes:
    auroc: area under the ROC curve, a tied (in, out) pair counting 1/2.
    aupr: average precision of detecting OOD inputs (scikit-learn's
      ``average_precision_score`` with OOD as positive).
    fpr95: the smallest false-positive rate (in-distribution inputs flagged)
      over the thresholds whose true-positive rate is at least 0.95 (no
      interpolation).

  Examples:
    >>> from blrax.uncertainty import Detection
    >>> Detection(auroc=0.9, aupr=0.8, fpr95=0.3).auroc
    0.9
  """

  auroc: float
  aupr: float
  fpr95: float


def _roc(h_in, h_out):
  """(fpr, tpr) at the cell thresholds, from the highest score down."""
  tp = np.cumsum(np.asarray(h_out, np.float64)[::-1])
  fp = np.cumsum(np.asarray(h_in, np.float64)[::-1])
  return fp / fp[-1], tp / tp[-1], tp, fp


def _detection(h_in, h_out) -> tuple[Detection, float]:
  """Detection metrics, and the AUROC's bound from ties within cells."""
  h_in = np.asarray(h_in, np.float64)
  h_out = np.asarray(h_out, np.float64)
  negatives, positives = h_in.sum(), h_out.sum()
  below = np.cumsum(h_in) - h_in
  auroc = np.sum(h_out * (below + 0.5 * h_in)) / (positives * negatives)
  fpr, tpr, tp, fp = _roc(h_in, h_out)
  flagged = tp + fp
  precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
  aupr = np.sum(h_out[::-1] * precision) / positives
  fpr95 = fpr[np.argmax(tpr >= 0.95)]
  bound = 0.5 * np.sum(h_in * h_out) / (positives * negatives)
  return Detection(float(auroc), float(aupr), float(fpr95)), float(bound)


class ReliabilityBins(NamedTuple):
  """Equal-width confidence bins of a :class:`UncertaintyReport`.

  Bin ``b`` holds confidences in ``(b/B, (b+1)/B]``.

  Attributes:
    count: examples per bin.
    confidence: their mean confidence (0 for an empty bin).
    accuracy: their accuracy (0 for an empty bin).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(jnp.eye(2), jnp.array([0, 1]))],
    ...                        num_bins=2)
    >>> r.reliability.count.tolist(), r.reliability.accuracy.tolist()
    ([0, 2], [0.0, 1.0])
  """

  count: np.ndarray
  confidence: np.ndarray
  accuracy: np.ndarray


@dataclasses.dataclass(frozen=True)
class OODReport:
  """The OOD stream of a :func:`report`.

  Attributes:
    num_examples: OOD examples.
    confidence: their mean max probability.
    entropy: their mean total entropy (nats).
    aleatoric: their mean expected entropy.
    epistemic: their mean mutual information.
    detection: a :class:`Detection` per score in :data:`SCORES`
      (``"msp"``, ``"entropy"``, ``"mutual_information"``).
    auroc_tie_bound: per score, the largest possible difference between the
      reported AUROC and the one of the unbinned scores (half the fraction
      of (in, out) pairs that share a grid cell).
    stats: the summed sufficient statistics of the OOD stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(jnp.eye(2), jnp.array([0, 1]))],
    ...                        ood_batches=[jnp.zeros((3, 2))])
    >>> r.ood.num_examples, round(r.ood.entropy, 4)
    (3, 0.6931)
  """

  num_examples: int
  confidence: float
  entropy: float
  aleatoric: float
  epistemic: float
  detection: dict = dataclasses.field(repr=False)
  auroc_tie_bound: dict = dataclasses.field(repr=False)
  stats: dict = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class UncertaintyReport:
  """What :func:`report` measures; ``str(report)`` is a markdown table.

  Attributes:
    num_examples: ``n``, the labelled examples.
    num_members: ``S``, the predictor's members.
    num_classes: ``k``.
    accuracy: of the predictive (BMA).
    nll: mean negative log-likelihood of the predictive (nats).
    brier: mean multi-class Brier score, in ``[0, 2]``.
    ece: equal-width ECE over ``num_bins`` bins.
    ece_equal_mass: ECE over ``num_bins`` equal-mass bins (from the score
      grid: see the module docstring).
    classwise_ece: classwise ECE, ``num_bins`` equal-width bins per class.
    mce: equal-width MCE, the largest gap of a non-empty bin.
    confidence: mean max probability.
    entropy: mean total entropy (nats).
    aleatoric: mean expected entropy of the members.
    epistemic: mean mutual information (:func:`entropy_decomposition`).
    aurc: area under the risk–coverage curve (examples accepted by
      decreasing confidence).
    e_aurc: ``aurc`` minus the AURC of an oracle that accepts every correct
      example first (Geifman et al., 2019).
    reliability: :class:`ReliabilityBins` (equal width).
    risk_coverage: ``(coverage, risk)`` arrays, one point per grid cell
      holding examples, by decreasing confidence.
    ood: an :class:`OODReport`, or None without an OOD stream.
    num_bins: the calibration bins.
    num_score_bins: the cells of the score grid.
    stats: the summed sufficient statistics (float64 and int64 arrays).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(jnp.eye(2), jnp.array([0, 1]))])
    >>> r.accuracy, r.num_members, r.as_dict()["epistemic"]
    (1.0, 1, 0.0)
  """

  num_examples: int
  num_members: int
  num_classes: int
  accuracy: float
  nll: float
  brier: float
  ece: float
  ece_equal_mass: float
  classwise_ece: float
  mce: float
  confidence: float
  entropy: float
  aleatoric: float
  epistemic: float
  aurc: float
  e_aurc: float
  reliability: ReliabilityBins = dataclasses.field(repr=False)
  risk_coverage: tuple = dataclasses.field(repr=False)
  ood: OODReport | None = dataclasses.field(repr=False)
  num_bins: int = dataclasses.field(repr=False)
  num_score_bins: int = dataclasses.field(repr=False)
  stats: dict = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, float]:
    """The scalar metrics, flat; OOD ones prefixed ``ood_`` (none without an
    OOD stream)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.repr}
    if self.ood is not None:
      out["ood_num_examples"] = self.ood.num_examples
      for name in ("confidence", "entropy", "aleatoric", "epistemic"):
        out[f"ood_{name}"] = getattr(self.ood, name)
      for score in SCORES:
        for metric, value in self.ood.detection[score]._asdict().items():
          out[f"ood_{score}_{metric}"] = value
    return out

  def __str__(self) -> str:
    return format_reports({"model": self})


_LABELS = {
    "num_examples": "examples",
    "num_members": "members S",
    "num_classes": "classes",
    "accuracy": "accuracy ↑",
    "nll": "NLL ↓",
    "brier": "Brier ↓",
    "ece": "ECE ↓",
    "ece_equal_mass": "ECE, equal mass ↓",
    "classwise_ece": "classwise ECE ↓",
    "mce": "MCE ↓",
    "confidence": "mean confidence",
    "entropy": "entropy (total)",
    "aleatoric": "aleatoric (expected entropy)",
    "epistemic": "epistemic (mutual information)",
    "aurc": "AURC ↓",
    "e_aurc": "E-AURC ↓",
    "ood_num_examples": "OOD examples",
    "ood_confidence": "OOD mean confidence",
    "ood_entropy": "OOD entropy",
    "ood_aleatoric": "OOD aleatoric",
    "ood_epistemic": "OOD mutual information",
    "rmse": "RMSE ↓",
    "crps": "CRPS ↓",
    "mean_std": "mean predictive std",
}
for _score, _name in zip(SCORES, ("max prob", "entropy", "MI")):
  _LABELS[f"ood_{_score}_auroc"] = f"OOD AUROC, {_name} ↑"
  _LABELS[f"ood_{_score}_aupr"] = f"OOD AUPR, {_name} ↑"
  _LABELS[f"ood_{_score}_fpr95"] = f"OOD FPR@95, {_name} ↓"


def format_reports(reports: Mapping[str, Any], digits: int = 4) -> str:
  """A markdown table of reports side by side: one row per metric.

  Args:
    reports: ``{name: report}``, :class:`UncertaintyReport` or
      :class:`RegressionReport` values (anything with ``as_dict()``).
    digits: decimals shown.

  Returns:
    The table, rows in the order of the first report's ``as_dict()`` (then
    any others'); "–" where a report lacks a metric (e.g. no OOD stream).

  Raises:
    ValueError: an empty ``reports``, or a value without ``as_dict()``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(jnp.eye(2), jnp.array([0, 1]))])
    >>> print(uncertainty.format_reports({"eye": r}).splitlines()[5])
    | accuracy ↑ | 1.0000 |
  """
  if not isinstance(reports, Mapping) or not reports:
    raise ValueError("`reports` must be a non-empty mapping {name: report}, "
                     f"got reports={reports!r}.")
  rows = {}
  for name, rep in reports.items():
    if not hasattr(rep, "as_dict"):
      raise ValueError(f"`reports[{name!r}]` must be a report, got {rep!r}.")
    rows[name] = rep.as_dict()
  keys = list(dict.fromkeys(k for values in rows.values() for k in values))

  def cell(value):
    if value is None:
      return "–"
    if isinstance(value, (int, np.integer)):
      return str(int(value))
    return f"{value:.{digits}f}"

  lines = ["| metric | " + " | ".join(rows) + " |",
           "|---|" + "---:|" * len(rows)]
  for key in keys:
    lines.append(f"| {_LABELS.get(key, key)} | "
                 + " | ".join(cell(values.get(key)) for values in rows.values())
                 + " |")
  return "\n".join(lines)


class _Sum:
  """Adds per-batch statistics on the host, in float64 / int64.

  ``shape_*`` entries are not summed: every batch must agree on them.
  """

  def __init__(self, name):
    self.name = name
    self.total = None

  def add(self, i, stats):
    stats = {k: np.asarray(v) for k, v in jax.device_get(stats).items()}
    stats = {k: v.astype(np.int64 if np.issubdtype(v.dtype, np.integer)
                         else np.float64) for k, v in stats.items()}
    if self.total is None:
      self.total = dict(stats)
      return stats
    for k, v in stats.items():
      if not k.startswith("shape_"):
        self.total[k] = self.total[k] + v
      elif v != self.total[k]:
        raise ValueError(
            f"`{self.name}`: batch {i} has {k[6:]}={int(v)}, the first batch "
            f"had {int(self.total[k])}.")
    return stats


def _batch_pair(i, batch, name):
  try:
    inputs, labels = batch
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"`{name}` must yield (inputs, labels) pairs; batch {i} is "
        f"{type(batch).__name__}.") from e
  labels = jnp.asarray(labels)
  if labels.dtype == jnp.bool_:
    labels = labels.astype(jnp.int32)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise _TypeError(
        f"`{name}`: batch {i} has labels of dtype {labels.dtype}; labels must "
        "be integer class indices.")
  return inputs, labels


def _ood_inputs(batch):
  # (x, y) or [x, y] (a list, as many loaders yield): the inputs are x.
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0]
  return batch


def _check_rows(i, stats, name):
  bad = int(stats["bad_rows"])
  if bad:
    raise ValueError(
        f"`{name}`: batch {i} has {bad} row(s) that are not log-"
        "probabilities (the predictor must return log_softmax outputs: "
        f"exp of each member row sums to 1 within {ROW_SUM_TOLERANCE}, or 4 "
        "machine epsilons for 16-bit outputs; no NaN).")
  bad = int(stats.get("bad_labels", 0))
  if bad:
    raise ValueError(
        f"`{name}`: batch {i} has {bad} label(s) outside [0, k).")


def _run(stream, name, one_batch):
  total = _Sum(name)
  for i, batch in enumerate(stream):
    _check_rows(i, total.add(i, one_batch(i, batch)), name)
  if total.total is None or total.total["n"] == 0:
    raise ValueError(f"`{name}` yielded no examples; it must yield at least "
                     "one non-empty batch.")
  return total.total


def report(predictor: Any, batches: Iterable, *,
           ood_batches: Iterable | None = None, num_bins: int = 15,
           num_score_bins: int = 65536, jit: bool = True) -> UncertaintyReport:
  r"""The uncertainty report of a classifier's predictive, streamed.

  Metrics of the predictive :math:`\bar p` (the BMA of the members) on
  ``n`` labelled examples :math:`(x_i, y_i)`, confidence :math:`c_i =
  \max_c \bar p_{ic}`, prediction :math:`\hat y_i = \arg\max_c \bar
  p_{ic}`:

  - NLL :math:`-\frac1n\sum_i \log\bar p_{i y_i}`; accuracy; Brier
    :math:`\frac1n\sum_i\sum_c(\bar p_{ic} - [y_i = c])^2`.
  - Calibration (Guo et al., 2017; Naeini et al., 2015): equal-width ECE
    :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`, MCE
    :math:`\max_b |\mathrm{acc}_b - \mathrm{conf}_b|`, equal-mass ECE and
    classwise ECE (see :mod:`blrax.metrics`), reliability bins.
  - Uncertainty: mean total entropy, aleatoric part (expected entropy) and
    epistemic part (mutual information), :func:`entropy_decomposition`.
  - Selective prediction (Geifman & El-Yaniv, 2017): accepting examples by
    decreasing confidence, the risk–coverage curve and its area
    :math:`\mathrm{AURC} = \frac1n\sum_{m=1}^n r_m` (:math:`r_m`: error
    rate of the :math:`m` most confident), and E-AURC (AURC minus that of
    the ideal ordering).
  - With ``ood_batches``: OOD detection (Hendrycks & Gimpel, 2017) by
    :math:`1 - c` (max probability), entropy and mutual information, OOD as
    the positive class: AUROC, AUPR, FPR at 95% TPR.

  Ranking metrics use a grid of ``num_score_bins`` log-spaced cells; see
  the module docstring for the resolution and the handling of ties.

  Args:
    predictor: a :class:`Predictor`, or a function ``inputs -> (S, n, k)``
      (or ``(n, k)``) of member log-probabilities (``jax.nn.log_softmax``
      outputs); the identity (``lambda x: x``) reports precomputed
      log-probabilities.
    batches: an iterable of ``(inputs, labels)`` pairs, labels integer
      ``(n,)`` in ``[0, k)``; consumed once, one batch at a time.
    ood_batches: optional iterable of OOD inputs (or ``(inputs, labels)``
      pairs, tuples or two-element lists, labels ignored).
    num_bins: calibration bins, an int ``>= 1``.
    num_score_bins: cells of the score grid, an int ``>= 2``.
    jit: jit-compile the per-batch statistics with the predictor;
      ``False`` runs eagerly. A batch smaller than an earlier one (the
      last) is padded by repeating its last example, the padding masked
      out, so a stream needs one compilation per predictor (the OOD stream
      shares it).

  Returns:
    An :class:`UncertaintyReport`.

  Raises:
    TypeError: a predictor that is not callable, non-integer labels, bad
      setting types (all also ``ValueError``).
    ValueError: ``num_bins < 1``, ``num_score_bins < 2``, an empty stream,
      a batch that is not a pair, predictions that are not ``(S, n, k)``
      log-probabilities (naming the batch), labels of the wrong shape or
      outside ``[0, k)``, streams with different numbers of classes.

  References:
    Guo et al., 2017; Naeini et al., 2015; Geifman & El-Yaniv, 2017;
    Hendrycks & Gimpel, 2017; Depeweg et al., 2018 (module docstring).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> x = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.0, 1.5]])
    >>> y = jnp.array([0, 1, 1, 0])
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(x[:2], y[:2]), (x[2:], y[2:])],
    ...                        ood_batches=[jnp.zeros((2, 2))])
    >>> r.num_examples, r.accuracy, round(r.nll, 4), round(r.aurc, 4)
    (4, 0.5, 0.7789, 0.3333)
    >>> r.ood.detection["entropy"]
    Detection(auroc=1.0, aupr=1.0, fpr95=0.0)
  """
  predictor = _as_predictor(predictor)
  num_bins = validation.check_integer("num_bins", num_bins, low=1)
  num_score_bins = validation.check_integer("num_score_bins", num_score_bins,
                                            low=2)
  jit = validation.check_flag("jit", jit)
  fn, args = predictor.fn, predictor.args

  size = [0]  # the largest batch so far: smaller ones are padded to it

  def one(inputs, labels):
    size[0] = max(size[0], labels.shape[0])
    inputs, labels, mask = _pad(inputs, labels, size[0])
    if jit:
      return _batch(fn, args, inputs, labels, mask, num_bins, num_score_bins)
    return _stats(fn(args, inputs), labels, mask, num_bins, num_score_bins)

  def labelled(i, batch):
    return one(*_batch_pair(i, batch, "batches"))

  rows = {}  # OOD batches have no labels: n from the output's shape

  def unlabelled(i, batch):
    inputs = _ood_inputs(batch)
    leaves = jax.tree.leaves(inputs)
    signature = (jax.tree.structure(inputs),
                 tuple((np.shape(x), getattr(x, "dtype", type(x)))
                       for x in leaves))
    if signature not in rows:
      rows[signature] = jax.eval_shape(lambda a, x: _members(fn(a, x)), args,
                                       inputs).shape[1]
    stats = one(inputs, jnp.zeros(rows[signature], jnp.int32))
    return {key: stats[key] for key in _UNLABELLED}

  total = _run(batches, "batches", labelled)
  ood = None
  if ood_batches is not None:
    ood_total = _run(ood_batches, "ood_batches", unlabelled)
    if ood_total["shape_classes"] != total["shape_classes"]:
      raise ValueError(
          f"`ood_batches` give {int(ood_total['shape_classes'])} classes, "
          f"`batches` {int(total['shape_classes'])}.")
    ood = _ood_report(total, ood_total)
  return _classification_report(total, num_bins, num_score_bins, ood)


def _ood_report(total, ood_total) -> OODReport:
  n = int(ood_total["n"])
  detection, bounds = {}, {}
  for score in SCORES:
    detection[score], bounds[score] = _detection(total[f"{score}_count"],
                                                 ood_total[f"{score}_count"])
  return OODReport(
      num_examples=n, confidence=float(ood_total["confidence"] / n),
      entropy=float(ood_total["entropy"] / n),
      aleatoric=float(ood_total["aleatoric"] / n),
      epistemic=float(ood_total["epistemic"] / n), detection=detection,
      auroc_tie_bound=bounds, stats=ood_total)


def _classification_report(total, num_bins, num_score_bins, ood):
  n = int(total["n"])
  k, s = int(total["shape_classes"]), int(total["shape_members"])
  correct = int(total["correct"])
  count = total["bin_count"]
  safe = np.maximum(count, 1)
  gaps = np.abs(total["bin_correct"] - total["bin_confidence"])
  cells_count = total["msp_count"]
  errors = cells_count - total["msp_correct"]
  aurc = _aurc(cells_count, errors)
  # Cells ascend in 1 - confidence: reversed, they ascend in confidence.
  ece_mass = _equal_mass_ece(cells_count[::-1], total["msp_correct"][::-1],
                             total["msp_confidence"][::-1], num_bins)
  return UncertaintyReport(
      num_examples=n, num_members=int(s), num_classes=int(k),
      accuracy=correct / n, nll=float(total["nll"] / n),
      brier=float(total["brier"] / n), ece=float(np.sum(gaps) / n),
      ece_equal_mass=ece_mass,
      classwise_ece=float(np.sum(np.abs(total["classwise_gap"])) / (n * k)),
      mce=float(np.max(np.where(count > 0, gaps / safe, 0.0))),
      confidence=float(total["confidence"] / n),
      entropy=float(total["entropy"] / n),
      aleatoric=float(total["aleatoric"] / n),
      epistemic=float(total["epistemic"] / n), aurc=aurc,
      e_aurc=aurc - _optimal_aurc(n, correct),
      reliability=ReliabilityBins(count, total["bin_confidence"] / safe,
                                  total["bin_correct"] / safe),
      risk_coverage=_risk_coverage(cells_count, errors), ood=ood,
      num_bins=num_bins, num_score_bins=num_score_bins, stats=total)


def plot_report(reports: Any, *, fig: Any = None, ood_score: str = "entropy"):
  """Reliability diagram, risk–coverage curve and (with OOD) ROC curve.

  One panel each, every report drawn in each (matplotlib, imported lazily).
  In the reliability diagram the marker area grows with the bin's count.

  Args:
    reports: an :class:`UncertaintyReport` or ``{name: report}``.
    fig: a matplotlib figure to draw in; a new one by default.
    ood_score: the score of the ROC panel, one of :data:`SCORES`.

  Returns:
    The matplotlib ``Figure``.

  Raises:
    ValueError: an empty mapping, values that are not
      :class:`UncertaintyReport`, an unknown ``ood_score``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = uncertainty.point_predictor(lambda w, x: x @ w, jnp.eye(2))
    >>> r = uncertainty.report(predictor, [(jnp.eye(2), jnp.array([0, 1]))])
    >>> fig = uncertainty.plot_report({"eye": r})
    >>> len(fig.axes)
    2
  """
  import matplotlib.pyplot as plt  # Imported lazily: plotting is optional.

  if isinstance(reports, UncertaintyReport):
    reports = {"model": reports}
  if not isinstance(reports, Mapping) or not reports or not all(
      isinstance(r, UncertaintyReport) for r in reports.values()):
    raise ValueError("`reports` must be an UncertaintyReport or a non-empty "
                     f"mapping of them, got reports={reports!r}.")
  if ood_score not in SCORES:
    raise ValueError(f"`ood_score` must be one of {SCORES}, got "
                     f"ood_score={ood_score!r}.")
  with_ood = any(r.ood is not None for r in reports.values())
  panels = 3 if with_ood else 2
  if fig is None:
    fig = plt.figure(figsize=(4.2 * panels, 4))
  axes = fig.subplots(1, panels)
  rel, rc = axes[0], axes[1]
  rel.plot([0, 1], [0, 1], "k--", lw=1)
  for name, r in reports.items():
    keep = r.reliability.count > 0
    count = r.reliability.count[keep]
    line, = rel.plot(r.reliability.confidence[keep],
                     r.reliability.accuracy[keep], "-", lw=1, alpha=0.6,
                     label=f"{name} (ECE {r.ece:.3f})")
    # Marker area ~ bin count: a bin of one example is a dot.
    rel.scatter(r.reliability.confidence[keep], r.reliability.accuracy[keep],
                s=8 + 120 * count / count.max(), color=line.get_color(),
                alpha=0.8)
    rc.plot(*r.risk_coverage, label=f"{name} (AURC {r.aurc:.4f})")
  rel.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
          title="reliability")
  rc.set(xlabel="coverage", ylabel="selective risk (error rate)",
         xlim=(0, 1), ylim=(0, None), title="risk–coverage")
  for ax in (rel, rc):
    ax.legend(fontsize=8)
  if with_ood:
    roc = axes[2]
    roc.plot([0, 1], [0, 1], "k--", lw=1)
    for name, r in reports.items():
      if r.ood is None:
        continue
      fpr, tpr, _, _ = _roc(r.stats[f"{ood_score}_count"],
                            r.ood.stats[f"{ood_score}_count"])
      auroc = r.ood.detection[ood_score].auroc
      roc.plot(np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]),
               label=f"{name} (AUROC {auroc:.3f})")
    roc.set(xlabel="false-positive rate (in-distribution)",
            ylabel="true-positive rate (OOD)", xlim=(0, 1), ylim=(0, 1),
            title=f"OOD detection by {ood_score}")
    roc.legend(fontsize=8)
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------
# Regression.


def regression_predictor(apply_fn: Callable[[Any, Any], jax.Array], key: Any,
                         params: Any, opt_state: Any, num_samples: int = 32,
                         chunk_size: int | None = None,
                         noise_variance: Any = None,
                         mean_only: bool = False) -> Predictor:
  r"""The Gaussian predictive :math:`(\mu, \sigma^2)` of a regression model
  under a blrax posterior.

  Wraps :func:`blrax.predictive.predictive_mean_variance`: mean and
  variance over ``num_samples`` draws (law of total variance) plus
  ``noise_variance``; with ``mean_only`` the output at the mean with
  variance ``noise_variance``. Any function ``inputs -> (mean, variance)``
  is a regression predictor too (an ensemble, a heteroscedastic net).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    key: PRNG key of the draws (may be ``None`` with ``mean_only``).
    params: the posterior mean, or an NNX model (see
      :mod:`blrax.predictive`).
    opt_state: the state of a blrax optimizer.
    num_samples: posterior draws, an int ``>= 1``.
    chunk_size: draws evaluated together (a divisor of ``num_samples``).
    noise_variance: observation noise :math:`\sigma^2_{\text{noise}} \ge 0`.
      Left out, it is 0 with a ``UserWarning`` (the intervals would cover
      the model's uncertainty only, not the targets' noise); pass ``0.0``
      to mean it.
    mean_only: a bool: ignore the posterior.

  Returns:
    A :class:`Predictor` of ``(mean, variance)``, each shaped like the
    outputs.

  Raises:
    TypeError, ValueError: as
      :func:`blrax.predictive.predictive_mean_variance`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import blrax
    >>> from blrax.uncertainty import regression_predictor
    >>> w = jnp.ones(3)
    >>> state = blrax.ivon(0.1, ess=100).init(w)
    >>> mean, var = regression_predictor(lambda w, x: x @ w, 0, w, state,
    ...                                  num_samples=8,
    ...                                  noise_variance=0.1)(jnp.ones((5, 3)))
    >>> mean.shape, bool((var > 0.1).all())
    ((5,), True)
  """
  apply_fn, params, opt_state = prediction_inputs.functional(apply_fn, params,
                                                             opt_state)
  key = prediction_inputs.check_apply_fn_and_key(apply_fn, key, mean_only)
  noise, _ = prediction_inputs.check_noise_variance(
      prediction_inputs.default_noise_variance(noise_variance,
                                               "regression_predictor"))
  if not mean_only:
    prediction_inputs.check_draw_counts(num_samples, chunk_size)

  def fn(args, inputs):
    key, params, opt_state, noise = args
    return predictive.predictive_mean_variance(
        apply_fn, key, params, opt_state, inputs, num_samples, chunk_size,
        noise, mean_only)

  return Predictor(fn, (key, params, opt_state, noise))


def gaussian_crps(mean: Any, variance: Any, targets: Any) -> jax.Array:
  r"""CRPS of a Gaussian predictive, elementwise (closed form).

  .. math::

     \mathrm{CRPS}(\mathcal N(\mu, \sigma^2), y) = \sigma\Bigl[z\bigl(2\Phi(z)
     - 1\bigr) + 2\varphi(z) - \tfrac{1}{\sqrt\pi}\Bigr],
     \qquad z = \frac{y - \mu}{\sigma},

  :math:`= \int (F(t) - [t \ge y])^2\,dt` for the predictive CDF :math:`F`;
  in the units of :math:`y`, lower is better, :math:`|y - \mu|` as
  :math:`\sigma \to 0`.

  Args:
    mean: predictive means.
    variance: predictive variances, ``> 0`` (broadcasting with ``mean``).
    targets: observations, broadcasting with ``mean``.

  Returns:
    The CRPS of every element; NaN where the variance is not positive.

  References:
    Gneiting & Raftery, `Strictly Proper Scoring Rules, Prediction, and
    Estimation <https://doi.org/10.1198/016214506000001437>`_, JASA 2007,
    eq. (21).

  Examples:
    >>> from blrax.uncertainty import gaussian_crps
    >>> round(float(gaussian_crps(0.0, 1.0, 0.0)), 4)  # (2 - sqrt 2)/sqrt(2 pi)
    0.2337
  """
  mean, variance, targets = (jnp.asarray(x, jnp.result_type(x, jnp.float32))
                             for x in (mean, variance, targets))
  return _crps(mean, variance, targets)


@jax.jit
def _crps(mean, variance, targets):
  std = jnp.sqrt(jnp.where(variance > 0, variance, jnp.nan))
  z = (targets - mean) / std
  return std * (z * (2 * jax.scipy.special.ndtr(z) - 1)
                + 2 * jax.scipy.stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


def _check_levels(levels: Any) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in levels)
  except (TypeError, ValueError) as e:
    raise _TypeError(f"`levels` must be a sequence of numbers in (0, 1), got "
                     f"levels={levels!r}.") from e
  if not values or not all(0 < v < 1 for v in values):
    raise ValueError(f"`levels` must be a non-empty sequence of numbers in "
                     f"(0, 1), got levels={levels!r}.")
  return values


def _regression_stats(out, targets, levels):
  try:
    mean, variance = out
  except (TypeError, ValueError) as e:
    raise ValueError("a regression predictor must return (mean, variance), "
                     f"got {type(out).__name__}.") from e
  mean, variance, targets = (jnp.asarray(x) for x in (mean, variance, targets))
  if not (mean.shape == variance.shape == targets.shape):
    raise ValueError(
        "the predictor's mean and variance must have the shape of the "
        f"targets, got mean {mean.shape}, variance {variance.shape}, targets "
        f"{targets.shape}.")
  dtype = jnp.result_type(mean, variance, targets, jnp.float32)
  mean, variance, targets = (x.astype(dtype) for x in (mean, variance, targets))
  ok = (variance > 0) & jnp.isfinite(variance) & jnp.isfinite(mean)
  bad = jnp.sum(~ok, dtype=jnp.int32) + jnp.sum(~jnp.isfinite(targets),
                                                dtype=jnp.int32)
  variance = jnp.where(ok, variance, 1.0)
  error = targets - mean
  std = jnp.sqrt(variance)
  stats = {
      "n": jnp.asarray(mean.size, jnp.int32),
      "bad_rows": bad,
      "nll": jnp.sum(0.5 * (jnp.log(2 * jnp.pi * variance)
                            + jnp.square(error) / variance)),
      "squared_error": jnp.sum(jnp.square(error)),
      "crps": jnp.sum(gaussian_crps(mean, variance, targets)),
      "std": jnp.sum(std),
  }
  for i, level in enumerate(levels):
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    stats[f"covered_{i}"] = jnp.sum(jnp.abs(error) <= z * std,
                                    dtype=jnp.int32)
  return stats


@functools.partial(jax.jit, static_argnames=("fn", "levels"))
def _regression_batch(fn, args, inputs, targets, levels):
  return _regression_stats(fn(args, inputs), targets, levels)


@dataclasses.dataclass(frozen=True)
class RegressionReport:
  """What :func:`regression_report` measures; ``str()`` is a markdown table.

  Attributes:
    num_examples: scalar targets (all output elements of all batches).
    nll: mean Gaussian negative log-likelihood (nats).
    rmse: root mean squared error of the predictive mean.
    crps: mean CRPS (:func:`gaussian_crps`).
    mean_std: mean predictive standard deviation (sharpness).
    coverage: ``{level: fraction}``: targets inside the central interval
      :math:`\\mu \\pm \\Phi^{-1}(\\tfrac{1 + \\text{level}}{2})\\,\\sigma`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> r = uncertainty.regression_report(lambda x: (x, jnp.ones_like(x)),
    ...                                   [(jnp.zeros(2), jnp.zeros(2))])
    >>> r.rmse, r.coverage[0.5]
    (0.0, 1.0)
  """

  num_examples: int
  nll: float
  rmse: float
  crps: float
  mean_std: float
  coverage: dict = dataclasses.field(repr=False)

  def as_dict(self) -> dict[str, float]:
    """The scalars, flat; coverages as ``coverage_<level>``."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.repr}
    out.update({f"coverage_{level:g}": v for level, v in self.coverage.items()})
    return out

  def __str__(self) -> str:
    return format_reports({"model": self})


def regression_report(predictor: Any, batches: Iterable, *,
                      levels: Any = (0.5, 0.9, 0.95),
                      jit: bool = True) -> RegressionReport:
  r"""Report of a Gaussian predictive :math:`\mathcal N(\mu, \sigma^2)`,
  streamed over ``(inputs, targets)`` batches.

  Every output element is one scalar target. Gaussian NLL
  :math:`\frac12\log(2\pi\sigma^2) + \frac{(y-\mu)^2}{2\sigma^2}`, RMSE,
  CRPS (:func:`gaussian_crps`; Gneiting & Raftery, 2007), mean predictive
  std and the coverage of central intervals at each level (a calibrated
  predictive covers a fraction ``level``). A mixture predictive (an
  ensemble, posterior draws) enters by its first two moments, as
  :func:`regression_predictor` gives them.

  Args:
    predictor: a :class:`Predictor` or function ``inputs -> (mean,
      variance)``, each shaped like the targets.
    batches: an iterable of ``(inputs, targets)`` pairs.
    levels: central-interval levels, numbers in ``(0, 1)``.
    jit: jit-compile the per-batch statistics.

  Returns:
    A :class:`RegressionReport`.

  Raises:
    TypeError: a predictor that is not callable, non-numeric levels.
    ValueError: empty stream, levels outside ``(0, 1)``, shapes that differ,
      a variance that is not positive and finite or non-finite means or
      targets (naming the batch).

  Examples:
    >>> import jax.numpy as jnp
    >>> from blrax import uncertainty
    >>> predictor = lambda x: (x, jnp.ones_like(x))  # N(x, 1)
    >>> r = uncertainty.regression_report(
    ...     predictor, [(jnp.zeros(4), jnp.array([0.0, 1.0, -1.0, 2.0]))])
    >>> round(r.rmse, 4), r.coverage[0.9]
    (1.2247, 0.75)
  """
  predictor = _as_predictor(predictor)
  levels = _check_levels(levels)
  jit = validation.check_flag("jit", jit)
  fn, args = predictor.fn, predictor.args

  def one(i, batch):
    try:
      inputs, targets = batch
    except (TypeError, ValueError) as e:
      raise ValueError(f"`batches` must yield (inputs, targets) pairs; batch "
                       f"{i} is {type(batch).__name__}.") from e
    targets = jnp.asarray(targets)
    if jit:
      return _regression_batch(fn, args, inputs, targets, levels)
    return _regression_stats(fn(args, inputs), targets, levels)

  total = _Sum("batches")
  for i, batch in enumerate(batches):
    stats = total.add(i, one(i, batch))
    if int(stats["bad_rows"]):
      raise ValueError(
          f"`batches`: batch {i} has {int(stats['bad_rows'])} element(s) "
          "with a variance that is not positive and finite, or a non-finite "
          "mean or target.")
  if total.total is None or total.total["n"] == 0:
    raise ValueError("`batches` yielded no examples; it must yield at least "
                     "one non-empty batch.")
  t = total.total
  n = int(t["n"])
  return RegressionReport(
      num_examples=n, nll=float(t["nll"] / n),
      rmse=float(np.sqrt(t["squared_error"] / n)), crps=float(t["crps"] / n),
      mean_std=float(t["std"] / n),
      coverage={level: float(t[f"covered_{i}"] / n)
                for i, level in enumerate(levels)})
