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

The package, one concept a module, each importing only those listed before
it: ``predictors`` (:class:`Predictor` and the predictors), ``batch_stats``
(the jit-compiled statistics of a batch), ``host_metrics`` (their float64 sum
on the host and the metrics from it), ``reports`` (the report classes, the
table and the plots), ``classification`` (:func:`report`) and ``regression``.

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

from blrax._src.evaluation.uncertainty.batch_stats import (
    SCORE_SPAN,
    SCORES,
    entropy_decomposition,
)
from blrax._src.evaluation.uncertainty.classification import report
from blrax._src.evaluation.uncertainty.host_metrics import Detection
from blrax._src.evaluation.uncertainty.predictors import (
    Predictor,
    ensemble_predictor,
    point_predictor,
    posterior_predictor,
)
from blrax._src.evaluation.uncertainty.regression import (
    RegressionReport,
    gaussian_crps,
    regression_predictor,
    regression_report,
)
from blrax._src.evaluation.uncertainty.reports import (
    OODReport,
    ReliabilityBins,
    UncertaintyReport,
    format_reports,
    plot_report,
)

__all__ = (
    "SCORES",
    "SCORE_SPAN",
    "Detection",
    "OODReport",
    "Predictor",
    "RegressionReport",
    "ReliabilityBins",
    "UncertaintyReport",
    "ensemble_predictor",
    "entropy_decomposition",
    "format_reports",
    "gaussian_crps",
    "plot_report",
    "point_predictor",
    "posterior_predictor",
    "regression_predictor",
    "regression_report",
    "report",
)
