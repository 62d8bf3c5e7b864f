"""Hostile inputs to metrics, prediction and exponential families.

Every wrong argument either raises an error that names it (concrete inputs),
or gives NaN (values under ``jit``): never a plausible-looking number. Valid
inputs keep giving the numbers of scikit-learn and of closed forms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

import blrax
from blrax import expfam
from blrax._src.evaluation import metrics as metrics_src

M = blrax.metrics
P = blrax.predictive

PROBS64 = np.array([[0.7, 0.2, 0.1],
                    [0.1, 0.6, 0.3],
                    [0.25, 0.25, 0.5],
                    [0.05, 0.9, 0.05]])
PROBS = PROBS64.astype(np.float32)
LABELS = np.array([0, 2, 2, 1])

METRICS = {
    "nll": M.negative_log_likelihood,
    "accuracy": M.accuracy,
    "brier": M.brier_score,
    "ece": M.expected_calibration_error,
}
JITTED = {name: jax.jit(f) for name, f in METRICS.items()}


def _logits_as_probs():
  return np.log(PROBS) + 1.0


# (name, probs, labels, the argument the message must name)
BAD_VALUES = [
    ("label_minus_one", PROBS, np.array([0, 2, 2, -1]), "labels"),
    ("label_k", PROBS, np.array([0, 3, 2, 1]), "labels"),
    ("rows_sum_to_3", 3 * PROBS, LABELS, "probs"),
    ("logits", _logits_as_probs(), LABELS, "probs"),
    ("nan_probs", np.full_like(PROBS, np.nan), LABELS, "probs"),
    ("negative_probs", np.array([[1.2, -0.1, -0.1]] + PROBS[1:].tolist(),
                                np.float32), LABELS, "probs"),
    ("inf_probs", np.array([[np.inf, 0.0, 0.0]] + PROBS[1:].tolist(),
                           np.float32), LABELS, "probs"),
    ("rows_off_by_1e-2", PROBS + np.float32(0.01 / 3), LABELS, "probs"),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,probs,labels,arg", BAD_VALUES,
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_values_raise_when_concrete(metric, name, probs, labels, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    METRICS[metric](probs, labels)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name,probs,labels,arg", BAD_VALUES,
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_nan_under_jit(metric, name, probs, labels, arg):
  assert np.isnan(JITTED[metric](probs, labels))


def test_calibration_bins_are_nan_under_jit():
  bins = jax.jit(M.calibration_bins, static_argnums=2)(
      PROBS, np.array([0, 2, 2, -1]), 3)
  assert all(np.isnan(b).all() for b in bins)


def test_nll_gradient_is_nan_under_jit_for_bad_labels():
  grad = jax.jit(jax.grad(M.negative_log_likelihood))(
      jnp.asarray(PROBS), jnp.array([0, 2, 2, -1]))
  assert np.isnan(grad).any()


def test_valid_inputs_match_sklearn():
  probs, labels = PROBS64, LABELS
  want = {
      "nll": skm.log_loss(labels, probs, labels=[0, 1, 2]),
      "accuracy": skm.accuracy_score(labels, probs.argmax(1)),
      "brier": skm.brier_score_loss(labels, probs, labels=[0, 1, 2],
                                    scale_by_half=False),
  }
  for name, value in want.items():
    np.testing.assert_allclose(METRICS[name](PROBS, LABELS), value, rtol=1e-6)
    np.testing.assert_allclose(JITTED[name](PROBS, LABELS), value, rtol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_python_lists_work(metric):
  np.testing.assert_allclose(
      METRICS[metric](PROBS.tolist(), LABELS.tolist()),
      METRICS[metric](jnp.asarray(PROBS), jnp.asarray(LABELS)), rtol=1e-6)


def test_friendly_dtypes():
  onehot = np.eye(3, dtype=np.int32)[LABELS]  # integer probabilities
  np.testing.assert_allclose(M.accuracy(onehot, LABELS), 1.0)
  np.testing.assert_allclose(M.negative_log_likelihood(onehot, LABELS), 0.0,
                             atol=1e-7)
  binary = np.array([[0.8, 0.2], [0.3, 0.7]])
  np.testing.assert_allclose(M.accuracy(binary, np.array([False, True])), 1.0)
  half = jax.nn.softmax(jnp.asarray(np.log(PROBS)).astype(jnp.bfloat16))
  assert np.isfinite(M.negative_log_likelihood(half, LABELS))


def test_row_sum_tolerance_is_1e_3():
  assert metrics_src.ROW_SUM_TOLERANCE == 1e-3
  close = PROBS + np.float32(5e-4 / 3)  # rows sum to 1.0005: accepted
  np.testing.assert_allclose(M.accuracy(close, LABELS), 0.75)
  with pytest.raises(ValueError, match="probs"):
    M.accuracy(PROBS + np.float32(5e-3 / 3), LABELS)


@pytest.mark.parametrize("metric", METRICS)
def test_float_labels_are_a_type_error(metric):
  with pytest.raises(TypeError, match="labels"):
    METRICS[metric](PROBS, LABELS.astype(np.float32))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("probs,labels", [
    (np.zeros((0, 3), np.float32), np.zeros(0, np.int32)),  # n = 0
    (np.zeros((4, 0), np.float32), LABELS),                 # k = 0
    (PROBS[0], np.array(0)),                                # 1-D probs
    (PROBS, LABELS[:, None]),                               # 2-D labels
    (PROBS[None], LABELS),                                  # 3-D probs
], ids=["n0", "k0", "probs1d", "labels2d", "probs3d"])
def test_bad_shapes_raise(metric, probs, labels):
  with pytest.raises(ValueError, match="probs"):
    METRICS[metric](probs, labels)
  with pytest.raises(ValueError, match="probs"):
    JITTED[metric](probs, labels)


@pytest.mark.parametrize("value", [True, 2.0, "2", None])
def test_num_bins_type(value):
  with pytest.raises(TypeError, match="num_bins"):
    M.expected_calibration_error(PROBS, LABELS, num_bins=value)


def test_num_bins_numpy_int():
  np.testing.assert_allclose(
      M.expected_calibration_error(PROBS, LABELS, num_bins=np.int64(2)),
      M.expected_calibration_error(PROBS, LABELS, num_bins=2))


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan")])
def test_nll_eps_range(eps):
  with pytest.raises(ValueError, match="eps"):
    M.negative_log_likelihood(PROBS, LABELS, eps=eps)


def test_non_numeric_probs_are_a_type_error():
  with pytest.raises(TypeError, match="probs"):
    M.accuracy([["a", "b"]], [0])


# --- Prediction --------------------------------------------------------------

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
W = jnp.array([1.0, -0.5, 0.25])
STATE = blrax.ivon(0.1, ess=10.0, hess_init=1.0).init(W)


def two_class(p, x):
  z = x @ p
  return jnp.stack([jnp.zeros_like(z), z], -1)


def linear(p, x):
  return x @ p


REFERENCE_PROBS = jax.jit(lambda k: P.predictive_probs(two_class, k, W, STATE, X,
                                                       num_samples=4))


@pytest.mark.parametrize("key,same_as", [
    (jax.random.PRNGKey(3), jax.random.wrap_key_data(jax.random.PRNGKey(3))),
    (3, jax.random.key(3)),
    (np.int64(3), jax.random.key(3)),
], ids=["legacy", "int", "numpy_int"])
def test_any_key_format(key, same_as):
  got = P.predictive_probs(two_class, key, W, STATE, X, num_samples=4)
  np.testing.assert_allclose(got, REFERENCE_PROBS(same_as), rtol=1e-5)


def test_any_key_format_under_jit_and_for_regression():
  f = jax.jit(lambda k: P.predictive_mean_variance(linear, k, W, STATE, X,
                                                   num_samples=4))
  legacy = jax.random.PRNGKey(1)
  for got, want in zip(f(legacy), f(jax.random.wrap_key_data(legacy))):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_numpy_int_counts():
  got = P.predictive_probs(two_class, jax.random.key(0), W, STATE, X,
                           num_samples=np.int64(4), chunk_size=np.int32(2))
  np.testing.assert_allclose(got, REFERENCE_PROBS(jax.random.key(0)),
                             rtol=1e-5)


@pytest.mark.parametrize("arg", ["num_samples", "chunk_size"])
@pytest.mark.parametrize("value", [True, 4.0, "4", np.float32(4)])
def test_counts_reject_non_ints(arg, value):
  kwargs = {"num_samples": 4, arg: value}
  with pytest.raises(TypeError, match=arg):
    P.predictive_probs(two_class, jax.random.key(0), W, STATE, X, **kwargs)


@pytest.mark.parametrize("value", [0, -2])
def test_num_samples_below_one(value):
  with pytest.raises(ValueError, match="num_samples"):
    P.predictive_mean_variance(linear, 0, W, STATE, X, num_samples=value)


@pytest.mark.parametrize("mean_only", [False, True])
def test_negative_noise_variance_raises(mean_only):
  with pytest.raises(ValueError, match="noise_variance=-0.5"):
    P.predictive_mean_variance(linear, 0, W, STATE, X, num_samples=4,
                               noise_variance=-0.5, mean_only=mean_only)


def test_negative_noise_variance_is_nan_under_jit():
  f = jax.jit(lambda v: P.predictive_mean_variance(
      linear, 0, W, STATE, X, num_samples=4, noise_variance=v))
  mean, var = f(-0.5)
  assert np.isfinite(mean).all() and np.isnan(var).all()
  _, good = f(0.5)
  assert np.all(np.asarray(good) >= 0.5)


def test_noise_variance_must_not_enlarge_the_output():
  for mean_only in (True, False):
    with pytest.raises(ValueError, match="noise_variance"):
      P.predictive_mean_variance(linear, 0, W, STATE, X, num_samples=2,
                                 noise_variance=jnp.ones((4, 1)),
                                 mean_only=mean_only)
  _, var = P.predictive_mean_variance(linear, 0, W, STATE, X, mean_only=True,
                                      noise_variance=jnp.full(4, 0.5))
  np.testing.assert_allclose(var, jnp.full(4, 0.5))


def test_single_logit_is_refused():
  one_logit = lambda p, x: (x @ p)[:, None]
  for mean_only in (False, True):
    with pytest.raises(ValueError, match="apply_fn"):
      P.predictive_probs(one_logit, 0, W, STATE, X, num_samples=2,
                         mean_only=mean_only)


@pytest.mark.parametrize("kwargs,error,arg", [
    ({"key": None}, TypeError, "key"),
    ({"key": "abc"}, TypeError, "key"),
    ({"key": jax.random.split(jax.random.key(0), 2)}, ValueError, "key"),
    ({"mean_only": "no"}, TypeError, "mean_only"),
    ({"apply_fn": "model"}, TypeError, "apply_fn"),
], ids=["none_key", "str_key", "key_batch", "str_mean_only", "apply_fn"])
def test_bad_prediction_arguments(kwargs, error, arg):
  args = {"apply_fn": two_class, "key": jax.random.key(0), "params": W,
          "opt_state": STATE, "inputs": X, "num_samples": 2, **kwargs}
  with pytest.raises(error, match=arg):
    P.predictive_probs(**args)


# --- Exponential families ----------------------------------------------------

BAD_ETAS = [
    ("beta_alpha_negative", expfam.beta(), [-1.5, 1.0]),
    ("gamma_rate_negative", expfam.gamma(), [1.0, 1.0]),
    ("gamma_shape_negative", expfam.gamma(), [-2.0, -1.0]),
    ("dirichlet_alpha_negative", expfam.dirichlet(), [-2.0, 1.0, 1.0]),
    ("diagonal_positive_eta2", expfam.diagonal_gaussian(1), [0.0, 0.5]),
    ("gaussian_not_pd", expfam.gaussian(2), [0.0, 0.0, 0.5, 0.0, 0.0, -0.5]),
    ("beta_nan", expfam.beta(), [np.nan, 1.0]),
]
FUNCTIONS = {
    "log_partition": lambda f, e: f.log_partition(e),
    "mean_params": lambda f, e: f.mean_params(e),
    "fisher": lambda f, e: f.fisher(e),
    "kl_q": lambda f, e: f.kl(e, jnp.zeros_like(e).at[-1].set(-0.5)),
    "from_natural": lambda f, e: f.from_natural(e),
    "sample": lambda f, e: f.sample(jax.random.key(0), e, (3,)),
    "grad_log_partition": lambda f, e: jax.grad(f.log_partition)(e),
}


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("name,family,eta", BAD_ETAS,
                         ids=[c[0] for c in BAD_ETAS])
def test_invalid_natural_parameter_raises(fn, name, family, eta):
  with pytest.raises(ValueError, match="`eta"):
    FUNCTIONS[fn](family, jnp.asarray(eta, jnp.float32))


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("name,family,eta", BAD_ETAS,
                         ids=[c[0] for c in BAD_ETAS])
def test_invalid_natural_parameter_is_nan_under_jit(fn, name, family, eta):
  if fn == "sample" and name not in ("beta_alpha_negative",
                                     "diagonal_positive_eta2"):
    pytest.skip("one family's sampler compiles slowly; the mask is shared")
  out = jax.jit(lambda e: FUNCTIONS[fn](family, e))(jnp.asarray(eta,
                                                                jnp.float32))
  assert all(np.isnan(x).all() for x in jax.tree.leaves(out))


def test_beta_kl_of_invalid_prior_is_not_negative():
  beta = expfam.beta()
  bad = jnp.array([-1.5, 1.0])  # "Beta(-0.5, 2)"
  with pytest.raises(ValueError, match="eta_p"):
    beta.kl(beta.to_natural(1.0, 1.0), bad)
  assert np.isnan(jax.jit(beta.kl)(beta.to_natural(1.0, 1.0), bad))


@pytest.mark.parametrize("family,eta", [
    (expfam.beta(), [0.0, 0.0, 0.0]),
    (expfam.gamma(), [0.0]),
    (expfam.dirichlet(), []),
    (expfam.dirichlet(), [[0.0, 0.0]]),
    (expfam.gaussian(2), [0.0] * 5),
    (expfam.diagonal_gaussian(2), [0.0, -1.0]),
], ids=["beta3", "gamma1", "dirichlet0", "dirichlet2d", "gaussian5", "diag2"])
def test_wrong_natural_shape_raises_even_under_jit(family, eta):
  eta = jnp.asarray(eta, jnp.float32)
  with pytest.raises(ValueError, match="eta.shape"):
    family.log_partition(eta)
  with pytest.raises(ValueError, match="eta.shape"):
    jax.jit(family.mean_params)(eta)


@pytest.mark.parametrize("family,args,arg", [
    (expfam.beta(), (-0.5, 2.0), "alpha"),
    (expfam.beta(), (2.0, 0.0), "beta"),
    (expfam.gamma(), (1.0, -1.0), "beta"),
    (expfam.dirichlet(), (jnp.array([1.0, -1.0]),), "alpha"),
    (expfam.diagonal_gaussian(2), (jnp.zeros(2), jnp.array([1.0, -1.0])),
     "var"),
    (expfam.gaussian(2), (jnp.zeros(2), jnp.array([[1.0, 0.5], [0.0, 1.0]])),
     "cov"),
    (expfam.gaussian(2), (jnp.zeros(2), jnp.array([[1.0, 2.0], [2.0, 1.0]])),
     "cov"),
], ids=["beta_alpha", "beta_beta", "gamma_rate", "dirichlet", "diag_var",
        "gaussian_asymmetric", "gaussian_indefinite"])
def test_invalid_usual_parameters(family, args, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    family.to_natural(*args)
  assert np.isnan(jax.jit(family.to_natural)(*args)).all()


@pytest.mark.parametrize("dim,error", [(0, ValueError), (2.0, TypeError),
                                       (True, TypeError)])
def test_gaussian_dim(dim, error):
  for factory in (expfam.gaussian, expfam.diagonal_gaussian):
    with pytest.raises(error, match="dim"):
      factory(dim)


def test_blr_step_checks_rho_and_prior_shape():
  beta = expfam.beta()
  eta = beta.to_natural(2.0, 2.0)
  lik = lambda mu: 3 * mu[0] + 2 * mu[1]
  with pytest.raises(ValueError, match="rho"):
    expfam.blr_step(beta, eta, eta, lik, rho=-0.5)
  with pytest.raises(ValueError, match="prior_eta"):
    expfam.blr_step(beta, eta, jnp.zeros(3), lik)
  step = jax.jit(lambda r: expfam.blr_step(beta, eta, eta, lik, r))
  assert np.isnan(step(-0.5)).all()
  np.testing.assert_allclose(step(1.0), eta + jnp.array([3.0, 2.0]), rtol=1e-4)


def test_blr_step_allows_an_improper_prior():
  # A flat Gaussian prior (zero precision) is not a distribution but a valid
  # prior; one conjugate step gives the likelihood's natural parameter.
  family = expfam.diagonal_gaussian(1)
  target = jnp.array([2.0, -1.5])
  step = jax.jit(lambda e: expfam.blr_step(family, e, jnp.zeros(2),
                                           lambda mu: jnp.dot(target, mu)))
  np.testing.assert_allclose(step(jnp.array([0.0, -0.5])), target, rtol=1e-4)


def test_sample_accepts_int_seed_and_int_shape():
  family = expfam.diagonal_gaussian(2)
  eta = family.to_natural(jnp.zeros(2), jnp.ones(2))
  np.testing.assert_allclose(family.sample(7, eta, 5),
                             family.sample(jax.random.key(7), eta, (5,)))
  np.testing.assert_allclose(family.sample(jax.random.PRNGKey(7), eta, 5),
                             family.sample(7, eta, 5))


def test_valid_values_unchanged_in_float32():
  beta = expfam.beta()
  eta = beta.to_natural(2.0, 5.0)
  np.testing.assert_allclose(eta, [1.0, 4.0])
  from scipy import special
  np.testing.assert_allclose(
      beta.mean_params(eta),
      [special.digamma(2) - special.digamma(7),
       special.digamma(5) - special.digamma(7)], rtol=1e-5)
  np.testing.assert_allclose(beta.log_partition(eta), special.betaln(2, 5),
                             rtol=1e-5)
  gauss = expfam.gaussian(2)
  cov = jnp.array([[1.0, 0.3], [0.3, 0.5]])
  mean, got_cov = gauss.from_natural(gauss.to_natural(jnp.ones(2), cov))
  np.testing.assert_allclose(mean, jnp.ones(2), rtol=1e-5)
  np.testing.assert_allclose(got_cov, cov, rtol=1e-5)


def test_int64_labels_beyond_int32_are_refused_not_wrapped():
  probs = [[0.7, 0.3], [0.2, 0.8]]
  with pytest.raises(ValueError, match="int32"):
    blrax.metrics.accuracy(probs, np.array([2**32, 1], np.int64))


def test_type_errors_are_value_errors_too():
  with pytest.raises(ValueError):
    blrax.metrics.accuracy([[0.5, 0.5]], np.array([0.0]))
  with pytest.raises(TypeError):
    blrax.metrics.accuracy([[0.5, 0.5]], np.array([0.0]))


def test_blr_step_refuses_a_bool_step_size():
  family = expfam.beta()
  eta = jnp.array([0.0, 0.0])
  with pytest.raises(ValueError, match="rho"):
    expfam.blr_step(family, eta, eta, lambda mu: jnp.sum(mu), rho=True)
