"""Execute the tutorials and store their outputs in the paired ``.ipynb`` files.

Each tutorial is a jupytext pair in ``tutorials/``: ``NN_name.md`` (MyST markdown, the source that is
edited and reviewed) and ``NN_name.ipynb`` (the same cells with executed outputs, rendered by Read
the Docs without executing anything). Run from the repository root::

    python scripts/execute_tutorials.py                     # execute every tutorial, write its .ipynb
    python scripts/execute_tutorials.py 01_quickstart       # only these (names or paths)
    python scripts/execute_tutorials.py --text-only         # prose edits only: copy the markdown cells,
                                                            # keep the stored outputs (no execution)
    python scripts/execute_tutorials.py --check             # exit 1 if a pair is out of sync

``--check`` (also run by ``tests/test_docs.py``) reports a tutorial whose ``.ipynb`` is missing,
whose cells (type, source, metadata) differ from its ``.md``, or which has a code cell that was never
executed; a tutorial missing from, or listed without a file in, the toctrees of ``docs/index.md``;
and markdown links to a tutorial's ``.md`` file, which have no target when Read the Docs builds
from the ``.ipynb`` files (write ``{doc}`` links). Notebooks are executed in a temporary working
directory with the ``python3`` kernel of this environment; a cell that raises stops the run and
leaves that ``.ipynb`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
DOCS_INDEX = ROOT / "docs" / "index.md"
# folder under docs/ into which docs/conf.py mirrors the tutorials (toctree entries point there)
DOCS_TUTORIALS = "generated_tutorials"
# cell metadata written by execution or by editors, not part of a tutorial's content
_RUNTIME_METADATA = {"execution", "ExecuteTime", "collapsed", "scrolled", "jp-MarkdownHeadingCollapsed"}


def tutorial_sources(folder: Path = TUTORIALS) -> list[Path]:
    """The ``.md`` sources of the tutorials in ``folder``, sorted by name."""
    return sorted(folder.glob("*.md"))


def cell_inputs(nb: nbformat.NotebookNode) -> list[tuple[str, str, dict]]:
    """``(cell type, source, metadata)`` of every cell, without outputs and runtime metadata."""
    return [
        (cell.cell_type, cell.source, {k: v for k, v in cell.metadata.items() if k not in _RUNTIME_METADATA})
        for cell in nb.cells
    ]


def check_pair(md: Path) -> list[str]:
    """Problems of the pair ``md`` / ``md.with_suffix('.ipynb')`` (empty list: in sync and executed)."""
    ipynb = md.with_suffix(".ipynb")
    if not ipynb.is_file():
        return [f"{ipynb.name}: missing (the paired notebook of {md.name})"]
    source = cell_inputs(jupytext.read(md))
    stored_nb = nbformat.read(ipynb, as_version=4)
    stored = cell_inputs(stored_nb)
    problems = []
    if len(source) != len(stored):
        problems.append(f"{ipynb.name}: {len(stored)} cells, {md.name} has {len(source)}")
    for i, (a, b) in enumerate(zip(source, stored, strict=False)):
        if a != b:
            what = "type" if a[0] != b[0] else "source" if a[1] != b[1] else "metadata"
            first_line = a[1].split("\n", 1)[0][:60]
            problems.append(f"{ipynb.name}: cell {i} ({a[0]}, {first_line!r}) differs from {md.name} in its {what}")
            break  # one difference is enough to say "out of sync"
    unexecuted = [i for i, c in enumerate(stored_nb.cells) if c.cell_type == "code" and c.execution_count is None]
    if unexecuted:
        problems.append(f"{ipynb.name}: code cells {unexecuted} were never executed (no stored outputs)")
    return problems


def toctree_entries(index: Path = DOCS_INDEX) -> list[str]:
    """Names of the tutorials (``NN_name``) listed in the toctrees of ``index``."""
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", index.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(f"{DOCS_TUTORIALS}/"):
                entries.append(line.removeprefix(f"{DOCS_TUTORIALS}/"))
    return entries


def check_toctree(folder: Path = TUTORIALS, index: Path = DOCS_INDEX) -> list[str]:
    """Tutorials listed in a toctree of ``index`` without a source, and sources listed in none."""
    listed = toctree_entries(index)
    sources = {md.stem for md in tutorial_sources(folder)}
    problems = [
        f"{index.name} lists {name!r}, but there is no {folder.name}/{name}.md"
        for name in listed
        if name not in sources
    ]
    problems += [f"{folder.name}/{name}.md is in no toctree of {index.name}" for name in sorted(sources - set(listed))]
    return problems


def check_links(folder: Path = TUTORIALS, docs: Path | None = None) -> list[str]:
    """Markdown links to a tutorial's ``.md`` file, in the tutorials and in the ``.md`` pages of ``docs``.

    Read the Docs builds from the ``.ipynb`` half of each pair, where such a link has no target;
    ``{doc}`text <NN_name>``` works with either half.
    """
    docs = DOCS_INDEX.parent if docs is None else docs
    names = {md.stem for md in tutorial_sources(folder)}
    problems = []
    pages = [(md, "") for md in tutorial_sources(folder)] + [
        (md, f"{DOCS_TUTORIALS}/") for md in sorted(docs.glob("*.md"))
    ]
    for page, prefix in pages:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            for target, name in re.findall(r"\]\(((?:[^)\s]*/)?([^/)\s]+)\.md(?:#[^)\s]*)?)\)", line):
                if name in names:
                    problems.append(
                        f"{page.parent.name}/{page.name}:{n}: link ({target}) to a tutorial's .md file; "
                        f"write {{doc}}`text <{prefix}{name}>` instead"
                    )
    return problems


def check_all(folder: Path = TUTORIALS, index: Path = DOCS_INDEX) -> list[str]:
    """Every problem of :func:`check_pair`, :func:`check_toctree` and :func:`check_links`."""
    problems = [p for md in tutorial_sources(folder) for p in check_pair(md)]
    return problems + check_toctree(folder, index) + check_links(folder, index.parent)


def execute(md: Path, timeout: int) -> float:
    """Execute the tutorial ``md`` and write its ``.ipynb``; returns the wall time in seconds."""
    from nbclient import NotebookClient

    nb = jupytext.read(md)
    # the kernel inherits this environment: a non-interactive backend (CI's Agg) would drop the figures
    os.environ.pop("MPLBACKEND", None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{md.stem}-") as workdir:
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", record_timing=False, resources={"metadata": {"path": workdir}}
        )
        client.execute()
    seconds = time.perf_counter() - start
    jupytext.write(nb, md.with_suffix(".ipynb"), fmt="ipynb")
    return seconds


def update_text(md: Path) -> None:
    """Copy the markdown cells of ``md`` into its ``.ipynb``, keeping the stored outputs (no execution)."""
    ipynb = md.with_suffix(".ipynb")
    if not ipynb.is_file():
        raise FileNotFoundError(f"{ipynb}: no stored notebook to update; execute {md.name} first.")
    source = jupytext.read(md)
    stored = nbformat.read(ipynb, as_version=4)
    code = [c for c in cell_inputs(source) if c[0] == "code"]
    if code != [c for c in cell_inputs(stored) if c[0] == "code"]:
        raise ValueError(f"{md.name}: code cells changed since {ipynb.name} was executed; run without --text-only.")
    jupytext.write(combine_inputs_with_outputs(source, stored), ipynb, fmt="ipynb")


def _resolve(names: list[str]) -> list[Path]:
    if not names:
        return tutorial_sources()
    paths = []
    for name in names:
        path = TUTORIALS / f"{Path(name).stem}.md"
        if not path.is_file():
            known = ", ".join(md.stem for md in tutorial_sources())
            raise SystemExit(f"No tutorial {name!r} ({path} does not exist); tutorials: {known}.")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tutorials", nargs="*", help="names (01_quickstart) or paths; default: all")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only check that the pairs are in sync")
    mode.add_argument("--text-only", action="store_true", help="copy markdown cells, keep outputs")
    parser.add_argument("--timeout", type=int, default=1800, help="per-cell timeout in s (default 1800)")
    args = parser.parse_args(argv)

    if args.check:
        problems = check_all()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("Out of sync: run `python scripts/execute_tutorials.py` (or `--text-only`).", file=sys.stderr)
            return 1
        print(f"{len(tutorial_sources())} tutorials in sync with their notebooks.")
        return 0
    for md in _resolve(args.tutorials):
        if args.text_only:
            update_text(md)
            print(f"{md.with_suffix('.ipynb').relative_to(ROOT)}: text updated")
        else:
            print(f"executing {md.relative_to(ROOT)} ...", flush=True)
            seconds = execute(md, args.timeout)
            print(f"{md.with_suffix('.ipynb').relative_to(ROOT)}: written ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
