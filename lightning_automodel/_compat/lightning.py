"""Private Lightning names the package needs (checked on lightning 2.6.6, jsonargparse 4.53.0)."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

# jsonargparse's text when no member of ``Optional[X]`` accepts a value: the class's error precedes the NoneType line.
_UNION_ERRORS = re.compile(r"Does not validate against any of the Union subtypes .*? Errors: - (.*?) - Expected a <class 'NoneType'>")


def union_member_error(message: str) -> str | None:
    """The first member's own error in jsonargparse's Union message, or None. Why text: LightningCLI's
    ``data``/``model`` keys are ``Optional[...]`` unions and jsonargparse's ``ArgumentError`` has no other structure."""
    found = _UNION_ERRORS.search(message)
    return found.group(1) if found else None


def set_process_group_backend(strategy: Any, backend: str | None) -> None:
    """The process-group backend of ``ModelParallelStrategy``/``FSDPStrategy``. Why private: no setter, and the
    constructor argument is fixed before the root device is known; ``setup_environment`` reads the attribute."""
    strategy._process_group_backend = backend


class LightningCLIHooks:
    """``LightningCLI`` mixin routing the private ``_parse_ckpt_path`` step to :meth:`check_ckpt_path_config`. Why:
    Lightning's step merges the checkpoint's hyper-parameters over the user's config; no public switch or hook."""

    def _parse_ckpt_path(self) -> None:
        self.check_ckpt_path_config()

    def check_ckpt_path_config(self) -> None:
        """Checks ``ckpt_path`` against the parsed configuration; a subclass overrides it."""


def callback_state_key(callback: Any, **identity: Any) -> str:
    """A ``state_key`` per ``identity``; the text of Lightning's private ``Callback._generate_state_key`` (older
    checkpoints load), built here so a Lightning change cannot orphan it."""
    return f"{type(callback).__qualname__}{identity!r}"


_IMPORT_POLICY_KEYS = ("import_path_verdicts", "import_paths_enforced")


@contextlib.contextmanager
def import_path_policy_preserved() -> Iterator[None]:
    """Restore jsonargparse's process-wide import-path policy after the block: the command's own restriction must
    not outlive an in-process fit. Why private: ``set_parsing_settings`` has no getter (``_common``'s dict)."""
    from jsonargparse import _common

    saved = {key: copy.deepcopy(_common.parsing_settings[key]) for key in _IMPORT_POLICY_KEYS}
    try:
        yield
    finally:
        _common.parsing_settings.update(saved)
