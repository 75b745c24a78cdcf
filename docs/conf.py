"""Sphinx configuration of the genedml-sd documentation."""

from __future__ import annotations

from datetime import date
from importlib.metadata import version as _version

project = "genedml-sd"
author = "genedml-sd developers"
copyright = f"{date.today().year}, {author}"
release = _version("genedml-sd")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "off"
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}
html_theme = "sphinx_book_theme"
html_title = "genedml-sd"
html_theme_options = {"repository_url": "https://github.com/genedml-sd/genedml-sd", "use_repository_button": True}
