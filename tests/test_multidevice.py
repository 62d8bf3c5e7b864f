"""Sharded training on 8 CPU devices equals the single-device run.

XLA_FLAGS must be set before jax is imported, so the checks run in a child
process (tests/multidevice_script.py).
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_sharded_runs_equal_single_device():
  script = os.path.join(os.path.dirname(__file__), "multidevice_script.py")
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, script], capture_output=True,
                          text=True, env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "multidevice OK" in result.stdout
