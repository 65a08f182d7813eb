"""Imports only go downward: every import of the library (TYPE_CHECKING and function-level
ones included), read with ``ast``, goes from a unit to a unit below it in LAYERS, and the
units' import graph has no cycle. The order is the one docs/architecture.md describes."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: lowest first; a unit may import only units listed before it (and itself)
LAYERS = [
    # small shared modules
    "orchestrator._lazy", "orchestrator.errors", "orchestrator.callbacks", "orchestrator.faults", "orchestrator.urls",
    "orchestrator.config",
    "orchestrator.keys", "orchestrator.clock", "orchestrator.proc", "orchestrator.events", "orchestrator.topics",
    "orchestrator.queue", "orchestrator.perf",
    "orchestrator.locks", "orchestrator.leader", "orchestrator.dispatcher",
    # the parts
    "orchestrator.workflow", "orchestrator.broker", "orchestrator.chat", "orchestrator.cron",
    "orchestrator.runs", "orchestrator.declarative", "orchestrator.ops", "orchestrator.pyoco",
    # the facade, the public API, the testing helpers, the command lines
    "orchestrator.app", "orchestrator", "orchestrator.testing", "orchestrator.pytest_plugin", "orchestrator.cli",
    # the worker process
    "workers.relay", "workers.processes", "workers.assemble", "workers.cli", "workers",
]
RANK = {unit: n for n, unit in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    """The layer unit a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    if parts[0] not in ("orchestrator", "workers"):
        return None
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return parts[0] if len(parts) == 1 else None  # the package itself: its public API


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute), with its line."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[str, int]]:
    """Every module ``source`` (a module of ``package``) imports, made absolute, with its line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                dotted = f"{base}.{alias.name}"
                # `from orchestrator import faults` imports the module orchestrator.faults
                found.append((dotted if is_module(dotted) else base, node.lineno))
    return found


def library_files() -> list[Path]:
    return sorted(p for pkg in ("orchestrator", "workers") for p in (ROOT / pkg).rglob("*.py"))


def test_every_library_module_belongs_to_a_layer():
    orphans = [module_name(p) for p in library_files() if unit_of(module_name(p)) is None]
    assert not orphans, f"add these to LAYERS (and docs/architecture.md): {orphans}"


def test_imports_only_go_downward():
    upward = []
    for path in library_files():
        unit = unit_of(module_name(path))
        if unit is None:
            continue  # reported by the test above
        for target, line in imports_of(path):
            other = unit_of(target)
            if other is None or other == unit:
                continue
            if RANK[other] > RANK[unit]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {unit} imports {target} (above it)")
    assert not upward, "\n".join(upward)


def test_the_units_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = defaultdict(set)
    for path in library_files():
        unit = unit_of(module_name(path))
        for target, _ in imports_of(path):
            other = unit_of(target)
            if unit and other and other != unit:
                graph[unit].add(other)
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*trail, node])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_layer_test_sees_upward_imports_of_every_spelling():
    """Relative, aliased, TYPE_CHECKING and function-level imports are all read."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import Orchestrator\n"
              "def f():\n    from orchestrator.broker import streams as s\n    import workers.cli\n")
    targets = {t for t, _ in imports_in(source, "orchestrator.workflow")}
    assert {"orchestrator.app", "orchestrator.broker.streams", "workers.cli"} <= targets
    below = RANK[unit_of("orchestrator.workflow.model")]
    assert all(RANK[unit_of(t)] > below for t in targets if unit_of(t))
