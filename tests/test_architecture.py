"""The shape of the code, read from its imports: no cycles, and each outside system free of the ORM.

Every import counts, including those inside functions (a cycle hidden in a function is still one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "backends_app"

# Modules talking to one outside system: plain Python, no Django, no ORM, no models.
OUTSIDE_SYSTEMS = (
    "backends_app.oci",
    "backends_app.gallery",
    "backends_app.disk",
    "backends_app.notify",
    "backends_app.sources",
    "backends_app.runtime_settings",
)
# Entry points: what users and schedulers call. The models are below all of them.
ENTRY_POINTS = (
    "backends_app.admin",
    "backends_app.api",
    "backends_app.views",
    "backends_app.urls",
    "backends_app.live",
    "backends_app.management",
    "backends_app.tasks",
    "backends_app.jobs",
    "backends_app.schedule",
    "backends_app.procedure",
    "backends_app.detection",
    "backends_app.notifications",
    "backends_app.notification_views",
    "backends_app.admin_notifications",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(APP.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in APP.rglob("*.py")
        if "migrations" not in path.relative_to(APP).parts
    }


def imported(path: Path, name: str) -> Iterator[str]:
    """Every module `path` imports, absolute, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            yield base
            # `from backends_app import jobs` imports the module backends_app.jobs.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target in imported(path, name):
            # The module itself, or the nearest package of ours that holds it.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def all_imports(name: str) -> set[str]:
    known = modules()
    return {
        target for path_name, path in known.items() if path_name == name for target in imported(path, name)
    }


def test_the_app_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith(OUTSIDE_SYSTEMS)))
def test_outside_system_modules_never_import_django_or_the_models(name: str) -> None:
    offending = sorted(
        target
        for target in all_imports(name)
        if target == "django" or target.startswith(("django.", "rest_framework", "backends_app.models"))
    )
    assert offending == [], f"{name} imports {offending}"


def test_models_never_import_an_entry_point() -> None:
    offending = sorted(
        target for target in all_imports("backends_app.models") if target.startswith(ENTRY_POINTS)
    )
    assert offending == []


def test_function_level_imports_are_seen() -> None:
    """The graph counts an import written inside a function (how the old cycles hid)."""
    graph = import_graph()
    # tasks.scheduled_check imports schedule inside its body.
    assert "backends_app.schedule" in graph["backends_app.tasks"]
