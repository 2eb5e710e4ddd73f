"""The package's shape (issue 20): layers only import downwards, no module circle, no Lightning in ``core``.

Imports are read from the source (AST), function-level imports included: a lazy import is still a
dependency, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "lightning_automodel"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first; a module may import its own layer or lower ones. Matched by the longest prefix.
LAYERS: dict[str, int] = {
    f"{PACKAGE}._compat": 0,  # the only place for other libraries' private names
    f"{PACKAGE}.core": 1,  # torch, transformers, peft, safetensors; never Lightning
    f"{PACKAGE}.callbacks": 2,  # Lightning plugins: when things happen
    f"{PACKAGE}.strategies": 2,
    f"{PACKAGE}.checkpoint_io": 2,
    f"{PACKAGE}.model_utils": 2,  # reference façades over core
    f"{PACKAGE}.checkpoint_utils": 2,
    f"{PACKAGE}.data": 3,  # what runs
    f"{PACKAGE}.models": 3,
    f"{PACKAGE}.cli": 4,  # commands
    f"{PACKAGE}.planning": 4,
    f"{PACKAGE}.export": 4,
    f"{PACKAGE}.config_loading": 4,
}
ROOT_LAYER = 4  # the package root (its __init__) only re-exports lazily
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported_names(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every absolute module name ``path`` imports (``from m import x`` yields ``m.x`` too: x may be a submodule)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def layer_of(module: str) -> int | None:
    if module == PACKAGE:
        return ROOT_LAYER
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def internal_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}; ``from a import b`` resolves to ``a.b`` when that is a module."""
    edges: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        targets: dict[str, int] = {}
        for name, line in imported_names(path, module):
            if name in modules and name != module:
                targets.setdefault(name, line)
        # ``from pkg import sub`` also yields ``pkg``: keep only the most specific target of that statement
        for name in list(targets):
            if any(other.startswith(name + ".") and targets[other] == targets[name] for other in targets):
                del targets[name]
        # Importing ``pkg.sub`` runs ``pkg/__init__`` first: from outside ``pkg`` that is a dependency too
        # (``strategies`` -> ``callbacks._lifecycle`` runs ``callbacks/__init__``, which imports every callback).
        for name, line in list(targets.items()):
            parts = name.split(".")
            for depth in range(2, len(parts)):
                package = ".".join(parts[:depth])
                if package in modules and package != module and not module.startswith(package + "."):
                    targets.setdefault(package, line)
        edges[module] = targets
    return edges


def upward_imports(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, targets in internal_edges(modules).items():
        own = layer_of(module)
        for target, line in targets.items():
            if (their := layer_of(target)) is not None and own is not None and their > own:
                problems.append(f"{module}:{line}: layer {own} imports {target} (layer {their})")
    return problems


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative enough for this size)."""
    edges = internal_edges(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def lightning_in_core(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in modules.items():
        if layer_of(module) not in (0, 1) or module.startswith(f"{PACKAGE}._compat"):
            continue
        for name, line in imported_names(path, module):
            if name.split(".")[0] in LIGHTNING_PACKAGES:
                problems.append(f"{module}:{line}: imports {name}")
    return problems


MODULES = all_modules()


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_upward_import() -> None:
    assert upward_imports(MODULES) == []


def test_no_import_cycle() -> None:
    assert import_cycles(MODULES) == []


def test_core_never_imports_lightning() -> None:
    assert lightning_in_core(MODULES) == []


def test_the_checks_see_function_level_imports_and_circles(tmp_path: Path) -> None:
    """The checker itself: a lazy upward import, a two-module circle and a lazy Lightning import are found."""
    pkg = tmp_path / PACKAGE
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from lightning_automodel.core import b\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from lightning_automodel.core.a import x\n    import lightning.pytorch\n")
    (pkg / "export.py").write_text("")
    (pkg / "core" / "c.py").write_text("def g():\n    from lightning_automodel.export import main\n")
    # A circle through a package's __init__: strategies -> callbacks.x runs callbacks/__init__, which imports y.
    (pkg / "callbacks").mkdir()
    (pkg / "callbacks" / "__init__.py").write_text("from lightning_automodel.callbacks.y import Y\n")
    (pkg / "callbacks" / "x.py").write_text("")
    (pkg / "callbacks" / "y.py").write_text("from lightning_automodel.callbacks import x\nfrom lightning_automodel import strategies\n")
    (pkg / "strategies.py").write_text("from lightning_automodel.callbacks.x import X\n")
    modules = all_modules(pkg)
    assert import_cycles(modules) == [
        [f"{PACKAGE}.callbacks", f"{PACKAGE}.callbacks.y", f"{PACKAGE}.strategies"],
        [f"{PACKAGE}.core.a", f"{PACKAGE}.core.b"],
    ]
    assert upward_imports(modules) == [f"{PACKAGE}.core.c:2: layer 1 imports {PACKAGE}.export (layer 4)"]
    assert lightning_in_core(modules) == [f"{PACKAGE}.core.b:3: imports lightning.pytorch"]


def design_map_rows() -> set[str]:
    """The modules the map in docs/design.md has a row for (``| `path.py` | one line |``)."""
    text = (ROOT.parent / "docs" / "design.md").read_text()
    return set(re.findall(r"^\| `((?:[a-z_]+/)*[a-z_]+\.py)` \|", text, flags=re.MULTILINE))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_has_a_line_in_the_design_map(module: str) -> None:
    relative = MODULES[module].relative_to(ROOT).as_posix()
    assert relative in design_map_rows(), f"docs/design.md has no line for `{relative}`; add one to the map of its layer."


def test_design_map_names_only_existing_modules() -> None:
    existing = {p.relative_to(ROOT).as_posix() for p in MODULES.values()}
    assert sorted(design_map_rows() - existing) == [], "docs/design.md's map names modules that do not exist"
