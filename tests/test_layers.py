"""The core's layers (``checkpoint_convert.LAYERS``): every module in a layer folder, imports only downward, no
import circle anywhere in the package, and family packages on the model layer's public names only.

Imports are read with ``ast`` from the source, so an import inside a function or under ``TYPE_CHECKING``
counts as much as one at the top of a module.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from checkpoint_convert import LAYERS

REPO = Path(__file__).resolve().parents[1]
CORE = "checkpoint_convert"


def _module_name(package_dir: Path, path: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules one import statement names, absolute; ``from package import name`` names the submodule
    when ``name`` is one (resolved later against the package's modules), else the package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every module of the package at ``package_dir``."""
    paths = {_module_name(package_dir, path): path for path in package_dir.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        named = {name for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(node, (ast.Import, ast.ImportFrom)) for name in _imported(module, is_package, node)}
        graph[module] = {name for name in named if name in paths and name != module}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a higher layer than its own (the package root, above every layer, excepted)."""
    found = []
    for module, imported in graph.items():
        if _layer(module) is None:
            continue
        for other in imported:
            if _layer(other) is None or LAYERS.index(_layer(other)) > LAYERS.index(_layer(module)):
                found.append(f"{module} imports {other}")
    return sorted(found)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, one per strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def modules_outside_layers(graph: dict[str, set[str]]) -> list[str]:
    """Modules that sit in no layer folder: only the package's ``__init__`` and ``__main__`` may."""
    return sorted(module for module in graph if _layer(module) is None and module not in (CORE, f"{CORE}.__main__"))


def test_every_module_sits_in_a_layer_folder():
    assert modules_outside_layers(import_graph(REPO / CORE)) == []
    packages = sorted(path.parent.name for path in (REPO / CORE).glob("*/__init__.py"))
    assert packages == sorted(LAYERS)


def test_imports_only_go_down_the_layers():
    assert upward_imports(import_graph(REPO / CORE)) == []


def test_no_import_circle_in_the_package():
    assert import_circles(import_graph(REPO / CORE)) == []


def _family_modules() -> list[Path]:
    return sorted(path for package in REPO.iterdir() if (package / "family.py").is_file() for path in package.glob("*.py"))


def _core_imports(path: Path) -> set[str]:
    return {name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in _imported(path.stem, False, node)[:1] if name.split(".")[0] == CORE}


def _is_command(path: Path) -> bool:
    return 'if __name__ == "__main__"' in path.read_text()


def test_families_use_only_the_model_layers_public_names():
    """A family module imports ``checkpoint_convert.model`` and nothing deeper; a family's own command-line tool
    (a module run as ``__main__``) is a command and may use the commands layer."""
    wrong = {path.relative_to(REPO).as_posix(): sorted(imports) for path in _family_modules() if not _is_command(path)
             if (imports := _core_imports(path) - {f"{CORE}.model"})}
    assert wrong == {}
    assert len(_family_modules()) >= 10


@pytest.fixture
def tiny_package(tmp_path: Path) -> Path:
    """A copy of the real package to damage."""
    copy = tmp_path / CORE
    shutil.copytree(REPO / CORE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_check_sees_an_upward_import_even_inside_a_function(tiny_package: Path):
    errors = tiny_package / "base" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from ..run.converter import convert\n")
    graph = import_graph(tiny_package)
    assert upward_imports(graph) == [f"{CORE}.base.errors imports {CORE}.run.converter"]
    assert any(f"{CORE}.base.errors" in circle for circle in import_circles(graph))


def test_the_check_sees_a_circle_within_one_layer_under_type_checking(tiny_package: Path):
    plan = tiny_package / "run" / "plan.py"
    plan.write_text(plan.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from .converter import convert\n")
    graph = import_graph(tiny_package)
    assert upward_imports(graph) == []
    assert [circle for circle in import_circles(graph) if f"{CORE}.run.plan" in circle]


def test_the_check_sees_a_module_outside_the_layers(tiny_package: Path):
    (tiny_package / "stray.py").write_text("from .base import errors\n")
    assert modules_outside_layers(import_graph(tiny_package)) == [f"{CORE}.stray"]


def test_the_architecture_page_lists_every_module_in_its_layer():
    """``docs/architecture.md`` draws each layer as a row of its modules: the tree and the page agree."""
    page = (REPO / "docs" / "architecture.md").read_text()
    drawing = page[page.index("```\n") + 4:page.index("```", page.index("```\n") + 4)]
    rows, layer = {}, None
    for line in drawing.splitlines():
        first = line[:11].strip()
        layer = first or layer
        rows.setdefault(layer, set()).update(name for name in line[11:].split("  ")[0].split(" · ") if name.strip())
    listed = {layer: {name.strip() for name in names} for layer, names in rows.items()}
    tree = {layer: {path.stem for path in (REPO / CORE / layer).glob("*.py") if path.stem != "__init__"}
            for layer in LAYERS}
    assert listed == tree
