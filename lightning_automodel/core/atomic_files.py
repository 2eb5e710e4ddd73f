"""Publishing a directory under its final name with no moment at which that name is missing (``rename`` cannot
replace a non-empty directory: ``renameat2(RENAME_EXCHANGE)``, else the old one parked, recovered at the next start)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def sibling(path: Path, tag: str) -> Path:
    """``dir/.name.tag``: where a directory is staged (``tmp``) or parked (``old``) beside ``path``."""
    return path.with_name(f".{path.name}.{tag}")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and then every directory, deepest first."""
    directories = []
    for current, dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(current) / name)
        directories.append(Path(current))
    for directory in reversed(directories):
        fsync_path(directory)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """``renameat2(a, b, flag)``; ``False`` when the system or the filesystem lacks the call or the flag."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST and flag == _RENAME_NOREPLACE:
        raise FileExistsError(code, os.strerror(code), str(b))
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # fall back: two renames for an exchange, lstat + rename for no-replace
    raise OSError(code, f"renameat2 of {a} and {b}: {os.strerror(code)}")


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (both must exist); ``False`` when the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; ``FileExistsError`` when ``target`` exists (even an empty directory). With
    ``renameat2(RENAME_NOREPLACE)`` exactly one of two racing writers wins (without it, a tiny ``lstat`` window)."""
    if not _renameat2(source, target, _RENAME_NOREPLACE):
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        os.rename(source, target)
    fsync_path(target.parent)


def replace_directory(staging: Path, final: Path, *, allow_exchange: bool = True) -> None:
    """Move ``staging`` to ``final``, replacing it (atomically if it can, else parked at ``sibling(final, "old")``)."""
    parked = sibling(final, "old")
    if not final.exists() and not final.is_symlink():
        os.replace(staging, final)
    elif allow_exchange and exchange_paths(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # staging now names the previous directory
    else:
        if parked.exists():
            shutil.rmtree(parked)
        os.replace(final, parked)
        try:
            os.replace(staging, final)
        except BaseException:
            os.replace(parked, final)
            raise
        fsync_path(final.parent)
        shutil.rmtree(parked, ignore_errors=True)
    fsync_path(final.parent)


def _awaits_recovery(final: Path) -> bool:
    """Whether ``final`` is missing while a parked previous directory waits beside it."""
    return not (final.exists() or final.is_symlink()) and sibling(final, "old").is_dir()


def recover_replaced_directory(final: Path) -> bool:
    """Put back a directory an interrupted :func:`replace_directory` parked; ``True`` if it did (not another node)."""
    parked = sibling(final, "old")
    if not _awaits_recovery(final):
        return False
    try:
        os.replace(parked, final)
    except OSError:
        # Lost the race: the parked directory is gone (ENOENT) or ``final`` is now a full directory
        # (ENOTEMPTY / EEXIST). Anything else, e.g. a permission error, is this process's to report.
        if final.is_dir() and not parked.exists():
            return False
        raise
    fsync_path(final.parent)
    log.warning("Recovered %s from %s, left by a save that was interrupted while replacing it.", final, parked.name)
    return True


def local_rank_before_group() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` (torchrun, Lightning), else ``SLURM_LOCALID`` (srun), else 0."""
    for variable in ("LOCAL_RANK", "SLURM_LOCALID"):
        raw = os.environ.get(variable)
        if raw is None:
            continue
        try:
            return int(raw)
        except ValueError:
            raise ValueError(
                f"Environment variable {variable}={raw!r} is not an integer. Unset it or set it to the process's "
                "rank on its node (as torchrun does)."
            ) from None
    return 0


def recover_replaced_directory_per_node(
    final: Path, *, local_rank: int | None = None, timeout: float = 120.0, poll: float = 0.05
) -> bool:
    """:func:`recover_replaced_directory` by local rank 0 only, the node's other processes waiting for it (every rank
    renaming the same path would race); ``TimeoutError`` when ``final`` is not back within ``timeout`` seconds."""
    if (local_rank_before_group() if local_rank is None else local_rank) == 0:
        return recover_replaced_directory(final)
    deadline = time.monotonic() + timeout
    while _awaits_recovery(final):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{final} is missing and its previous copy is still parked at {sibling(final, 'old')} after "
                f"{timeout:.0f} s waiting for local rank 0 to put it back: see local rank 0's log, or rename it back by hand."
            )
        time.sleep(poll)
    return False
