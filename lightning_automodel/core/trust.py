"""Whether to trust remote code for a model name, by a small organisation whitelist.

Only a hub name of the exact form ``<org>/<name>`` with a whitelisted org is trusted. Local
directories never are (whatever their name), and path tricks (``nvidia/../x``, ``./nvidia/x``,
``nvidia//x``, ``/nvidia/x``) are not hub names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

DEFAULT_TRUSTED_ORGS: tuple[str, ...] = ("nvidia",)
#: Used with ``fullmatch``: ``$`` would also match before a trailing newline (``"nvidia/x\n"``).
_HUB_NAME = re.compile(r"(?P<org>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)")


def resolve_trust_remote_code(
    path: str | os.PathLike[str] | None, *, trusted_orgs: Iterable[str] = DEFAULT_TRUSTED_ORGS
) -> bool:
    """True only for a hub name ``<org>/<name>`` whose org is in ``trusted_orgs`` (case-sensitive; a plain
    string is one org, never its characters)."""
    orgs = {trusted_orgs} if isinstance(trusted_orgs, str) else set(trusted_orgs)
    text = os.fspath(path) if path else ""
    if not isinstance(text, str) or not text or os.path.isdir(text):
        return False
    match = _HUB_NAME.fullmatch(text)  # a name starts with a letter or digit: never "." or ".."
    return match is not None and ".." not in match["name"] and match["org"] in orgs
