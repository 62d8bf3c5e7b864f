"""Every blrax variant trains digits to within AdamW's reach (one seed).

Runs ``benchmarks/digits_family.py``'s training (MLP 64-128-128-10, batch 32,
50 epochs, ess = 1347, each variant at its starting learning rate and default
hyperparameters) on seed 0, and checks the Bayesian model average over 32
posterior samples: accuracy >= 0.95 and NLL <= 1.2 x AdamW's test NLL.

The full 50 epochs are needed: at a constant learning rate, after 20 epochs
IVON and VOGN are still above the NLL bound (measured 1.27 x AdamW's 50-epoch
NLL) and VAdam is at its edge (1.19 x), so the budget is not cut here.
Measured at 50 epochs (BMA NLL / AdamW NLL): ivon 1.12, von 1.02, vadam 0.99,
vogn 1.05; BMA accuracy 0.976 for all four (AdamW 0.982). EVON (the
official defaults, whitened steps of lr 1e-3) has BMA NLL 0.064, 0.069 and
0.054 on seeds 0-2 (AdamW's mean over them 0.073), BMA accuracy 0.976-0.987.
The bound is not
loose for every seed: on seed 1 ivon, vadam and vogn are at 1.24, 1.25 and
1.22 x that seed's AdamW NLL (von 1.13), so changing ``SEED`` may fail.
"""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
  path = os.path.join(ROOT, "benchmarks", "digits_family.py")
  spec = importlib.util.spec_from_file_location("digits_family", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_benchmark()

SEED = 0
# The best of the benchmark's AdamW sweep (1e-3, 3e-3, 1e-2) by mean NLL over
# seeds 0-2 (0.0728 against 0.0903 and 0.0915).
ADAMW_LR = 1e-3


@pytest.fixture(scope="module")
def adamw_nll():
  result = bench.train("adamw", (SEED,), learning_rate=ADAMW_LR)
  return float(result["nll"][0])


@pytest.mark.parametrize("name", bench.VARIANTS)
def test_variant_trains_digits(name, adamw_nll):
  result = bench.train(name, (SEED,))
  accuracy = float(result["bma_accuracy"][0])
  nll = float(result["bma_nll"][0])
  assert accuracy >= bench.MIN_BMA_ACCURACY, (
      f"{name}: BMA accuracy {accuracy:.4f} < {bench.MIN_BMA_ACCURACY}")
  assert nll <= bench.MAX_NLL_RATIO * adamw_nll, (
      f"{name}: BMA NLL {nll:.4f} > {bench.MAX_NLL_RATIO} x AdamW's "
      f"{adamw_nll:.4f}")
