"""The core's shape: it imports no plugin, and its modules import each other without cycles.

The import graph is read from the source with ``ast``: every ``import`` of a ``fusion_core``
module counts, also inside functions (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).resolve().parents[1] / "fusion_core"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports at run time (any depth, not TYPE_CHECKING-only)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import adapters`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    """Core module → the core modules it imports (the package ``fusion_core`` itself left out)."""
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m not in (name, "fusion_core")}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_core_imports_no_plugin():
    offenders = {}
    for path in CORE.rglob("*.py"):
        plugins = sorted(m for m in _imports(path)
                         if m.split(".")[0].startswith("fusion_") and m.split(".")[0] != "fusion_core")
        if plugins:
            offenders[_module_name(path)] = plugins
    assert not offenders, f"the core must not import plugins (imports flow plugins -> core): {offenders}"


def test_the_core_has_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        # the cycles the core once had (issue 10), as a check that the detector sees them
        ({"api": {"runconfig"}, "runconfig": {"registry"}, "registry": {"executors"}, "executors": {"api"}},
         [["api", "executors", "registry", "runconfig"]]),
        ({"components": {"adapters"}, "adapters": {"components"}}, [["adapters", "components"]]),
        ({"kernel": {"executor"}, "executor": {"kernel", "run_context"}, "run_context": {"kernel"}},
         [["executor", "kernel", "run_context"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_cycle_detector_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_the_import_graph_sees_lazy_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert "fusion_core.program" in graph["fusion_core.cli.run"]  # imported inside the command function
    assert "fusion_core.run_context" not in graph["fusion_core.components"]  # only under TYPE_CHECKING


# --------------------------------------------------------------------------- plugins use the public API

PLUGINS = CORE.parent / "plugins"

#: modules of the core a plugin may import from: the package itself (its ``__all__``) and the adapter protocol
PUBLIC_MODULES = {"fusion_core", "fusion_core.adapters", "fusion_core.backdoor"}

#: the deliberate exceptions, (plugin file relative to plugins/, module, name) → why
ALLOWED_INTERNAL_IMPORTS = {
    ("fusion-merging/fusion_merging/stacking.py", "fusion_core.engine.stream", "merge_pool"):
        "layer stacking drives the streaming engine with its own plan",
    ("fusion-merging/fusion_merging/stacking.py", "fusion_core.engine.validate", "PASSTHROUGH"):
        "layer stacking builds the engine's plan (copied tensors)",
    ("fusion-merging/fusion_merging/stacking.py", "fusion_core.engine.validate", "TensorPlan"):
        "layer stacking builds the engine's plan",
}


def internal_imports(root: pathlib.Path = PLUGINS) -> set[tuple[str, str, str]]:
    """(file, module, name) of every import of a non-public core module in the plugins' packages (not their tests)."""
    found = set()
    for path in sorted(root.glob("*/fusion_*/**/*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                pairs = [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                pairs = [(alias.name, "") for alias in node.names]
            else:
                continue
            found.update((rel, module, name) for module, name in pairs
                         if module.split(".")[0] == "fusion_core" and module not in PUBLIC_MODULES)
    return found


def test_plugins_import_the_public_api():
    new = sorted(internal_imports() - set(ALLOWED_INTERNAL_IMPORTS))
    assert not new, ("plugins import names from fusion_core's public API (`from fusion_core import X`; add X to "
                     f"fusion_core.__init__ if a plugin legitimately needs it), not from internal modules: {new}")


def test_the_allowed_internal_imports_are_still_used():
    assert set(ALLOWED_INTERNAL_IMPORTS) <= internal_imports(), "remove exceptions no plugin needs any more"


def test_every_public_name_resolves():
    import fusion_core

    missing = [name for name in fusion_core.__all__ if getattr(fusion_core, name, None) is None]
    assert missing == []
