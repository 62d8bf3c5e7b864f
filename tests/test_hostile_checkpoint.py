"""Hostile checkpoints and diagnostics inputs: an error naming the cause, never
a silently wrong restore.

Every case here restored (or summarised) without error, or failed with a
message that did not name the cause, before restore checked the template
against the checkpoint's structure record.
"""

import os

import cases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blrax
import blrax.checkpoint
from blrax._src.integrations import checkpoint as checkpoint_lib

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(2)}


def _opt(factory=blrax.vadam, **kwargs):
  return factory(learning_rate=0.1, ess=100.0, **kwargs)


def _save(path, opt, params=PARAMS, **kwargs):
  blrax.checkpoint.save_checkpoint(path, params, opt.init(params), **kwargs)


def _restore(path, opt, params=PARAMS, **kwargs):
  return blrax.checkpoint.restore_checkpoint(path, params, opt.init(params),
                                             **kwargs)


MISMATCHES = [
    # (saved optimizer, template optimizer, what the message must name)
    ("mc_samples_1_into_2", _opt(), _opt(mc_samples=2),
     r"opt_state\[0\]\.posterior\.noise_state\.key: saved shape \(2,\) dtype "
     r"uint32, template has shape \(2, 2\)"),
    ("mc_samples_2_into_1", _opt(mc_samples=2), _opt(),
     r"mc_samples=2.*the template has .*mc_samples=1"),
    ("normal_into_hash_noise", _opt(), _opt(noise="hash"),
     r"opt_state\[0\]\.posterior\.noise_state: saved node NormalNoiseState, "
     r"template has node HashNoiseState"),
    ("normal_into_flip_noise", _opt(), _opt(noise="flip"),
     r"noise_state: saved node NormalNoiseState, template has node "
     r"FlipNoiseState"),
    ("von_diag_into_full", _opt(blrax.von), _opt(blrax.von, covariance="full"),
     r"saved with a DiagonalGaussian posterior of optimizer type "
     r"ScaleByBLRState.*the template has a FullGaussian posterior of "
     r"optimizer type ScaleByFullVONState"),
    ("von_into_vadam", _opt(blrax.von), _opt(),
     r"opt_state\[0\]\.momentum: saved node tuple, template has node dict"),
    # The state keeps key data: a threefry key's 2 words, an rbg key's 4.
    ("threefry_into_rbg_key", _opt(),
     _opt(key=jax.random.key(0, impl="rbg")),
     r"noise_state\.key: saved shape \(2,\) dtype uint32, template has shape "
     r"\(4,\) dtype uint32"),
    ("bare_into_chain", _opt(), optax.chain(optax.identity(), _opt()),
     r"opt_state\[0\]: saved node ScaleByBLRState, template has node "
     r"EmptyState"),
]


@pytest.mark.parametrize("saved,template,message",
                         [m[1:] for m in MISMATCHES],
                         ids=[m[0] for m in MISMATCHES])
def test_restore_into_another_configuration_names_the_difference(
    tmp_path, saved, template, message):
  _save(tmp_path / "ckpt", saved)
  with pytest.raises(ValueError, match=message):
    _restore(tmp_path / "ckpt", template)


@pytest.mark.parametrize("v", [cases.param(v, v) for v in cases.VARIANTS])
def test_restore_into_another_mc_samples_names_it(tmp_path, v):
  """Every variant of the table: a checkpoint with S draws per step does not
  restore into a template with another number."""
  saved = v.factory(**v.wide)
  other = 1 if v.mc_samples > 1 else 2
  template = v.factory(**dict(v.wide, mc_samples=other))
  _save(tmp_path / "ckpt", saved)
  with pytest.raises(ValueError, match=rf"mc_samples={v.mc_samples}.*the "
                     rf"template has .*mc_samples={other}"):
    _restore(tmp_path / "ckpt", template)


PARAM_MISMATCHES = [
    ("shape", {"w": jnp.zeros((3, 3)), "b": jnp.zeros(2)},
     r"params\['w'\]: saved shape \(2, 3\) dtype float32, template has shape "
     r"\(3, 3\) dtype float32"),
    ("dtype", {"w": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros(2)},
     r"params\['w'\]: saved shape \(2, 3\) dtype float32, template has shape "
     r"\(2, 3\) dtype bfloat16"),
    ("tree", {"w": jnp.zeros((2, 3)), "c": jnp.zeros(2)},
     r"params\['c'\]: saved nothing"),
]


@pytest.mark.parametrize("params,message", [m[1:] for m in PARAM_MISMATCHES],
                         ids=[m[0] for m in PARAM_MISMATCHES])
def test_restore_with_other_params_names_the_leaf(tmp_path, params, message):
  _save(tmp_path / "ckpt", _opt())
  with pytest.raises(ValueError, match=message):
    _restore(tmp_path / "ckpt", _opt(), params)


def test_full_covariance_params_shape_is_checked(tmp_path):
  opt = _opt(blrax.von, covariance="full")
  _save(tmp_path / "ckpt", opt)
  transposed = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"posterior\.template\['w'\]: saved "
                     r"shape \(0, 2, 3\)"):
    _restore(tmp_path / "ckpt", opt, transposed)


def test_metadata_tells_ivon_from_vadam(tmp_path):
  # Same structure (ScaleByBLRState, momentum, DiagonalGaussian): only the
  # metadata the user saved can tell them apart.
  _save(tmp_path / "ckpt", _opt(blrax.ivon), metadata={"optimizer": "ivon"})
  with pytest.raises(ValueError, match=r"metadata\['optimizer'\]: saved "
                     r"'ivon', expected 'vadam'"):
    _restore(tmp_path / "ckpt", _opt(), metadata={"optimizer": "vadam"})
  with pytest.raises(ValueError, match=r"metadata\['ess'\]: the checkpoint "
                     "has none"):
    _restore(tmp_path / "ckpt", _opt(blrax.ivon), metadata={"ess": 100.0})
  params, state = _restore(tmp_path / "ckpt", _opt(blrax.ivon),
                           metadata={"optimizer": "ivon"})
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  np.testing.assert_array_equal(blrax.find_posteriors(state)[0].key,
                                jax.random.key_data(jax.random.key(0)))


def test_metadata_must_be_json(tmp_path):
  with pytest.raises(TypeError, match="`metadata` must be JSON-serialisable"):
    _save(tmp_path / "ckpt", _opt(), metadata={"optimizer": object()})
  assert not os.path.exists(tmp_path / "ckpt")


def test_checkpoint_without_record_warns_and_still_checks_shapes(tmp_path):
  # As saved by an older blrax: no structure record.
  _save(tmp_path / "ckpt", _opt())
  os.remove(tmp_path / "ckpt" / checkpoint_lib.RECORD)
  with pytest.warns(UserWarning, match="not checked"):
    params, _ = _restore(tmp_path / "ckpt", _opt())
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  with pytest.warns(UserWarning), pytest.raises(
      ValueError, match=r"opt_state\[0\]\.posterior\.noise_state\.key: saved "
      r"shape \(2,\), template has \(2, 2\)"):
    _restore(tmp_path / "ckpt", _opt(mc_samples=2))
  with pytest.raises(ValueError, match="metadata cannot be checked"):
    _restore(tmp_path / "ckpt", _opt(), metadata={"optimizer": "vadam"})


def test_corrupt_record_is_an_error(tmp_path):
  _save(tmp_path / "ckpt", _opt())
  (tmp_path / "ckpt" / checkpoint_lib.RECORD).write_text("{not json")
  with pytest.raises(ValueError, match="structure record .* is unreadable"):
    _restore(tmp_path / "ckpt", _opt())


def test_posterior_summary_skips_zero_size_leaves():
  params = {"w": jnp.zeros((0, 3)), "b": jnp.zeros(3)}
  for opt in (blrax.vadam(0.1, ess=4.0, hess_init=0.25, weight_decay=0.0),
              blrax.von(0.1, ess=4.0, hess_init=0.25, weight_decay=0.0,
                        covariance="full")):
    summary = blrax.posterior_summary(opt.init(params))
    assert set(summary) == {"stddev/b", "curvature/b"}
    np.testing.assert_allclose(summary["stddev/b"]["max"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(summary["curvature/b"]["min"], 0.25, rtol=1e-6)


def test_export_posterior_with_foreign_params_is_an_error():
  state = _opt().init(PARAMS)
  with pytest.raises(ValueError, match=r"params have leaves the posterior "
                     r"lacks: \['c'\]; the posterior has leaves the params "
                     r"lack: \['b'\]"):
    blrax.export_posterior({"w": PARAMS["w"], "c": PARAMS["b"]}, state)
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 3\)"):
    blrax.export_posterior({"w": jnp.zeros((3, 3)), "b": PARAMS["b"]}, state)
