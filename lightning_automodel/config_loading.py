"""The one YAML loader of every command: regular files only, bounded size, bounded alias expansion.

``fit``/``validate``/``test`` (LightningCLI, through jsonargparse) and ``plan`` read configs people
were sent. Two things in such a file cost without limit unless refused before any object is built:

* a name that is not a regular file: ``--config /dev/stdin`` or a FIFO blocks forever on open, a
  device never ends;
* aliases: an alias is one node in the text but a whole subtree in the result, so nine lines of nested
  ``[*a, *a, ...]`` make 10^9 references ("billion laughs") that every later merge or walk visits.

Nothing here imports Lightning: jsonargparse only gets a parser mode (:func:`register_parser_mode`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

#: Nodes a config may expand to through aliases (``*anchor``); a real config has a few hundred.
MAX_YAML_NODES = 100_000
#: Bytes a config file may have; a real one has a few kilobytes.
MAX_CONFIG_BYTES = 16 * 2**20
#: The jsonargparse parser mode that loads with :func:`jsonargparse_load`.
PARSER_MODE = "lightning_automodel_yaml"


class ConfigFileError(ValueError):
    """A config file or value that is refused before it is parsed (one line naming it)."""


class PlanError(ValueError):
    """Bad input to ``plan``: one line, exit code 2 (here so that ``cli`` names it without importing ``planning``)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops past ``MAX_YAML_NODES`` expanded nodes, counted on the composed graph (nothing built yet)."""

    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        if node is not None:
            _count_nodes(node, self.name)
        return node


def _count_nodes(root: yaml.Node, name: str) -> None:
    sizes: dict[int, int] = {}  # id(node) -> expanded size: a shared subtree is walked once, counted per use

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias (not possible in SafeLoader's output, but cheap to guard)
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
        sizes[key] = n
        return n

    size(root)


def check_yaml_bounded(text: str, name: str = "<config>") -> None:
    """Refuse ``text`` when its aliases expand past ``MAX_YAML_NODES`` nodes (composes, builds nothing)."""
    loader = _BoundedLoader(text)
    loader.name = name
    try:
        loader.get_single_node()
    except RecursionError:
        raise ConfigFileError(f"{name}: the YAML is nested too deeply to be a config.") from None
    finally:
        loader.dispose()


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of a config file: a regular file (checked on the opened descriptor), UTF-8, at most ``MAX_CONFIG_BYTES``.

    Opened non-blocking, so a FIFO is refused at once instead of waiting for a writer forever.
    """
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
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config {name!r} is not UTF-8 text ({exc}).") from None


def check_config_file(path: str | os.PathLike[str]) -> None:
    """Fail in one line unless ``path`` is a readable regular YAML file within every bound."""
    check_yaml_bounded(read_config_text(path), os.fspath(path))


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
    """Refuse a command-line value whose aliases expand past the bound.

    jsonargparse parses some values (a ``dict`` option, a union) with its own unbounded YAML load, not
    through the parser mode, so each value is composed here first; text that is not YAML passes (it
    stays a string).
    """
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if "*" not in value:
            continue  # no alias, nothing to expand
        try:
            check_yaml_bounded(value, f"the command-line value {value[:40]!r}")
        except yaml.YAMLError:
            continue


def config_paths(argv: list[str]) -> list[Path]:
    """The ``--config``/``-c`` files of a LightningCLI command line (both ``--config X`` and ``--config=X``)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths
