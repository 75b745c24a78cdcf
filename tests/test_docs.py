"""The docs build's inputs: tutorial pairs (.md source / executed .ipynb) in sync, toctree complete.

Fast: nothing is executed and Sphinx is not run. ``docs/conf.py`` is loaded on a copy of the
docs tree to check which half of each tutorial pair it hands to Sphinx.
"""

from __future__ import annotations

import importlib.util
import runpy
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("execute_tutorials", ROOT / "scripts" / "execute_tutorials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


et = _load_script()

MD = """\
---
jupytext:
  formats: ipynb,md:myst
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A tutorial

Some prose.

```{code-cell} ipython3
x = 1 + 1
x
```

More prose.

```{code-cell} ipython3
print(x * 3)
```
"""


def _executed_pair(folder: Path, name: str = "01_demo") -> Path:
    """A .md source and its .ipynb with every code cell marked executed (as nbclient leaves it)."""
    md = folder / f"{name}.md"
    md.write_text(MD, encoding="utf-8")
    nb = jupytext.read(md)
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
        cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": str(2 * (n + 1))})]
    jupytext.write(nb, md.with_suffix(".ipynb"), fmt="ipynb")
    return md


# --------------------------------------------------------------------------------------------- the real tutorials
def test_every_tutorial_is_paired_executed_and_in_sync():
    sources = et.tutorial_sources()
    assert len(sources) >= 4
    problems = [p for md in sources for p in et.check_pair(md)]
    assert problems == [], "\n".join(problems) + "\nRun `python scripts/execute_tutorials.py`."


def test_docs_toctree_lists_exactly_the_tutorials():
    listed = et.toctree_entries()
    assert sorted(listed) == [md.stem for md in et.tutorial_sources()]
    assert len(listed) == len(set(listed))  # each tutorial once
    assert et.check_toctree() == []


def test_check_mode_exit_status_of_the_real_repo(capsys):
    assert et.main(["--check"]) == 0
    assert "in sync" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- the check logic
def test_check_pair_accepts_an_executed_pair(tmp_path):
    md = _executed_pair(tmp_path)
    assert et.check_pair(md) == []
    cells = et.cell_inputs(nbformat.read(md.with_suffix(".ipynb"), as_version=4))
    assert [(t, s) for t, s, _ in cells if t == "code"] == [("code", "x = 1 + 1\nx"), ("code", "print(x * 3)")]


def test_check_pair_reports_changed_code(tmp_path):
    md = _executed_pair(tmp_path)
    md.write_text(MD.replace("print(x * 3)", "print(x * 4)"), encoding="utf-8")
    (problem,) = et.check_pair(md)
    assert "01_demo.ipynb: cell 3 (code, 'print(x * 4)')" in problem
    assert problem.endswith("in its source")


def test_check_pair_reports_changed_prose_and_added_cells(tmp_path):
    md = _executed_pair(tmp_path)
    md.write_text(MD.replace("More prose.", "Other prose."), encoding="utf-8")
    (problem,) = et.check_pair(md)
    assert "cell 2 (markdown, 'Other prose.')" in problem
    md.write_text(MD + "\n```{code-cell} ipython3\nx\n```\n", encoding="utf-8")
    assert et.check_pair(md) == ["01_demo.ipynb: 4 cells, 01_demo.md has 5"]


def test_check_pair_reports_cell_metadata(tmp_path):
    md = _executed_pair(tmp_path)
    md.write_text(MD.replace("```{code-cell} ipython3\nprint", "```{code-cell} ipython3\n:tags: [hide-input]\n\nprint"))
    (problem,) = et.check_pair(md)
    assert problem.endswith("in its metadata")


def test_check_pair_reports_missing_and_unexecuted_notebooks(tmp_path):
    md = _executed_pair(tmp_path)
    nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
    nb.cells[3].execution_count = None
    nbformat.write(nb, md.with_suffix(".ipynb"))
    assert et.check_pair(md) == ["01_demo.ipynb: code cells [3] were never executed (no stored outputs)"]
    md.with_suffix(".ipynb").unlink()
    assert et.check_pair(md) == ["01_demo.ipynb: missing (the paired notebook of 01_demo.md)"]


def test_check_toctree_reports_both_directions(tmp_path):
    _executed_pair(tmp_path, "01_demo")
    _executed_pair(tmp_path, "02_unlisted")
    (tmp_path / "docs").mkdir()
    index = tmp_path / "docs" / "index.md"
    index.write_text(
        "# Docs\n\n```{toctree}\n:hidden: true\n\ninstallation\ngenerated_tutorials/01_demo\n"
        "generated_tutorials/03_gone\n```\n",
        encoding="utf-8",
    )
    assert et.toctree_entries(index) == ["01_demo", "03_gone"]
    assert et.check_toctree(tmp_path, index) == [
        f"index.md lists '03_gone', but there is no {tmp_path.name}/03_gone.md",
        f"{tmp_path.name}/02_unlisted.md is in no toctree of index.md",
    ]


def test_check_links_reports_links_to_tutorial_md_files(tmp_path):
    tutorials, docs = tmp_path / "tutorials", tmp_path / "docs"
    tutorials.mkdir()
    docs.mkdir()
    _executed_pair(tutorials, "01_demo")
    _executed_pair(tutorials, "02_next")
    with (tutorials / "02_next.md").open("a", encoding="utf-8") as f:
        f.write("\nBack to [the demo](01_demo.md#a-tutorial), see {doc}`the demo <01_demo>`.\n")
    (docs / "index.md").write_text(
        "Start with [the demo](generated_tutorials/01_demo.md) or [install](installation.md).\n", encoding="utf-8"
    )
    assert et.check_links(tutorials, docs) == [
        f"tutorials/02_next.md:{len(MD.splitlines()) + 2}: link (01_demo.md#a-tutorial) to a tutorial's .md file; "
        "write {doc}`text <01_demo>` instead",
        "docs/index.md:1: link (generated_tutorials/01_demo.md) to a tutorial's .md file; "
        "write {doc}`text <generated_tutorials/01_demo>` instead",
    ]


def test_text_only_update_keeps_outputs_and_refuses_code_changes(tmp_path):
    md = _executed_pair(tmp_path)
    md.write_text(MD.replace("Some prose.", "Better prose."), encoding="utf-8")
    et.update_text(md)
    assert et.check_pair(md) == []
    nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
    assert nb.cells[0].source == "# A tutorial\n\nBetter prose."
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "2"
    assert nb.cells[3].outputs[0]["data"]["text/plain"] == "4"
    md.write_text(MD.replace("x = 1 + 1", "x = 2 + 2"), encoding="utf-8")
    with pytest.raises(ValueError, match="code cells changed"):
        et.update_text(md)


# --------------------------------------------------------------------------------------------- docs/conf.py
@pytest.fixture(autouse=True)
def _restore_mplbackend(monkeypatch):
    # docs/conf.py pops MPLBACKEND from the environment (for the notebook kernels); undo it after each test
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _load_conf(tmp_path: Path) -> dict:
    """Run a copy of docs/conf.py whose tutorials/ folder is a temporary one with one executed pair."""
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "conf.py", tmp_path / "docs" / "conf.py")
    (tmp_path / "tutorials").mkdir(exist_ok=True)
    _executed_pair(tmp_path / "tutorials")
    return runpy.run_path(str(tmp_path / "docs" / "conf.py"))


def _mirrored(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "docs" / "generated_tutorials").iterdir())


@pytest.mark.parametrize("env", [{}, {"CI": "true", "GENEDML_SD_DOCS_OFFLINE": "1"}])
def test_conf_executes_the_md_sources_by_default_and_in_ci(tmp_path, monkeypatch, env):
    monkeypatch.delenv("READTHEDOCS", raising=False)
    monkeypatch.delenv("GENEDML_SD_DOCS_EXECUTE", raising=False)
    monkeypatch.delenv("GENEDML_SD_NB_EXECUTION", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conf = _load_conf(tmp_path)
    assert conf["nb_execution_mode"] == "cache"
    assert "generated_tutorials/*.ipynb" in conf["exclude_patterns"]
    assert _mirrored(tmp_path) == ["01_demo.md"]
    assert conf["nitpicky"] is True


def test_conf_renders_stored_outputs_on_read_the_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("READTHEDOCS", "True")
    monkeypatch.delenv("GENEDML_SD_DOCS_EXECUTE", raising=False)
    monkeypatch.setenv("GENEDML_SD_NB_EXECUTION", "force")  # ignored: nothing is executed there
    conf = _load_conf(tmp_path)
    assert conf["nb_execution_mode"] == "off"
    assert "generated_tutorials/*.md" in conf["exclude_patterns"]
    assert _mirrored(tmp_path) == ["01_demo.ipynb"]


def test_conf_switches_mirrored_half_and_fails_without_stored_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("READTHEDOCS", raising=False)
    monkeypatch.setenv("GENEDML_SD_DOCS_EXECUTE", "1")
    _load_conf(tmp_path)
    assert _mirrored(tmp_path) == ["01_demo.md"]
    monkeypatch.setenv("GENEDML_SD_DOCS_EXECUTE", "0")  # a later build in the same tree
    conf = runpy.run_path(str(tmp_path / "docs" / "conf.py"))
    assert conf["nb_execution_mode"] == "off"
    assert _mirrored(tmp_path) == ["01_demo.ipynb"]  # the .md of the earlier build is gone
    (tmp_path / "tutorials" / "01_demo.ipynb").unlink()
    with pytest.raises(FileNotFoundError, match=r"01_demo\.md.*scripts/execute_tutorials\.py"):
        runpy.run_path(str(tmp_path / "docs" / "conf.py"))
    monkeypatch.setenv("GENEDML_SD_DOCS_EXECUTE", "maybe")
    with pytest.raises(ValueError, match="GENEDML_SD_DOCS_EXECUTE='maybe'"):
        runpy.run_path(str(tmp_path / "docs" / "conf.py"))
