"""The layout of ``blrax/_src``: how its modules may use one another.

Each check walks the source with ``ast`` (nothing is imported), so it covers
every module, optional extras included.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "blrax" / "_src"

# Private names of one module that others may use: none. Each entry would be
# (the module using it, "module.name").
PRIVATE_NAME_ALLOW_LIST = frozenset()


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules():
  """``{dotted name: path}`` of every module under ``blrax/_src``."""
  return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_module(name: str, root: pathlib.Path) -> bool:
  """Whether ``name`` (dotted) is a module or package under ``root``."""
  path = root.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__")
                                       and name.endswith("__"))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module of ``from <node.module> import ...``."""
  if not node.level:
    return node.module or ""
  base = module.split(".")
  if not is_package:
    base.pop()
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> str | None:
  """``a.b.c`` of a chain of attributes on a name, or None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  parts.append(node.id)
  return ".".join(reversed(parts))


def _private_uses(module: str, path: pathlib.Path,
                  root: pathlib.Path = ROOT):
  """``(line, "target.name")`` for each private name of another blrax module
  that ``module`` uses: ``from blrax._src.x import _name``, or
  ``alias._name`` on an imported blrax module."""
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  aliases = {}  # local name -> the blrax module it is bound to
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for item in node.names:
        if item.name.split(".")[0] != "blrax":
          continue
        if item.asname:
          aliases[item.asname] = item.name
        else:
          aliases["blrax"] = "blrax"
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, is_package, node)
      if source.split(".")[0] != "blrax":
        continue
      for item in node.names:
        full = f"{source}.{item.name}"
        if _is_module(full, root):
          aliases[item.asname or item.name] = full
        elif _private(item.name) and source != module:
          found.append((node.lineno, full))
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute) or not _private(node.attr):
      continue
    value = _dotted(node.value)
    if value is None:
      continue
    head, _, rest = value.partition(".")
    if head not in aliases:
      continue
    target = aliases[head] + (f".{rest}" if rest else "")
    if _is_module(target, root) and target != module:
      found.append((node.lineno, f"{target}.{node.attr}"))
  return sorted(set(found))


def _all_private_uses():
  return {(module, name): line
          for module, path in _modules().items()
          for line, name in _private_uses(module, path)}


def test_no_module_uses_another_modules_private_names():
  uses = _all_private_uses()
  bad = sorted(f"{_modules()[module].relative_to(ROOT)}:{line}: {name}"
               for (module, name), line in uses.items()
               if (module, name) not in PRIVATE_NAME_ALLOW_LIST)
  assert not bad, (
      "modules of blrax/_src use private names of other modules; make the "
      "helper a documented public function of the module that owns it (or "
      "of a shared module):\n" + "\n".join(bad))


def test_the_private_name_check_sees_every_kind_of_use(tmp_path):
  """The check finds ``from ... import _x``, ``alias._x`` (also through
  ``import a.b as c`` and relative imports), and nothing else."""
  package = tmp_path / "blrax" / "_src"
  (package / "pkg").mkdir(parents=True)
  for name in ("__init__.py", "other.py", "pkg/__init__.py", "pkg/inner.py"):
    (package / name).write_text("")
  (package / "user.py").write_text(
      "import blrax._src.other as o\n"
      "from blrax._src import other\n"
      "from blrax._src.other import _one, fine\n"
      "from blrax._src.pkg import inner\n"
      "x = other._two + o._three + inner._four + other.fine + other.__doc__\n"
      "y = fine._replace\n")
  (package / "pkg" / "inner.py").write_text(
      "from . import _five\nfrom .. import other\nz = other._six\n")
  user = _private_uses("blrax._src.user", package / "user.py", tmp_path)
  assert {name for _, name in user} == {
      "blrax._src.other._one", "blrax._src.other._two",
      "blrax._src.other._three", "blrax._src.pkg.inner._four"}
  inner = _private_uses("blrax._src.pkg.inner", package / "pkg" / "inner.py",
                        tmp_path)
  assert {name for _, name in inner} == {"blrax._src.pkg._five",
                                         "blrax._src.other._six"}



# The layers of blrax/_src, lowest first: a module may import its own layer
# and the layers below, never one above. So a posterior type never imports the
# engine, and a function of the posterior (lookup, health, merging, the
# predictive) never imports an optimizer: it sees only base's protocols.
LAYERS = (
    ("base", "numerics", "validation"),
    ("noise", "expfam"),
    ("posteriors",),
    ("engine",),
    ("functions", "integrations"),
    ("evaluation",),
    ("optimizers",),
    ("wrappers",),
)
_RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> str:
  """``blrax._src.engine.steps`` -> ``engine``."""
  return module.split(".")[2]


def _imported(module: str, path: pathlib.Path) -> list[str]:
  """The blrax/_src modules ``path`` imports, anywhere in it (lazy imports
  inside functions included; relative imports resolved)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      target = _absolute(module, path.name == "__init__.py", node)
      if target == "blrax._src":
        found += [f"blrax._src.{a.name}" for a in node.names]
      elif target.startswith("blrax._src."):
        found.append(target)
    elif isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.startswith("blrax._src.")]
  return found


def _upward_imports(modules) -> list[str]:
  return [f"{module} imports {target}"
          for module, path in modules.items() if module.count(".") >= 2
          for target in _imported(module, path)
          if _RANK[_layer(target)] > _RANK[_layer(module)]]


def test_every_module_is_in_a_layer():
  layers = {_layer(m) for m in _modules() if m.count(".") >= 2}
  assert not layers - set(_RANK), sorted(layers - set(_RANK))
  assert set(_RANK) <= layers, sorted(set(_RANK) - layers)


def test_imports_point_down():
  upward = _upward_imports(_modules())
  assert not upward, "imports must point down the layers:\n" + "\n".join(
      upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
  path = tmp_path / "lookup.py"
  path.write_text("def f():\n  from blrax._src.optimizers import ivon\n")
  assert _upward_imports({"blrax._src.functions.lookup": path}) == [
      "blrax._src.functions.lookup imports blrax._src.optimizers"]
  path.write_text("from blrax._src.posteriors import diagonal\n")
  assert not _upward_imports({"blrax._src.functions.lookup": path})
