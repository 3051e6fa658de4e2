"""The shape of the code base: the import graph between the packages runs one way (the functions are
the ground floor: `export` and `gateway` build on them, never the reverse), no module imports itself
back through others (no circle, `TYPE_CHECKING` imports included), and package modules stay small
(at most MAX_LINES lines unless the module docstring says why, in a paragraph starting "Size:")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.procs import REPO_ROOT

PACKAGES = ("export", "functions", "gateway", "infra", "observability")
MAX_LINES = 320
# package -> the first-party packages it may import (the layers, ground floor first)
ALLOWED = {
    "functions": set(),
    "export": {"functions"},
    "gateway": {"functions"},
    "observability": set(),
    "infra": {"functions", "gateway", "export", "observability"},
}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules `name` imports anywhere in its file (a `from package import module`
    counts as the module when there is one)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = dict(modules())
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    tarjan = _Tarjan(g)
    for root in g:
        if root not in tarjan.index:
            tarjan.visit(root)
    return tarjan.found


class _Tarjan:
    """The state of one Tarjan run: depth-first order, low links, the open components' stack."""

    def __init__(self, g: dict[str, set[str]]) -> None:
        self.g = g
        self.index: dict[str, int] = {}
        self.low: dict[str, int] = {}
        self.stack: list[str] = []
        self.on_stack: set[str] = set()
        self.found: list[list[str]] = []

    def visit(self, root: str) -> None:
        # the recursion's frames: (module, its children not yet looked at)
        work: list[tuple[str, Iterator[str]]] = []
        self._open(root, work)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                self._close(v, work)
            elif child not in self.index:
                self._open(child, work)
            elif child in self.on_stack:
                self.low[v] = min(self.low[v], self.index[child])

    def _open(self, v: str, work: list[tuple[str, Iterator[str]]]) -> None:
        self.index[v] = self.low[v] = len(self.index)
        self.stack.append(v)
        self.on_stack.add(v)
        work.append((v, iter(sorted(self.g[v]))))

    def _close(self, v: str, work: list[tuple[str, Iterator[str]]]) -> None:
        if work:
            parent = work[-1][0]
            self.low[parent] = min(self.low[parent], self.low[v])
        if self.low[v] != self.index[v]:
            return
        component = []
        while True:
            w = self.stack.pop()
            self.on_stack.discard(w)
            component.append(w)
            if w == v:
                break
        if len(component) > 1:
            self.found.append(sorted(component))


def test_packages_import_only_the_layers_below_them() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert not wrong, "imports against the layering (functions is the ground floor):\n" + "\n".join(wrong)


def test_no_import_circle() -> None:
    found = cycles(graph())
    assert not found, f"modules that import each other (directly or through others): {found}"


def test_the_cycle_finder_finds_a_circle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_modules_stay_small_or_say_why() -> None:
    long = []
    for name, path in modules():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "\nSize:" not in f"\n{doc}":
            long.append(f"{name} ({lines} lines)")
    assert not long, (
        f"modules over {MAX_LINES} lines without a 'Size:' paragraph in their docstring saying why "
        f"(split them by reason to change): {long}"
    )
