"""Sphinx configuration of the delora_jax docs site (build: see README, "Build the docs locally").

The API reference is generated from the docstrings (autodoc + napoleon, Google style) of every
name in the public modules' ``__all__``; the build refuses a public name without a docstring or a
public module without an API page. Guides are the Markdown pages beside this file (MyST); their
```python blocks run in ``tests/test_docs.py``, the docstring examples as pytest doctests.
"""

import importlib
import inspect
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout being documented, not an installed copy

from sphinx.util import logging  # noqa: E402

import delora_jax  # noqa: E402

logger = logging.getLogger(__name__)

project = "delora_jax"
author = "delora_jax authors"
copyright = "delora_jax authors"
release = version = delora_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "myst_parser",
]
autosummary_generate = False  # api/index.md's summary tables link to the automodule pages
# Every cross-reference must resolve (with -W, a broken one fails the build), offline: references to
# other projects' names (jax, flax, optax, ... in signatures and docstrings) are not checked, as
# there is no network for their inventories; our own (delora_jax.*) and the pages' links are.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!delora_jax\b).*")]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"delora_jax {release}"
html_static_path = ["_static"]
html_css_files = ["code.css"]  # long code lines wrap

# The public modules; each has an `automodule` under api/. Their public names: ``__all__``, or
# for a module without one, the functions and classes it defines whose names have no underscore.
PUBLIC_MODULES = (
  "delora_jax",
  "delora_jax.nnx",
  "delora_jax.peft",
  "delora_jax.models",
  "delora_jax.models.bert",
  "delora_jax.integrations.maxtext",
)


def public_names(mod) -> list[str]:
  if hasattr(mod, "__all__"):
    return list(mod.__all__)
  return [
    n
    for n, o in vars(mod).items()
    if not n.startswith("_") and (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == mod.__name__
  ]


def _undocumented(modname: str) -> list[str]:
  """Public names of ``modname`` (and public methods of its classes) without a docstring."""
  mod = importlib.import_module(modname)
  missing = []
  for name in public_names(mod):
    obj = getattr(mod, name)
    if inspect.ismodule(obj):
      continue  # a public submodule: documented on its own page (checked below)
    if not inspect.getdoc(obj):
      missing.append(f"{modname}.{name}")
    if inspect.isclass(obj):
      for attr, member in vars(obj).items():
        fn = member.fget if isinstance(member, property) else member
        if (
          not attr.startswith("_")
          and (inspect.isfunction(fn) or isinstance(member, property))
          and not inspect.getdoc(fn)
        ):
          missing.append(f"{modname}.{name}.{attr}")
  return missing


def check_public_api(app):
  """Fails the build when a public name has no docstring or a public module has no API page."""
  problems = [f"{n} has no docstring" for m in PUBLIC_MODULES for n in _undocumented(m)]
  pages = "\n".join(p.read_text() for p in (HERE / "api").glob("*.md"))
  documented = set(re.findall(r"automodule:: (\S+)", pages))
  for modname in PUBLIC_MODULES:
    if modname not in documented:
      problems.append(f"{modname} has no `automodule` page under docs/api/")
    mod = importlib.import_module(modname)
    for name in public_names(mod):
      sub = getattr(mod, name)
      if inspect.ismodule(sub) and sub.__name__ not in documented:
        problems.append(f"{sub.__name__} (public, in {modname}.__all__) has no API page")
  for problem in problems:  # warnings: -W makes the build fail, --keep-going lists them all
    logger.warning("public API not documented: %s", problem, type="delora_jax", subtype="api")


def setup(app):
  app.connect("builder-inited", check_public_api)
