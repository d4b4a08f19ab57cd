"""The code's layout rules: no import cycles between the project's files (imports inside
functions count), no function longer than MAX_FUNCTION_LINES lines, and no citation of a
document that is not in the repository."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dymu", "training", "service", "benchmarks")
MAX_FUNCTION_LINES = 120


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path) -> list[str]:
    """The dotted package a file's relative imports start from (its folder, as parts)."""
    return list(path.relative_to(ROOT).parent.parts)


def _targets(path: Path, node: ast.AST) -> list[Path]:
    """The project files one import statement loads directly (a submodule when it names one)."""
    found: list[Path | None] = []
    if isinstance(node, ast.Import):
        found = [_module_file(alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = _package_of(path)
            package = package[: len(package) - node.level + 1]
            dotted = ".".join([*package, *([node.module] if node.module else [])])
        else:
            dotted = node.module or ""
        for alias in node.names:
            sub = _module_file(f"{dotted}.{alias.name}")
            found.append(sub if sub is not None else _module_file(dotted))
    return [p for p in found if p is not None and p != path]


def import_graph() -> dict[Path, set[Path]]:
    graph: dict[Path, set[Path]] = {}
    for path in _sources():
        tree = ast.parse(path.read_text())
        graph[path] = {t for node in ast.walk(tree) for t in _targets(path, node)}
    return graph


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    """One cycle of ``graph`` (depth-first search), or None."""
    state: dict[Path, int] = {}  # 1 = on the current path, 2 = finished
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    assert find_cycle({a: {b}, b: {c}, c: set()}) is None
    assert find_cycle({a: {b}, b: {c}, c: {a}}) == [a, b, c, a]
    code = "def f():\n    from .anchor import x\n"
    node = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.ImportFrom))
    assert _targets(ROOT / "dymu" / "model.py", node) == [ROOT / "dymu" / "anchor.py"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    shown = " -> ".join(str(p.relative_to(ROOT)) for p in cycle or [])
    assert cycle is None, f"import cycle: {shown}"


def _long_functions() -> list[tuple[int, str]]:
    out = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append((lines, f"{rel}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_no_function_is_longer_than_the_limit(limit: int) -> None:
    assert _long_functions() == [], f"functions over {limit} lines"


# Spelled in pieces so that this file does not cite them itself.
OUTSIDE_DOCUMENTS = ("DESIGN" + ".md", "../" + "shared/", "/work" + "/shared")


def test_no_citation_of_a_document_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.toml", "*.js", "*.html"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    cited = [
        f"{name}: {needle}"
        for name in tracked
        if (ROOT / name).is_file()
        for needle in OUTSIDE_DOCUMENTS
        if needle in (ROOT / name).read_text(errors="replace")
    ]
    assert cited == []
