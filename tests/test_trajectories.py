"""Every optimizer's 25-step trajectory is bitwise what it was (golden files).

The golden arrays come from ``python tests/golden/trajectories.py``; a change
meant to alter a trajectory regenerates them and says which in its commit.
"""

import importlib.util
import os

import numpy as np
import pytest

_HERE = os.path.join(os.path.dirname(__file__), "golden")
_spec = importlib.util.spec_from_file_location(
    "golden_trajectories", os.path.join(_HERE, "trajectories.py"))
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
_saved = np.load(os.path.join(_HERE, "trajectories.npz"))


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_trajectory_is_unchanged(name):
  path, leaves = golden.run(name)
  np.testing.assert_array_equal(path, _saved[f"{name}/params"])
  saved = sorted((k for k in _saved.files if k.startswith(f"{name}/state")),
                 key=lambda k: int(k.rsplit("state", 1)[1]))
  assert len(saved) == len(leaves)
  for key, leaf in zip(saved, leaves):
    np.testing.assert_array_equal(leaf, _saved[key], err_msg=key)
