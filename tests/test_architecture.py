"""Structure of the package: file sizes, no import cycles, the model layer knows only tensors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "genedml_sd"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules imported by one file (module level and inside functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target in known:
                found.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_source_file_over_500_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    too_long = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not too_long, f"source files over {MAX_LINES} lines: {too_long}"


def _in_package(module: str) -> str:
    """The subpackage a module belongs to (``genedml_sd.model._train`` -> ``genedml_sd.model``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_cycle_between_modules():
    # Package __init__ files re-export their own submodules: an edge from a submodule to its own package's
    # __init__ is a re-export, not a dependency, so a cycle is only real among modules of one package, or
    # between packages (which must form a DAG: io/pp/tiling -> encoders -> tl -> pl; model needs none of them).
    graph = _import_graph()
    modules = {m: {d for d in deps if not (d == _in_package(m) and d != m)} for m, deps in graph.items()}
    cycles = _cycles(modules)
    assert not cycles, f"import cycles between modules: {cycles}"
    packages: dict[str, set[str]] = {}
    for m, deps in graph.items():
        src = _in_package(m)
        packages.setdefault(src, set()).update(_in_package(d) for d in deps if _in_package(d) != src)
    assert not _cycles(packages), f"import cycles between subpackages: {_cycles(packages)}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_model_layer_imports_no_spatialdata_layer():
    graph = _import_graph()
    forbidden = ("genedml_sd.tl", "genedml_sd.io", "genedml_sd.pp", "genedml_sd.pl", "genedml_sd._spatial")
    for module, deps in graph.items():
        if module.startswith("genedml_sd.model"):
            bad = [d for d in deps if d.startswith(forbidden)]
            assert not bad, f"{module} imports {bad}"
    for module, path in _modules().items():
        if module.startswith("genedml_sd.model"):
            text = path.read_text()
            for lib in ("spatialdata", "anndata", "pandas"):
                assert f"import {lib}" not in text and f"from {lib}" not in text, f"{module} imports {lib}"


@pytest.mark.parametrize("reader", ["_spatial"])
def test_spatialdata_table_metadata_is_read_in_one_place(reader):
    # "spatialdata_attrs" (a table's region / instance keys) is read only by _spatial.py
    users = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "spatialdata_attrs" in p.read_text() and p.stem != reader
    ]
    assert not users, f"table metadata read outside {reader}.py: {users}"
