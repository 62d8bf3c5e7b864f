"""Self-checks of ``tests/evon_reference.py``, the float64 NumPy transcription
of the official EVON optimizer (spec: ``docs/evon_algorithm.md``).

Nothing here involves ``blrax.evon``: the first two calls are checked against
explicit formulas on a 2x2 matrix and a length-3 vector, the QR power
iteration against a known eigenbasis, Newton-Schulz against the SVD, the
per-mode factor rule on a (3, 3, 4, 8) kernel, and the whole transcription
for determinism.
"""

import math

import evon_reference as ref
import numpy as np
import pytest


def _rot(angle):
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, -s], [s, c]])


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


# Small, readable hyperparameters for the hand checks.
HAND = dict(ess=10.0, hess_init=0.5, lr=0.1, betas=(0.9, 0.99),
            shampoo_beta=0.5, weight_decay=0.1, eps=0.0, signs="canonical")
SIGMA0 = 1.0 / math.sqrt(10.0 * (0.5 + 0.1))  # 1/sqrt(ess (h0 + delta))


# ---------------------------------------------------------------------------
# 1. The first two calls, by hand.
# ---------------------------------------------------------------------------


def _matrix_first_call(**extra):
  """A 2x2 whose first gradient has known Kronecker eigenbases."""
  q_l, q_r = _rot(math.pi / 6), _rot(-math.pi / 8)
  g1 = q_l @ np.diag([2.0, 1.0]) @ q_r.T  # G G^T = Q_L diag(4, 1) Q_L^T
  m0 = np.array([[1.0, 2.0], [3.0, 4.0]])
  state = ref.init({"w": m0}, **dict(HAND, **extra))
  e1 = {"w": np.array([[0.3, -1.2], [0.7, 0.1]])}
  # Before the first call there is no basis: the draw is M + sigma0 E.
  np.testing.assert_allclose(ref.draw(state, e1)["w"], m0 + SIGMA0 * e1["w"])
  state = ref.step(state, [{"w": g1}], [e1])
  return state, m0, g1, q_l, q_r


def test_first_call_only_starts_the_factors_and_bases():
  state, m0, g1, q_l, q_r = _matrix_first_call()
  leaf = state["leaves"][0]
  assert leaf["step"] == 0  # the counter starts at the second call
  np.testing.assert_array_equal(leaf["mean"], m0)
  np.testing.assert_array_equal(leaf["momentum"], 0.0)
  np.testing.assert_array_equal(leaf["h"], 0.5)
  np.testing.assert_allclose(leaf["factors"][0], 0.5 * g1 @ g1.T)
  np.testing.assert_allclose(leaf["factors"][1], 0.5 * g1.T @ g1)
  # eigh, largest eigenvalue first.
  np.testing.assert_allclose(leaf["bases"][0], q_l, atol=1e-12)
  np.testing.assert_allclose(leaf["bases"][1], q_r, atol=1e-12)


def _second_call_by_hand(m0, g1, q_l, q_r, e2, g2, whiten=False):
  """The expected state after the second call, written out for 2x2."""
  rotated = q_l.T @ g2 @ q_r
  momentum = (1 - 0.9) * rotated
  price = SIGMA0 * e2 * rotated * (0.5 + 0.1) * 10.0
  h = (0.99 * 0.5 + 0.01 * price
       + 0.5 * 0.01 ** 2 * (0.5 - price) ** 2 / (0.5 + 0.1))
  direction = (momentum / (1 - 0.9) + 0.1 * q_l.T @ m0 @ q_r) / (h + 0.1)
  update = q_l @ direction @ q_r.T
  if whiten:
    update = ref.newton_schulz(update)
  left = 0.5 * (0.5 * g1 @ g1.T) + 0.5 * g2 @ g2.T
  right = 0.5 * (0.5 * g1.T @ g1) + 0.5 * g2.T @ g2
  return m0 - 0.1 * update, momentum, h, left, right


@pytest.mark.parametrize("whiten", [False, True])
def test_second_call_on_a_matrix(whiten):
  state, m0, g1, q_l, q_r = _matrix_first_call(whiten_prec_grad=whiten)
  e2 = np.array([[-0.4, 0.9], [1.5, -0.2]])
  g2 = np.array([[0.5, -1.0], [2.0, 0.25]])
  theta = ref.draw(state, {"w": e2})["w"]
  np.testing.assert_allclose(theta, m0 + q_l @ (SIGMA0 * e2) @ q_r.T)
  new = ref.step(state, [{"w": g2}], [{"w": e2}])
  leaf = new["leaves"][0]
  mean, momentum, h, left, right = _second_call_by_hand(
      m0, g1, q_l, q_r, e2, g2, whiten)
  assert leaf["step"] == 1
  np.testing.assert_allclose(leaf["mean"], mean, rtol=1e-12)
  np.testing.assert_allclose(leaf["momentum"], momentum, rtol=1e-12)
  np.testing.assert_allclose(leaf["h"], h, rtol=1e-12)
  np.testing.assert_allclose(leaf["factors"][0], left, rtol=1e-12)
  np.testing.assert_allclose(leaf["factors"][1], right, rtol=1e-12)
  # t = 1 is not a refresh step (frequency 10): the bases stay.
  np.testing.assert_allclose(leaf["bases"][0], q_l, atol=1e-12)
  np.testing.assert_allclose(leaf["bases"][1], q_r, atol=1e-12)


def test_refresh_comes_after_the_mean_update_and_keeps_h_in_place():
  """With frequency 1 the second call refreshes: its mean update still uses
  the old bases; then Q <- qr(L Q), the momentum is carried by rotation and
  h keeps its index."""
  state, m0, g1, q_l, q_r = _matrix_first_call(precondition_frequency=1,
                                                whiten_prec_grad=False)
  e2 = np.array([[-0.4, 0.9], [1.5, -0.2]])
  g2 = np.array([[0.5, -1.0], [2.0, 0.25]])
  leaf = ref.step(state, [{"w": g2}], [{"w": e2}])["leaves"][0]
  mean, momentum, h, left, right = _second_call_by_hand(
      m0, g1, q_l, q_r, e2, g2)
  np.testing.assert_allclose(leaf["mean"], mean, rtol=1e-12)
  np.testing.assert_allclose(leaf["h"], h, rtol=1e-12)

  def qr_pos(a):
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))

  new_l, new_r = qr_pos(left @ q_l), qr_pos(right @ q_r)
  np.testing.assert_allclose(leaf["bases"][0], new_l, atol=1e-12)
  np.testing.assert_allclose(leaf["bases"][1], new_r, atol=1e-12)
  carried = new_l.T @ (q_l @ momentum @ q_r.T) @ new_r
  np.testing.assert_allclose(leaf["momentum"], carried, atol=1e-12)


def test_first_two_calls_on_a_vector():
  """A length-3 vector: no basis (precondition_1d off), whitening on, so
  the step is the IVON direction normalised to length lr."""
  m0 = np.array([1.0, -2.0, 0.5])
  state = ref.init(m0, **HAND)
  e1, g1 = np.array([0.2, -0.3, 1.1]), np.array([0.4, 0.1, -0.6])
  np.testing.assert_allclose(ref.draw(state, e1), m0 + SIGMA0 * e1)
  state = ref.step(state, [g1], [e1])
  leaf = state["leaves"][0]
  assert leaf["step"] == 0 and leaf["bases"] == [None]
  np.testing.assert_array_equal(leaf["mean"], m0)

  e2, g2 = np.array([1.0, -1.0, 0.5]), np.array([0.3, -0.8, 1.2])
  np.testing.assert_allclose(ref.draw(state, e2), m0 + SIGMA0 * e2)
  leaf = ref.step(state, [g2], [e2])["leaves"][0]
  price = SIGMA0 * e2 * g2 * 0.6 * 10.0
  h = 0.99 * 0.5 + 0.01 * price + 0.5e-4 * (0.5 - price) ** 2 / 0.6
  direction = (g2 + 0.1 * m0) / (h + 0.1)
  expected = m0 - 0.1 * direction / np.linalg.norm(direction)
  np.testing.assert_allclose(leaf["h"], h, rtol=1e-12)
  np.testing.assert_allclose(leaf["momentum"], 0.1 * g2, rtol=1e-12)
  np.testing.assert_allclose(leaf["mean"], expected, rtol=1e-12)
  assert np.linalg.norm(leaf["mean"] - m0) == pytest.approx(0.1, rel=1e-12)


def test_vector_with_precondition_1d_gets_a_full_basis():
  g = np.array([0.3, -0.8, 1.2])
  state = ref.init(np.zeros(3), **dict(HAND, precondition_1d=True))
  leaf = ref.step(state, [g], [np.zeros(3)])["leaves"][0]
  np.testing.assert_allclose(leaf["factors"][0], 0.5 * np.outer(g, g))
  q = leaf["bases"][0]
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(abs(q[:, 0] @ g), np.linalg.norm(g))


# ---------------------------------------------------------------------------
# 2. Bases.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False])
def test_qr_power_iteration_converges_to_the_eigenbasis(exact):
  rng = np.random.default_rng(0)
  v = _orthogonal(rng, 5)
  factor = v @ np.diag([10.0, 5.0, 2.0, 1.0, 0.5]) @ v.T
  q = _orthogonal(rng, 5)
  for _ in range(80):
    q = ref.qr_refresh(factor, q, exact=exact)
  overlap = np.abs(v.T @ q)  # columns in decreasing eigenvalue order
  np.testing.assert_allclose(overlap, np.eye(5), atol=1e-12 if exact else 1e-5)
  # The first eigh, too, orders by decreasing eigenvalue.
  first = ref.initial_basis(factor, exact=exact)
  np.testing.assert_allclose(np.abs(v.T @ first), np.eye(5),
                             atol=1e-12 if exact else 1e-5)


def test_qr_refresh_does_not_reorder_columns():
  """Started from an eigenbasis in a scrambled order, a refresh keeps that
  order (no SOAP-style re-sort by the diagonal of Q^T L Q)."""
  rng = np.random.default_rng(1)
  v = _orthogonal(rng, 4)
  factor = v @ np.diag([4.0, 3.0, 2.0, 1.0]) @ v.T
  perm = [2, 0, 3, 1]
  q = ref.qr_refresh(factor, v[:, perm])
  np.testing.assert_allclose(np.abs(q), np.abs(v[:, perm]), atol=1e-12)


# ---------------------------------------------------------------------------
# 3. Newton-Schulz whitening.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (6, 6)])
def test_newton_schulz_approximates_the_polar_factor(shape):
  rng = np.random.default_rng(2)
  g = rng.standard_normal(shape)
  u, s, vt = np.linalg.svd(g, full_matrices=False)
  assert s[-1] / np.linalg.norm(g) > 2e-3  # inside Muon's working range
  exact = ref.newton_schulz(g, exact=True)
  inner = u.T @ exact @ vt.T  # same singular vectors: diagonal
  np.testing.assert_allclose(inner - np.diag(np.diag(inner)), 0.0, atol=1e-10)
  assert np.all((np.diag(inner) > 0.68) & (np.diag(inner) < 1.14))
  low = ref.newton_schulz(g, exact=False)  # bfloat16
  sv = np.linalg.svd(low, compute_uv=False)
  assert np.all((sv > 0.6) & (sv < 1.2))
  assert np.linalg.norm(low - u @ vt, 2) < 0.4
  assert np.max(np.abs(low - exact)) < 0.05


def test_whiten_views_by_the_first_axis_and_normalises_vectors():
  rng = np.random.default_rng(3)
  kernel = rng.standard_normal((3, 3, 4, 8))
  np.testing.assert_allclose(
      ref.whiten(kernel, 1e-10),
      ref.newton_schulz(kernel.reshape(3, 96)).reshape(kernel.shape))
  v = rng.standard_normal(7)
  np.testing.assert_allclose(np.linalg.norm(ref.whiten(v, 1e-10)), 1.0)
  np.testing.assert_array_equal(ref.whiten(np.zeros(3), 1e-10), 0.0)
  assert ref.whiten(np.array(-0.25), 1e-10) == -1.0  # extension: 0-D


# ---------------------------------------------------------------------------
# 4. Factors per mode and the merge rule.
# ---------------------------------------------------------------------------


def test_conv_kernel_factor_count_and_merge_rule():
  shape = (3, 3, 4, 8)
  hyper = lambda **kw: ref.make_hyper(1.0, 1.0, **kw)
  assert ref.factor_sizes(shape, hyper()) == [3, 3, 4, 8]  # one per mode
  assert ref.factor_sizes(shape, hyper(merge_dims=True)) == [288]
  assert ref.factor_sizes(shape, hyper(merge_dims=True,
                                       max_precond_dim=16)) == [9, 4, 8]
  assert ref.factor_sizes(shape, hyper(merge_dims=True,
                                       max_precond_dim=5)) == [3, 3, 4, None]
  assert ref.factor_sizes(shape, hyper(max_precond_dim=5)) == [3, 3, 4, None]
  # channels_last (4-D, only with merge_dims): permuted to (3, 8, 3, 4).
  assert ref.factor_sizes(shape, hyper(merge_dims=True, max_precond_dim=30,
                                       data_format="channels_last")) == [24, 12]
  assert ref.merge_shape((1, 5, 1), 4) == (5,)
  assert ref.merge_shape((), 4) == (1,)
  # Vectors and scalars.
  assert ref.factor_sizes((7,), hyper()) == [None]
  assert ref.factor_sizes((7,), hyper(precondition_1d=True)) == [7]
  assert ref.factor_sizes((7,), hyper(precondition_1d=True,
                                      max_precond_dim=6)) == [None]
  assert ref.factor_sizes((), hyper()) == []


def test_conv_kernel_rotation_is_the_per_mode_product():
  rng = np.random.default_rng(4)
  kernel = rng.standard_normal((3, 3, 4, 8))
  state = ref.init({"k": kernel}, ess=100.0, hess_init=1.0)
  state = ref.step(state, [{"k": rng.standard_normal(kernel.shape)}],
                   [{"k": np.zeros(kernel.shape)}])
  leaf = state["leaves"][0]
  assert [f.shape for f in leaf["factors"]] == [(3, 3), (3, 3), (4, 4), (8, 8)]
  bases, hyper = leaf["bases"], state["hyper"]
  x = rng.standard_normal(kernel.shape)
  rotated = np.einsum("abcd,ai,bj,ck,dl->ijkl", x, *bases)
  np.testing.assert_allclose(ref.rotate(x, bases, hyper), rotated, atol=1e-12)
  np.testing.assert_allclose(ref.unrotate(rotated, bases, hyper), x,
                             atol=1e-12)
  for merged in ({"merge_dims": True, "max_precond_dim": 16},
                 {"merge_dims": True, "max_precond_dim": 30,
                  "data_format": "channels_last"}):
    h = dict(hyper, **merged)
    sizes = ref.factor_sizes(kernel.shape, h)
    qs = [_orthogonal(rng, n) for n in sizes]
    np.testing.assert_allclose(ref.unrotate(ref.rotate(x, qs, h), qs, h), x,
                               atol=1e-12)


# ---------------------------------------------------------------------------
# 5. Other rules of the step.
# ---------------------------------------------------------------------------


def _run(n_calls, seed=0, **hyper):
  rng = np.random.default_rng(seed)
  target = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3),
            "k": rng.standard_normal((2, 3, 2, 2)), "s": np.array(0.7)}
  params = {k: np.zeros_like(v) for k, v in target.items()}
  state = ref.init(params, **dict(dict(ess=50.0, hess_init=1.0, lr=0.05),
                                  **hyper))
  n = state["hyper"]["mc_samples"]
  for _ in range(n_calls):
    noise = ref.standard_normal(state, rng)
    thetas = [ref.draw(state, e) for e in noise]
    grads = [{k: t[k] - target[k] + 0.1 * rng.standard_normal(t[k].shape)
              for k in t} for t in thetas]
    state = ref.step(state, grads, noise if math.isfinite(
        state["hyper"]["ess"]) else None)
  assert len(grads) == n
  return state


@pytest.mark.parametrize("hyper", [
    dict(whiten_prec_grad=False),  # a 0-D leaf is in the tree
    dict(whiten_prec_grad=False, exact=False, mc_samples=2),
    dict(whiten_prec_grad=False, merge_dims=True, max_precond_dim=6,
         precondition_1d=True, price_clip_ratio=2.0, phasing=True),
])
def test_determinism(hyper):
  a, b = _run(12, **hyper), _run(12, **hyper)
  assert a["leaves"][0]["step"] == 11  # 12 calls; refreshed at t = 10
  for la, lb in zip(a["leaves"], b["leaves"]):
    for key in ("mean", "h", "momentum"):
      np.testing.assert_array_equal(la[key], lb[key])
    for qa, qb in zip(la["bases"], lb["bases"]):
      np.testing.assert_array_equal(qa, qb)


def test_whitening_with_a_scalar_leaf_runs_and_exact_false_stays_close():
  exact = _run(12, whiten_prec_grad=True)
  low = _run(12, whiten_prec_grad=True, exact=False)
  for le, ll in zip(exact["leaves"], low["leaves"]):
    np.testing.assert_allclose(ll["mean"], le["mean"], atol=0.05)


def test_first_call_skips_every_leaf():
  state = _run(1)
  for leaf in state["leaves"]:
    assert leaf["step"] == 0
    np.testing.assert_array_equal(leaf["mean"], 0.0)
    np.testing.assert_array_equal(leaf["h"], 1.0)


def test_duplicated_samples_equal_one_sample():
  state, *_ = _matrix_first_call()
  e = {"w": np.array([[-0.4, 0.9], [1.5, -0.2]])}
  g = {"w": np.array([[0.5, -1.0], [2.0, 0.25]])}
  one = ref.step(state, [g], [e])
  two_state = dict(state, hyper=dict(state["hyper"], mc_samples=2))
  two = ref.step(two_state, [g, g], [e, e])
  for key in ("mean", "h", "momentum"):
    np.testing.assert_allclose(two["leaves"][0][key], one["leaves"][0][key],
                               rtol=1e-14)


def test_price_clip_debias_beta2_and_deterministic_mode():
  m0 = np.array([1.0, -2.0, 0.5])
  e, g = np.array([1.0, -1.0, 0.5]), np.array([300.0, -800.0, 1.2])

  def second(**extra):
    state = ref.init(m0, **dict(HAND, whiten_prec_grad=False, **extra))
    state = ref.step(state, [g], [e])
    return ref.step(state, [g], [e])["leaves"][0]

  # price_clip_ratio: f clamped to +-r (h + eps) before the EMA.
  price = np.clip(SIGMA0 * e * g * 6.0, -2.0 * 0.5, 2.0 * 0.5)
  h = 0.99 * 0.5 + 0.01 * price + 0.5e-4 * (0.5 - price) ** 2 / 0.6
  np.testing.assert_allclose(second(price_clip_ratio=2.0)["h"], h, rtol=1e-12)
  # debias_beta2: the learning rate is divided by 1 - beta2^t.
  plain, debiased = second(), second(debias_beta2=True)
  np.testing.assert_allclose(m0 - debiased["mean"],
                             (m0 - plain["mean"]) / (1 - 0.99), rtol=1e-12)
  # ess = inf: no noise, h is an EMA of the squared rotated gradient.
  det = second(ess=math.inf)
  np.testing.assert_allclose(det["h"], 0.99 * 0.5 + 0.01 * g ** 2, rtol=1e-12)
  state = ref.init(m0, **dict(HAND, ess=math.inf))
  np.testing.assert_array_equal(ref.draw(state, e), m0)
