"""Sphinx configuration of the blrax documentation.

Build (no network needed; warnings are errors, as in the test suite)::

  pip install -e '.[docs]'
  sphinx-build -W --keep-going -b html docs docs/_build/html

``tests/test_api_docs.py`` runs the same build. The API pages in ``api/``
document every public name from its docstring (autodoc + napoleon, Google
style); the guides are the Markdown files here and the notebooks are rendered
from ``notebooks/`` (``docs/notebooks`` is a link to it) without executing
them: ``tests/test_notebooks.py`` runs them.
"""

import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blrax  # noqa: E402

project = "blrax"
author = "blrax developers"
copyright = "blrax developers"  # noqa: A001
release = version = blrax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
# Broken cross-references are errors too (with -W); names from other
# libraries are not resolvable offline (no intersphinx), so they are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|optax|numpy|np|flax|nnx|orbax|os|typing|collections"
               r"|builtins|dataclasses)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Mapping|Sequence|ArrayLike|Array|PathLike)"),
    # The parts of scale_by_blr are internal types (blrax._src.engine.estimators,
    # blrax._src.engine.steps); flax's TrainState fields are annotated ArrayTree.
    (r"py:class", r"blrax\._src\.engine\.(estimators\.Estimator|steps\.Step)"),
    (r"py:class", r"ArrayTree"),
    # State fields annotated with the module alias of a posterior type (the
    # types themselves are documented as blrax.DiagonalGaussian, ...).
    (r"py:class", r"(gaussian|full_gaussian|eigenbasis)\.\w+"),
]

# autodoc and napoleon (Google style, as optax).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Shown as written (the modules use postponed annotations), not expanded
# into their unions.
autodoc_type_aliases = {
    "jax.typing.ArrayLike": "jax.typing.ArrayLike",
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
}
autodoc_default_options = {}
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as fields, not duplicate objects.
napoleon_attr_annotations = False  # (jax.Array would show as jaxlib's path)
napoleon_use_rtype = False

# myst-nb: Markdown guides and notebooks, rendered as stored (no execution).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"blrax {release}"
html_theme_options = {
    "description": "Variational-learning optimizers for JAX and Optax",
    "fixed_sidebar": True,
}


def _drop_type_docstrings(app, what, name, obj, options, lines):
  """A constant has no docstring of its own: autodoc would show its type's
  (``tuple``'s for ``blrax.uncertainty.SCORES``)."""
  del app, name, options
  own = inspect.cleandoc(type(obj).__doc__ or "")
  if what in ("data", "attribute") and own and "\n".join(lines).strip() == own:
    lines.clear()


def setup(app):
  app.connect("autodoc-process-docstring", _drop_type_docstrings)
