"""The API reference: every public name is documented, and the docs build.

Public names are the ``__all__`` of the public modules (``PUBLIC_MODULES``;
``blrax.uncertainty`` once it exists), submodules left out. Each must be
named in an autodoc directive of ``docs/api/*.rst`` under its public path
(``.. autofunction:: blrax.noise.flip_noise``), or its module's page must
document it with ``.. automodule:: <module>`` and a bare ``:members:``.

The docstring rules, checked once per object (an alias such as
``ScaleByIVONState = ScaleByBLRState`` shares its target's docstring):

- A function: an ``Args:`` section naming each of its parameters (``*name``
  and ``**name`` for variadic ones) when it takes any; a ``Returns:`` section
  unless it is annotated ``-> None``; an ``Examples:`` section with at least
  one ``>>>`` line (the examples run in ``tests/test_docstrings.py``).
- A ``NamedTuple`` (an optimizer, noise or posterior state): an
  ``Attributes:`` section naming each field, and ``Examples:`` with a
  ``>>>`` line. No ``Args:``/``Returns:``: the optimizers build these
  states, users read them.
- Any other class (a dataclass such as a noise generator or an exponential
  family): ``Attributes:`` naming each field it declares itself (when it
  declares any), and ``Examples:`` with a ``>>>`` line.
- A method listed in a ``:members:`` option of the API pages: ``Args:``
  naming its parameters (``self`` aside) when it has any, and ``Returns:``;
  its class's example covers it.
- A constant (``blrax.uncertainty.SCORES``): no rule; ``autodata`` shows its
  value, and its module's docstring says what it is.

``test_docs_build`` builds the HTML (API pages, guides in ``docs/``, the
notebooks unexecuted) with ``-W --keep-going``, and with ``nitpicky`` set in
``docs/conf.py`` so that a broken cross-reference is an error too.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "blrax", "blrax.engine", "blrax.noise", "blrax.predictive", "blrax.metrics",
    "blrax.expfam", "blrax.flax", "blrax.checkpoint",
] + (["blrax.uncertainty"] if importlib.util.find_spec("blrax.uncertainty")
     else [])

_DIRECTIVE = re.compile(
    r"^\.\. auto(function|class|data|exception|module)::\s+(\S+)\s*$")
_OPTION = re.compile(r"^\s+:(\w[\w-]*):\s*(.*)$")
_SECTION = re.compile(r"^([A-Z]\w*(?: \w+)*):\s*$")
_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:")


def _directives():
  """``(kind, target, options)`` of every autodoc directive in docs/api."""
  found = []
  for page in sorted((DOCS / "api").glob("*.rst")):
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
      match = _DIRECTIVE.match(line)
      if not match:
        continue
      options = {}
      for option in lines[i + 1:]:
        option_match = _OPTION.match(option)
        if not option_match:
          break
        options[option_match.group(1)] = option_match.group(2).strip()
      found.append((match.group(1), match.group(2), options))
  return found


def _public_names():
  """``(module, name, object)`` for each public name, modules left out."""
  out = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj):
        out.append((module_name, name, obj))
  return out


def _sections(doc):
  """``{header: body lines}`` of a Google-style docstring."""
  sections, current = {}, None
  for line in inspect.cleandoc(doc or "").splitlines():
    match = _SECTION.match(line)
    if match:
      current = sections.setdefault(match.group(1), [])
    elif line and not line[0].isspace():
      current = None
    elif current is not None:
      current.append(line)
  return sections


def _items(body):
  """The names a section lists (its least-indented ``name:`` lines)."""
  lines = [line for line in body if line.strip()]
  if not lines:
    return set()
  indent = min(len(line) - len(line.lstrip()) for line in lines)
  return {m.group(1) for line in lines
          if len(line) - len(line.lstrip()) == indent
          and (m := _ITEM.match(line.strip()))}


def _parameters(function, skip_self=False):
  names = []
  for parameter in inspect.signature(function).parameters.values():
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*",
              inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    names.append(prefix + parameter.name)
  return names[1:] if skip_self else names


def _check_args_returns(function, sections, skip_self=False):
  problems = []
  wanted = _parameters(function, skip_self)
  if wanted:
    if "Args" not in sections:
      problems.append("no Args: section")
    else:
      listed = _items(sections["Args"])
      missing = [p for p in wanted if p not in listed
                 and p.lstrip("*") not in listed]
      if missing:
        problems.append(f"Args: does not name {', '.join(missing)}")
  annotation = inspect.signature(function).return_annotation
  if annotation not in (None, "None") and "Returns" not in sections:
    problems.append("no Returns: section")
  return problems


def _check_examples(sections):
  if "Examples" not in sections:
    return ["no Examples: section"]
  if not any(line.strip().startswith(">>>") for line in sections["Examples"]):
    return ["Examples: has no >>> line"]
  return []


def _own_fields(cls):
  if hasattr(cls, "_fields"):
    return list(cls._fields)
  if dataclasses.is_dataclass(cls):
    own = cls.__dict__.get("__annotations__", {})
    return [f.name for f in dataclasses.fields(cls) if f.name in own]
  return []


def docstring_problems(obj):
  """What the docstring of ``obj`` lacks under the rules above."""
  sections = _sections(inspect.getdoc(obj) if inspect.isclass(obj)
                       else obj.__doc__)
  if not (obj.__doc__ or "").strip():
    return ["no docstring"]
  problems = []
  if inspect.isclass(obj):
    fields = _own_fields(obj)
    if fields:
      if "Attributes" not in sections:
        problems.append("no Attributes: section")
      else:
        missing = [f for f in fields if f not in _items(sections["Attributes"])]
        if missing:
          problems.append(f"Attributes: does not name {', '.join(missing)}")
  else:
    problems += _check_args_returns(obj, sections)
  return problems + _check_examples(sections)


def method_problems(cls, name):
  method = getattr(cls, name)
  sections = _sections(method.__doc__)
  if not (method.__doc__ or "").strip():
    return ["no docstring"]
  return _check_args_returns(method, sections, skip_self=True)


def _documented():
  names, whole_modules = set(), set()
  for kind, target, options in _directives():
    if kind == "module":
      if options.get("members", None) == "":
        whole_modules.add(target)
    else:
      names.add(target)
  return names, whole_modules


def test_public_names_are_in_the_api_pages():
  names, whole_modules = _documented()
  missing = [f"{module}.{name}" for module, name, _ in _public_names()
             if f"{module}.{name}" not in names and module not in whole_modules]
  assert not missing, f"public names missing from docs/api/*.rst: {missing}"


def test_api_pages_name_only_public_objects():
  public = {f"{module}.{name}" for module, name, _ in _public_names()}
  stale = [target for kind, target, _ in _directives()
           if kind != "module" and target not in public]
  assert not stale, f"docs/api/*.rst documents non-public names: {stale}"


def test_docstring_sections():
  """Args/Returns/Attributes/Examples as the module docstring states."""
  problems, seen = [], set()
  for module, name, obj in _public_names():
    if id(obj) in seen or not (inspect.isclass(obj) or callable(obj)):
      continue
    seen.add(id(obj))
    problems += [f"{module}.{name}: {p}" for p in docstring_problems(obj)]
  for kind, target, options in _directives():
    if kind == "class" and options.get("members"):
      module, _, name = target.rpartition(".")
      cls = getattr(importlib.import_module(module), name)
      for method in options["members"].split(","):
        problems += [f"{target}.{method.strip()}: {p}"
                     for p in method_problems(cls, method.strip())]
  assert not problems, "\n".join(["docstrings lack:"] + problems)


def test_docs_build(tmp_path):
  """The HTML docs build with warnings (and broken references) as errors."""
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
             "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
             str(tmp_path / "html")]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  for page in ("index", "api/blrax", "api/expfam", "notebooks/quickstart"):
    assert (tmp_path / "html" / f"{page}.html").exists(), page


@pytest.mark.parametrize("doc, problem", [
    ('"""Does.\n\n  Args:\n    x: a.\n\n  Returns:\n    b.\n  """', None),
    ('"""Does.\n\n  Returns:\n    b.\n  """', "no Args: section"),
    ('"""Does.\n\n  Args:\n    y: a.\n  """', "Args: does not name x"),
])
def test_the_rules_read_sections(doc, problem):
  namespace = {}
  exec(f"def f(x):\n  {doc}\n  return x\n", namespace)  # noqa: S102
  problems = docstring_problems(namespace["f"])
  if problem is None:
    assert problems == ["no Examples: section"]
  else:
    assert problem in problems
