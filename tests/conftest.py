import os
import sys

import pytest

# Tests import the shared case list as `cases`.
sys.path.insert(0, os.path.dirname(__file__))

# The slow tier (`pytest -m slow`): training runs, examples, notebooks, the
# docs build, multi-device runs, and the longest compile-bound checks. The
# README's test command runs the rest (`-m "not slow"`), which still covers
# every public function with its oracles, contracts and hostile inputs. Tests
# may also mark themselves with @pytest.mark.slow.
SLOW_FILES = {
    "test_examples.py", "test_notebooks.py", "test_multidevice.py",
    "test_family_trains.py", "test_posterior_benchmark.py", "test_lora.py",
}
SLOW_TESTS = {
    "test_api_docs.py::test_docs_build",
}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    name = os.path.basename(item.fspath)
    if name in SLOW_FILES or f"{name}::{item.originalname}" in SLOW_TESTS:
      item.add_marker(pytest.mark.slow)
