"""The uncertainty report of a classifier, streamed over batches:
:func:`report` (see the package docstring (``__init__.py``))."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blrax._src import validation
from blrax._src.evaluation.metrics import ROW_SUM_TOLERANCE
from blrax._src.evaluation.uncertainty import batch_stats, host_metrics, predictors
from blrax._src.evaluation.uncertainty.batch_stats import SCORES
from blrax._src.evaluation.uncertainty.reports import (
    OODReport,
    ReliabilityBins,
    UncertaintyReport,
)

_TypeError = validation.ArgumentTypeError


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
  total = host_metrics.StatsSum(name)
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
  predictor = predictors.as_predictor(predictor)
  num_bins = validation.check_integer("num_bins", num_bins, low=1)
  num_score_bins = validation.check_integer("num_score_bins", num_score_bins,
                                            low=2)
  jit = validation.check_flag("jit", jit)
  fn, args = predictor.fn, predictor.args

  size = [0]  # the largest batch so far: smaller ones are padded to it

  def one(inputs, labels):
    size[0] = max(size[0], labels.shape[0])
    inputs, labels, mask = batch_stats.pad_batch(inputs, labels, size[0])
    if jit:
      return batch_stats.jit_statistics(fn, args, inputs, labels, mask,
                                        num_bins, num_score_bins)
    return batch_stats.statistics(fn(args, inputs), labels, mask, num_bins,
                                  num_score_bins)

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
      rows[signature] = jax.eval_shape(
          lambda a, x: predictors.check_members(fn(a, x)), args,
          inputs).shape[1]
    stats = one(inputs, jnp.zeros(rows[signature], jnp.int32))
    return {key: stats[key] for key in batch_stats.UNLABELLED}

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
    detection[score], bounds[score] = host_metrics.detection(
        total[f"{score}_count"], ood_total[f"{score}_count"])
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
  aurc = host_metrics.aurc(cells_count, errors)
  # Cells ascend in 1 - confidence: reversed, they ascend in confidence.
  ece_mass = host_metrics.equal_mass_ece(
      cells_count[::-1], total["msp_correct"][::-1],
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
      e_aurc=aurc - host_metrics.optimal_aurc(n, correct),
      reliability=ReliabilityBins(count, total["bin_confidence"] / safe,
                                  total["bin_correct"] / safe),
      risk_coverage=host_metrics.risk_coverage(cells_count, errors), ood=ood,
      num_bins=num_bins, num_score_bins=num_score_bins, stats=total)
