"""Issue 23: the hostile cases of the features added since the last pass.

Each test names the numbered problem it covers (the session brief's list:
silent wrong results, corrupted state, accepted bad input, unclear errors
and frictions). Every one of them failed before its fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
