"""Bad input raises ValueError naming the argument and its value."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import blrax

BAD_IVON = [
    ("learning_rate", -0.1),
    ("ess", 0.0),
    ("ess", -5.0),
    ("hess_init", 0.0),
    ("hess_init", -1.0),
    ("b1", 1.5),
    ("b1", -0.1),
    ("b2", 1.01),
    ("weight_decay", -1e-4),
    ("clip_radius", 0.0),
    ("mc_samples", 0),
    ("mc_samples", 1.5),
    ("ess", math.nan),
]


@pytest.mark.parametrize("arg,value", BAD_IVON)
def test_ivon_rejects_bad_hyperparameter(arg, value):
  kwargs = dict(learning_rate=0.1, ess=100.0)
  kwargs[arg] = value
  with pytest.raises(ValueError, match=rf"`{arg}`.*{arg}="):
    blrax.ivon(**kwargs)


def test_ivon_rejects_bad_key():
  with pytest.raises(ValueError, match="key"):
    blrax.ivon(0.1, ess=10.0, key=1.5).init(jnp.zeros(2))


def test_ivon_accepts_edge_values():
  blrax.ivon(0.0, ess=math.inf, b1=0.0, b2=1.0, weight_decay=0.0)
  blrax.ivon(optax.linear_schedule(0.1, 0.0, 100), ess=10.0)


def test_grads_shape_mismatch_names_grads():
  opt = blrax.ivon(0.1, ess=10.0)
  params = {"w": jnp.zeros((2, 3))}
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"`grads` leaf has shape \(3, 2\)"):
    opt.update({"w": jnp.zeros((3, 2))}, state, params)
  with pytest.raises(ValueError, match="`grads` must have the structure"):
    opt.update({"v": jnp.zeros((2, 3))}, state, params)
  with pytest.raises(ValueError, match="params"):
    opt.update({"w": jnp.zeros((2, 3))}, state)


def test_mc_samples_grads_need_leading_axis():
  opt = blrax.ivon(0.1, ess=10.0, mc_samples=4)
  params = jnp.zeros(3)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"expected \(4, 3\)"):
    opt.update(jnp.zeros((2, 3)), state, params)


def test_traced_mc_samples_explains_static_args():
  opt = optax.inject_hyperparams(blrax.ivon)(learning_rate=0.1, ess=10.0,
                                             mc_samples=2)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(opt.init)(jnp.zeros(3))


def test_state_without_posterior():
  with pytest.raises(ValueError, match="no blrax posterior"):
    blrax.sample_params(jnp.zeros(2), optax.adam(0.1).init(jnp.zeros(2)))


def test_sample_posterior_num_samples():
  opt = blrax.ivon(0.1, ess=10.0)
  state = opt.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="num_samples=0"):
    blrax.sample_posterior(jnp.zeros((), jnp.uint32), jnp.zeros(2), state, 0)


VARIANT_BAD = [
    (blrax.von, "ess", 0.0), (blrax.von, "b2", 2.0), (blrax.von, "hess_init", 0.0),
    (blrax.von, "weight_decay", -1.0), (blrax.von, "mc_samples", 0),
    (blrax.von, "covariance", "lowrank"),
    (blrax.vadam, "ess", -1.0), (blrax.vadam, "b1", 1.2), (blrax.vadam, "b2", -0.5),
    (blrax.vadam, "hess_init", -1.0), (blrax.vadam, "learning_rate", -1.0),
    (blrax.vogn, "ess", 0.0), (blrax.vogn, "hess_init", 0.0),
    (blrax.vogn, "b2", 1.5), (blrax.vogn, "mc_samples", -2),
]


@pytest.mark.parametrize("factory,arg,value", VARIANT_BAD,
                         ids=[f"{f.__name__}-{a}" for f, a, _ in VARIANT_BAD])
def test_variants_reject_bad_hyperparameter(factory, arg, value):
  kwargs = dict(learning_rate=0.1, ess=100.0)
  kwargs[arg] = value
  with pytest.raises(ValueError, match=rf"`{arg}`.*{arg}="):
    factory(**kwargs)


def test_vadam_needs_positive_initial_precision():
  with pytest.raises(ValueError, match="hess_init.*weight_decay"):
    blrax.vadam(0.1, ess=10.0, hess_init=0.0, weight_decay=0.0)
  blrax.vadam(0.1, ess=float("inf"), hess_init=0.0, weight_decay=0.0)
  # Leaves the mask excludes have no prior precision: hess_init = 0 would
  # give them an infinite variance.
  with pytest.raises(ValueError,
                     match="with weight_decay_mask, hess_init alone must be"):
    blrax.vadam(0.1, ess=10.0, batch_size=1, hess_init=0.0, weight_decay=1.0,
                weight_decay_mask={"a": False})


def test_von_full_refuses_huge_dimension():
  opt = blrax.von(0.1, ess=10.0, covariance="full", max_dim=100)
  with pytest.raises(ValueError, match="D=101 exceeds max_dim=100"):
    opt.init(jnp.zeros(101))


def test_von_full_hessian_shape():
  opt = blrax.von(0.1, ess=10.0, covariance="full")
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
    opt.update(params, state, params, hessian=jnp.eye(4))


def test_vogn_needs_per_example_grads():
  opt = blrax.vogn(0.1, ess=10.0)
  params = jnp.zeros(3)
  with pytest.raises(ValueError, match="per-example"):
    opt.update(jnp.zeros(3), opt.init(params), params)


@pytest.mark.parametrize("factory", [blrax.ivon, blrax.von, blrax.vadam,
                                     blrax.vogn])
def test_unknown_noise_generator(factory):
  with pytest.raises(ValueError, match="`noise`.*noise='philox'"):
    factory(0.1, ess=10.0, noise="philox")
  with pytest.raises(ValueError, match="covariance='full'"):
    blrax.von(0.1, ess=10.0, covariance="full", noise="hash")
  with pytest.raises(ValueError, match="covariance='full'"):
    blrax.von(0.1, ess=10.0, covariance="full", noise=blrax.noise.flip_noise(8))
