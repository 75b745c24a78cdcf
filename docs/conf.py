"""Sphinx configuration of the genedml-sd documentation.

Build (offline, warnings are errors)::

    GENEDML_SD_DOCS_OFFLINE=1 python -m sphinx -W --keep-going -b html docs docs/_build/html

Environment variables:

``GENEDML_SD_DOCS_OFFLINE=1``
    Do not fetch intersphinx inventories (no network); cross-references to other projects'
    docs are then rendered as plain text.
``GENEDML_SD_NB_EXECUTION``
    myst-nb execution mode of the tutorials: ``cache`` (default: execute a notebook when its code
    changed, reuse stored outputs otherwise), ``force`` (always execute) or ``off`` (render the
    sources without outputs, e.g. for a quick look at the text).
``GENEDML_SD_NB_TIMEOUT``
    Per-cell execution timeout in seconds (default 900).
"""

from __future__ import annotations

import filecmp
import os
import shutil
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------------------------- tutorials
# Tutorials live in the top-level ``tutorials/`` folder (MyST markdown notebooks). Sphinx only reads
# files under ``docs/``, so they are mirrored into ``docs/generated_tutorials/`` (not tracked by git)
# at the start of every build. Files are only rewritten when their content changed, so unchanged
# tutorials are neither re-read nor re-executed.
TUTORIALS_SRC = ROOT / "tutorials"
TUTORIALS_DST = HERE / "generated_tutorials"


def _sync_tutorials(src: Path, dst: Path) -> None:
    dst.mkdir(exist_ok=True)
    wanted = set()
    for file in sorted(src.rglob("*")):
        if file.is_dir() or ".ipynb_checkpoints" in file.parts:
            continue
        rel = file.relative_to(src)
        wanted.add(rel)
        target = dst / rel
        if not target.exists() or not filecmp.cmp(file, target, shallow=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    for file in sorted(dst.rglob("*"), reverse=True):  # drop tutorials removed from the source
        rel = file.relative_to(dst)
        if file.is_file() and rel not in wanted:
            file.unlink()
        elif file.is_dir() and not any(file.iterdir()):
            file.rmdir()


if TUTORIALS_SRC.is_dir():
    _sync_tutorials(TUTORIALS_SRC, TUTORIALS_DST)

# The notebook kernels inherit this process's environment: a non-interactive MPLBACKEND (CI sets
# Agg) would replace the inline backend and the tutorials' figures would be missing from the pages.
os.environ.pop("MPLBACKEND", None)

# --------------------------------------------------------------------------------------------- project
project = "genedml-sd"
author = "genedml-sd developers"
copyright = f"{date.today().year}, {author}"
release = _version("genedml-sd")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
]
# ".rst" first: autosummary writes its stub pages with the first suffix, and they are reST
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_static/*.py"]
templates_path: list[str] = []
html_static_path = ["_static"]

# --------------------------------------------------------------------------------------------- API docs
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Type hints are shown in the signature only (types live in signatures, not in the docstrings); the
# docstrings' numpydoc sections give the meaning. sphinx-autodoc-typehints formats the signature.
autodoc_typehints = "signature"
typehints_document_rtype = False
always_document_param_types = False
typehints_defaults = None
typehints_fully_qualified = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# Our "Returns" sections are prose; as an rtype field their words would become cross-references.
napoleon_use_rtype = False
napoleon_use_param = True
# Objects not in an intersphinx inventory (our private helpers, third-party types offline) are
# rendered as plain text rather than reported.
nitpicky = False

bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# --------------------------------------------------------------------------------------------- MyST / notebooks
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("GENEDML_SD_NB_EXECUTION", "cache")
nb_execution_timeout = int(os.environ.get("GENEDML_SD_NB_TIMEOUT", "900"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# markdown outputs of code cells (the benchmark tables) are parsed as MyST, which has tables
nb_render_markdown_format = "myst"
nb_execution_excludepatterns = ["_build/*"]

# --------------------------------------------------------------------------------------------- cross-references
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "xarray": ("https://docs.xarray.dev/en/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}
if os.environ.get("GENEDML_SD_DOCS_OFFLINE", "0") not in ("", "0", "false", "False"):
    # no network: do not try to fetch inventories (a failed fetch is a warning, an error under -W)
    intersphinx_mapping = {}

# --------------------------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = "genedml-sd"
html_css_files = ["custom.css"]
html_theme_options = {
    "repository_url": "https://github.com/genedml-sd/genedml-sd",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "navigation_with_keys": False,
    "show_toc_level": 2,
    # the sidebar already has a search field; no second one in a top bar
    "navbar_persistent": [],
}
html_show_sourcelink = False
