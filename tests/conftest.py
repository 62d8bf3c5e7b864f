import fnmatch
import os
import sys

import jax
import pytest

# Tests import the shared case list as `cases`.
sys.path.insert(0, os.path.dirname(__file__))

# Compiled programs are cached on disk (.pytest_cache/jax, keyed by the
# program, the jax version and the flags), so identical programs in other
# tests, the other xdist worker, the slow tier and the next run are not
# compiled again: compile time dominates this suite. BLRAX_TEST_JAX_CACHE=0
# turns it off.
if os.environ.get("BLRAX_TEST_JAX_CACHE", "1") != "0":
  jax.config.update("jax_compilation_cache_dir", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      ".pytest_cache", "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The fast tier compiles with XLA's quick CPU pipeline: without LLVM's
# optimisations and with the older loop emitters its compile time halves
# (the tier took 345 s on 2 cores, 175 s with it), and the programs are too
# small for unoptimised code to cost much. Its numbers differ from the default
# pipeline's by rounding only. The slow tier compiles with the default
# pipeline (what users run); the bitwise golden trajectories belong to it.
# BLRAX_TEST_QUICK_COMPILE=1 or 0 forces it on or off; an XLA_FLAGS of
# your own is left alone.
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                       "--xla_cpu_use_fusion_emitters=false")


def pytest_configure(config):
  # Before any test module runs a computation: XLA reads XLA_FLAGS when the
  # backend starts.
  quick = os.environ.get("BLRAX_TEST_QUICK_COMPILE")
  if quick is None:
    quick = (config.getoption("markexpr", "") or "").strip() == "not slow"
  else:
    quick = quick != "0"
  if quick and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = QUICK_COMPILE_FLAGS


# Two tiers. The README's test command runs the fast one (`-m "not slow"`):
# every public function with its oracles, contracts and hostile inputs, the
# shared contract tests for IVON, and every variant's own oracles. The slow
# tier (`-m slow`) adds training runs, examples, notebooks, the docs build
# and its examples, multi-device runs, every other variant through the shared
# contract tests (wrappers, dtypes, checkpoints, invariants), and the longest
# compile-bound checks. CI runs both. Tests may also mark themselves with
# @pytest.mark.slow.
SLOW_FILES = {
    "test_examples.py", "test_notebooks.py", "test_multidevice.py",
    "test_family_trains.py", "test_posterior_benchmark.py", "test_lora.py",
    "test_docstrings.py",
    # Bitwise golden files of the default compile pipeline (see above).
    "test_trajectories.py",
}
SLOW_TESTS = {
    "test_api_docs.py::test_docs_build",
    # Each repeats a cheaper oracle in the fast tier on a larger program.
    "test_linearized.py::test_sampled_uses_the_same_draws_as_f_plus_j_offset",
    "test_linearized.py::test_linear_model_equals_the_ordinary_bma_draw_for_draw",
    "test_linearized.py::test_predictor_in_the_uncertainty_report",
}
# Single cases (`*` matches any characters) whose sibling case
# (mc_samples=1, the price estimator) stays in the fast tier.
SLOW_CASES = {
    "test_equinox.py::test_equinox_module_trains_like_the_plain_pytree[2]",
    "test_gradients.py::test_nnx_grads_at_each_draw_with_batchnorm_and_dropout[2]",
    "test_full_von.py::test_multisteps_equals_mc_samples_k_in_one_step[hessian]",
    "test_check_gradients.py::test_draw_passes_mean_is_refused[*-2]",
}
# Files whose tests run once per row of tests/cases.py (or per optimizer):
# the fast tier keeps the FAST_VARIANTS rows, the slow tier runs the others.
SWEEP_FILES = {
    "test_nesting.py", "test_optax_battery.py", "test_feature_matrix.py",
    "test_single_draw.py", "test_invariants.py", "test_plain_state.py",
    "test_checkpoint.py", "test_calibration.py", "test_ensembles.py",
    "test_health.py", "test_merging.py", "test_accumulation.py",
}
FAST_VARIANTS = {"ivon"}


def _variant_names():
  import cases  # pylint: disable=import-outside-toplevel
  return {v.name for v in cases.VARIANTS}


def pytest_collection_modifyitems(config, items):
  del config
  variants = _variant_names()
  for item in items:
    name = os.path.basename(item.fspath)
    callspec = getattr(item, "callspec", None)
    tokens = set(callspec.id.split("-")) if callspec else set()
    swept_away = (name in SWEEP_FILES and tokens & variants
                  and not tokens & FAST_VARIANTS)
    if (name in SLOW_FILES or swept_away
        or f"{name}::{item.originalname}" in SLOW_TESTS
        or any(fnmatch.fnmatchcase(f"{name}::{item.name}",
                                   pattern.replace("[", "[[]"))
               for pattern in SLOW_CASES)):
      item.add_marker(pytest.mark.slow)
