"""Every optimizer's 25-step trajectory is what it was (golden files).

The golden arrays come from ``python tests/golden/trajectories.py``; a change
meant to alter a trajectory regenerates them and says which in its commit.
On the machine that wrote them the comparison is bitwise; on another CPU,
whose vector code rounds differently, within
``golden.CROSS_MACHINE_TOLERANCE`` of each array's largest magnitude.
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


_RECORDED_ON = (str(_saved["machine"]) if "machine" in _saved.files
                else "an unrecorded machine")
_BITWISE = _RECORDED_ON == golden.machine()


def _assert_same(new, saved, key):
  new = np.asarray(new)
  if _BITWISE or not np.issubdtype(saved.dtype, np.floating):
    np.testing.assert_array_equal(new, saved, err_msg=key)
    return
  scale = float(np.max(np.abs(saved))) if saved.size else 0.0
  np.testing.assert_allclose(
      new, saved, rtol=0, atol=golden.CROSS_MACHINE_TOLERANCE * scale,
      err_msg=f"{key}, recorded on {_RECORDED_ON}")


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_trajectory_is_unchanged(name):
  path, leaves = golden.run(name)
  _assert_same(path, _saved[f"{name}/params"], f"{name}/params")
  saved = sorted((k for k in _saved.files if k.startswith(f"{name}/state")),
                 key=lambda k: int(k.rsplit("state", 1)[1]))
  assert len(saved) == len(leaves)
  for key, leaf in zip(saved, leaves):
    _assert_same(leaf, _saved[key], key)
