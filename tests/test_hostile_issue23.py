"""Issue 23: the hostile cases of the features added since the last pass.

Each test names the numbered problem it covers (the session brief's list:
silent wrong results, corrupted state, accepted bad input, unclear errors
and frictions). Every one of them failed before its fix.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blrax
import blrax.flax
from blrax import uncertainty as U

PROBS = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6],
                  [0.7, 0.2, 0.1]], np.float32)
LABELS = np.array([0, 1, 2, 0])


# --------------------------------------------------------------------------
# 2-4: temperature scaling and conformal sets under jit.


@pytest.mark.parametrize("case", ["nan_logit", "bad_label"])
def test_fit_temperature_under_jit_is_nan_for_bad_inputs(case):
  """#2: under jit a NaN logit or an out-of-range label gave T = 0.01."""
  logits, labels = np.log(PROBS), LABELS.copy()
  if case == "nan_logit":
    logits[1, 0] = np.nan
  else:
    labels[2] = 3
  assert np.isnan(jax.jit(U.fit_temperature)(logits, labels))
  with pytest.raises(ValueError, match="logits|labels"):  # eager raises
    U.fit_temperature(logits, labels)
  # A valid input still fits a finite temperature under jit.
  assert np.isfinite(jax.jit(U.fit_temperature)(np.log(PROBS), LABELS))


def test_conformal_threshold_under_jit_is_nan_for_a_bad_label():
  """#3: under jit an out-of-range label gave the threshold 1.0."""
  labels = LABELS.copy()
  labels[0] = 5
  fn = jax.jit(lambda p, y: U.conformal_threshold(p, y, 0.5,
                                                  randomized=False))
  assert np.isnan(fn(PROBS, labels))
  assert np.isfinite(fn(PROBS, LABELS))
  with pytest.raises(ValueError, match="labels"):
    U.conformal_threshold(PROBS, labels, 0.5, randomized=False)


def test_conformal_sets_refuse_a_nan_threshold():
  """#4: a NaN threshold (invalid calibration data) became all-empty sets."""
  with pytest.raises(ValueError, match="threshold=nan"):
    U.conformal_sets(PROBS, jnp.nan, randomized=False)
  # Under jit the sets cannot hold NaN: documented as all-empty there.
  sets = jax.jit(lambda q: U.conformal_sets(PROBS, q, randomized=False))(
      jnp.nan)
  assert not np.asarray(sets).any()


# --------------------------------------------------------------------------
# 5-7: merging and health with int leaves, per-leaf decays and masks.

MIXED = {"w": jnp.array([0.5, -1.0]), "n": jnp.array(3, jnp.int32)}


def _layout(tree):
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)


def test_merge_keeps_shard_zeros_int_counters():
  """#5: int counters were averaged (3 and 6 -> 4), not shard 0's."""
  opt = blrax.ivon(0.1, ess=10.0)
  other = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(6)}
  params, _ = blrax.merge_posteriors(
      [MIXED, other], [opt.init(MIXED), opt.init(other)])
  assert int(params["n"]) == 3 and params["n"].dtype == MIXED["n"].dtype


@pytest.mark.parametrize("kwargs", [
    dict(weight_decay={"w": 0.1, "n": 0.0}),
    dict(weight_decay=0.1, weight_decay_mask={"w": True, "n": False}),
])
def test_merged_state_keeps_the_init_layout(kwargs):
  """#7: per-leaf weight_decay or a mask changed the state's leaf shapes."""
  opt = blrax.ivon(0.1, ess=10.0, **kwargs)
  state = opt.init(MIXED)
  params, merged = blrax.merge_posteriors([MIXED, MIXED], [state, state])
  assert _layout(merged) == _layout(state)
  assert _layout(params) == _layout(MIXED)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(None)
    grads = jax.tree.map(jnp.zeros_like, p)
    return opt.update(grads, s, p)

  step(MIXED, state)
  step(params, merged)
  assert len(traces) == 1  # the merged state does not retrace the step


def test_merged_prior_precision_keeps_a_scalar_leaf_a_scalar():
  """#7: an explicit full-shaped but uniform prior precision of a leaf whose
  state decay is a scalar stays a scalar; a non-uniform one is refused."""
  opt = blrax.ivon(0.1, ess=10.0, weight_decay={"w": 0.1, "n": 0.0})
  state = opt.init(MIXED)
  _, merged = blrax.merge_posteriors(
      [MIXED, MIXED], [state, state],
      prior_precision={"w": jnp.full(2, 3.0), "n": 0.0})
  assert _layout(merged) == _layout(state)
  decay = blrax.find_posteriors(merged)[0].weight_decay["w"]
  np.testing.assert_allclose(decay, 3.0 / 20.0, rtol=1e-6)
  with pytest.raises(ValueError, match="prior_precision"):
    blrax.merge_posteriors([MIXED, MIXED], [state, state],
                           prior_precision={"w": jnp.array([3.0, 4.0]),
                                            "n": 0.0})


def test_health_skips_int_leaves():
  """#6: int leaves (untrainable counters) were reported with sigma > 0."""
  opt = blrax.ivon(0.1, ess=10.0)
  health = blrax.posterior_health(MIXED, opt.init(MIXED), hess_init=1.0,
                                  b2=0.99999, warn=False)
  assert "n" not in health.leaves and "w" in health.leaves


# --------------------------------------------------------------------------
# 10, 18: uncertainty.report inputs.


def _bf16_log_probs(n=64, k=10):
  z = 3.0 * jax.random.normal(jax.random.key(0), (n, k))
  return jax.nn.log_softmax(z.astype(jnp.bfloat16))


def test_report_accepts_exact_bf16_log_softmax():
  """#10: a bf16 model's exact log_softmax output was refused (a fixed 1e-3
  tolerance after the float32 cast; bf16 rounding reaches several 1e-3)."""
  log_probs = _bf16_log_probs()
  sums = jax.nn.logsumexp(log_probs.astype(jnp.float32), axis=-1)
  assert float(jnp.max(jnp.abs(jnp.expm1(sums)))) > 1e-3  # the hard case
  labels = jnp.zeros(log_probs.shape[0], jnp.int32)
  report = U.report(lambda x: x, [(log_probs, labels)])
  assert report.num_examples == log_probs.shape[0]
  # float32 outputs keep the 1e-3 tolerance: the same rows in float32 fail.
  with pytest.raises(ValueError, match="not log-probabilities"):
    U.report(lambda x: x, [(log_probs.astype(jnp.float32), labels)])


def test_ood_batches_as_lists_are_split_like_tuples():
  """#18: an OOD batch given as an [x, y] list reached the predictor whole."""
  log_probs = jnp.log(jnp.asarray(PROBS))
  seen = []

  def predictor(x):
    seen.append(type(x))
    return x

  want = U.report(predictor, [(log_probs, LABELS)],
                  ood_batches=[(log_probs[::-1], LABELS)], jit=False)
  got = U.report(predictor, [(log_probs, LABELS)],
                 ood_batches=[[log_probs[::-1], LABELS]], jit=False)
  assert list not in seen
  assert got.ood.num_examples == len(LABELS)
  assert got.ood.detection == want.ood.detection


# --------------------------------------------------------------------------
# 21: a regression predictive without observation noise.


def test_regression_predictive_warns_when_noise_variance_is_left_out():
  """#21: noise_variance defaulted to 0 silently (90% intervals covered 22%
  of the targets); left out it now warns, an explicit 0.0 does not."""
  w = jnp.ones(3)
  state = blrax.ivon(0.1, ess=100.0).init(w)
  apply_fn = lambda w, x: x @ w  # noqa: E731
  x = jnp.ones((4, 3))
  with pytest.warns(UserWarning, match="noise_variance not given"):
    blrax.predictive.predictive_mean_variance(apply_fn, 0, w, state, x,
                                              num_samples=2)
  with pytest.warns(UserWarning, match="noise_variance not given"):
    U.regression_predictor(apply_fn, 0, w, state, num_samples=2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, var = blrax.predictive.predictive_mean_variance(
        apply_fn, 0, w, state, x, num_samples=2, noise_variance=0.0)
    U.regression_predictor(apply_fn, 0, w, state, num_samples=2,
                           noise_variance=0.0)(x)
  assert var.shape == (4,)


# --------------------------------------------------------------------------
# 1, 8, 9, 11-13, 22: gradient accumulation.


def _partitioned():
  return optax.partition(
      {"bayes": blrax.ivon(0.1, ess=10.0), "plain": optax.sgd(1.0)},
      {"a": "bayes", "b": "plain"})


def test_multisteps_gives_a_plain_part_the_average_gradient():
  """#1: the plain optax part of a partition stepped on the last micro-batch
  only (k - 1 of k micro-batches' gradients dropped)."""
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  micro = [jnp.array([1.0, -2.0]), jnp.array([3.0, 4.0]),
           jnp.array([5.0, 1.0])]
  opt = blrax.MultiSteps(_partitioned(), every_k_schedule=3)
  want_opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3)
  state, want_state = opt.init(params), want_opt.init(params["b"])
  step = jax.jit(opt.update)
  for g in micro:
    theta = blrax.sample_params(params, state)
    grads = {"a": 2.0 * theta["a"], "b": g}
    updates, state = step(grads, state, params)
    want, want_state = want_opt.update(g, want_state, params["b"])
  np.testing.assert_allclose(updates["b"], -sum(micro) / 3, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], want, rtol=1e-6)
  # The IVON part still stepped (its own accumulation is unchanged).
  assert np.all(np.asarray(updates["a"]) != 0.0)
  # The buffer is only for the plain part: a pure IVON keeps its memory.
  assert [x.shape for x in jax.tree.leaves(state.acc_grads)] == [(2,)]
  pure = blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), 3).init(params)
  assert not jax.tree.leaves(pure.acc_grads)


def test_multisteps_keeps_the_nan_skip_counters_of_apply_if_finite():
  """#8: MultiSteps(blrax.apply_if_finite(ivon)) lost the NaN-skip counters
  of the micro-batches (and so their consecutive-error limit)."""
  opt = blrax.MultiSteps(
      blrax.apply_if_finite(blrax.ivon(0.1, ess=10.0), 5), every_k_schedule=3)
  params = jnp.zeros(2)
  state = opt.init(params)
  for g in (jnp.full(2, jnp.nan), jnp.ones(2), jnp.ones(2)):
    _, state = opt.update(g, state, params)
  assert int(state.inner_state.total_notfinite) == 1
  # The NaN micro-batch was skipped: the step averaged the two finite ones.
  blr = state.inner_state.inner_state[0]
  assert int(blr.count) == 1 and int(blr.accumulator.count) == 0


def test_multisteps_refuses_mixing_hessian_and_no_hessian():
  """#9: micro-batches with and without `hessian=` were mixed silently."""
  opt = blrax.MultiSteps(blrax.von(0.1, ess=10.0), every_k_schedule=3)
  params = jnp.zeros(2)
  state = opt.init(params)
  _, state = opt.update(jnp.ones(2), state, params, hessian=jnp.ones(2))
  with pytest.raises(ValueError, match="hessian"):
    opt.update(jnp.ones(2), state, params)
  state = opt.init(params)
  _, state = opt.update(jnp.ones(2), state, params)
  with pytest.raises(ValueError, match="hessian"):
    opt.update(jnp.ones(2), state, params, hessian=jnp.ones(2))
  # Under jit the mix cannot raise: the updates are NaN, not silently wrong.
  step = jax.jit(lambda g, s, h: opt.update(g, s, params, hessian=h))
  updates, _ = step(jnp.ones(2), state, jnp.ones(2))
  assert np.all(np.isnan(updates))
  # All micro-batches with hessian= (or all without) still work.
  state = opt.init(params)
  for _ in range(3):
    updates, state = step(jnp.ones(2), state, jnp.ones(2))
  assert np.all(np.isfinite(updates)) and int(state.gradient_step) == 1


def test_multisteps_accumulates_full_von_instead_of_refusing():
  """#11: bSAM / full VON were refused as holding "no posterior". Both now
  accumulate (tests/test_bsam.py, tests/test_full_von.py); the accumulator
  of full VON holds the (D,) gradient and (D, D) Price sums."""
  state = blrax.MultiSteps(blrax.von(0.1, ess=10.0, covariance="full"),
                           every_k_schedule=2).init(jnp.zeros(2))
  accumulator = state.inner_state[0].accumulator
  assert accumulator.gradient.shape == (2,)
  assert accumulator.statistic.shape == (2, 2)


def test_nested_multisteps_is_a_clear_value_error():
  """#12: MultiSteps in MultiSteps raised a duplicate-keyword TypeError."""
  inner = blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"product of the two \(here 3 times"):
    blrax.MultiSteps(inner, every_k_schedule=3).init(jnp.zeros(2))


def test_multisteps_has_updated_like_optax():
  """#13: blrax.MultiSteps had no has_updated (not a drop-in for optax's)."""
  opt = blrax.MultiSteps(blrax.ivon(0.1, ess=10.0), every_k_schedule=2)
  ref = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
  params = jnp.zeros(2)
  state, ref_state = opt.init(params), ref.init(params)
  for _ in range(4):
    assert bool(opt.has_updated(state)) == bool(ref.has_updated(ref_state))
    _, state = opt.update(jnp.ones(2), state, params)
    _, ref_state = ref.update(jnp.ones(2), ref_state, params)
  assert bool(opt.has_updated(state))
  assert isinstance(opt.gradient_transformation(), optax.GradientTransformation)


def test_optax_multisteps_with_mc_samples_points_to_blrax_multisteps():
  """#22: optax.MultiSteps with mc_samples > 1 quoted a shape the user never
  passed and not the fix."""
  opt = optax.MultiSteps(blrax.ivon(0.1, ess=10.0, mc_samples=2), 2)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="blrax.MultiSteps") as info:
    opt.update({"w": jnp.ones((2, 3))}, opt.init(params), params)
  assert "optax.MultiSteps" in str(info.value)


# --------------------------------------------------------------------------
# 14-17, 19, 26: gradients and the NNX helpers.


def test_value_grads_and_squares_refuses_an_empty_batch():
  """#14: an empty batch raised ZeroDivisionError."""
  loss = lambda w, x: jnp.mean((x @ w) ** 2)  # noqa: E731
  with pytest.raises(ValueError, match="`batch` is empty"):
    blrax.value_grads_and_squares(loss, jnp.ones(2), jnp.zeros((0, 2)))


def test_value_and_grad_accepts_allow_int():
  """#15: an int leaf failed, and JAX's advice (allow_int) was refused."""
  params = {"w": jnp.ones(2), "n": jnp.array(3, jnp.int32)}
  loss = lambda p, x: jnp.sum(p["w"] * x)  # noqa: E731
  for samples in (1, 2):
    opt = blrax.ivon(0.1, ess=10.0, mc_samples=samples)
    state = opt.init(params)
    _, grads = blrax.value_and_grad(loss, allow_int=True)(params, state, 2.0)
    assert grads["n"].dtype == jax.dtypes.float0
    updates, _ = opt.update(grads, state, params)
    assert float(updates["n"]) == 0.0
    new = optax.apply_updates(params, updates)
    assert int(new["n"]) == 3 and new["n"].dtype == jnp.int32


def test_value_and_grad_passes_a_plain_optax_state_through():
  """#26: a non-blrax state (optax.adamw's) was refused; it is now the
  gradient at the params, so one script can A/B AdamW and IVON."""
  params = jnp.array([1.0, -2.0])
  loss = lambda p, x: jnp.sum((p - x) ** 2)  # noqa: E731
  state = optax.adamw(0.1).init(params)
  value, grads = blrax.value_and_grad(loss)(params, state, 0.5)
  want_value, want = jax.value_and_grad(loss)(params, 0.5)
  np.testing.assert_array_equal(grads, want)
  assert value == want_value


class _BatchNormNet(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)
    self.norm = nnx.BatchNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


def _nnx_setup():
  model = _BatchNormNet(nnx.Rngs(0))
  return model, nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0), wrt=nnx.Param)


def test_nnx_value_and_grad_has_aux_with_a_scalar_loss_is_clear():
  """#16: has_aux=True with a scalar loss failed with "iteration over a 0-d
  array"."""
  model, optimizer = _nnx_setup()
  with pytest.raises(ValueError, match=r"has_aux=True.*\(loss, aux\)"):
    blrax.flax.nnx_value_and_grad(lambda m, x: jnp.mean(m(x)), model,
                                  optimizer, jnp.ones((4, 3)), has_aux=True)


def test_nnx_value_and_grad_accepts_the_opt_state():
  """#17: optimizer.opt_state raised "'tuple' object has no attribute 'wrt'"."""
  model, optimizer = _nnx_setup()
  loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
  x = jnp.ones((4, 3))
  want_value, want = blrax.flax.nnx_value_and_grad(loss, model, optimizer, x)
  value, grads = blrax.flax.nnx_value_and_grad(loss, model,
                                               optimizer.opt_state, x)
  assert value == want_value
  jax.tree.map(np.testing.assert_array_equal, grads, want)
  _, grads, squares = blrax.flax.nnx_value_grads_and_squares(
      lambda m, x: jnp.mean(m.linear(x) ** 2), model, optimizer.opt_state, x)
  assert squares["linear"]["kernel"].shape == (3, 2)


def test_nnx_prediction_in_train_mode_says_call_eval():
  """#19: prediction with BatchNorm in train mode failed deep in Flax
  ("Cannot mutate BatchStat from a different trace level")."""
  model, optimizer = _nnx_setup()
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"model\.eval\(\)"):
    blrax.predictive.predictive_log_probs(None, 0, model, optimizer, x,
                                          num_samples=2)
  model.eval()
  out = blrax.predictive.predictive_log_probs(None, 0, model, optimizer, x,
                                              num_samples=2)
  assert np.all(np.isfinite(out))


# --------------------------------------------------------------------------
# 20, 24, 25, 27: optimizer frictions.


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_inject_hyperparams_von_needs_no_max_dim_static_arg(covariance):
  """#24: inject_hyperparams(blrax.von) failed under jit unless
  static_args=("max_dim",) (its int default was injected and traced)."""
  opt = optax.inject_hyperparams(blrax.von, static_args=("mc_samples",))(
      learning_rate=0.1, ess=100.0, covariance=covariance)
  params = {"w": jnp.ones(3)}
  state = jax.jit(opt.init)(params)
  updates, state = jax.jit(opt.update)(params, state, params)
  assert np.all(np.isfinite(updates["w"]))
  # An explicit max_dim is still checked eagerly where it matters.
  with pytest.raises(ValueError, match="max_dim"):
    blrax.von(0.1, ess=10.0, covariance="full", max_dim=2).init(params)
  with pytest.raises(ValueError, match="max_dim"):
    blrax.von(0.1, ess=10.0, max_dim=0)


def test_vogn_with_mean_gradients_points_to_value_grads_and_squares_first():
  """#20: VOGN fed mean gradients pointed to per_example_grads (227x Adam's
  cost), not to value_grads_and_squares + hessian= (2.2x)."""
  opt = blrax.vogn(0.1, ess=10.0)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError) as info:
    opt.update({"w": jnp.ones(3)}, opt.init(params), params)
  message = str(info.value)
  first = message.index("blrax.value_grads_and_squares")
  assert "hessian=" in message[first:]
  assert first < message.index("blrax.per_example_grads")


def test_a_params_dict_missing_a_key_is_named():
  """#25: a params dict missing a key got a raw JAX pytree error."""
  params = {"w": jnp.zeros(3), "bias": jnp.zeros(2)}
  opt = blrax.ivon(0.1, ess=10.0)
  state = opt.init(params)
  short = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"`params`.*lacks \['bias'\]"):
    blrax.sample_params(short, state)
  with pytest.raises(ValueError, match=r"`params`.*lacks \['bias'\]"):
    opt.update(short, state, short)
  with pytest.raises(ValueError, match=r"`grads`.*lacks \['bias'\]"):
    opt.update(short, state, params)
  extra = dict(params, scale=jnp.ones(()))
  with pytest.raises(ValueError, match=r"has \['scale'\], which the state"):
    blrax.sample_params(extra, state)


def test_vadam_warns_when_batch_size_is_left_out():
  """#27: Vadam's batch_size defaulted to 1 with no warning (a curvature
  about M-fold too small, a posterior about sqrt(M) too wide)."""
  with pytest.warns(UserWarning, match="batch_size not given") as record:
    blrax.vadam(0.1, ess=100.0)
  assert len(record) == 1 and record[0].filename == __file__
  with pytest.warns(UserWarning, match="batch_size not given"):
    blrax.scale_by_vadam(100.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    blrax.vadam(0.1, ess=100.0, batch_size=32)
    blrax.vadam(0.1, ess=1.0, batch_size=1)
    blrax.vadam(0.1, ess=jnp.inf, hess_init=0.0)  # Adam's limit: M = 1 is Adam


def test_inject_hyperparams_takes_a_large_ess_as_a_float():
  """#23 (documented, README Caveats): optax.inject_hyperparams stores an int
  hyperparameter as int32 before blrax sees it, so ess=5_000_000_000
  overflows inside optax; the documented ess=5e9 works end to end. (A guard
  of the documented workaround: optax's overflow cannot be fixed here.)"""
  opt = optax.inject_hyperparams(blrax.ivon, static_args=("mc_samples",))(
      learning_rate=0.1, ess=5e9)
  params = jnp.ones(2)
  state = jax.jit(opt.init)(params)
  _, state = jax.jit(opt.update)(params, state, params)
  ess = blrax.find_posteriors(state)[0].ess
  np.testing.assert_allclose(ess, 5e9, rtol=1e-7)
