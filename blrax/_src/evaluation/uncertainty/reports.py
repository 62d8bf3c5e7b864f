"""The report classes of a classifier's predictive, as a markdown table
(:func:`format_reports`) and as plots (:func:`plot_report`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from blrax._src.evaluation.uncertainty import host_metrics
from blrax._src.evaluation.uncertainty.batch_stats import SCORES


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
      fpr, tpr, _, _ = host_metrics.roc(r.stats[f"{ood_score}_count"],
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
