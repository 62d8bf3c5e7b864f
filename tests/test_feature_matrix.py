"""Every variant of the table (tests/cases.py) times every feature.

Each cell exercises the feature on a tiny problem (params of 8 numbers in
two leaves, 3 steps) and checks a property against an oracle that does not
use the feature:

* ``mc_samples=2``: draws with a leading axis of 2 that differ; samples
  whose gradients are g and 3g (and hessian= H and 3H where the estimate
  would use the noise) give the run of one sample with 2g (2H): the samples
  are averaged, none dropped. VOGN: one sample with the per-example batch
  [g, 3g].
* ``hessian=``: with gradients taken at the mean, the run does not depend
  on the noise key (the given curvature replaced the noise-based estimate),
  and 4H gives a smaller posterior stddev than H after the last step. VOGN: the
  mean gradient g with hessian=g^2 is the per-example gradient g.
* per-leaf ``weight_decay``: {w: d, b: d} equals the scalar d; where the
  posterior does not couple the leaves, {w: d1, b: d2} is the scalar-d1 run
  on w spliced with the scalar-d2 run on b (else: it differs from d1 on b).
* ``weight_decay_mask``: all True equals no mask; {w: True, b: False}
  equals the per-leaf decay {w: d, b: 0}.
* ``prior_mean``: translation invariance: params m with prior mean m0 on
  L(theta) follow params m - m0 with a zero-mean prior on L(theta + m0),
  shifted by m0; and the prior mean moves the run.
* ``blrax.MultiSteps``: k=1 is the plain optimizer; k=2 with micro-batches
  g and 3g (H and 3H) leaves the params, then takes the plain step with 2g
  (2H). bSAM: the plain step with 2g and the mean of the two micro-batches'
  adversarial gradients (m-sharpness).
* ``blrax.apply_if_finite``: a NaN step is skipped (zero update, the inner
  state bitwise unchanged, counted); the next finite step is the plain
  optimizer's first.
* ``optax.masked``: the masked-out leaf gets no noise (draws equal the
  params, stddev 0) and optax's passthrough update (the gradient as it
  came); the covered leaf draws and updates as the bare optimizer on that
  leaf alone.
* ``optax.inject_hyperparams``: the injected optimizer follows the plain
  one; a learning rate set to 0 in its state gives a zero update.
* checkpoint: a flax.serialization round trip into a fresh state restores
  the same tree, dtypes and bits, so the run resumes bitwise (the orbax
  round trip: tests/test_checkpoint.py).
* single draw: in the compiled train step the draw is made once:
  conditionals with a params-shaped result and LAPACK calls appear no more
  often than in ``update`` or ``sample_params`` alone (the step inside
  lax.scan: tests/test_single_draw.py).

The table's two optax wrappers (``optax.MultiSteps``,
``optax.apply_if_finite``) are checked in tests/test_nesting.py and
tests/test_optax_battery.py, through the same ``cases.check_cell``.

A cell the table declares unsupported must fail: with a ValueError or
TypeError naming the feature (a refusal), or with an AssertionError where
the reason starts with "bug:" or "limitation:". A declared-unsupported cell
that works fails the test, naming the entry to delete from tests/cases.py.

Cost: per variant, the trajectories of all features are traced into one
jitted function (one compile; runs that differ only in values share a
jax.vmap), plus three small compiles for the single-draw check: about 10 s
of CPU per row (EVON 20 s). Only the families' own rows are in the fast
tier; the rows that vary the noise or the number of samples are slow.
"""

import functools

import cases
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_single_draw import check_single_draw

import blrax

STEPS = 3
PARAMS = {"b": jnp.array([0.5, -1.0]),
          "w": jnp.array([[0.3, -0.8, 1.2], [-0.4, 0.9, 0.1]])}
PRIOR = {"b": jnp.array([-1.2, 0.8]), "w": jnp.full((2, 3), 0.7)}
MASK = {"b": False, "w": True}
D1, D2 = 0.25, 0.0625  # weight decays (exact in binary)
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                    "xla_llvm_disable_expensive_passes": True}


def loss(p):
  """Separable across the leaves (the per-leaf splice needs it), not
  quadratic (the curvature varies with theta)."""
  return (jnp.sum(jnp.log(jnp.cosh(2.0 * p["w"] - 0.5)))
          + jnp.sum(jnp.sin(p["b"]) + 0.5 * p["b"] ** 2))


def settings(v, **over):
  """The row's wide settings; b2 exact in float32 (inject_hyperparams casts
  it, and 1 - b2 amplifies the rounding)."""
  return {**v.wide, "learning_rate": 0.05, "b2": 0.875, **over}


def make(v, **over):
  return v.factory(**settings(v, **over))


def tmap(f, *trees):
  return jax.tree.map(f, *trees)


def stack(trees):
  return tmap(lambda *x: jnp.stack(x), *trees)


# --- batches: (grads, update kwargs) for one update ---------------------------


def at_draw(v, mc=None):
  """The gradients of ``loss`` at the draw, as the user's loop takes them."""
  mc = v.mc_samples if mc is None else mc

  def batch(p, s, lossf=loss):
    theta = blrax.sample_params(p, s)
    return cases.grads(v, lossf, theta, mc), cases.update_kwargs(v, lossf)

  return batch


def curvature(p):
  """A positive diagonal curvature that varies with the params."""
  return tmap(lambda x: 1.0 + x ** 2, p)


def at_mean(v, factors=None, mc=None, hessian_scale=None, micro=False,
            per_example=True):
  """Gradients taken at the mean (so the draw cannot enter them), one
  sample per factor f (gradient f g, curvature f H).

  mc == len(factors): the samples along the sample axis. mc == 1: their mean
  (VOGN: a per-example batch, one example per factor). By default: the
  row's mc_samples, each of factor 1. micro: one sample, of
  the factor of the micro-batch ``state.mini_step`` (under a MultiSteps).
  hessian_scale: also hessian= (scale * curvature(m) per sample).
  per_example=False: VOGN's mean gradient (as it takes it with hessian=).
  """
  mc = v.mc_samples if mc is None else mc
  factors = (1.0,) * mc if factors is None else factors
  lifted = per_example and cases.per_example(v)

  def batch(p, s):
    g = jax.grad(loss)(p)
    h = tmap(lambda x: (1.0 if hessian_scale is None else hessian_scale) * x,
             curvature(p))
    scale = lambda t, f: tmap(lambda x: f * x, t)  # noqa: E731
    lift = lifted
    if micro:
      f = jnp.asarray(factors)[s.mini_step]
      gs, hs, lead = scale(g, f), scale(h, f), 1
    elif mc > 1:
      assert mc == len(factors)
      gs = stack([scale(g, f) for f in factors])
      hs = stack([scale(h, f) for f in factors])
      lead = mc
    else:
      mean = sum(factors) / len(factors)
      gs, hs, lead = scale(g, mean), scale(h, mean), 1
      if lifted and len(factors) > 1:  # VOGN: one example per factor
        gs, lift = stack([scale(g, f) for f in factors]), False
    if lift:
      gs = cases.lift(v, gs, lead)
    extra = cases.update_kwargs(v, loss)
    if hessian_scale is not None:
      extra["hessian"] = cases.hessian(v, hs, lead)
    return gs, extra

  return batch


def trajectory(v, opt, batch, params=None, state=None, steps=STEPS):
  """(params after each step, stddev after each step, the last state)."""
  params = PARAMS if params is None else params
  state = opt.init(params) if state is None else state

  def step(carry, _):
    p, s = carry
    grads, extra = batch(p, s)
    updates, s = opt.update(grads, s, p, **extra)
    p = optax.apply_updates(p, updates)
    return (p, s), (p, blrax.posterior_stddev(s, p))

  (_, state), (ps, sds) = jax.lax.scan(step, (params, state), length=steps)
  return dict(params=ps, stddev=sds), state


def hessian_given(v):
  """Whether the mean-gradient oracles pass hessian=: where the curvature
  estimate uses the noise (it takes hessian= and is not VOGN's)."""
  return v.supports(cases.HESSIAN) and not cases.per_example(v)


def pick(runs, names):
  """Splits vmapped runs (a leading axis) into a dict by ``names``."""
  return {n: tmap(lambda x, i=i: x[i], runs) for i, n in enumerate(names)}


# --- the features: compute (traced, inside one jit per variant) -------------
# Runs that differ only in values (a decay, a key, a start) share one
# compile: the optimizer is built inside jax.vmap from traced
# hyperparameters.


def scalar_runs(v, run):
  """Scalar decays D1 and D2, and D1 translated by -PRIOR (params m - m0,
  loss L(theta + m0)): one compile. Also the D1 run's last state."""

  def one(decay, shift):
    lossf = lambda t: loss(tmap(jnp.add, t, shift))  # noqa: E731
    return trajectory(v, make(v, weight_decay=decay),
                      lambda p, s: at_draw(v)(p, s, lossf),
                      params=tmap(jnp.subtract, PARAMS, shift))

  def runs():
    zero = tmap(jnp.zeros_like, PRIOR)
    trajectories, states = jax.vmap(one)(jnp.array([D1, D2, D1]),
                                         stack([zero, zero, PRIOR]))
    out = pick(trajectories, ("d1", "d2", "translated"))
    out["d1_state"] = tmap(lambda x: x[0], states)
    return out

  return run("scalar", runs)


def tree_runs(v, run):
  """Per-leaf decays {D1, D1}, {b: D2, w: D1}, {b: 0, w: D1}: one compile."""

  def one(b, w):
    return trajectory(v, make(v, weight_decay={"b": b, "w": w}),
                      at_draw(v))[0]

  return run("tree", lambda: pick(jax.vmap(one)(
      jnp.array([D1, D2, 0.0]), jnp.array([D1, D1, D1])),
      ("same", "mixed", "zero_b")))


def mean13(v, run):
  """One sample (mc_samples=1) with the mean 2g of the samples g, 3g (2H)."""
  hs = 1.0 if hessian_given(v) else None
  return run("mean13", lambda: trajectory(
      v, make(v, mc_samples=1), at_mean(v, (1.0, 3.0), 1, hs))[0])


def compute_mc_samples(v, run):
  hs = 1.0 if hessian_given(v) else None
  two = make(v, mc_samples=2)
  return dict(
      draws=blrax.sample_params(PARAMS, two.init(PARAMS)),
      two=trajectory(v, two, at_mean(v, (1.0, 3.0), 2, hs))[0],
      one=mean13(v, run))


def compute_hessian(v, run):
  def one(key, scale):
    return trajectory(v, make(v, key=key), at_mean(
        v, hessian_scale=scale, per_example=False))[0]

  out = pick(jax.vmap(one)(jnp.array([1, 2, 1]), jnp.array([1.0, 1.0, 4.0])),
             ("key1_x1", "key2_x1", "key1_x4"))
  if cases.per_example(v):  # VOGN: hessian=g^2 with the mean gradient g.
    def squares(p, s):
      g = jax.grad(loss)(p)
      return g, {"hessian": tmap(jnp.square, g)}

    out["given_squares"] = trajectory(v, make(v, key=1), squares)[0]
    out["per_example"] = trajectory(v, make(v, key=1), at_mean(v))[0]
  return out


def compute_per_leaf_decay(v, run):
  scalar, tree = scalar_runs(v, run), tree_runs(v, run)
  return dict(scalar1=scalar["d1"], scalar2=scalar["d2"], same=tree["same"],
              mixed=tree["mixed"])


def compute_decay_mask(v, run):
  masked = lambda mask: trajectory(v, make(  # noqa: E731
      v, weight_decay=D1, weight_decay_mask=mask), at_draw(v))[0]
  return dict(plain=scalar_runs(v, run)["d1"],
              all_true=masked({"b": True, "w": True}), half=masked(MASK),
              zero_b=tree_runs(v, run)["zero_b"])


def compute_prior_mean(v, run):
  scalar = scalar_runs(v, run)
  return dict(
      prior=trajectory(v, make(v, weight_decay=D1, prior_mean=PRIOR),
                       at_draw(v))[0],
      translated=scalar["translated"], zero_mean=scalar["d1"])


def bsam_m_sharpness(v, factors):
  """bSAM's oracle for micro-batches g_i = f_i g: the mean gradient and the
  mean of the gradients at the micro-batches' adversarial points."""

  def batch(p, s):
    g = jax.grad(loss)(p)
    points = [blrax.bsam_adversarial_params(p, s, tmap(lambda x, f=f: f * x, g))
              for f in factors]
    adversarial = tmap(lambda *x: sum(x) / len(x),
                       *[jax.grad(loss)(q) for q in points])
    mean = sum(factors) / len(factors)
    return tmap(lambda x: mean * x, g), {"adversarial_grads": adversarial}

  return batch


def compute_multi_steps(v, run):
  hs = 1.0 if hessian_given(v) else None
  k1 = trajectory(v, blrax.MultiSteps(make(v, weight_decay=D1),
                                      every_k_schedule=1), at_draw(v))[0]
  k2 = trajectory(v, blrax.MultiSteps(make(v, mc_samples=1),
                                      every_k_schedule=2),
                  at_mean(v, (1.0, 3.0), 1, hessian_scale=hs, micro=True),
                  steps=2 * STEPS)[0]
  if v.call == cases.GRAD_FN:  # each micro-batch has its own adversary
    plain = trajectory(v, make(v, mc_samples=1),
                       bsam_m_sharpness(v, (1.0, 3.0)))[0]
  else:
    plain = mean13(v, run)
  return dict(base=scalar_runs(v, run)["d1"], k1=k1, k2=k2, plain=plain)


def finite_outcome(v, wrap):
  """A NaN step, then a finite one (one scan), and the plain optimizer's
  first step on the finite gradients."""
  plain, opt = make(v), wrap(make(v))
  s0 = opt.init(PARAMS)
  grads, extra = at_draw(v)(PARAMS, s0)
  sequence = stack([tmap(lambda g: g * jnp.nan, grads), grads])

  def step(s, g):
    updates, s = opt.update(g, s, PARAMS, **extra)
    return s, (updates, s.inner_state, s.notfinite_count,
               blrax.posterior_stddev(s))

  _, (updates, inner, count, stddev) = jax.lax.scan(step, s0, sequence)
  ref_updates, ref_state = plain.update(grads, plain.init(PARAMS), PARAMS,
                                        **extra)
  first = lambda t: tmap(lambda x: x[0], t)  # noqa: E731
  second = lambda t: tmap(lambda x: x[1], t)  # noqa: E731
  return dict(skipped=first(updates), before=s0.inner_state,
              after=first(inner), count1=count[0], updates=second(updates),
              ref_updates=ref_updates, stddev=second(stddev),
              ref_stddev=blrax.posterior_stddev(ref_state), count2=count[1])


def compute_apply_if_finite(v, run):
  return finite_outcome(v, lambda o: blrax.apply_if_finite(o, 2))


def compute_masked(v, run):
  # mask_compatible_extra_args: bSAM's adversarial_grads is masked too.
  opt = optax.masked(make(v), MASK, mask_compatible_extra_args=True)
  state = opt.init(PARAMS)
  theta = blrax.sample_params(PARAMS, state)
  grads = cases.grads(v, loss, theta, v.mc_samples)
  extra = cases.update_kwargs(v, loss, PARAMS, state, grads)
  updates, new_state = opt.update(grads, state, PARAMS, **extra)
  # The bare optimizer on the covered leaf alone (the loss is separable).
  only_w = {"w": PARAMS["w"]}
  loss_w = lambda q: loss({**PARAMS, **q})  # noqa: E731
  bare = make(v)
  bare_state = bare.init(only_w)
  bare_theta = blrax.sample_params(only_w, bare_state)
  bare_grads = cases.grads(v, loss_w, bare_theta, v.mc_samples)
  bare_updates, bare_new = bare.update(bare_grads, bare_state, only_w,
                                       **cases.update_kwargs(v, loss_w))
  return dict(
      theta=theta, stddev=blrax.posterior_stddev(state, PARAMS),
      samples=blrax.sample_posterior(jax.random.key(1), PARAMS, state, 3),
      grads=grads, updates=updates,
      new_stddev=blrax.posterior_stddev(new_state, PARAMS),
      bare_theta=bare_theta, bare_updates=bare_updates,
      bare_stddev=blrax.posterior_stddev(bare_new))


def compute_inject(v, run):
  """The injected optimizer for STEPS + 1 steps, its learning rate set to 0
  in the state before the last one."""
  factory = optax.inject_hyperparams(
      v.factory, static_args=cases.static_args(v.factory))
  opt = factory(**settings(v, weight_decay=D1))
  draw = at_draw(v)

  def step(carry, i):
    p, s = carry
    hyper = dict(s.hyperparams)
    hyper["learning_rate"] = jnp.where(i == STEPS, 0.0,
                                       hyper["learning_rate"])
    s = s._replace(hyperparams=hyper)
    grads, extra = draw(p, s)
    updates, s = opt.update(grads, s, p, **extra)
    p = optax.apply_updates(p, updates)
    return (p, s), (p, blrax.posterior_stddev(s, p))

  _, (ps, sds) = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)),
                              jnp.arange(STEPS + 1))
  return dict(injected=dict(params=ps, stddev=sds),
              plain=scalar_runs(v, run)["d1"])


def compute_checkpoint(v, run):
  return dict(state=scalar_runs(v, run)["d1_state"])


COMPUTE = {
    cases.MC_SAMPLES: compute_mc_samples,
    cases.HESSIAN: compute_hessian,
    cases.PER_LEAF_DECAY: compute_per_leaf_decay,
    cases.DECAY_MASK: compute_decay_mask,
    cases.PRIOR_MEAN: compute_prior_mean,
    cases.MULTI_STEPS: compute_multi_steps,
    cases.APPLY_IF_FINITE: compute_apply_if_finite,
    cases.MASKED: compute_masked,
    cases.INJECT: compute_inject,
    cases.CHECKPOINT: compute_checkpoint,
}


@functools.lru_cache(maxsize=None)
def outcomes(name):
  """{feature: outputs} and {feature: the exception it raised}, from one
  jitted function that traces every feature of variant ``name``."""
  v = cases.BY_NAME[name]
  errors = {}

  def body():
    shared, out = {}, {}

    def run(key, thunk):  # a trajectory several features compare against
      if key not in shared:
        shared[key] = thunk()
      return shared[key]

    for feature, compute in COMPUTE.items():
      try:
        out[feature] = compute(v, run)
      except (ValueError, TypeError) as error:  # refused while tracing
        errors[feature] = error
    return out

  # Compiled without LLVM's expensive passes: a third less compile time.
  compiled = jax.jit(body).lower().compile(COMPILER_OPTIONS)
  return compiled(), errors


# --- the features: check (outside jit) ---------------------------------------


def close(a, b, rtol=1e-5, atol=1e-6, err_msg=""):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
      atol=atol, err_msg=err_msg), a, b)


def equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)


def differ(a, b, by=1e-3):
  gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert gap > by, f"the runs differ by {gap} <= {by}"


def leaf(traj, name):
  return {k: t[name] for k, t in traj.items()}


def check_mc_samples(v, out):
  draws = out["draws"]
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(draws))
  assert not np.allclose(draws["w"][0], draws["w"][1])
  close(out["two"], out["one"], err_msg="samples g, 3g != one sample 2g")


def check_hessian(v, out):
  # The draw does not enter: another key, the same run.
  close(out["key1_x1"], out["key2_x1"], rtol=1e-6, atol=1e-7,
        err_msg="hessian= run depends on the noise key")
  # The given curvature reaches the posterior: 4H, a smaller stddev (after
  # the last step: a family may take the first step's curvature as it is).
  for weak, strong in zip(jax.tree.leaves(out["key1_x1"]["stddev"]),
                          jax.tree.leaves(out["key1_x4"]["stddev"])):
    assert np.all(np.asarray(strong[-1]) < np.asarray(weak[-1])), (weak,
                                                                    strong)
  if cases.per_example(v):
    close(out["given_squares"], out["per_example"])


def check_per_leaf_decay(v, out):
  close(out["same"], out["scalar1"], err_msg="{w: d, b: d} != d")
  if v.couples_leaves:
    differ(out["mixed"]["params"]["b"], out["scalar1"]["params"]["b"])
  else:
    close(leaf(out["mixed"], "w"), leaf(out["scalar1"], "w"))
    close(leaf(out["mixed"], "b"), leaf(out["scalar2"], "b"))


def check_decay_mask(v, out):
  close(out["all_true"], out["plain"], err_msg="all-True mask != no mask")
  close(out["half"], out["zero_b"], err_msg="mask False != decay 0")


def check_prior_mean(v, out):
  prior, translated = out["prior"], out["translated"]
  close(prior["params"], tmap(lambda x, m: x + m, translated["params"],
                              PRIOR), rtol=1e-5, atol=1e-5,
        err_msg="not translation invariant")
  close(prior["stddev"], translated["stddev"], rtol=1e-5, atol=1e-6)
  differ(prior["params"], out["zero_mean"]["params"])


def accumulates(k2, plain):
  """k2: a k=2 accumulation over 2 * STEPS micro-batches; plain: STEPS steps.
  Micro-batch 2i leaves the params as they were; 2i + 1 is plain step i."""
  at = lambda t, i: tmap(lambda x: x[i], t)  # noqa: E731
  for i in range(STEPS):
    before = PARAMS if i == 0 else at(k2["params"], 2 * i - 1)
    close(at(k2["params"], 2 * i), before, rtol=0, atol=0,
          err_msg=f"micro-batch {2 * i} moved the params")
    close(at(k2["params"], 2 * i + 1), at(plain["params"], i),
          err_msg=f"micro-batches g, 3g != one step with 2g (step {i})")
    close(at(k2["stddev"], 2 * i + 1), at(plain["stddev"], i))


def check_multi_steps(v, out):
  close(out["k1"], out["base"], err_msg="MultiSteps(k=1) != plain")
  accumulates(out["k2"], out["plain"])


def check_apply_if_finite(v, out):
  equal(out["skipped"], tmap(jnp.zeros_like, out["skipped"]))
  equal(out["after"], out["before"])
  assert int(out["count1"]) == 1 and int(out["count2"]) == 0
  close(out["updates"], out["ref_updates"])
  close(out["stddev"], out["ref_stddev"])


def check_masked(v, out):
  theta = out["theta"]
  lead = (v.mc_samples,) if v.mc_samples > 1 else ()
  equal(theta["b"], np.broadcast_to(PARAMS["b"], lead + PARAMS["b"].shape))
  equal(theta["w"], out["bare_theta"]["w"])
  equal(out["stddev"]["b"], np.zeros(2))
  assert np.all(np.asarray(out["stddev"]["w"]) > 0)
  equal(out["samples"]["b"], np.broadcast_to(PARAMS["b"], (3, 2)))
  equal(out["updates"]["b"], out["grads"]["b"])  # optax.masked passes it on
  close(out["updates"]["w"], out["bare_updates"]["w"], rtol=1e-6, atol=1e-7)
  close(out["new_stddev"]["w"], out["bare_stddev"]["w"], rtol=1e-6,
        atol=1e-7)
  equal(out["new_stddev"]["b"], np.zeros(2))


def check_inject(v, out):
  injected = out["injected"]
  close(tmap(lambda x: x[:STEPS], injected), out["plain"],
        err_msg="injected != plain")
  equal(tmap(lambda x: x[STEPS], injected["params"]),
        tmap(lambda x: x[STEPS - 1], injected["params"]))  # learning_rate 0


def check_checkpoint(v, out):
  state = out["state"]
  template = make(v, weight_decay=D1).init(tmap(jnp.zeros_like, PARAMS))
  restored = flax.serialization.from_bytes(
      template, flax.serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


CHECK = {
    cases.MC_SAMPLES: check_mc_samples,
    cases.HESSIAN: check_hessian,
    cases.PER_LEAF_DECAY: check_per_leaf_decay,
    cases.DECAY_MASK: check_decay_mask,
    cases.PRIOR_MEAN: check_prior_mean,
    cases.MULTI_STEPS: check_multi_steps,
    cases.APPLY_IF_FINITE: check_apply_if_finite,
    cases.MASKED: check_masked,
    cases.INJECT: check_inject,
    cases.CHECKPOINT: check_checkpoint,
}


# --- the cells -----------------------------------------------------------------

# What a refusal's message must name.
REFUSAL = {cases.MC_SAMPLES: "mc_samples", cases.HESSIAN: "hessian",
           cases.PER_LEAF_DECAY: "weight_decay",
           cases.DECAY_MASK: "weight_decay_mask",
           cases.PRIOR_MEAN: "prior_mean", cases.MULTI_STEPS: "MultiSteps"}
# The optax wrappers' cells are checked where their tests live, with
# cases.check_cell as here.
ELSEWHERE = {cases.OPTAX_MULTI_STEPS: "test_nesting.py, test_optax_battery.py",
             cases.OPTAX_APPLY_IF_FINITE: "test_nesting.py"}
FEATURES = [f for f in cases.FEATURES if f not in ELSEWHERE]
assert set(FEATURES) == set(CHECK) | {cases.SINGLE_DRAW}


def cell(v, feature):
  if feature == cases.SINGLE_DRAW:  # its own programs (the step, no scan)
    params = {"b": jnp.zeros(5), "w": jnp.ones((3, 5))}
    return check_single_draw(v, settings(v), params, COMPILER_OPTIONS)
  results, errors = outcomes(v.name)
  if feature in errors:
    raise errors[feature]
  return CHECK[feature](v, results[feature])


# The fast tier: one row per family. The other rows vary the noise generator
# or the number of samples, which the families' own cells (mc_samples=2) and
# tests/test_fast_noise.py cover; their cells are slow.
CELLS = [pytest.param(v, f, id=f"{v.name}-{f}",
                      marks=[] if v in cases.FAMILIES else [pytest.mark.slow])
         for v in cases.VARIANTS for f in FEATURES]


@pytest.mark.parametrize("v,feature", CELLS)
def test_feature(v, feature):
  cases.check_cell(v, feature, lambda: cell(v, feature),
                   REFUSAL.get(feature, ""))


def test_table_is_complete():
  """Every family of blrax is a row; the derived lists follow the table."""
  factories = {v.factory for v in cases.VARIANTS}
  assert factories == {blrax.ivon, blrax.von, blrax.vadam, blrax.vogn,
                       blrax.evon, blrax.bsam}
  assert cases.ids(cases.OPTIMIZERS) == [v.name for v in cases.VARIANTS]
  assert cases.ids(cases.WIDE) == [v.name for v in cases.VARIANTS]
  for v in cases.VARIANTS:
    for feature, reason in v.unsupported.items():
      assert feature in cases.FEATURES and reason, (v.name, feature)
  print("\n" + cases.matrix())
