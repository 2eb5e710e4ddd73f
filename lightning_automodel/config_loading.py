"""The one YAML loader of every command: regular files only (a FIFO blocks forever on open), bounded size, and
bounded alias expansion (nine lines of nested ``[*a, *a, ...]`` make 10^9 references). No Lightning import here.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import yaml

#: Nodes a config may expand to through aliases (``*anchor``); a real config has a few hundred.
MAX_YAML_NODES = 100_000
#: Bytes a config file may have; a real one has a few kilobytes.
MAX_CONFIG_BYTES = 16 * 2**20
PARSER_MODE = "lightning_automodel_yaml"


class ConfigFileError(ValueError):
    """A config file or value that is refused before it is parsed (one line naming it)."""


class PlanError(ValueError):
    """Bad input to ``plan``: one line, exit code 2 (here so that ``cli`` names it without importing ``planning``)."""


def check_yaml_bounded(text: str, name: str = "<config>") -> None:
    """Refuse ``text`` when its aliases expand past ``MAX_YAML_NODES`` nodes (composes the graph, builds nothing)."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size: a shared subtree is walked once, counted per use

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias (not possible in SafeLoader's output, but cheap to guard)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        if n > MAX_YAML_NODES:
            raise ConfigFileError(
                f"{name}: the YAML expands to more than {MAX_YAML_NODES:,} nodes through anchors/aliases; refusing it "
                "(an alias bomb, or a config that should be written out)."
            )
        sizes[id(node)] = n
        return n

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            size(node)
    except RecursionError:
        raise ConfigFileError(f"{name}: the YAML is nested too deeply to be a config.") from None
    finally:
        loader.dispose()


def check_config_file(path: str | os.PathLike[str]) -> None:
    """Fail in one line unless ``path`` is a regular (fstat, opened non-blocking), bounded, UTF-8 YAML file."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigFileError(f"config {name!r} does not exist.") from None
    except PermissionError:
        raise ConfigFileError(f"config {name!r} cannot be read (permission denied).") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigFileError(f"config {name!r} is not a regular file (a FIFO, device or directory); pass a YAML file.")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"config {name!r} is over {MAX_CONFIG_BYTES // 2**20} MiB; a config is a few kilobytes.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config {name!r} is not UTF-8 text ({exc}).") from None
    check_yaml_bounded(text, name)


def jsonargparse_load(text: str, path: str | os.PathLike[str] = "") -> Any:
    """jsonargparse's own YAML loading (its float and key handling), after the alias bound is checked."""
    from jsonargparse import get_loader

    check_yaml_bounded(text, os.fspath(path) or "a configuration value")
    return get_loader("yaml")(text)


def register_parser_mode() -> str:
    """Make :data:`PARSER_MODE` a jsonargparse parser mode (idempotent); returns its name."""
    from jsonargparse import set_loader

    set_loader(PARSER_MODE, jsonargparse_load, exceptions=(yaml.YAMLError, ConfigFileError))
    return PARSER_MODE


def check_command_line_values(argv: list[str]) -> None:
    """Refuse a command-line value past the alias bound (jsonargparse YAML-loads some values itself, unbounded)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if "*" in value:  # else no alias, nothing to expand
            with contextlib.suppress(yaml.YAMLError):  # text that is not YAML stays a string
                check_yaml_bounded(value, f"the command-line value {value[:40]!r}")


def config_paths(argv: list[str]) -> list[Path]:
    """The ``--config``/``-c`` files of a LightningCLI command line (both ``--config X`` and ``--config=X``)."""
    paths = [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    return paths + [Path(arg.split("=", 1)[1]) for arg in argv if arg.startswith("--config=")]
