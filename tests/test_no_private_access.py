"""No module outside ``lightning_automodel/_compat/`` reaches a private name of torch, Lightning, transformers or peft.

An AST scan of every package module flags:

* importing a private module or name (``from torch.utils._python_dispatch import ...``, ``from x import _y``);
* an underscore attribute reached from a name imported from those libraries (``torch.distributed._x``,
  ``nn.Module._apply``, ``dist.distributed_c10d._get_default_group``);
* an underscore attribute, ``getattr``/``setattr``/``hasattr`` string, ``vars(obj)[...]`` or
  ``obj.__dict__[...]`` key that names a private attribute those libraries define on their objects
  (collected from the installed libraries: ``module._parameters``, ``func._schema``, ``model._tied_weights_keys``,
  ``parser._actions``), and a method overriding one (``def _parse_ckpt_path``). ``self._x`` counts only in a
  class derived from a library class: the package's own classes keep their own private names.
"""

from __future__ import annotations

import ast
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_automodel"
LIBRARIES = ("torch", "lightning", "lightning_fabric", "pytorch_lightning", "transformers", "peft")
#: Private attributes the libraries set lazily (after loading, on parameters), which no fresh object shows.
KNOWN_LAZY = {"_weight_conversions", "_is_hf_initialized", "_init_weights", "_process_group_backend", "_checkpoint_io"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _names_of(*objects: object) -> set[str]:
    names: set[str] = set()
    for obj in objects:
        names.update(n for n in dir(obj) if _private(n))
        names.update(n for n in getattr(obj, "__dict__", {}) if _private(n))
    return names


@functools.cache
def library_objects() -> tuple[object, ...]:
    """Fresh library objects and classes the package handles (their attributes are what the scan knows)."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from torch import nn
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import PretrainedConfig, PreTrainedModel

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", devices=1, default_root_dir=root)
        reader = FileSystemReader(root)
    return (
        nn.Linear(1, 1), nn.Parameter(torch.zeros(1)), torch.Tensor, torch.ops.aten.add.Tensor,
        reader, LightningModule(), LightningDataModule(), Callback(), trainer, trainer.strategy, ModelParallelStrategy(),
        Strategy, LightningCLI, LightningArgumentParser(), PreTrainedModel, PretrainedConfig(), LoraLayer, PeftModel,
    )


@functools.cache
def library_private_names() -> frozenset[str]:
    """Underscore attributes of the library objects the package handles, read from the installed versions."""
    return frozenset(_names_of(*library_objects()) | KNOWN_LAZY)


#: Where the :data:`KNOWN_LAZY` names live (set on instances later than construction).
_LAZY_OWNERS = {
    "_process_group_backend": "lightning.pytorch.strategies.Strategy",
    "_checkpoint_io": "lightning.pytorch.strategies.Strategy",
    "_weight_conversions": "transformers.PreTrainedModel",
    "_init_weights": "transformers.PreTrainedModel",
}


def _resolve(qualified: str) -> object | None:
    import importlib

    module_name, _, attr = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None


@functools.cache
def private_names_of_class(qualified: str) -> frozenset[str]:
    """Underscore attributes a subclass of the library class ``qualified`` (``lightning.pytorch.Callback``)
    inherits: the class's own, its fresh instances' (from :func:`library_objects`) and its lazy ones."""
    cls = _resolve(qualified)
    if not isinstance(cls, type):
        return frozenset(KNOWN_LAZY)  # unresolvable: the lazy names at least
    instances = [obj for obj in library_objects() if isinstance(obj, cls)]
    lazy = {name for name, owner in _LAZY_OWNERS.items() if isinstance(_resolve(owner), type) and issubclass(cls, _resolve(owner))}
    return frozenset(_names_of(cls, *instances) | lazy)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _library(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it is bound to: ``lib:<qualified name>`` for a library, ``pkg:<name>`` for anything else."""
    table: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else alias.name.split(".")[0]
                table[local] = f"lib:{target}" if _library(alias.name) else f"pkg:{target}"
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                library = node.level == 0 and _library(node.module)
                table[alias.asname or alias.name] = f"lib:{node.module}.{alias.name}" if library else f"pkg:{alias.name}"
    return table


def _base_refs(base: ast.AST, table: dict[str, str]) -> str | None:
    """``lib:<qualified>`` or ``pkg:<class name>`` for a class's base expression."""
    parts = _dotted(base)
    if parts is None:
        return None
    bound = table.get(parts[0])
    if bound is None:
        return f"pkg:{parts[-1]}"  # a class of the same module
    kind, _, target = bound.partition(":")
    return f"{kind}:{'.'.join([target, *parts[1:]])}" if kind == "lib" else f"pkg:{parts[-1]}"


def package_class_bases(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Every package class name -> its base references (see :func:`_base_refs`)."""
    bases: dict[str, list[str]] = {}
    for file in sorted(package.rglob("*.py")):
        tree = ast.parse(file.read_text())
        table = _imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, []).extend(ref for ref in (_base_refs(b, table) for b in node.bases) if ref)
    return bases


def _library_bases(refs: list[str], classes: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> set[str]:
    found: set[str] = set()
    for ref in refs:
        kind, _, name = ref.partition(":")
        if kind == "lib":
            found.add(name)
        elif name in classes and name not in seen:
            found |= _library_bases(classes[name], classes, seen | {name})
    return found


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, tree: ast.Module, classes: dict[str, list[str]]) -> None:
        self.path, self.classes = path, classes
        self.private = library_private_names()
        self.table = _imports(tree)
        self.library_names = {local for local, bound in self.table.items() if bound.startswith("lib:")}
        self.inherited: list[frozenset[str]] = []  # per enclosing class: the private names its library bases define
        self.findings: list[Finding] = []

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _library(alias.name) and any(_private(part) for part in alias.name.split(".")):
                self.flag(node, f"imports private module {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and _library(node.module):
            if any(_private(part) for part in node.module.split(".")):
                self.flag(node, f"imports from private module {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    self.flag(node, f"imports private {node.module}.{alias.name}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        refs = [ref for ref in (_base_refs(b, self.table) for b in node.bases) if ref]
        names: set[str] = set()
        for qualified in _library_bases(refs, self.classes):
            names |= private_names_of_class(qualified)
        self.inherited.append(frozenset(names))
        self.generic_visit(node)
        self.inherited.pop()

    def _own_class_private(self) -> frozenset[str]:
        return self.inherited[-1] if self.inherited else frozenset()

    def _check_name(self, node: ast.AST, receiver: ast.AST, name: str, how: str) -> None:
        if not _private(name):
            return
        root = _root_name(receiver)
        if root in self.library_names:
            self.flag(node, f"{how} {name!r} of library object {root}")
        elif root in ("self", "cls"):
            if name in self._own_class_private():
                self.flag(node, f"{how} {name!r}, private to the library class this class derives from")
        elif name in self.private:
            self.flag(node, f"{how} {name!r}, a private attribute of torch/Lightning/transformers/peft objects")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if _private(node.name) and node.name in self._own_class_private():
            self.flag(node, f"overrides private library method {node.name!r}")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            if node.attr in self._own_class_private():
                self.flag(node, f"calls private library method super().{node.attr}")
        else:
            self._check_name(node, value, node.attr, "reaches")
        self.generic_visit(node)

    @staticmethod
    def _string(node: ast.AST | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    @staticmethod
    def _namespace_of(node: ast.AST) -> ast.AST | None:
        """``obj`` of ``vars(obj)`` / ``obj.__dict__``, else None."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "vars" and node.args:
            return node.args[0]
        if isinstance(node, ast.Attribute) and node.attr == "__dict__":
            return node.value
        return None

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            name = self._string(node.args[1])
            if name is not None:
                self._check_name(node, node.args[0], name, f"{func.id}()")
        if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and node.args:
            owner, name = self._namespace_of(func.value), self._string(node.args[0])
            if owner is not None and name is not None:
                self._check_name(node, owner, name, "reads the namespace key")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        owner, name = self._namespace_of(node.value), self._string(node.slice)
        if owner is not None and name is not None:
            self._check_name(node, owner, name, "reads the namespace key")
        self.generic_visit(node)


def scan_source(source: str, path: str = "<string>", classes: dict[str, list[str]] | None = None) -> list[Finding]:
    tree = ast.parse(source)
    scanner = _Scanner(path, tree, classes if classes is not None else {})
    scanner.visit(tree)
    return scanner.findings


def scan_package(package: Path = PACKAGE) -> list[Finding]:
    classes = package_class_bases(package)
    findings: list[Finding] = []
    for file in sorted(package.rglob("*.py")):
        relative = file.relative_to(package.parent)
        if relative.parts[1] == "_compat":
            continue
        findings.extend(scan_source(file.read_text(), str(relative), classes))
    return findings


def test_no_module_outside_compat_reaches_a_private_library_name():
    findings = scan_package()
    assert not findings, "private torch/Lightning/transformers/peft names outside lightning_automodel/_compat/:\n" + "\n".join(map(str, findings))


@pytest.mark.parametrize(
    "source",
    [
        "from torch.utils._python_dispatch import TorchDispatchMode",
        "import torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "from lightning.fabric.utilities.types import _PATH",
        "import torch.distributed as dist\nx = dist.distributed_c10d._get_default_group()",
        "from torch import nn\nnn.Module._apply",
        "def f(module):\n    return module._parameters",
        "def f(model):\n    return getattr(model, '_tied_weights_keys', None)",
        "def f(strategy):\n    return vars(strategy).get('_checkpoint_io')",
        "def f(model):\n    model.__dict__['_weight_conversions'] = 1",
        "def f(parser):\n    return parser._actions",
        "from lightning.pytorch.cli import LightningCLI\nclass C(LightningCLI):\n    def _parse_ckpt_path(self):\n        pass",
        "from lightning.pytorch.cli import LightningCLI\nclass C(LightningCLI):\n    def f(self):\n        return super()._instantiate_trainer({}, [])",
        "from lightning.pytorch.strategies import ModelParallelStrategy\nclass S(ModelParallelStrategy):\n    def f(self):\n        self._process_group_backend = 'gloo'",
    ],
)
def test_the_scan_catches_each_kind_of_private_access(source):
    assert scan_source(source), f"not flagged:\n{source}"


@pytest.mark.parametrize(
    "source",
    [
        "class Own:\n    def f(self):\n        return self._parameters",  # the package's own class, its own names
        "def _helper():\n    pass\n_helper()",
        "from lightning_automodel.callbacks._lifecycle import patch_method",
        "import torch\ntorch.nn.Module.__init__",
    ],
)
def test_the_scan_leaves_own_and_dunder_names_alone(source):
    assert not scan_source(source)
