"""blrax.uncertainty and the new blrax.metrics against independent oracles.

scikit-learn (log_loss, brier_score_loss, roc_auc_score,
average_precision_score, roc_curve), scipy (entropy, norm, quad,
minimize_scalar), brute force over orderings, and small cases by hand.
"""

import itertools
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize, special, stats
from sklearn import metrics as skm

import blrax
from blrax import uncertainty as U
from blrax._src.evaluation.uncertainty import batch_stats, host_metrics

M = blrax.metrics
IDENT = lambda x: x  # noqa: E731  (one function: the jit cache is shared)
G = 65536  # the default score grid


def _members(seed, s, n, k, scale=2.0, spread=1.0):
  """Member log-probs (S, n, k) around shared logits, and labels from them."""
  rng = np.random.default_rng(seed)
  base = scale * rng.normal(size=(n, k))
  logits = base[None] + spread * rng.normal(size=(s, n, k))
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
  labels = np.array([rng.choice(k, p=p) for p in special.softmax(base, 1)],
                    np.int32)
  return log_probs, labels


def _bma(log_probs):
  """float64 BMA probabilities of member log-probs."""
  lp = np.asarray(log_probs, np.float64)
  p = np.exp(special.logsumexp(lp, axis=0) - math.log(lp.shape[0]))
  return p / p.sum(-1, keepdims=True)


LP, Y = _members(0, 4, 240, 5)
OOD, _ = _members(1, 4, 160, 5, scale=0.7)


@pytest.fixture(scope="module")
def full():
  return U.report(IDENT, [(LP, Y)], ood_batches=[OOD])


# --------------------------------------------------------------------------
# Scalar metrics.


def test_scalar_metrics_match_sklearn_and_scipy(full):
  p = _bma(LP)
  k = p.shape[1]
  np.testing.assert_allclose(full.nll, skm.log_loss(Y, p, labels=range(k)),
                             rtol=1e-5)
  assert full.accuracy == skm.accuracy_score(Y, p.argmax(1))
  np.testing.assert_allclose(
      full.brier, skm.brier_score_loss(Y, p, labels=range(k),
                                       scale_by_half=False), rtol=1e-5)
  np.testing.assert_allclose(full.confidence, p.max(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(full.entropy, stats.entropy(p, axis=1).mean(),
                             rtol=1e-5)
  members = np.exp(LP.astype(np.float64))
  aleatoric = stats.entropy(members, axis=2).mean()
  np.testing.assert_allclose(full.aleatoric, aleatoric, rtol=1e-5)
  np.testing.assert_allclose(full.epistemic,
                             stats.entropy(p, axis=1).mean() - aleatoric,
                             rtol=1e-4)
  assert (full.num_examples, full.num_members, full.num_classes) == (240, 4, 5)


def test_binary_brier_is_twice_sklearns():
  lp, y = _members(2, 1, 50, 2)
  r = U.report(IDENT, [(lp, y)])
  p1 = np.exp(lp[0, :, 1].astype(np.float64))
  np.testing.assert_allclose(r.brier, 2 * skm.brier_score_loss(y, p1),
                             rtol=1e-5)


def test_calibration_metrics_match_blrax_metrics(full):
  p = jnp.asarray(_bma(LP), jnp.float32)
  np.testing.assert_allclose(full.ece, M.expected_calibration_error(p, Y),
                             atol=1e-6)
  np.testing.assert_allclose(full.mce, M.maximum_calibration_error(p, Y),
                             atol=1e-5)
  np.testing.assert_allclose(full.classwise_ece,
                             M.classwise_calibration_error(p, Y), atol=1e-6)
  # Equal mass from the score grid: the bins can differ only where one cell
  # straddles a bin edge (see the quantised test below for exactness).
  np.testing.assert_allclose(
      full.ece_equal_mass,
      M.expected_calibration_error(p, Y, binning="equal_mass"), atol=2e-3)
  count, conf, acc = M.calibration_bins(p, Y)
  np.testing.assert_allclose(full.reliability.count, count)
  np.testing.assert_allclose(full.reliability.confidence, conf, atol=1e-6)
  np.testing.assert_allclose(full.reliability.accuracy, acc, atol=1e-6)


# Six binary rows, by hand: confidences .9 .8 .7 .55 .6 .95, correct
# 1 0 1 0 1 1.
HAND = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55],
                 [0.6, 0.4], [0.95, 0.05]], np.float32)
HAND_Y = np.array([0, 1, 1, 0, 0, 0])


def test_calibration_by_hand():
  # 4 equal-width bins: (.5,.75] holds .7 .55 .6 (2 of 3 correct, mean conf
  # .61667); (.75,1] holds .9 .8 .95 (2 of 3, mean .88333).
  ece4 = 0.5 * abs(2 / 3 - 1.85 / 3) + 0.5 * abs(2 / 3 - 2.65 / 3)
  mce4 = abs(2 / 3 - 2.65 / 3)
  # 3 equal-mass bins of 2, by confidence: {.55 x, .6 v} {.7 v, .8 x}
  # {.9 v, .95 v}.
  ece_mass = (abs(0.5 - 0.575) + abs(0.5 - 0.75) + abs(1 - 0.925)) / 3
  mce_mass = 0.25
  # Classwise, 2 bins: class 0: bin 0 {.3 (y=1), .45 (y=0)}: +0.25; bin 1
  # {.9, .8, .6, .95} with hits 1 0 1 1: -0.25; class 1 mirrors: +-0.25.
  cw = 4 * 0.25 / (6 * 2)
  np.testing.assert_allclose(M.expected_calibration_error(HAND, HAND_Y, 4),
                             ece4, rtol=1e-5)
  np.testing.assert_allclose(M.maximum_calibration_error(HAND, HAND_Y, 4),
                             mce4, rtol=1e-5)
  np.testing.assert_allclose(
      M.expected_calibration_error(HAND, HAND_Y, 3, binning="equal_mass"),
      ece_mass, rtol=1e-5)
  np.testing.assert_allclose(
      M.maximum_calibration_error(HAND, HAND_Y, 3, binning="equal_mass"),
      mce_mass, rtol=1e-5)
  np.testing.assert_allclose(M.classwise_calibration_error(HAND, HAND_Y, 2),
                             cw, rtol=1e-5)
  # The report, all with 4 bins. Equal mass: ranks 0..5 -> floor(4r/6) =
  # 0 0 1 2 2 3: {.55 x, .6 v} {.7 v} {.8 x, .9 v} {.95 v}.
  ece_mass4 = (2 * 0.075 + 0.3 + 2 * 0.35 + 0.05) / 6
  # Classwise, 4 bins: class 0: (.25,.5] {.3 (y=1), .45 (y=0)}: +.25,
  # (.5,.75] {.6}: +.4, (.75,1] {.9, .8 (y=1), .95}: -.65; class 1 mirrors.
  cw4 = 2 * (0.25 + 0.4 + 0.65) / (6 * 2)
  np.testing.assert_allclose(
      M.expected_calibration_error(HAND, HAND_Y, 4, binning="equal_mass"),
      ece_mass4, rtol=1e-5)
  np.testing.assert_allclose(M.classwise_calibration_error(HAND, HAND_Y, 4),
                             cw4, rtol=1e-5)
  r = U.report(IDENT, [(np.log(HAND), HAND_Y)], num_bins=4)
  np.testing.assert_allclose([r.ece, r.mce, r.ece_equal_mass, r.classwise_ece],
                             [ece4, mce4, ece_mass4, cw4], rtol=1e-5)


def _binned_oracle(values, hits, num_bins):
  """sum_b |sum_{i in b} (hit_i - value_i)| over bins (b/B, (b+1)/B], the
  first also holding 0: written as interval tests, not index arithmetic."""
  total, worst = 0.0, 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    inside = (values > lo) & (values <= hi) | ((b == 0) & (values == 0))
    if inside.any():
      gap = hits[inside].sum() - values[inside].sum()
      total += abs(gap)
      worst = max(worst, abs(gap) / inside.sum())
  return total, worst


def test_bin_edges_belong_to_the_lower_bin():
  # Probabilities on a 1/8 grid: many sit exactly on the edges of 4 bins.
  rng = np.random.default_rng(11)
  probs = np.zeros((40, 3))
  probs[:, 0] = rng.integers(1, 9, size=40) / 8  # conf on the edges
  probs[:, 1] = (1 - probs[:, 0]) * (rng.integers(0, 3, size=40) / 2)
  probs[:, 2] = 1 - probs[:, 0] - probs[:, 1]
  probs = probs.astype(np.float32)
  labels = rng.integers(0, 3, size=40)
  n, k = probs.shape
  conf, pred = probs.max(1), probs.argmax(1)
  ece, mce = _binned_oracle(conf, (pred == labels).astype(float), 4)
  cw = sum(_binned_oracle(probs[:, c], (labels == c).astype(float), 4)[0]
           for c in range(k)) / (n * k)
  np.testing.assert_allclose(M.expected_calibration_error(probs, labels, 4),
                             ece / n, atol=1e-6)
  np.testing.assert_allclose(M.maximum_calibration_error(probs, labels, 4),
                             mce, atol=1e-6)
  np.testing.assert_allclose(M.classwise_calibration_error(probs, labels, 4),
                             cw, atol=1e-6)
  with np.errstate(divide="ignore"):
    r = U.report(IDENT, [(np.log(probs), labels)], num_bins=4)
  np.testing.assert_allclose([r.ece, r.mce, r.classwise_ece], [ece / n, mce, cw],
                             atol=1e-6)


def test_equal_mass_bins_with_ties_and_uneven_sizes():
  # n = 7, B = 3: ranks 0..6 -> bins floor(3r/7) = 0 0 0 1 1 2 2.
  conf = np.array([0.6, 0.9, 0.7, 0.6, 0.8, 0.95, 0.65], np.float32)
  probs = np.stack([conf, 1 - conf], 1)
  labels = np.array([0, 1, 0, 0, 1, 0, 0])
  count, _, _ = M.calibration_bins(probs, labels, 3, binning="equal_mass")
  np.testing.assert_array_equal(count, [3, 2, 2])
  # sorted (stable): .6(0) .6(3) .65(6) | .7(2) .8(4) | .9(1) .95(5)
  want = (abs(1 - (0.6 + 0.6 + 0.65) / 3) * 3 + abs(0.5 - 0.75) * 2
          + abs(0.5 - 0.925) * 2) / 7
  np.testing.assert_allclose(
      M.expected_calibration_error(probs, labels, 3, binning="equal_mass"),
      want, rtol=1e-5)


def test_new_metrics_are_nan_under_jit_for_bad_inputs():
  bad = np.array(HAND_Y)
  bad[0] = 7
  for fn in (M.maximum_calibration_error, M.classwise_calibration_error):
    assert np.isnan(jax.jit(fn)(HAND, bad))
    with pytest.raises(ValueError, match="labels"):
      fn(HAND, bad)
  with pytest.raises(ValueError, match="binning"):
    M.expected_calibration_error(HAND, HAND_Y, binning="quantile")


# --------------------------------------------------------------------------
# Entropy decomposition.


def test_entropy_decomposition_by_hand_and_identities():
  members = np.log(np.array([[[0.99, 0.01]], [[0.01, 0.99]]]))
  total, aleatoric, epistemic = U.entropy_decomposition(members)
  h = -(0.99 * math.log(0.99) + 0.01 * math.log(0.01))
  np.testing.assert_allclose([total[0], aleatoric[0], epistemic[0]],
                             [math.log(2), h, math.log(2) - h], rtol=1e-5)

  total, aleatoric, epistemic = U.entropy_decomposition(LP)
  assert (np.asarray(epistemic) >= 0).all()
  np.testing.assert_allclose(total, aleatoric + epistemic, atol=1e-6)
  # Members that agree: no epistemic part; S = 1: exactly none.
  same = np.repeat(LP[:1], 3, axis=0)
  assert float(jnp.max(U.entropy_decomposition(same)[2])) < 1e-5
  one = U.entropy_decomposition(LP[0])
  assert float(jnp.max(one[2])) == 0.0
  np.testing.assert_allclose(one[0], stats.entropy(np.exp(LP[0]), axis=1),
                             rtol=1e-5)


def test_a_point_predictor_has_no_epistemic_uncertainty():
  r = U.report(IDENT, [(LP[0], Y)])
  assert r.num_members == 1 and r.epistemic == 0.0
  assert r.entropy == pytest.approx(r.aleatoric)


# --------------------------------------------------------------------------
# Streaming.


def _close(a, b):
  for key, value in a.as_dict().items():
    np.testing.assert_allclose(value, b.as_dict()[key], rtol=2e-6, atol=1e-7,
                               err_msg=key)


def test_streaming_equals_one_batch(full):
  cuts = [0, 120, 200, 240]  # batch shapes 120, 80, 40: 3 compilations
  batches = ((LP[:, a:b], Y[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
  ood = iter([OOD[:, :80], OOD[:, 80:]])  # iterators are consumed once
  split = U.report(IDENT, batches, ood_batches=ood)
  _close(split, full)
  for key in ("msp_count", "entropy_count", "mutual_information_count",
              "bin_count", "msp_correct"):
    np.testing.assert_array_equal(split.stats[key], full.stats[key])
  np.testing.assert_allclose(split.risk_coverage, full.risk_coverage)


@pytest.mark.slow  # eager: every primitive compiles on its own (~15 s)
def test_eager_equals_jit():
  kwargs = dict(ood_batches=[OOD[:, :10]], num_score_bins=64)
  _close(U.report(IDENT, [(LP[:, :20], Y[:20])], jit=False, **kwargs),
         U.report(IDENT, [(LP[:, :20], Y[:20])], **kwargs))


# --------------------------------------------------------------------------
# Selective prediction.


def _binary_rows(gaps):
  """Log-probs of rows (1 - g, g): predicted class 0, 1 - confidence = g."""
  gaps = np.asarray(gaps, np.float64)
  assert gaps.max() < 0.5
  return np.stack([np.log1p(-gaps), np.log(gaps)], 1).astype(np.float32)


def _cell_centres(cells, num=G):
  """Scores at the centres of msp grid cells (u_max = 1)."""
  span = batch_stats._LOG_SPAN
  return np.exp(-span + (np.asarray(cells) + 0.5) * span / num)


def _aurc_brute_force(gaps, errors):
  """Mean over every order of tied scores of (1/n) sum_m risk_m."""
  gaps, errors = np.asarray(gaps), np.asarray(errors)
  groups = [np.flatnonzero(gaps == g) for g in np.unique(gaps)]
  values = []
  for orders in itertools.product(*(itertools.permutations(g)
                                    for g in groups)):
    order = np.concatenate(orders)
    risks = np.cumsum(errors[order]) / np.arange(1, len(order) + 1)
    values.append(risks.mean())
  return np.mean(values)


def test_aurc_by_hand():
  # Confidences .9 v, .8 x, .7 v, .6 x: risks 0, 1/2, 1/3, 2/4.
  lp = _binary_rows([0.1, 0.2, 0.3, 0.4])
  r = U.report(IDENT, [(lp, np.array([0, 1, 0, 1]))])
  np.testing.assert_allclose(r.aurc, (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
  # The ideal order (both correct first): risks 0, 0, 1/3, 2/4.
  np.testing.assert_allclose(r.e_aurc, r.aurc - (1 / 3 + 2 / 4) / 4)
  coverage, risk = r.risk_coverage
  np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])


def test_aurc_with_ties_is_the_mean_over_orders():
  rng = np.random.default_rng(3)
  gaps = _cell_centres(rng.choice([100, 20000, 40000, 60000], size=9))
  labels = rng.integers(0, 2, size=9)
  r = U.report(IDENT, [(_binary_rows(gaps), labels)])
  np.testing.assert_allclose(r.aurc, _aurc_brute_force(gaps, labels != 0),
                             rtol=1e-12)


def test_aurc_on_many_quantised_scores():
  # Expected errors after m accepted, ties in random order: E_before +
  # (m - M_before) e/c within a tie group (hypergeometric mean), summed
  # directly over m (not through harmonic numbers as the code does).
  rng = np.random.default_rng(4)
  gaps = _cell_centres(rng.choice(np.arange(0, 60000, 700), size=400))
  labels = (rng.random(400) < 0.3 + gaps).astype(int)
  r = U.report(IDENT, [(_binary_rows(gaps), labels)])
  errors = labels != 0
  total, m, e_before = 0.0, 0, 0
  for g in np.unique(gaps):
    group = errors[gaps == g]
    c, e = len(group), group.sum()
    for i in range(1, c + 1):
      total += (e_before + i * e / c) / (m + i)
    m, e_before = m + c, e_before + e
  np.testing.assert_allclose(r.aurc, total / 400, rtol=1e-10)
  coverage, risk = r.risk_coverage
  assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(1 - r.accuracy)


def test_score_grid_cells():
  # Cells are uniform in log u over [u_max / 1e12, u_max]: the centre of
  # cell j maps to j, the edges to the first and last cells.
  cells = np.array([0, 1, 7, 4095, 40000, G - 2, G - 1])
  got = batch_stats._cells(jnp.log(_cell_centres(cells)), 0.0, G)
  np.testing.assert_array_equal(got, cells)
  edges = jnp.log(jnp.array([1.0, 2.0, 1e-12, 1e-13, 0.0]))
  np.testing.assert_array_equal(batch_stats._cells(edges, 0.0, G),
                                [G - 1, G - 1, 0, 0, 0])
  # Entropy and mutual information: u_max = log k.
  top = math.log(math.log(5))
  np.testing.assert_array_equal(
      batch_stats._cells(jnp.log(_cell_centres(cells) * math.log(5)), top, G),
      cells)


def test_harmonic_numbers():
  m = np.array([0, 1, 2, 10, 63, 64, 65, 1000, 10**6])
  exact = [math.fsum(1 / i for i in range(1, int(x) + 1)) for x in m[:-1]]
  exact.append(float(special.digamma(10**6 + 1) + np.euler_gamma))
  np.testing.assert_allclose(host_metrics._harmonic(m), exact, rtol=1e-14)


# --------------------------------------------------------------------------
# OOD detection.


def _sklearn_detection(scores_in, scores_out):
  truth = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
  scores = np.r_[scores_in, scores_out]
  fpr, tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
  return U.Detection(skm.roc_auc_score(truth, scores),
                     skm.average_precision_score(truth, scores),
                     fpr[np.argmax(tpr >= 0.95)])


def test_ood_metrics_equal_sklearn_on_quantised_scores():
  # Gaps at cell centres far apart, so every distinct gap has its own cell
  # for the entropy too; ties within and across the two streams.
  rng = np.random.default_rng(5)
  cells = np.arange(30000, 63000, 997)  # gaps from 1e-7 to 0.25
  gaps_in = _cell_centres(rng.choice(cells[:20], size=300))
  gaps_out = _cell_centres(rng.choice(cells[10:], size=120))
  r = U.report(IDENT, [(_binary_rows(gaps_in), np.zeros(300, int))],
               ood_batches=[_binary_rows(gaps_out)])
  assert np.count_nonzero(r.stats["entropy_count"]) == len(
      np.unique(gaps_in))
  want = _sklearn_detection(gaps_in, gaps_out)
  for score in ("msp", "entropy"):
    np.testing.assert_allclose(r.ood.detection[score], want, rtol=1e-12,
                               err_msg=score)
  assert r.ood.auroc_tie_bound["msp"] > 0  # the streams share cells
  # One member: no mutual information, so it cannot detect anything.
  assert r.ood.detection["mutual_information"].auroc == 0.5


def test_ood_metrics_on_raw_scores_within_the_grid_resolution(full):
  # Unquantised float scores: pairs in one cell (a factor 1.00042) count as
  # tied. The AUROC is within the tie bound the report computes; AUPR and
  # FPR@95 within 2e-3 here (measured up to 2e-4 / 0 on 3000 scores, k = 10).
  p_in, p_out = _bma(LP), _bma(OOD)
  scores = {
      "msp": (1 - p_in.max(1), 1 - p_out.max(1)),
      "entropy": (stats.entropy(p_in, axis=1), stats.entropy(p_out, axis=1)),
  }
  m_in = stats.entropy(np.exp(LP.astype(np.float64)), axis=2).mean(0)
  m_out = stats.entropy(np.exp(OOD.astype(np.float64)), axis=2).mean(0)
  scores["mutual_information"] = (scores["entropy"][0] - m_in,
                                  scores["entropy"][1] - m_out)
  for name, (a, b) in scores.items():
    got, want = full.ood.detection[name], _sklearn_detection(a, b)
    bound = full.ood.auroc_tie_bound[name]
    assert bound < 2e-3, name
    assert abs(got.auroc - want.auroc) <= bound + 1e-6, name
    assert abs(got.aupr - want.aupr) <= 2e-3, name
    assert abs(got.fpr95 - want.fpr95) <= 2e-3, name
  assert full.ood.num_examples == 160
  np.testing.assert_allclose(full.ood.entropy,
                             scores["entropy"][1].mean(), rtol=1e-5)


def test_equal_mass_ece_is_exact_when_no_cell_straddles_a_bin():
  # 12 rows, 4 distinct confidences, 3 each; 4 bins of 3 rows.
  rng = np.random.default_rng(6)
  gaps = _cell_centres(np.repeat([5000, 30000, 50000, 60000], 3))
  labels = rng.integers(0, 2, 12)
  r = U.report(IDENT, [(_binary_rows(gaps), labels)], num_bins=4)
  probs = np.exp(_binary_rows(gaps).astype(np.float64))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(
      r.ece_equal_mass,
      M.expected_calibration_error(probs, labels, 4, binning="equal_mass"),
      atol=1e-6)


# --------------------------------------------------------------------------
# Predictors.


def _linear_model():
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 20))
  state = blrax.ivon(0.1, ess=50.0, hess_init=0.5).init(w)
  return (lambda p, inputs: inputs @ p), w, state, x, y


def test_posterior_predictor_draws_match_predictive():
  apply_fn, w, state, x, y = _linear_model()
  predictor = U.posterior_predictor(apply_fn, 3, w, state, num_samples=8,
                                    chunk_size=4)
  members = predictor(x)
  assert members.shape == (8, 20, 4)
  bma = jax.nn.logsumexp(members, 0) - jnp.log(8)
  np.testing.assert_allclose(
      bma, blrax.predictive.predictive_log_probs(apply_fn, 3, w, state, x,
                                                 num_samples=8), atol=1e-5)
  # The same draws for every batch and every chunk size.
  np.testing.assert_allclose(predictor(x[:5]), members[:, :5], atol=1e-6)
  np.testing.assert_allclose(
      U.posterior_predictor(apply_fn, 3, w, state, 8)(x), members, atol=1e-6)
  r = U.report(predictor, [(x[:10], y[:10]), (x[10:], y[10:])],
               ood_batches=[3 * x[:10]])
  assert r.num_members == 8 and r.epistemic > 0
  np.testing.assert_allclose(r.nll, -np.mean(np.take_along_axis(
      np.asarray(bma), np.asarray(y)[:, None], 1)), rtol=1e-5)


def test_point_and_ensemble_predictors():
  apply_fn, w, _, x, y = _linear_model()
  r = U.report(U.point_predictor(apply_fn, w), [(x, y)])
  p = jax.nn.softmax(x @ w)
  np.testing.assert_allclose(r.nll, M.negative_log_likelihood(p, y),
                             rtol=1e-5)
  ensemble = U.ensemble_predictor(apply_fn, [w, -w, 2 * w])
  members = ensemble(x)
  np.testing.assert_allclose(members[1], jax.nn.log_softmax(-x @ w),
                             atol=1e-6)
  assert U.report(ensemble, [(x, y)]).num_members == 3


def test_short_batches_are_padded_and_share_one_compilation():
  apply_fn, w, _, x, y = _linear_model()
  predictor = U.point_predictor(apply_fn, w)  # a new fn: nothing cached
  before = batch_stats.jit_statistics._cache_size()
  ragged = U.report(predictor, [(x[:8], y[:8]), (x[8:16], y[8:16]),
                                (x[16:], y[16:])],
                    ood_batches=[2 * x[:8], 2 * x[8:11]])
  assert batch_stats.jit_statistics._cache_size() == before + 1
  whole = U.report(predictor, [(x, y)], ood_batches=[2 * x[:11]])
  _close(ragged, whole)
  for key in ("msp_count", "entropy_count", "bin_count", "msp_correct"):
    np.testing.assert_array_equal(ragged.stats[key], whole.stats[key])


# --------------------------------------------------------------------------
# Temperature scaling.


def _nll_at(logits, labels, t):
  lp = special.log_softmax(logits / t, axis=1)
  return -np.mean(lp[np.arange(len(labels)), labels])


def test_fit_temperature_matches_scipy():
  rng = np.random.default_rng(8)
  logits = 3 * rng.normal(size=(400, 4))
  labels = np.array([rng.choice(4, p=p) for p in special.softmax(logits / 2.5,
                                                                 1)])
  want = optimize.minimize_scalar(lambda t: _nll_at(logits, labels, t),
                                  bounds=(0.01, 100), method="bounded",
                                  options={"xatol": 1e-9}).x
  got = U.fit_temperature(logits.astype(np.float32), labels)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  np.testing.assert_allclose(jax.jit(U.fit_temperature)(logits, labels), want,
                             rtol=1e-4)
  # Log-probabilities give the same temperature (shift invariance).
  np.testing.assert_allclose(
      U.fit_temperature(special.log_softmax(logits, 1), labels), want,
      rtol=1e-4)
  assert _nll_at(logits, labels, float(got)) <= _nll_at(logits, labels, 1.0)
  np.testing.assert_allclose(U.apply_temperature(logits, got),
                             special.log_softmax(logits / float(got), 1),
                             atol=1e-5)


def test_separated_data_leave_the_logits_unscaled():
  # Every label has the largest logit (the last row: tied): the NLL falls
  # as T -> 0 with no minimiser, so T = 1, clipped to the bounds, warned.
  logits = np.array([[5.0, 0.0, 1.0], [0.0, 5.0, 4.0], [2.0, 0.0, 3.0],
                     [1.0, 1.0, 0.0]])
  labels = np.array([0, 1, 2, 1])
  nll = [_nll_at(logits, labels, t) for t in (100.0, 1.0, 0.1, 0.01)]
  assert nll[0] > nll[1] > nll[2] > nll[3]  # The lower bound: the "minimum".
  for bounds, want in (((0.01, 100.0), 1.0), ((2.0, 10.0), 2.0),
                       ((0.1, 0.5), 0.5)):
    with pytest.warns(UserWarning, match=f"cannot set T; returning T = {want:g}"):
      np.testing.assert_allclose(
          U.fit_temperature(logits, labels, bounds=bounds), want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(U.fit_temperature)(logits, labels), 1.0)
  # One label below its row's maximum: a finite minimiser (the scipy
  # oracle's), no warning.
  labels[3] = 2
  want = optimize.minimize_scalar(lambda t: _nll_at(logits, labels, t),
                                  bounds=(0.01, 100), method="bounded",
                                  options={"xatol": 1e-9}).x
  assert 0.05 < want < 50
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_allclose(U.fit_temperature(logits, labels), want,
                               rtol=1e-4)
    # A label of probability 0 (every logit -inf) is not a correct one.
    U.fit_temperature(np.array([[-np.inf, -np.inf], [1.0, 0.0]]), [0, 0])


def test_temperature_predictor_scales_the_bma():
  scaled = U.temperature_predictor(IDENT, 2.0)
  out = scaled(LP)
  assert out.shape == (1,) + LP.shape[1:]
  np.testing.assert_allclose(out[0], special.log_softmax(np.log(_bma(LP)) / 2,
                                                         1), atol=1e-5)


# --------------------------------------------------------------------------
# Conformal prediction.


def test_conformal_by_hand():
  # Deterministic APS (U = 1): a label's score is the mass ranked above it
  # plus its own. Calibration scores: .5, .5 + .3, .2 + .5 + .3 = 1.0
  # (rank 3), .6, .1 + .6 + .3... see each row.
  probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2],
                    [0.1, 0.6, 0.3], [0.1, 0.6, 0.3]], np.float32)
  labels = np.array([0, 1, 2, 1, 2])
  # scores: 0.5, 0.8, 1.0, 0.6, 0.9; alpha = 0.5: rank ceil(6 * 0.5) = 3
  # -> the 3rd smallest, 0.8.
  q = U.conformal_threshold(probs, labels, 0.5, randomized=False)
  np.testing.assert_allclose(q, 0.8, rtol=1e-6)
  sets = U.conformal_sets(probs[[0, 3]], q, randomized=False)
  np.testing.assert_array_equal(sets, [[True, True, False],
                                       [False, True, False]])
  # alpha = 0.1: rank ceil(6 * 0.9) = 6 > 5: every set is every class.
  q = U.conformal_threshold(probs, labels, 0.1, randomized=False)
  assert q == np.inf
  assert U.conformal_sets(probs, q, randomized=False).all()
  # RAPS adds lam * (rank - k_reg)^+: label 2 of row 0 (rank 3) gains 0.2.
  q = U.conformal_threshold(probs, labels, 0.2, method="raps",
                            randomized=False, lam=0.1, k_reg=1)
  np.testing.assert_allclose(q, 1.2, rtol=1e-6)  # scores .5 .9 1.2 .6 1.0


def test_randomised_sets_follow_a_uniform_u():
  # One row (.6, .3, .1) repeated: with threshold q, class 0 is in the set
  # iff U * .6 <= q, class 1 iff .6 + U * .3 <= q (independent oracle: U is
  # uniform), and the set is nested (class 1 only with class 0).
  probs = np.tile(np.array([[0.6, 0.3, 0.1]], np.float32), (6000, 1))
  for q, want0, want1 in [(0.5, 5 / 6, 0.0), (0.75, 1.0, 0.5)]:
    sets = np.asarray(U.conformal_sets(probs, q, key=jax.random.key(4)))
    err = 3 * math.sqrt(0.25 / len(probs))
    assert abs(sets[:, 0].mean() - want0) <= err, q
    assert abs(sets[:, 1].mean() - want1) <= err, q
    assert not (sets[:, 1] & ~sets[:, 0]).any() and not sets[:, 2].any()


def test_alpha_rank_uses_the_decimal_value():
  # (n + 1)(1 - 0.1) with n = 9 is 9 exactly, not 9.000000000000002.
  probs = np.full((9, 2), 0.5, np.float32)
  labels = np.arange(9) % 2
  q = U.conformal_threshold(probs, labels, 0.1, randomized=False)
  assert np.isfinite(q)


def _pool(seed, n, k):
  rng = np.random.default_rng(seed)
  logits = 2 * rng.normal(size=(n, k))
  probs = special.softmax(logits, 1).astype(np.float32)
  # The model is over-confident: labels come from softer probabilities.
  labels = np.array([rng.choice(k, p=p) for p in special.softmax(logits / 2,
                                                                 1)])
  return jnp.asarray(probs), jnp.asarray(labels)


@pytest.mark.parametrize("method,randomized", [("aps", True), ("aps", False),
                                               ("raps", True)])
def test_conformal_coverage_over_random_splits(method, randomized):
  probs, labels = _pool(9, 1000, 5)
  n_cal, alpha, splits = 95, 0.1, 300
  kwargs = dict(method=method, randomized=randomized)
  if method == "raps":
    kwargs.update(lam=0.05, k_reg=1)

  @jax.jit
  def coverage(key):
    order = jax.random.permutation(key, len(labels))
    cal, test = order[:n_cal], order[n_cal:]
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    q = U.conformal_threshold(probs[cal], labels[cal], alpha,
                              key=k1 if randomized else None, **kwargs)
    sets = U.conformal_sets(probs[test], q, key=k2 if randomized else None,
                            **kwargs)
    return jnp.mean(sets[jnp.arange(len(test)), labels[test]])

  keys = jax.random.split(jax.random.key(0), splits)
  covered = np.asarray(jax.lax.map(coverage, keys))
  mean, err = covered.mean(), covered.std() / math.sqrt(splits)
  # The guarantee: E[coverage] >= 1 - alpha; for continuous (randomised)
  # scores E[coverage] = ceil((n+1)(1-alpha)) / (n+1) = 87/96 exactly.
  assert mean >= 1 - alpha
  if randomized:
    assert abs(mean - 87 / 96) <= 3 * err, (mean, err)
    assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * err


# --------------------------------------------------------------------------
# Regression.


def _regression_data(n=200):
  rng = np.random.default_rng(10)
  mean = rng.normal(size=n)
  var = np.exp(rng.normal(size=n) - 1)
  y = mean + np.sqrt(var) * rng.standard_t(4, size=n)
  return mean, var, y


def test_regression_report_matches_scipy():
  mean, var, y = _regression_data()
  predictor = U.Predictor(lambda a, i: (a[0][i], a[1][i]),
                          (jnp.asarray(mean, jnp.float32),
                           jnp.asarray(var, jnp.float32)))
  idx = np.arange(len(y))
  r = U.regression_report(predictor, [(idx[:120], y[:120]),
                                      (idx[120:], y[120:])])
  std = np.sqrt(var)
  np.testing.assert_allclose(r.nll, -stats.norm.logpdf(y, mean, std).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(r.rmse, np.sqrt(np.mean((y - mean) ** 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(r.mean_std, std.mean(), rtol=1e-5)
  for level, value in r.coverage.items():
    lo, hi = stats.norm.interval(level, mean, std)
    assert value == np.mean((lo <= y) & (y <= hi)), level

  def crps(m, s, obs):  # integral of (F(t) - [t >= obs])^2
    f = lambda t: (stats.norm.cdf(t, m, s) - (t >= obs)) ** 2  # noqa: E731
    return (integrate.quad(f, -np.inf, obs, epsabs=1e-12)[0]
            + integrate.quad(f, obs, np.inf, epsabs=1e-12)[0])

  want = np.array([crps(m, s, o) for m, s, o in zip(mean[:20], std[:20],
                                                    y[:20])])
  got = U.gaussian_crps(mean, var, y)
  np.testing.assert_allclose(got[:20], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(r.crps, np.mean(got), rtol=1e-5)
  assert set(r.as_dict()) >= {"nll", "rmse", "crps", "coverage_0.9"}


def test_crps_limits():
  # As sigma -> 0 the CRPS is the absolute error; at y = mu it is
  # sigma (sqrt 2 - 1) / sqrt(pi).
  np.testing.assert_allclose(U.gaussian_crps(1.0, 1e-12, 3.0), 2.0, rtol=1e-5)
  np.testing.assert_allclose(U.gaussian_crps(0.0, 4.0, 0.0),
                             2 * (math.sqrt(2) - 1) / math.sqrt(math.pi),
                             rtol=1e-6)
  assert np.isnan(U.gaussian_crps(0.0, 0.0, 1.0))


def test_regression_predictor_matches_predictive():
  apply_fn, w, state, x, _ = _linear_model()
  apply_fn = lambda p, inputs: (inputs @ p)[:, 0]  # noqa: E731
  predictor = U.regression_predictor(apply_fn, 1, w, state, num_samples=8,
                                     noise_variance=0.5)
  mean, var = predictor(x)
  want = blrax.predictive.predictive_mean_variance(apply_fn, 1, w, state, x,
                                                   8, noise_variance=0.5)
  np.testing.assert_allclose(mean, want[0], atol=1e-6)
  np.testing.assert_allclose(var, want[1], rtol=1e-5)
  r = U.regression_report(predictor, [(x, np.zeros(20))])
  assert r.num_examples == 20 and r.mean_std > math.sqrt(0.5)


# --------------------------------------------------------------------------
# Output, plots and bad inputs.


def test_format_and_plot(full, tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  no_ood = U.report(IDENT, [(LP[:2], Y)])
  table = U.format_reports({"a": full, "b": no_ood})
  assert "| metric | a | b |" in table
  assert "| OOD AUROC, entropy ↑ | " in table and "| – |" in table
  assert str(full).startswith("| metric | model |")
  fig = U.plot_report({"a": full, "b": no_ood})
  assert len(fig.axes) == 3
  fig.savefig(tmp_path / "r.png")
  assert len(U.plot_report(no_ood).axes) == 2


BAD_REPORTS = [
    (dict(batches=[]), "batches"),
    (dict(batches=[(LP[:, :0], Y[:0])]), "batches"),
    (dict(batches=[LP]), "batches"),
    (dict(batches=[(LP, Y[:10])]), "labels"),
    (dict(batches=[(LP, Y.astype(np.float32))]), "labels"),
    (dict(batches=[(LP, Y), (LP, Y + 5)]), "batch 1"),
    (dict(batches=[(np.exp(LP), Y)]), "log-prob"),
    (dict(batches=[(LP[..., :1], Y)]), "k >= 2"),
    (dict(batches=[(LP, Y)], num_bins=0), "num_bins"),
    (dict(batches=[(LP, Y)], num_score_bins=1), "num_score_bins"),
    (dict(batches=[(LP, Y)], ood_batches=[]), "ood_batches"),
    (dict(batches=[(LP, Y)],
          ood_batches=[jax.nn.log_softmax(OOD[..., :3])]), "classes"),
    (dict(batches=[(LP, Y), (LP[:2], Y)]), "members"),
]


@pytest.mark.parametrize("kwargs,match", BAD_REPORTS,
                         ids=[m for _, m in BAD_REPORTS])
def test_bad_report_inputs_raise(kwargs, match):
  kwargs = dict(kwargs)
  with pytest.raises(ValueError, match=match):
    U.report(IDENT, kwargs.pop("batches"), **kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda: U.report(3, [(LP, Y)]), "predictor"),
    (lambda: U.ensemble_predictor(IDENT, []), "params_list"),
    (lambda: U.point_predictor(None, {}), "apply_fn"),
    (lambda: U.posterior_predictor(IDENT, 0, {}, (), 0), "num_samples"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 0.0, key=0), "alpha"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 1.0, key=0), "alpha"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 1.5, key=0), "alpha"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 0.1), "key"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 0.1, key=0, method="lac"),
     "method"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 0.1, key=0, lam=0.1),
     "lam"),
    (lambda: U.conformal_threshold(HAND, HAND_Y, 0.1, key=0, method="raps",
                                   lam=-1.0), "lam"),
    (lambda: U.conformal_threshold(2 * HAND, HAND_Y, 0.1, key=0), "probs"),
    (lambda: U.conformal_threshold(HAND, HAND_Y + 2, 0.1, key=0), "labels"),
    (lambda: U.conformal_sets(HAND, np.ones(2), key=0), "threshold"),
    (lambda: U.fit_temperature(HAND, HAND_Y, bounds=(1.0, 0.5)), "bounds"),
    (lambda: U.fit_temperature(HAND[:, :1], HAND_Y), "logits"),
    (lambda: U.fit_temperature(np.full((6, 2), np.nan), HAND_Y), "logits"),
    (lambda: U.fit_temperature(HAND, HAND_Y[:3]), "labels"),
    (lambda: U.apply_temperature(HAND, 0.0), "temperature"),
    (lambda: U.regression_report(IDENT, [(np.ones(3), np.ones(3))],
                                 levels=(0.5, 1.0)), "levels"),
    (lambda: U.regression_report(lambda x: (x, 0 * x),
                                 [(np.ones(3), np.ones(3))]), "variance"),
    (lambda: U.regression_report(lambda x: (x, x), [(np.ones(3),
                                                     np.ones(2))]), "shape"),
    (lambda: U.regression_report(lambda x: (x, x), []), "batches"),
    (lambda: U.plot_report({}), "reports"),
    (lambda: U.format_reports({}), "reports"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.slow
def test_digits_example_runs(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "examples", "uncertainty_report.py"),
       "--epochs", "2", "--samples", "4", "--out", str(tmp_path)],
      capture_output=True, text=True, cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ("| OOD AUROC, MI ↑ |", "| ECE, equal mass ↓ |", "IVON (BMA, 4)",
              "| IVON (mean) |"):
    assert row in result.stdout, row
  assert (tmp_path / "report.png").stat().st_size > 0
