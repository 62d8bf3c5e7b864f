"""Hostile inputs to the optimizers: every bad argument named, no corrupted state.

Three kinds: (1) hyperparameters checked at construction for type, shape,
finiteness and range; (2) ``update``/``sample_params`` inputs checked
against the state (shapes, dtypes, int leaves, complex numbers, empty
batches); (3) the update is numerically safe: for any finite gradients the
curvature stays finite with h + delta > 0, sigma finite and positive, the
params finite and the state's dtypes those of ``init``.
"""

import math
import os
import subprocess
import sys
import textwrap

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blrax

# One factory per family of the table (tests/cases.py), at its wide settings.
FACTORIES = {v.name: (v.factory, dict(v.wide)) for v in cases.FAMILIES}
COMMON_BAD = [
    ("learning_rate", None), ("learning_rate", math.inf),
    ("learning_rate", math.nan), ("learning_rate", "0.1"),
    ("learning_rate", [0.1]), ("learning_rate", 1j), ("learning_rate", -1.0),
    ("ess", 0.0), ("ess", math.nan), ("ess", "1e3"), ("ess", None),
    ("ess", [100.0]), ("ess", True), ("ess", -math.inf), ("ess", 1 + 2j),
    ("hess_init", math.inf), ("hess_init", math.nan), ("hess_init", [-1.0]),
    ("hess_init", None),
    ("weight_decay", math.inf), ("weight_decay", -1.0), ("weight_decay", "x"),
    ("weight_decay", np.array([1e-4, -1e-4])),  # per element: each checked
    ("b2", 1.5), ("b2", [2.0]), ("b2", math.nan), ("b2", -0.5),
    ("mc_samples", math.inf), ("mc_samples", 1.5), ("mc_samples", 0),
    ("mc_samples", True), ("mc_samples", "2"), ("mc_samples", 2.0),
    ("key", 2**32), ("key", -1), ("key", 1.5), ("key", "seed"), ("key", None),
    ("key", jax.random.split(jax.random.key(0), 3)),
    # Finite in float64 but beyond what the float32 state can hold.
    ("learning_rate", 1e39), ("ess", 1e39), ("ess", 1e20),
    ("hess_init", 1e30), ("weight_decay", 1e39),
    # Positive but subnormal in float32: XLA on CPU flushes them to 0.
    ("ess", 1e-40), ("hess_init", 1e-39), ("weight_decay", 1e-39),
]
SPECIFIC_BAD = {
    "ivon": [("b1", 1.0), ("b1", 0.9999999999), ("b1", math.nan),
             ("clip_radius", 0.0), ("clip_radius", math.nan),
             ("rescale_lr", "no"), ("debias", 1), ("noise", "philox"),
             ("noise", None), ("noise", 3)],
    "von_diag": [("covariance", ["full"]), ("covariance", "Full"),
                 ("hess_init", 0.0), ("max_dim", "big"), ("max_dim", -5)],
    "von_full": [("max_dim", math.nan), ("max_dim", 0), ("max_dim", 1.5),
                 ("max_dim", "big"), ("noise", "hash")],
    "vadam": [("b1", 1.0), ("b2", 1.0), ("b2", 0.9999999999),
              ("batch_size", 0.0), ("batch_size", math.inf),
              ("batch_size", "32"), ("batch_size", 1e39)],
    "vogn": [("b1", 1.0), ("hess_init", 0.0)],
    "evon": [("b1", 1.0), ("hess_init", 0.0), ("clip_radius", 0.0),
             ("shampoo_beta", 1.5), ("shampoo_beta", math.nan),
             ("precondition_frequency", 0), ("precondition_frequency", 1.5),
             ("max_precond_dim", 0), ("precondition_1d", "yes"),
             ("weight_decay_mask", {"w": 1.0}), ("noise", "philox")],
    "bsam": [("rho", -1.0), ("rho", math.nan), ("rho", "0.1"), ("rho", None),
             ("b1", 1.0), ("damping", -0.1), ("damping", math.inf),
             ("weight_decay_mask", {"w": 1.0}), ("noise", "philox")],
}
assert set(SPECIFIC_BAD) == set(FACTORIES), "a family without its own cases"
CASES = [(name, arg, value) for name in FACTORIES
         for arg, value in COMMON_BAD + SPECIFIC_BAD[name]]


@pytest.mark.parametrize("name,arg,value", CASES,
                         ids=[f"{n}-{a}={v!r}"[:60] for n, a, v in CASES])
def test_bad_hyperparameter_is_named_at_construction(name, arg, value):
  factory, kwargs = FACTORIES[name]
  with pytest.raises(ValueError, match=rf"`{arg}`.*({arg}=|batch of keys)"):
    factory(**dict(kwargs, **{arg: value}))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_numpy_scalars_and_inf_ess_are_accepted(name):
  factory, kwargs = FACTORIES[name]
  opt = factory(**dict(kwargs, ess=np.float32(100.0), mc_samples=np.int64(2),
                       key=np.int64(3)))
  assert blrax.find_posteriors(opt.init(jnp.zeros(2)))[0].mc_samples == 2
  factory(**dict(kwargs, ess=math.inf))  # the deterministic limit


def test_engine_refuses_a_posterior_without_precision():
  """hess_init = weight_decay = 0 gives sigma = 1/sqrt(0) at the first draw
  (the named optimizers refuse it too)."""
  parts = dict(estimator=blrax.engine.PRICE,
               precision=blrax.engine.positive_ema,
               step=blrax.engine.newton_step(), ess=100.0, b2=0.9999,
               mc_samples=1, key=0, noise="normal")
  with pytest.raises(ValueError, match="hess_init=0.0, weight_decay=0.0"):
    blrax.engine.scale_by_blr(hess_init=0.0, weight_decay=0.0, **parts)
  tx = blrax.engine.scale_by_blr(hess_init=0.0, weight_decay=1e-4, **parts)
  grads = jnp.array([1.0, -1.0])
  updates, state = tx.update(grads, tx.init(jnp.zeros(2)), jnp.zeros(2))
  assert np.all(np.isfinite(updates))
  assert np.all(np.isfinite(blrax.posterior_stddev(state)))


@pytest.mark.parametrize("name", ["vadam", "bsam"])
@pytest.mark.parametrize("params,prior", [
    ([1e33, 1.0], dict(weight_decay=1e6)),            # delta * m = 1e39
    ([3e38, 1.0], dict(prior_mean=np.array([-3e38, 0.0]))),  # m - m0 = 6e38
])
def test_momentum_of_the_prior_term_saturates(name, params, prior):
  """The steps whose momentum holds g + delta (m - m0) saturate it: an
  overflow there turned Vadam's momentum inf and its params NaN."""
  factory, kwargs = FACTORIES[name]
  opt = factory(**dict(kwargs, **prior))
  params = jnp.asarray(params, jnp.float32)
  state = opt.init(params)
  for _ in range(5):
    grads = jnp.ones(2)
    extra = cases.update_kwargs(VARIANTS[name][0], cases.linear_loss(grads))
    updates, state = opt.update(grads, state, params, **extra)
    params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves((params, state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf)), (name, leaf)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_decay={"w": None, "b": 1e-4}), "`weight_decay` leaf.*None"),
    (dict(weight_decay={"w": {"a": 1.0}, "b": 1e-4}),
     "`weight_decay` leaf.*'a'"),
    (dict(weight_decay_mask={"w": np.ones(5, bool), "b": True}),
     r"`weight_decay_mask` leaf of shape \(5,\).*\(2, 3\)"),
])
def test_bad_prior_leaves_are_named_at_init(name, kwargs, match):
  """A weight_decay leaf that is not a number, or a mask leaf that does not
  broadcast to its param, is named at init (a bad mask used to be stored
  and fail at the first update)."""
  factory, base = FACTORIES[name]
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match=match):
    factory(**dict(base, **kwargs)).init(params)


@pytest.mark.parametrize("part,value", [
    ("step", None), ("step", "newton"), ("step", blrax.engine.newton_step),
    ("estimator", "price"), ("precision", None), ("precision", "ema"),
])
def test_engine_parts_are_named(part, value):
  parts = dict(estimator=blrax.engine.PRICE,
               precision=blrax.engine.positive_ema,
               step=blrax.engine.newton_step(), ess=100.0, hess_init=1.0,
               b2=0.9999, weight_decay=0.0, mc_samples=1, key=0,
               noise="normal")
  with pytest.raises(ValueError, match=rf"`{part}` must be .*{part}="):
    blrax.engine.scale_by_blr(**dict(parts, **{part: value}))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_params_of_another_shape_are_blamed_not_the_grads(name):
  factory, kwargs = FACTORIES[name]
  opt = factory(**dict(kwargs, mc_samples=1))
  state = opt.init(jnp.ones((2, 3)))
  grads = jnp.ones((2, 3))
  extra = cases.update_kwargs(cases.variant(name), cases.linear_loss(grads))
  with pytest.raises(ValueError, match=r"`params` leaf has shape \(1, 2, 3\)"):
    opt.update(grads, state, jnp.ones((1, 2, 3)), **extra)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_another_optimizers_state_is_named(name):
  factory, kwargs = FACTORIES[name]
  opt = factory(**dict(kwargs, mc_samples=1))
  params = jnp.ones(3)
  extra = cases.update_kwargs(cases.variant(name), cases.linear_loss(params))
  with pytest.raises(ValueError,
                     match="`state` must be the state.*got a ScaleByAdamState"):
    opt.update(params, optax.adam(0.1).init(params), params, **extra)


def test_smallest_normal_hess_init_stays_finite():
  """The smallest accepted hess_init (float32's smallest normal) with no
  prior: the positivity correction divides by it, and stays finite."""
  tiny = float(np.finfo(np.float32).tiny)
  grads = jnp.array([1.0, -1.0, 0.5])
  for factory in (blrax.ivon, blrax.von):
    opt = factory(0.1, ess=100.0, hess_init=tiny, weight_decay=0.0)
    updates, state = opt.update(grads, opt.init(jnp.ones(3)), jnp.ones(3))
    for leaf in jax.tree.leaves((updates, state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert np.all(np.isfinite(leaf)), factory


def test_scalar_generators_accept_numpy_ints():
  assert blrax.noise.flip_noise(np.int64(8)) == blrax.noise.flip_noise(8)
  for bad in (0, 2.0, True, "8", 2**31):
    with pytest.raises(ValueError, match="refresh_every"):
      blrax.noise.flip_noise(bad)


def test_traced_hyperparameters_are_not_branched_on():
  opt = optax.inject_hyperparams(blrax.ivon, static_args=("mc_samples",))(
      learning_rate=0.1, ess=100.0, b2=0.999)
  params = jnp.ones(3)
  state = jax.jit(opt.init)(params)
  updates, _ = jax.jit(opt.update)(jnp.ones(3), state, params)
  assert np.isfinite(np.asarray(updates)).all()


# --- update and sample_params inputs --------------------------------------


def _grad_shape_step(opt, params):
  state = opt.init(params)
  theta = blrax.sample_params(params, state)
  return state, theta


def test_params_of_another_shape_are_refused():
  opt = blrax.ivon(0.1, ess=100.0)
  state = opt.init(jnp.zeros((2, 3)))
  wrong = jnp.zeros((1, 3))
  with pytest.raises(ValueError, match=r"`params`.*\(1, 3\).*\(2, 3\)"):
    opt.update(jnp.zeros((1, 3)), state, wrong)
  with pytest.raises(ValueError, match=r"`params`.*\(1, 3\)"):
    blrax.sample_params(wrong, state)
  with pytest.raises(ValueError, match=r"`params`.*\(1, 3\)"):
    blrax.sample_posterior(jax.random.key(0), wrong, state, 2)


def test_int_leaves_get_no_noise_and_no_update():
  params = {"w": jnp.ones(3), "step": jnp.asarray(5, jnp.int32)}

  def loss(p):
    return jnp.sum(p["w"] ** 2) + 0.0 * p["step"]

  for factory in (blrax.ivon, blrax.von, blrax.vadam):
    opt = factory(0.1, ess=100.0)
    state = opt.init(params)
    p = params

    @jax.jit  # one compile; the eager loop took ~100 s of CI time
    def step(p, state):
      theta = blrax.sample_params(p, state)
      grads = jax.grad(loss, allow_int=True)(theta)
      assert grads["step"].dtype == jax.dtypes.float0
      updates, state = opt.update(grads, state, p)
      return optax.apply_updates(p, updates), state, theta["step"]

    for _ in range(20):
      p, state, theta_step = step(p, state)
      assert int(theta_step) == 5
    assert int(p["step"]) == 5 and p["step"].dtype == jnp.int32
    assert float(jnp.abs(p["w"]).max()) < 1.0  # the float leaf trained
    sigma = blrax.posterior_stddev(state, p)
    assert float(sigma["step"]) == 0.0 and float(sigma["w"].min()) > 0.0
    draws = blrax.sample_posterior(jax.random.key(1), p, state, 4)
    assert (np.asarray(draws["step"]) == 5).all()


def test_python_float_leaves_work_as_in_optax():
  params = {"a": 1.0, "b": jnp.ones(2)}
  opt = blrax.ivon(0.1, ess=100.0)
  state = opt.init(params)
  theta = blrax.sample_params(params, state)
  grads = jax.grad(lambda p: p["a"] ** 2 + jnp.sum(p["b"] ** 2))(theta)
  updates, state = opt.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["a"]) < 1.0


def test_complex_params_and_grads_are_refused():
  opt = blrax.ivon(0.1, ess=100.0)
  with pytest.raises(ValueError, match="complex"):
    opt.init(jnp.ones(2, jnp.complex64))
  params = jnp.ones(2)
  state = opt.init(params)
  with pytest.raises(ValueError, match="`grads`.*complex"):
    opt.update(jnp.ones(2, jnp.complex64) * 1j, state, params)


def test_vogn_empty_batch_is_refused_and_zero_size_leaves_work():
  opt = blrax.vogn(0.1, ess=100.0)
  params = {"w": jnp.ones(2), "empty": jnp.zeros((0, 3))}
  state = opt.init(params)
  with pytest.raises(ValueError, match="batch of 0 examples"):
    opt.update({"w": jnp.zeros((0, 2)), "empty": jnp.zeros((0, 0, 3))},
               state, params)
  updates, state = opt.update(
      {"w": jnp.ones((4, 2)), "empty": jnp.zeros((4, 0, 3))}, state, params)
  assert np.isfinite(np.asarray(updates["w"])).all()
  assert updates["empty"].shape == (0, 3)


def test_full_von_with_no_params_is_refused():
  opt = blrax.von(0.1, ess=10.0, covariance="full")
  with pytest.raises(ValueError, match="at least one entry"):
    opt.update({}, opt.init({}), {})


def test_apply_if_finite_with_sample_axis():
  inner = blrax.ivon(0.1, ess=100.0, mc_samples=2)
  opt = blrax.apply_if_finite(inner, max_consecutive_errors=2)
  params = jnp.ones(3)
  state = opt.init(params)
  reference = inner.init(params)
  theta = blrax.sample_params(params, state)
  np.testing.assert_array_equal(theta, blrax.sample_params(params, reference))
  grads = jax.vmap(jax.grad(lambda x: jnp.sum(x**2)))(theta)
  bad = grads.at[1, 0].set(jnp.nan)
  updates, state = jax.jit(opt.update)(bad, state, params)
  np.testing.assert_array_equal(updates, jnp.zeros(3))
  assert int(state.notfinite_count) == 1
  updates, state = jax.jit(opt.update)(grads, state, params)
  expected, _ = inner.update(grads, reference, params)
  np.testing.assert_allclose(updates, expected, rtol=1e-6)
  # optax's own wrapper cannot (its reject branch has the grads' shape).
  with pytest.raises(TypeError):
    optax.apply_if_finite(inner, 2).update(grads, optax.apply_if_finite(
        inner, 2).init(params), params)


# --- numerically safe update -------------------------------------------------

MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e15, 1e30, 3e38]
# Every variant of the table, at a narrow posterior and a small step, with
# the settings that stress each family most (no prior floor, a fast
# curvature EMA); then combinations the table lacks.
STRESS = {
    "ivon": dict(weight_decay=0.0),
    "von_diag": dict(weight_decay=0.0, b2=0.9),
    "von_full": dict(b2=0.9),
    "vadam": dict(batch_size=32),
    "vogn": dict(weight_decay=0.0, b2=0.9),
    "evon": dict(weight_decay=0.0, b2=0.9, precondition_1d=True,
                 precondition_frequency=2),
    "bsam": dict(weight_decay=0.0, b2=0.9, hess_init=1e-3),
}
assert set(STRESS) == {v.name for v in cases.FAMILIES}
EXTRA = {  # name: (row, settings on top of its family's)
    "ivon_hash_mc2": ("ivon", dict(noise="hash", mc_samples=2)),
    "vogn_hash": ("vogn", dict(noise="hash", weight_decay=1e-4, b2=0.99999)),
    "vadam_flip_mc2": ("vadam", dict(noise="flip", mc_samples=2,
                                     weight_decay=0.0, hess_init=1e-3)),
    # its update is given the (signed, adversarial) grads as hessian=
    "von_hessian": ("von_diag", dict(b2=0.99999)),
}
VARIANTS = {
    name: (cases.variant(row), dict(
        cases.variant(row).wide, learning_rate=1e-3, ess=1e4,
        **{**STRESS[cases.variant(row).family], **over}))
    for name, row, over in
    [(v.name, v.name, {}) for v in cases.VARIANTS]
    + [(name, row, over) for name, (row, over) in EXTRA.items()]}
GIVEN_HESSIAN = {"von_hessian"}
SHAPE = (4,)


def _grads_shape(name):
  v, kwargs = VARIANTS[name]
  mc = kwargs.get("mc_samples", 1)
  per_example = cases.per_example(v)
  return ((mc,) if mc > 1 else ()) + ((2,) if per_example else ()) + SHAPE


@jax.jit
def _health(params, state):
  posterior = blrax.find_posteriors(state)[0]
  h, sigma = posterior.curvature, blrax.posterior_stddev(state)
  if isinstance(posterior, blrax.FullGaussian):  # checked in float64 below
    positive = jnp.array(True)
  else:
    positive = jnp.all(h + posterior.weight_decay > 0)
  return dict(params=jnp.all(jnp.isfinite(params)),
              curvature=jnp.all(jnp.isfinite(h)), positive=positive,
              sigma=jnp.all(jnp.isfinite(sigma)) & jnp.all(sigma > 0))


_RUNS = {}


def _run(name):
  """A jitted scan of ``name`` over a (T,) + grads-shape array of grads."""
  if name not in _RUNS:
    v, kwargs = VARIANTS[name]
    opt = v.factory(**kwargs)

    @jax.jit
    def run(grads_seq, dtype_probe):
      params = jnp.zeros(SHAPE, dtype_probe.dtype)
      state = opt.init(params)

      def step(carry, grads):
        params, state = carry
        grads = grads.astype(params.dtype)
        extra = {"hessian": grads} if name in GIVEN_HESSIAN else {}
        # bSAM: the same grads at its adversarial point.
        extra.update(cases.update_kwargs(v, cases.linear_loss(grads)))
        updates, state = opt.update(grads, state, params, **extra)
        return (optax.apply_updates(params, updates), state), None

      (params, state), _ = jax.lax.scan(step, (params, state), grads_seq)
      return params, state, opt.init(params)

    _RUNS[name] = run
  return _RUNS[name]


def _check_run(name, grads_seq, dtype=jnp.float32):
  params, state, fresh = _run(name)(jnp.asarray(grads_seq, jnp.float32),
                                    jnp.zeros((), dtype))
  health = {k: bool(v) for k, v in _health(params, state).items()}
  posterior = blrax.find_posteriors(state)[0]
  if isinstance(posterior, blrax.FullGaussian):
    # S + delta I positive definite. Its eigenvalues in float64: float32's
    # eigvalsh misreports the smallest of a PD matrix with a condition
    # number near 1e8 (1e15 gradients: exact 2.9e24, float32 -1.3e25).
    h = np.asarray(posterior.curvature, np.float64)
    health["positive"] = bool(np.all(np.linalg.eigvalsh(
        h + float(posterior.weight_decay) * np.eye(h.shape[0])) > 0))
  assert all(health.values()), (name, health)
  assert (jax.tree.map(lambda x: x.dtype, state)
          == jax.tree.map(lambda x: x.dtype, fresh))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("magnitude", [1e15, 1e30, 3e38])
def test_huge_finite_gradients_keep_the_state_finite(name, magnitude):
  signs = np.where(np.arange(np.prod(_grads_shape(name))) % 2, 1.0, -1.0)
  grads = np.broadcast_to(signs.reshape(_grads_shape(name)) * magnitude,
                          (32,) + _grads_shape(name))
  _check_run(name, grads)


@pytest.mark.parametrize("name", ["von_diag", "vogn"])
def test_dead_unit_without_decay_keeps_a_finite_sigma(name):
  # b2 = 0.9: h would decay below float32's smallest normal within ~900
  # steps (IVON: the longer run below).
  _check_run(name, np.zeros((3000,) + _grads_shape(name)))


def test_dead_unit_ivon_long_run_and_tiny_hess_init():
  opt = blrax.ivon(1e-3, ess=1e4, weight_decay=0.0, b2=0.999)
  params = jnp.zeros(3)

  @jax.jit
  def run(state):
    def step(state, _):
      _, state = opt.update(jnp.zeros(3), state, params)
      return state, None
    return jax.lax.scan(step, state, None, length=60000)[0]

  state = run(opt.init(params))
  sigma = blrax.posterior_stddev(state)
  assert np.isfinite(np.asarray(sigma)).all() and float(sigma.min()) > 0
  tiny = blrax.ivon(1e-3, ess=1e4, weight_decay=0.0, hess_init=1e-30)
  state = tiny.init(params)
  for _ in range(3):
    theta = blrax.sample_params(params, state)
    assert np.isfinite(np.asarray(theta)).all()
    _, state = tiny.update(2.0 * theta, state, params)
  assert np.isfinite(np.asarray(blrax.posterior_stddev(state))).all()


@pytest.mark.parametrize("name", ["ivon", "vadam"])
def test_bfloat16_params_keep_float32_state(name):
  grads = np.full((16,) + _grads_shape(name), 1e30)
  _check_run(name, grads, dtype=jnp.bfloat16)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data(), name=st.sampled_from(sorted(VARIANTS)))
def test_adversarial_gradients_never_corrupt_the_state(data, name):
  """Mixed signs and magnitudes from 0 to 3e38, with runs of zeros."""
  shape = (24,) + _grads_shape(name)
  size = int(np.prod(shape))
  magnitudes = data.draw(st.lists(st.sampled_from(MAGNITUDES), min_size=size,
                                  max_size=size))
  signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=size,
                             max_size=size))
  grads = (np.asarray(magnitudes) * np.asarray(signs)).reshape(shape)
  zero_from = data.draw(st.integers(0, shape[0]))
  grads[zero_from:] = 0.0
  _check_run(name, grads.astype(np.float32))


X64_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, optax, blrax
    params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    for opt in (blrax.ivon(0.1, ess=100.0), blrax.von(0.1, ess=100.0),
                blrax.vadam(0.1, ess=100.0), blrax.ivon(0.1, ess=100.0,
                noise="flip")):
      state = opt.init(params)
      def step(carry, _):
        p, s = carry
        theta = blrax.sample_params(p, s)
        g = jax.grad(lambda q: sum(jnp.sum(x.astype(jnp.float32) ** 2)
                                   for x in jax.tree.leaves(q)))(theta)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
      (p, s), _ = jax.lax.scan(step, (params, state), None, length=3)
      dtypes = lambda t: jax.tree.map(lambda x: x.dtype, t)
      assert dtypes(s) == dtypes(state), (dtypes(s), dtypes(state))
      assert dtypes(p) == dtypes(params)
    # float64 params: gradients up to 1e300 keep the state finite.
    opt = blrax.ivon(1e-3, ess=1e4, weight_decay=0.0)
    p = jnp.zeros(4, jnp.float64)
    s = opt.init(p)
    for scale in (1e300, -1e300, 0.0, 1e-300, 1e150):
      u, s = opt.update(jnp.array([1.0, -1.0, 2.0, 0.0]) * scale, s, p)
      p = optax.apply_updates(p, u)
    h = s[0].posterior.curvature
    assert h.dtype == jnp.float64
    assert bool(jnp.all(jnp.isfinite(h)) & jnp.all(h > 0))
    assert bool(jnp.all(jnp.isfinite(p)))
    print("ok")
""")


def test_x64_keeps_the_state_dtypes_of_init():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", X64_SCRIPT], env=env,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


# --- found by an independent hostile run (each failed before its fix) -------


def test_full_von_refuses_int_leaves_and_checks_params():
  opt = blrax.von(1.0, ess=100.0, covariance="full")
  with pytest.raises(ValueError, match="int32 leaf"):
    opt.init({"w": jnp.ones(2), "n": jnp.asarray(7)})
  with pytest.raises(ValueError, match="complex"):
    opt.init(jnp.ones(2, jnp.complex64))
  state = opt.init({"w": jnp.ones((6, 1))})
  other = {"w": jnp.ones(6)}
  with pytest.raises(ValueError, match=r"`params`.*\(6,\).*\(6, 1\)"):
    opt.update(other, state, other)
  params = {"a": 1.0, "b": jnp.ones(2)}  # a Python float leaf
  state = opt.init(params)
  updates, _ = opt.update({"a": 2.0, "b": jnp.ones(2)}, state, params)
  assert np.isfinite(float(updates["a"]))
  with pytest.raises(ValueError, match="`hessian` must be real"):
    opt.update({"a": 2.0, "b": jnp.ones(2)}, state, params,
               hessian=jnp.eye(3, dtype=jnp.complex64))


def test_full_von_saturates_huge_grads_and_shows_nan_hessian():
  opt = blrax.von(1.0, ess=100.0, covariance="full", hess_init=1e-3)
  params = jnp.zeros(2)
  state = opt.init(params)
  updates, state = opt.update(jnp.array([3e38, -3e38]), state, params)
  assert np.isfinite(np.asarray(updates)).all()
  assert np.isfinite(np.asarray(state[0].posterior.curvature)).all()
  updates, _ = opt.update(jnp.ones(2), state, params,
                          hessian=jnp.array([[jnp.nan, 0.0], [0.0, 1.0]]))
  assert not np.isfinite(np.asarray(updates)).all()  # NaN input shows


def test_floor_holds_when_weight_decay_dwarfs_it():
  # float32(sqrt(tiny) - 1e-4) == -1e-4: the floor must be relative to delta.
  opt = blrax.von(0.1, ess=100.0, b2=0.0, weight_decay=1e-4)
  params = jnp.zeros(2)
  state = opt.init(params)
  for _ in range(3):
    updates, state = opt.update(jnp.zeros(2), state, params,
                                hessian=jnp.full(2, -1.0))
    posterior = state[0].posterior
    assert float(jnp.min(posterior.curvature + posterior.weight_decay)) > 0
    assert np.isfinite(np.asarray(updates)).all()
    sigma = blrax.posterior_stddev(state)
    assert np.isfinite(np.asarray(sigma)).all()


def test_largest_accepted_ess_keeps_a_positive_sigma():
  opt = blrax.ivon(1e-3, ess=4e18, hess_init=1e3)
  params = jnp.zeros(3)
  state = opt.init(params)
  for _ in range(5):
    theta = blrax.sample_params(params, state)
    _, state = opt.update(1e3 * (theta - 1.0), state, params)
  sigma = np.asarray(blrax.posterior_stddev(state))
  assert np.isfinite(sigma).all() and (sigma > 0).all()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_updates_saturate_instead_of_inf(dtype):
  opt = blrax.von(1.0, ess=100.0, b2=0.0)
  params = jnp.zeros(2, dtype)
  state = opt.init(params)
  updates, _ = opt.update(jnp.full(2, 1e36).astype(dtype), state, params,
                          hessian=jnp.full(2, 1e-30, dtype))
  assert updates.dtype == dtype and np.isfinite(
      np.asarray(updates, np.float32)).all()


def test_apply_if_finite_also_checks_the_hessian():
  inner = blrax.von(0.1, ess=100.0)
  opt = blrax.apply_if_finite(inner, max_consecutive_errors=2)
  params = jnp.ones(2)
  state = opt.init(params)
  updates, new = opt.update(jnp.ones(2), state, params,
                            hessian=jnp.array([jnp.nan, 1.0]))
  assert int(new.notfinite_count) == 1
  np.testing.assert_array_equal(updates, jnp.zeros(2))
  np.testing.assert_array_equal(new.inner_state[0].posterior.curvature,
                                state.inner_state[0].posterior.curvature)


def test_safety_parts_directly():
  """Unit checks of the saturation parts (mutations the jitted runs miss)."""
  from blrax._src.engine import estimators as curvature
  from blrax._src.posteriors import diagonal as gaussian
  h = jnp.ones(1)
  # mc mean of +-3e38 * +-2 must not meet inf - inf.
  est = curvature.price_curvature(jnp.array([[3e38], [3e38]]),
                                  jnp.array([[2.0], [-2.0]]), h, 1e4, 0.0)
  assert np.isfinite(np.asarray(est)).all()
  # A traced ess beyond the limit: lambda (h + delta) saturates, no 0 * inf.
  est = curvature.price_curvature(jnp.zeros(1), jnp.zeros(1),
                                  jnp.full(1, 1.8e19), 1e30, 0.0)
  assert float(est[0]) == 0.0
  _, est = curvature.squared_gradient(32.0).estimate(
      jnp.array([3e38]), None, h, 1e4, 0.0)
  assert np.isfinite(np.asarray(est)).all()
  sigma = gaussian.stddev(jnp.full(1, 1e-19), jnp.float32(1e-30), 0.0)
  assert np.isfinite(np.asarray(sigma)).all() and float(sigma[0]) > 0
