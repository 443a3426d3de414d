"""No import cycles among lorafleet's modules (issue 15), read from the source alone.

The graph holds every module-level import of a lorafleet module: an import inside a function
or under ``if TYPE_CHECKING:`` runs later or never, so it cannot close a cycle at import time,
and a module importing its own (half-initialised) parent package is the normal package
pattern. A cycle is a strongly connected component of two or more modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorafleet"


def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> its file, for every module under ``package``."""
    out: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_time(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                yield from _import_time(node.orelse)
            else:
                yield from _import_time(node.body)
                yield from _import_time(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from _import_time(block)
        elif isinstance(node, ast.With):
            yield from _import_time(node.body)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the lorafleet modules it imports at import time."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _import_time(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
                continue
            base = node.module or ""
            if node.level:  # relative: from . / .. import
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.add(sub if sub in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name
                       and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more nodes (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lorafleet_has_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert "lorafleet.models.training" in graph["lorafleet.models.adapters"]
    assert cycles(graph) == []


@pytest.mark.parametrize("guard", ["if TYPE_CHECKING:", "if True:"])
def test_a_cycle_is_found_unless_type_checking_only(tmp_path: Path, guard: str) -> None:
    pkg = tmp_path / "lorafleet"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from lorafleet.sub.a import A\n")
    (pkg / "sub" / "a.py").write_text("from lorafleet.sub import b\nA = 1\n")
    (pkg / "sub" / "b.py").write_text(
        f"from typing import TYPE_CHECKING\n{guard}\n    from lorafleet.sub.a import A\n")
    expected = [] if guard.startswith("if TYPE") else [["lorafleet.sub.a", "lorafleet.sub.b"]]
    assert cycles(import_graph(pkg)) == expected
