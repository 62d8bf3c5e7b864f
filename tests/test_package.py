"""The package's shape: topical modules, deprecated top-level names, optional
extras (flax, orbax) and keyword-only hyperparameters."""

import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import cases
import pytest

import blrax
import blrax.checkpoint
import blrax.expfam
import blrax.metrics
import blrax.noise
import blrax.predictive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = ("blrax.engine", "blrax.expfam", "blrax.metrics",
           "blrax.predictive", "blrax.noise", "blrax.uncertainty", "blrax.flax",
           "blrax.checkpoint")
# The modules that need an optional extra, and the package it brings.
EXTRAS = {"blrax.flax": "flax"}


def _import(name):
  if name in EXTRAS:
    pytest.importorskip(EXTRAS[name])
  return importlib.import_module(name)


@pytest.mark.parametrize("name", MODULES)
def test_topical_module_imports_and_exports_its_all(name):
  module = _import(name)
  assert module.__all__, name
  assert len(set(module.__all__)) == len(module.__all__), name
  for attr in module.__all__:
    assert hasattr(module, attr), f"{name}.{attr}"
  # the same module object under the package's attribute
  assert getattr(blrax, name.split(".")[1]) is module


def test_top_level_all_exists():
  for attr in blrax.__all__:
    assert hasattr(blrax, attr), attr


def test_moved_names_cover_the_topical_modules():
  moved = blrax._MOVED
  for home in set(moved.values()):
    names = {n for n, h in moved.items() if h == home}
    if home in EXTRAS and importlib.util.find_spec(EXTRAS[home]) is None:
      continue
    want = set(importlib.import_module(home).__all__)
    if home == "blrax.metrics":  # only the 0.1 names moved; later ones are new
      assert names == set(blrax._METRICS_01) and names <= want, home
    elif home == "blrax.predictive":  # the linearised predictive is new
      assert names == {n for n in want if not n.startswith("linearized")}, home
    elif home == "blrax.flax":  # nnx_value_grads_and_squares is new in 0.3
      assert names == want - {"nnx_value_grads_and_squares"}, home
    elif home in set(blrax._MOVED_03.values()):  # single names, in 0.3
      assert names <= want, home
    else:
      assert names == want, home
  # moved names are no longer advertised at the top level
  assert set(moved).isdisjoint(blrax.__all__)


@pytest.mark.parametrize("name", sorted(blrax._MOVED))
def test_moved_name_warns_and_is_the_new_object(name):
  home = blrax._MOVED[name]
  new = getattr(_import(home), name)
  with pytest.warns(DeprecationWarning, match=rf"{home}\.{name}\b"):
    old = getattr(blrax, name)
  assert old is new
  namespace = {}
  with pytest.warns(DeprecationWarning, match=rf"{home}\.{name}\b"):
    exec(f"from blrax import {name}", namespace)
  assert namespace[name] is new


@pytest.mark.parametrize("name", sorted(blrax._RENAMED))
def test_renamed_state_alias_warns_and_is_the_shared_state(name):
  with pytest.warns(DeprecationWarning, match=r"blrax\.ScaleByBLRState"):
    assert getattr(blrax, name) is blrax.ScaleByBLRState
  assert name not in blrax.__all__


def test_each_public_name_has_one_home():
  homes = {}
  for module in ("blrax", *MODULES):
    if module in EXTRAS and importlib.util.find_spec(EXTRAS[module]) is None:
      continue
    for attr in _import(module).__all__:
      obj = getattr(_import(module), attr)
      if inspect.ismodule(obj):
        continue
      homes.setdefault(id(obj), []).append(f"{module}.{attr}")
  shared = [names for names in homes.values() if len(names) > 1]
  assert not shared, shared


def test_unknown_attribute_raises_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    blrax.no_such_name


_NO_EXTRAS_SCRIPT = textwrap.dedent("""
    import importlib.abc
    import sys
    import tempfile
    import warnings

    BLOCKED = ("flax", "orbax")


    class Block(importlib.abc.MetaPathFinder):

      def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)",
                                    name=fullname)
        return None


    for name in list(sys.modules):
      if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
    sys.modules["flax"] = None
    sys.modules["orbax"] = None
    sys.meta_path.insert(0, Block())
    warnings.filterwarnings("error", message="blrax", category=DeprecationWarning)

    import jax
    import jax.numpy as jnp

    import blrax

    opt = blrax.ivon(0.1, ess=10.0)
    params = jnp.arange(3.0)
    state = opt.init(params)
    theta = blrax.sample_params(params, state)
    grads = jax.grad(lambda p: jnp.sum(p ** 2))(theta)
    updates, state = opt.update(grads, state, params)
    new_params = params + updates
    assert new_params.shape == (3,) and bool(jnp.all(jnp.isfinite(new_params)))
    assert bool(jnp.any(new_params != params))

    loaded = [m for m, v in sys.modules.items()
              if m.split(".")[0] in BLOCKED and v is not None]
    assert not loaded, loaded

    try:
      import blrax.flax  # noqa: F401
    except ImportError as error:
      assert "blrax[flax]" in str(error), str(error)
    else:
      raise AssertionError("import blrax.flax worked without flax")

    import blrax.checkpoint

    with tempfile.TemporaryDirectory() as tmp:
      for fn in (blrax.checkpoint.save_checkpoint,
                 blrax.checkpoint.restore_checkpoint):
        try:
          fn(tmp + "/ckpt", params, state)
        except ImportError as error:
          assert "blrax[checkpoint]" in str(error), str(error)
        else:
          raise AssertionError(f"{fn.__name__} worked without orbax")
    print("OK")
""")


def test_core_works_without_flax_and_orbax():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _NO_EXTRAS_SCRIPT],
                          capture_output=True, text=True, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK"), result.stdout


# Every optimizer and scale_by_* transform of the table (tests/cases.py).
FACTORIES = sorted({f.__name__ for v in cases.VARIANTS
                    for f in (v.factory, v.transform)})


@pytest.mark.parametrize("name", FACTORIES)
def test_hyperparameters_are_keyword_only(name):
  factory = getattr(blrax, name)
  params = list(inspect.signature(factory).parameters.values())
  assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, params[0]
  assert params[0].name == ("ess" if name.startswith("scale_by") else
                            "learning_rate")
  assert len(params) > 1
  for p in params[1:]:
    assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {p}"
  with pytest.raises(TypeError, match="positional"):
    factory(0.1, 10.0)
