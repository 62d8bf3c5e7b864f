"""The runnable examples in the public docstrings produce what they print."""

import doctest

import pytest

from blrax._src import ivon, von

MODULES = [ivon, von]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
