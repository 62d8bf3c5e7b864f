"""The linearised (GLM) predictive against an explicit Jacobian.

The oracle builds J = d f / d theta over the flattened params with
``jax.jacrev`` and does the rest in NumPy: diag(J Sigma J^T), the probit
probabilities, and f(m) + J (theta_s - m) for the same draws.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import blrax

IN, HIDDEN, CLASSES = 3, 4, 3  # 31 params


def mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _init(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w1": (IN, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, CLASSES),
            "b2": (CLASSES,)}
  return {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}


def _with_curvature(state, curvature, kind=blrax.DiagonalGaussian):
  is_post = lambda x: isinstance(x, kind)
  return jax.tree.map(
      lambda x: x._replace(curvature=curvature) if is_post(x) else x, state,
      is_leaf=is_post)


def _setup(seed=0, ess=20.0):
  """float64 params and an IVON state with a different sigma per param."""
  params = _init(seed)
  rng = np.random.default_rng(seed + 1)
  curvature = jax.tree.map(
      lambda p: jnp.asarray(rng.uniform(0.2, 5.0, size=p.shape)), params)
  state = blrax.ivon(0.1, ess=ess, weight_decay=0.1).init(params)
  state = _with_curvature(state, curvature)
  x = jnp.asarray(rng.normal(size=(5, IN)))
  return params, state, x


def _oracle(apply_fn, params, state, x):
  """(f(m) as (n, k), J as (n, k, P), sigma^2 as (P,), unravel) in NumPy."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacrev(lambda t: apply_fn(unravel(t), x))(flat)
  sigma, _ = ravel_pytree(blrax.posterior_stddev(state, params))
  f = np.asarray(apply_fn(params, x))
  jac = np.asarray(jac).reshape(f.shape + (flat.size,))
  return f, jac, np.asarray(sigma) ** 2, unravel


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _offsets(key, params, state, num_samples):
  """The draws theta_s - m of predictive_log_probs (one key per draw), flat."""
  flat, _ = ravel_pytree(params)
  out = []
  for k in jax.random.split(key, num_samples):
    theta = jax.tree.map(lambda x: x[0],
                         blrax.sample_posterior(k, params, state, 1))
    out.append(np.asarray(ravel_pytree(theta)[0] - flat))
  return np.stack(out)


# --------------------------------------------------------------------------
# The closed form.


def test_closed_form_variance_and_probit_match_explicit_jacobian():
  with jax.enable_x64(True):
    params, state, x = _setup()
    f, jac, s2, _ = _oracle(mlp, params, state, x)
    # diag(J Sigma J^T) from the dense matrices, per example.
    want = np.stack([np.diag(j @ np.diag(s2) @ j.T) for j in jac])
    assert want.min() > 0.01 and np.ptp(s2) > 0.01  # a non-trivial check
    mean, var = blrax.predictive.linearized_mean_variance(
        mlp, None, params, state, x, noise_variance=0.0, method="closed_form")
    np.testing.assert_allclose(mean, f, rtol=1e-13)
    np.testing.assert_allclose(var, want, rtol=1e-12)
    log_probs = blrax.predictive.linearized_log_probs(
        mlp, None, params, state, x, method="probit")
    probit = _log_softmax(f / np.sqrt(1 + math.pi / 8 * want))
    np.testing.assert_allclose(log_probs, probit, rtol=1e-12)
    probs = blrax.predictive.linearized_probs(mlp, None, params, state, x,
                                              method="probit")
    np.testing.assert_allclose(probs, np.exp(probit), rtol=1e-12)
    predictor = blrax.uncertainty.linearized_predictor(
        mlp, None, params, state, method="probit")
    np.testing.assert_allclose(predictor(x), probit[None], rtol=1e-12)


def test_closed_form_regression_scalar_outputs_and_noise():
  with jax.enable_x64(True):
    params, state, x = _setup(seed=3)
    scalar = lambda p, x: jnp.sin(mlp(p, x)).sum(-1)  # outputs (n,)
    f, jac, s2, _ = _oracle(scalar, params, state, x)
    noise = jnp.linspace(0.1, 0.5, 5)
    mean, var = blrax.predictive.linearized_mean_variance(
        scalar, None, params, state, x, noise_variance=noise,
        method="closed_form")
    assert mean.shape == var.shape == (5,)
    np.testing.assert_allclose(mean, f, rtol=1e-13)
    np.testing.assert_allclose(var, (jac ** 2) @ s2 + np.asarray(noise),
                               rtol=1e-12)


def test_inputs_pytree_and_int_leaves_held_fixed():
  """A dict of inputs, and an int leaf (a counter) in the params."""
  with jax.enable_x64(True):
    params, state, x = _setup(seed=5)
    apply_fn = lambda p, inp: mlp(p, inp["a"] * inp["scale"][:, None])
    with_int = {**params, "count": jnp.array(7)}
    state = blrax.ivon(0.1, ess=20.0, weight_decay=0.1).init(with_int)
    inputs = {"a": x, "scale": jnp.arange(1.0, 6.0)}
    f, jac, s2, _ = _oracle(apply_fn, params, blrax.ivon(
        0.1, ess=20.0, weight_decay=0.1).init(params), inputs)
    _, var = blrax.predictive.linearized_mean_variance(
        lambda p, inp: apply_fn(p, inp) + 0 * p["count"], None, with_int,
        state, inputs, noise_variance=0.0, method="closed_form")
    np.testing.assert_allclose(var, np.einsum("nkp,p,nkp->nk", jac, s2, jac),
                               rtol=1e-12)


def _dense_covariance(params, posteriors_and_leaves):
  """Sigma over ravel_pytree(params) from (posterior, leaf names) pairs: a
  full posterior's covariance on its leaves (tree order), a diagonal one's
  sigma^2; zero elsewhere."""
  flat, unravel = ravel_pytree(params)
  index = unravel(jnp.arange(flat.size, dtype=flat.dtype))
  sigma = np.zeros((flat.size, flat.size))
  for posterior, names in posteriors_and_leaves:
    idx = np.concatenate([np.asarray(index[k]).ravel().astype(int)
                          for k in sorted(names)])
    if isinstance(posterior, blrax.FullGaussian):
      sigma[np.ix_(idx, idx)] = np.asarray(posterior.covariance())
    else:
      sd = posterior.stddev()
      s2 = np.concatenate([np.asarray(sd[k]).ravel() for k in sorted(names)])
      sigma[idx, idx] = s2 ** 2
  return sigma


def test_closed_form_with_a_full_covariance_posterior():
  with jax.enable_x64(True):
    params, _, x = _setup(seed=9)
    state = blrax.von(0.1, ess=20.0, covariance="full",
                      weight_decay=0.5).init(params)
    # A covariance with strong correlations: a random PSD curvature.
    a = np.random.default_rng(2).normal(size=(31, 31))
    state = _with_curvature(state, jnp.asarray(a @ a.T / 31),
                            blrax.FullGaussian)
    (posterior,) = blrax.find_posteriors(state)
    sigma = _dense_covariance(params, [(posterior, params)])
    assert np.abs(sigma - np.diag(np.diag(sigma))).max() > 0.01
    f, jac, _, _ = _oracle(mlp, params, state, x)
    want = np.einsum("nkp,pq,nkq->nk", jac, sigma, jac)
    mean, var = blrax.predictive.linearized_mean_variance(
        mlp, None, params, state, x, noise_variance=0.0, method="closed_form")
    np.testing.assert_allclose(mean, f, rtol=1e-13)
    np.testing.assert_allclose(var, want, rtol=1e-10)
    log_probs = blrax.predictive.linearized_log_probs(
        mlp, None, params, state, x, method="probit")
    np.testing.assert_allclose(
        log_probs, _log_softmax(f / np.sqrt(1 + math.pi / 8 * want)),
        rtol=1e-10)


def test_closed_form_with_masked_and_partitioned_posteriors():
  """optax.masked (holes: no variance from the frozen leaves) and
  optax.partition of a full and a diagonal posterior (Sigma block-diagonal)."""
  with jax.enable_x64(True):
    params, _, x = _setup(seed=10)
    f, jac, _, _ = _oracle(mlp, params, blrax.ivon(0.1, ess=20.0).init(
        params), x)
    first = {"w1": True, "b1": True, "w2": False, "b2": False}
    masked = optax.masked(blrax.ivon(0.1, ess=20.0, hess_init=2.0), first)
    state = masked.init(params)
    (posterior,) = blrax.find_posteriors(state)
    sigma = _dense_covariance(params, [(posterior, ["w1", "b1"])])
    _, var = blrax.predictive.linearized_mean_variance(
        mlp, None, params, state, x, noise_variance=0.0, method="closed_form")
    np.testing.assert_allclose(
        var, np.einsum("nkp,pq,nkq->nk", jac, sigma, jac), rtol=1e-12)

    labels = {k: "full" if v else "diag" for k, v in first.items()}
    opt = optax.partition(
        {"full": blrax.von(0.1, ess=20.0, covariance="full",
                           weight_decay=0.5),
         "diag": blrax.ivon(0.1, ess=20.0, hess_init=3.0)}, labels)
    state = opt.init(params)
    posteriors = blrax.find_posteriors(state)
    pairs = [(p, ["w1", "b1"] if isinstance(p, blrax.FullGaussian)
              else ["w2", "b2"]) for p in posteriors]
    assert len(pairs) == 2
    sigma = _dense_covariance(params, pairs)
    _, var = blrax.predictive.linearized_mean_variance(
        mlp, None, params, state, x, noise_variance=0.0, method="closed_form")
    np.testing.assert_allclose(
        var, np.einsum("nkp,pq,nkq->nk", jac, sigma, jac), rtol=1e-12)


# --------------------------------------------------------------------------
# The sampled form.


def test_sampled_uses_the_same_draws_as_f_plus_j_offset():
  with jax.enable_x64(True):
    params, state, x = _setup(seed=1)
    f, jac, _, _ = _oracle(mlp, params, state, x)
    key, num = jax.random.key(4), 6
    offsets = _offsets(key, params, state, num)  # (S, P)
    logits = f[None] + np.einsum("nkp,sp->snk", jac, offsets)
    members = _log_softmax(logits)
    bma = np.log(np.exp(members).mean(0))
    for chunk in (None, 2):
      got = blrax.predictive.linearized_log_probs(
          mlp, key, params, state, x, num_samples=num, chunk_size=chunk)
      np.testing.assert_allclose(got, bma, rtol=1e-11)
    predictor = blrax.uncertainty.linearized_predictor(
        mlp, key, params, state, num_samples=num, chunk_size=3)
    np.testing.assert_allclose(predictor(x), members, rtol=1e-11)
    mean, var = blrax.predictive.linearized_mean_variance(
        mlp, key, params, state, x, num_samples=num, chunk_size=3,
        noise_variance=0.5)
    np.testing.assert_allclose(mean, logits.mean(0), rtol=1e-11)
    np.testing.assert_allclose(var, logits.var(0) + 0.5, rtol=1e-11)


def test_sampled_with_a_full_covariance_posterior():
  with jax.enable_x64(True):
    params, _, x = _setup(seed=2)
    state = blrax.von(0.1, ess=20.0, covariance="full",
                      weight_decay=0.5).init(params)
    f, jac, _, _ = _oracle(mlp, params, state, x)
    key = jax.random.key(9)
    offsets = _offsets(key, params, state, 4)
    assert np.abs(offsets).max() > 0.01
    logits = f[None] + np.einsum("nkp,sp->snk", jac, offsets)
    got = blrax.predictive.linearized_log_probs(mlp, key, params, state, x,
                                                num_samples=4)
    np.testing.assert_allclose(
        got, np.log(np.exp(_log_softmax(logits)).mean(0)), rtol=1e-11)


def test_many_samples_approach_the_monte_carlo_reference():
  """The sampled BMA against p = E softmax(f + J sigma eps), eps drawn by
  NumPy: within 5 standard errors."""
  with jax.enable_x64(True):
    params, state, x = _setup(seed=4, ess=2.0)
    f, jac, s2, _ = _oracle(mlp, params, state, x)
    num, ref_num = 20_000, 100_000
    eps = np.random.default_rng(7).normal(size=(ref_num, s2.size))
    mc = lambda scale: np.exp(_log_softmax(
        f[None] + np.einsum("nkp,sp->snk", jac, scale * eps * np.sqrt(s2))))
    ref = mc(1.0)
    want, sd = ref.mean(0), ref.std(0)
    got = blrax.predictive.linearized_probs(
        mlp, jax.random.key(11), params, state, x, num_samples=num,
        chunk_size=1000)
    err = 5 * sd * np.sqrt(1 / num + 1 / ref_num)
    np.testing.assert_array_less(np.abs(got - want), err)
    # The check has power: the point prediction, and a predictive with
    # sigma 20% too large, are more than twice the tolerance away.
    assert np.any(np.abs(np.exp(_log_softmax(f)) - want) > 2 * err)
    assert np.any(np.abs(mc(1.2).mean(0) - want) > 2 * err)


# --------------------------------------------------------------------------
# Limits and equivalences.


def test_zero_stddev_gives_the_point_prediction():
  with jax.enable_x64(True):
    params, _, x = _setup(seed=6)
    state = blrax.ivon(0.1, ess=float("inf")).init(params)
    point = jax.nn.log_softmax(mlp(params, x))
    probit = blrax.predictive.linearized_log_probs(mlp, None, params, state, x,
                                                   method="probit")
    np.testing.assert_array_equal(probit, point)
    one = blrax.predictive.linearized_log_probs(mlp, 0, params, state, x,
                                                num_samples=1)
    np.testing.assert_array_equal(one, point)
    many = blrax.predictive.linearized_log_probs(mlp, 0, params, state, x,
                                                 num_samples=8)
    np.testing.assert_allclose(many, point, rtol=0, atol=1e-15)
    mean, var = blrax.predictive.linearized_mean_variance(
        mlp, None, params, state, x, noise_variance=0.25,
        method="closed_form")
    np.testing.assert_array_equal(mean, mlp(params, x))
    np.testing.assert_array_equal(var, np.full(var.shape, 0.25))


def test_linear_model_equals_the_ordinary_bma_draw_for_draw():
  """f linear in its params: f(m) + J (theta - m) = f(theta)."""
  with jax.enable_x64(True):
    params, state, x = _setup(seed=8)
    linear = lambda p, x: jnp.tanh(x) @ p["w2"][:IN] + x ** 2 @ p["w1"][:, :3]
    key = jax.random.key(2)
    got = blrax.predictive.linearized_log_probs(linear, key, params, state, x,
                                                num_samples=8, chunk_size=4)
    want = blrax.predictive.predictive_log_probs(linear, key, params, state, x,
                                                 num_samples=8, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    members = blrax.uncertainty.linearized_predictor(
        linear, key, params, state, num_samples=8)(x)
    want_members = blrax.uncertainty.posterior_predictor(
        linear, key, params, state, num_samples=8)(x)
    np.testing.assert_allclose(members, want_members, rtol=1e-12)
    got = blrax.predictive.linearized_mean_variance(
        linear, key, params, state, x, num_samples=8, noise_variance=0.0)
    want = blrax.predictive.predictive_mean_variance(
        linear, key, params, state, x, num_samples=8, noise_variance=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_nnx_model():
  """An NNX model with its optimizer, against the closed form by hand:
  for a linear layer, var_k = sum_i x_i^2 sigma_{w,ik}^2 + sigma_{b,k}^2."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, blrax.ivon(0.1, ess=10.0, hess_init=2.0),
                            wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  sigma = blrax.posterior_stddev(optimizer.opt_state)
  var = (np.asarray(x) ** 2 @ np.asarray(sigma["kernel"]) ** 2
         + np.asarray(sigma["bias"]) ** 2)
  logits = np.asarray(model(x))
  got = blrax.predictive.linearized_log_probs(None, None, model, optimizer, x,
                                              method="probit")
  np.testing.assert_allclose(
      got, _log_softmax(logits / np.sqrt(1 + math.pi / 8 * var)), rtol=1e-5)
  got = blrax.predictive.linearized_log_probs(None, 3, model, optimizer, x,
                                              num_samples=4)
  want = blrax.predictive.predictive_log_probs(None, 3, model, optimizer, x,
                                               num_samples=4)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predictor_in_the_uncertainty_report():
  """The report of linearized_predictor: its NLL is that of
  linearized_log_probs, batch by batch; probit has one member."""
  params, state, x = _setup(seed=12)
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  state = blrax.ivon(0.1, ess=20.0, weight_decay=0.1).init(params)
  y = jnp.argmax(mlp(params, x), -1).at[0].set(2)
  batches = [(x[:3], y[:3]), (x[3:], y[3:])]
  for method, key, members in (("sampled", 5, 4), ("probit", None, 1)):
    predictor = blrax.uncertainty.linearized_predictor(
        mlp, key, params, state, num_samples=4, method=method)
    r = blrax.uncertainty.report(predictor, batches)
    log_probs = blrax.predictive.linearized_log_probs(
        mlp, key, params, state, x, num_samples=4, method=method)
    want = -np.mean(np.take_along_axis(np.asarray(log_probs),
                                       np.asarray(y)[:, None], 1))
    np.testing.assert_allclose(r.nll, want, rtol=1e-5)
    assert r.num_members == members


# --------------------------------------------------------------------------
# Bad input.

_PARAMS = {"w": jnp.ones((3, 2))}
_STATE = blrax.ivon(0.1, ess=10.0).init(_PARAMS)
_APPLY = lambda p, x: jnp.tanh(x @ p["w"])
_X = jnp.ones((2, 3))


@pytest.mark.parametrize("call, match", [
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, _X, method="probits"),
     "method='probits'"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, _X, method="closed_form"),
     "method='closed_form'"),
    (lambda: blrax.predictive.linearized_mean_variance(
        _APPLY, 0, _PARAMS, _STATE, _X, method="probit"), "method='probit'"),
    (lambda: blrax.uncertainty.linearized_predictor(
        _APPLY, 0, _PARAMS, _STATE, method=None), "method=None"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, _X, num_samples=0), "num_samples=0"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, _X, num_samples=0, method="probit"),
     "num_samples=0"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, _X, num_samples=4, chunk_size=3),
     "chunk_size=3"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, None, _PARAMS, _STATE, _X), "key=None"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, {"w": jnp.ones((3, 3))}, _STATE, _X), "params"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, {"w": jnp.ones((3, 3))}, _STATE, _X, method="probit"),
     "params"),
    (lambda: blrax.predictive.linearized_mean_variance(
        _APPLY, 0, _PARAMS, _STATE, _X, noise_variance=-1.0),
     "noise_variance=-1.0"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, 0, _PARAMS, _STATE, {"a": _X, "b": jnp.ones(3)},
        method="probit"), "batch axis"),
    (lambda: blrax.predictive.linearized_log_probs(
        lambda p, x: x @ p["w"][:, :1], 0, _PARAMS, _STATE, _X),
     "2 classes"),
    (lambda: blrax.predictive.linearized_log_probs(
        _APPLY, None, _PARAMS, blrax.evon(0.1, ess=10.0).init(_PARAMS), _X,
        method="probit"), "EigenbasisGaussian.*'sampled'"),
    (lambda: blrax.uncertainty.linearized_predictor(
        _APPLY, None, _PARAMS, blrax.evon(0.1, ess=10.0).init(_PARAMS),
        method="probit"), "EigenbasisGaussian.*'sampled'"),
])
def test_bad_input_raises_value_error_naming_it(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_noise_variance_left_out_warns_and_is_zero():
  with pytest.warns(UserWarning, match="linearized_mean_variance: noise_var"):
    _, var = blrax.predictive.linearized_mean_variance(
        _APPLY, None, _PARAMS, _STATE, _X, method="closed_form")
  _, zero = blrax.predictive.linearized_mean_variance(
      _APPLY, None, _PARAMS, _STATE, _X, noise_variance=0.0,
      method="closed_form")
  np.testing.assert_array_equal(var, zero)
