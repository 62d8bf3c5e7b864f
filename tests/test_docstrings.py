"""Every runnable example in a public docstring produces what it prints."""

import doctest
import importlib
import pkgutil

import pytest

import blrax
import blrax._src

MODULES = sorted(
    [m.name for m in pkgutil.walk_packages(blrax._src.__path__, "blrax._src.")]
    + [f"blrax.{m.name}" for m in pkgutil.iter_modules(blrax.__path__)
       if m.name != "_src"])


def test_the_optimizers_have_examples():
  finder = doctest.DocTestFinder()
  for name in ("blrax._src.optimizers.ivon", "blrax._src.optimizers.von",
               "blrax._src.optimizers.vogn"):
    examples = sum(len(t.examples) for t in finder.find(
        importlib.import_module(name)))
    assert examples > 0, name


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
