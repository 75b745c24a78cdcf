"""Sphinx configuration of the genedml-sd documentation.

Build (offline, warnings are errors; what CI runs)::

    GENEDML_SD_DOCS_OFFLINE=1 python -m sphinx -W --keep-going -b html docs docs/_build/html

Environment variables:

``GENEDML_SD_DOCS_OFFLINE=1``
    Do not fetch intersphinx inventories (no network); cross-references to other projects'
    docs are then rendered as plain text.
``GENEDML_SD_DOCS_EXECUTE``
    ``1`` (default, except on Read the Docs): execute the tutorials' ``.md`` sources during the
    build. ``0`` (default on Read the Docs, where ``READTHEDOCS=True``): render the outputs stored
    in the paired ``.ipynb`` files without executing anything.
``GENEDML_SD_NB_EXECUTION``
    When executing: myst-nb execution mode of the tutorials: ``cache`` (default: execute a notebook
    when its code changed, reuse stored outputs otherwise), ``force`` (always execute) or ``off``
    (render the sources without outputs, e.g. for a quick look at the text).
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
# Each tutorial is a jupytext pair in the top-level ``tutorials/`` folder: ``NN_name.md`` (MyST
# markdown, the source developers edit) and ``NN_name.ipynb`` (the same cells with their executed
# outputs, written by ``scripts/execute_tutorials.py``). Sphinx only reads files under ``docs/``, so
# ONE file of each pair is mirrored into ``docs/generated_tutorials/`` (not tracked by git) at the
# start of every build:
#
# - executing builds (the default; CI): the ``.md`` sources, executed by myst-nb, so a broken
#   tutorial fails the build;
# - Read the Docs (``READTHEDOCS=True``) or ``GENEDML_SD_DOCS_EXECUTE=0``: the ``.ipynb`` files,
#   rendered with their stored outputs and not executed (no time or memory for training there).
#
# Files are only rewritten when their content changed, so unchanged tutorials are neither re-read
# nor re-executed.
TUTORIALS_SRC = ROOT / "tutorials"
TUTORIALS_DST = HERE / "generated_tutorials"


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/true/yes/on or 0/false/no/off.")


ON_READTHEDOCS = os.environ.get("READTHEDOCS") == "True"
EXECUTE_TUTORIALS = _env_flag("GENEDML_SD_DOCS_EXECUTE", default=not ON_READTHEDOCS)
# the half of each pair Sphinx must not see: one document per tutorial
TUTORIAL_SKIPPED_SUFFIX = ".ipynb" if EXECUTE_TUTORIALS else ".md"


def _check_stored_outputs(src: Path) -> None:
    """Fail early, naming the file, when a tutorial has no stored outputs to render."""
    missing = [md.name for md in sorted(src.glob("*.md")) if not md.with_suffix(".ipynb").is_file()]
    if missing:
        raise FileNotFoundError(
            f"Tutorials without a paired .ipynb in {src}: {', '.join(missing)}. This build renders stored "
            "outputs (READTHEDOCS=True or GENEDML_SD_DOCS_EXECUTE=0); write them with "
            "`python scripts/execute_tutorials.py`."
        )


def _sync_tutorials(src: Path, dst: Path, skip_suffix: str) -> None:
    dst.mkdir(exist_ok=True)
    wanted = set()
    for file in sorted(src.rglob("*")):
        rel = file.relative_to(src)
        if file.is_dir() or any(part.startswith(".") for part in rel.parts):  # .ipynb_checkpoints, caches
            continue
        if len(rel.parts) == 1 and (file.suffix == skip_suffix or file.name == "ruff.toml"):
            continue
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
    if not EXECUTE_TUTORIALS:
        _check_stored_outputs(TUTORIALS_SRC)
    _sync_tutorials(TUTORIALS_SRC, TUTORIALS_DST, TUTORIAL_SKIPPED_SUFFIX)

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
exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    "_static/*.py",
    f"generated_tutorials/*{TUTORIAL_SKIPPED_SUFFIX}",
]
# _templates/autosummary/class.rst: a class page is its autoclass alone (the class docstring and the
# class's own documented members). Sphinx's default template adds tables of every method and
# attribute, inherited ones included (torch.nn.Module, LightningModule), which link to members
# nobody documents here and fail the nitpicky build.
templates_path = ["_templates"]
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
# Every cross-reference must resolve: a broken one is a warning, an error under -W.
nitpicky = True
# ... except references to other projects. Offline (CI) there are no intersphinx inventories, so
# none of them can resolve; online (Read the Docs) the type hints name some classes by their
# private import path (``spatialdata._core.spatialdata.SpatialData``), which no inventory lists
# (see _PUBLIC_NAMES below for the ones we map). Only these packages' names are exempt; a broken
# reference to anything in genedml_sd still fails the build.
_EXTERNAL_PACKAGES = (
    "anndata",
    "dask",
    "lightning",
    "matplotlib",
    "numpy",
    "pandas",
    "scanpy",
    "spatialdata",
    "spatialdata_io",
    "spatialdata_plot",
    "squidpy",
    "timm",
    "torch",
    "torchvision",
    "xarray",
)
# the standard library's names used in our type hints (resolved by the python inventory online)
_STDLIB = r"(collections\.abc|typing|os|pathlib|types|enum|dataclasses)\.\w+(\.\w+)*|Ellipsis|None"
nitpick_ignore_regex = [
    (r"py:.*", rf"~?({'|'.join(_EXTERNAL_PACKAGES)})(\.\w+)*"),
    (r"py:.*", _STDLIB),
]

bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# --------------------------------------------------------------------------------------------- MyST / notebooks
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("GENEDML_SD_NB_EXECUTION", "cache") if EXECUTE_TUTORIALS else "off"
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
# Type hints of other projects' classes that are rendered with their defining (private) module,
# mapped to the public name under which those projects' inventories list them.
_PUBLIC_NAMES = {
    "anndata._core.anndata.AnnData": "anndata.AnnData",
    "matplotlib.axes._axes.Axes": "matplotlib.axes.Axes",
    "spatialdata._core.spatialdata.SpatialData": "spatialdata.SpatialData",
    "torch._C.Generator": "torch.Generator",
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "torch.utils.data.dataset.Dataset": "torch.utils.data.Dataset",
    "xarray.core.dataarray.DataArray": "xarray.DataArray",
}


def _resolve_public_name(app, env, node, contnode):
    """Retry an unresolved Python reference under its public name in the intersphinx inventories."""
    public = _PUBLIC_NAMES.get(node.get("reftarget", ""))
    if public is None or node.get("refdomain") != "py" or not app.config.intersphinx_mapping:
        return None
    from sphinx.ext.intersphinx import missing_reference

    renamed = node.deepcopy()
    renamed["reftarget"] = public
    return missing_reference(app, env, renamed, contnode)


def setup(app):  # noqa: D103
    # after intersphinx's own handler (priority 500), which tries the name as written first
    app.connect("missing-reference", _resolve_public_name, priority=600)


if _env_flag("GENEDML_SD_DOCS_OFFLINE", default=False):
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
