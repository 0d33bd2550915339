"""The layout of docs/architecture.md, kept so (issue 31): no product module imports in a cycle,
nor does any package; dependencies point one way (daemon uses storage, model, config; storage and
model use config); model never imports pynetdicom; the node's runtime never imports the training
code; the daemon/ root holds at most a dozen modules.

Imports are read from the source (every ``import`` statement, those inside functions included),
so a cycle hidden behind a function-level import counts."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("config", "daemon", "model", "storage")

# Which package may import which (besides itself and the packages below it in this table):
# everything else is a dependency in the wrong direction.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "storage": {"config"},
    "storage.images": {"storage", "config"},
    "storage.migrations": {"storage", "config"},
    "storage.migrations.versions": {"storage", "config"},
    "model": {"config"},
    "model.training": {"model", "config"},
    "daemon.process": set(),
    "daemon.dicom": {"daemon.process", "storage", "storage.images", "config"},
    "daemon.dicomweb": {"daemon.dicom", "daemon.process", "storage", "storage.images", "config"},
    "daemon.jobs": {"daemon.dicom", "daemon.dicomweb", "daemon.process", "storage",
                    "storage.images", "model", "config"},
    "daemon.web": {"daemon.jobs", "daemon.dicom", "daemon.dicomweb", "daemon.process", "storage",
                   "storage.images", "model", "config"},
    "daemon": {"daemon.web", "daemon.jobs", "daemon.dicom", "daemon.dicomweb", "daemon.process",
               "storage", "storage.images", "model", "config"},
    "daemon.cli": {"daemon", "daemon.web", "daemon.jobs", "daemon.dicom", "daemon.dicomweb",
                   "daemon.process", "storage", "storage.images", "model", "model.training",
                   "config"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _modules()


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str) -> set[str]:
    """The product modules that ``name`` imports (names without the ``denoised_node.``)."""
    found: set[str] = set()
    package = _package(name)
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = (node.module or "").removeprefix("denoised_node.")
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES
                       else module for alias in node.names]
        else:
            continue
        found.update(t.removeprefix("denoised_node.") for t in targets)
    found &= MODULES.keys()
    found.discard(name)
    if MODULES[name].name == "__init__.py":  # a package re-exporting its own modules
        found = {t for t in found if not t.startswith(name + ".")}
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, targets in IMPORTS.items():
        for target in targets:
            if _package(name) != _package(target):
                edges[_package(name)].add(_package(target))
    return edges


def test_no_module_imports_in_a_cycle() -> None:
    assert _cycles(IMPORTS) == []


def test_no_package_imports_in_a_cycle() -> None:
    assert _cycles(_package_edges()) == []


def test_dependencies_point_one_way() -> None:
    packages = {_package(name) for name in MODULES}
    assert packages == ALLOWED.keys(), "a new package: give it its row in ALLOWED"
    wrong = sorted(f"{name} -> {target}" for name, targets in IMPORTS.items()
                   for target in targets
                   if _package(target) != _package(name)
                   and _package(target) not in ALLOWED[_package(name)])
    assert wrong == []


@pytest.mark.parametrize("folder", ["model", "storage", "config"])
def test_no_dicom_networking_outside_daemon(folder: str) -> None:
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] == "pynetdicom" for n in names), path


def test_the_daemon_root_holds_at_most_a_dozen_modules() -> None:
    assert len(list((ROOT / "daemon").glob("*.py"))) <= 12
