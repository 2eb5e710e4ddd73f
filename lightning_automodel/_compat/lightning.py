"""Private Lightning names the package needs (checked on lightning 2.6.6, jsonargparse 4.53.0)."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

# jsonargparse's text for a value no member of ``Optional[X]`` accepts: the class's own error sits between
# "Errors: - " and the NoneType member's line.
_UNION_ERRORS = re.compile(r"Does not validate against any of the Union subtypes .*? Errors: - (.*?) - Expected a <class 'NoneType'>")


def union_member_error(message: str) -> str | None:
    """The first member's own error inside jsonargparse's "Does not validate against any of the Union
    subtypes" message, or None when ``message`` is not one.
    Why text: LightningCLI's subclass-mode ``data``/``model`` keys are ``Optional[...]`` unions and
    jsonargparse raises a plain ``ArgumentError`` whose only structure is this text."""
    found = _UNION_ERRORS.search(message)
    return found.group(1) if found else None


def set_process_group_backend(strategy: Any, backend: str | None) -> None:
    """Choose the backend ``ModelParallelStrategy``/``FSDPStrategy`` create the process group with.
    Why private: ``process_group_backend`` has no setter and the constructor argument is fixed before the
    root device is known; ``setup_environment`` reads ``_process_group_backend``."""
    strategy._process_group_backend = backend


class LightningCLIHooks:
    """``LightningCLI`` mixin: routes the private ``_parse_ckpt_path`` step (right after parsing, before anything
    is built) to :meth:`check_ckpt_path_config`.
    Why private: LightningCLI's own step merges the checkpoint's hyper-parameters over the user's
    configuration; no public switch turns it off and no public hook runs at that point."""

    def _parse_ckpt_path(self) -> None:
        self.check_ckpt_path_config()

    def check_ckpt_path_config(self) -> None:
        """Checks ``ckpt_path`` against the parsed configuration; a subclass overrides it."""


def callback_state_key(callback: Any, **identity: Any) -> str:
    """A callback's ``state_key`` that tells apart instances with different ``identity`` arguments.
    Same text as Lightning's private ``Callback._generate_state_key``, so older checkpoints' state still
    loads; built here, so a Lightning change cannot orphan it."""
    return f"{type(callback).__qualname__}{identity!r}"


_IMPORT_POLICY_KEYS = ("import_path_verdicts", "import_paths_enforced")


@contextlib.contextmanager
def import_path_policy_preserved() -> Iterator[None]:
    """Put jsonargparse's process-wide import-path policy back as it was when the block ends.
    The command restricts the import paths a config may name (``set_parsing_settings``) for its own parse;
    an in-process fit must not leave that on the user's later parsers. Why private: ``set_parsing_settings``
    has no getter, so the policy is read from and restored into ``jsonargparse._common.parsing_settings``."""
    from jsonargparse import _common

    saved = {key: copy.deepcopy(_common.parsing_settings[key]) for key in _IMPORT_POLICY_KEYS}
    try:
        yield
    finally:
        _common.parsing_settings.update(saved)
