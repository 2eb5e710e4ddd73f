"""Publishing a directory under its final name with no moment at which that name is missing.

A checkpoint or export directory is written beside its target and then moved into place. When the
target already exists, POSIX ``rename`` cannot replace a non-empty directory, so the usual dance is
two renames (old aside, new in), and a crash between them leaves no directory under the name at
all. Linux has an atomic swap of two paths (``renameat2(..., RENAME_EXCHANGE)``, ext4, xfs, btrfs,
tmpfs); :func:`replace_directory` uses it when the filesystem supports it, and otherwise falls back
to the two renames with the old directory parked at a fixed sibling name that
:func:`recover_replaced_directory` moves back at the next start.

At that start no process group exists yet, and every rank of a job checks the same path. The
recovery is therefore done by one process per node (:func:`recover_replaced_directory_per_node`:
local rank 0, while the node's other processes wait for the outcome), and tolerates losing the
rename to another node's local rank 0 on a shared filesystem (NFS, Lustre).

``renameat2`` is not in Python's ``os`` module; it is reached through ``ctypes`` here and nowhere
else (tested in ``tests/core/test_atomic_files.py``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def sibling(path: Path, tag: str) -> Path:
    """``dir/.name.tag``: where a directory is staged (``tmp``) or parked (``old``) beside ``path``."""
    return path.with_name(f".{path.name}.{tag}")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk (best effort where a directory cannot be opened)."""
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


def _renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (both must exist); ``False`` when the system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # no such call, or a filesystem that cannot exchange: fall back to two renames
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(code)}")


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, raising ``FileExistsError`` when ``target`` exists (even an empty directory).

    ``renameat2(RENAME_NOREPLACE)`` checks and renames in one step, so of two writers racing for one
    name exactly one wins and the other is told. Where the call or the filesystem lacks the flag, the
    check is a separate ``lstat`` just before ``rename``: the window is tiny but not zero there.
    """
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            fsync_path(target.parent)
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, f"renameat2(RENAME_NOREPLACE) of {source} to {target}: {os.strerror(code)}")
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)
    fsync_path(target.parent)


def replace_directory(staging: Path, final: Path, *, allow_exchange: bool = True) -> None:
    """Move ``staging`` to ``final``, replacing an existing ``final``; no moment without ``final`` if possible.

    With the atomic exchange, ``final`` always names a complete directory (old, then new). Without
    it, the old directory is parked at ``sibling(final, "old")`` between two renames; a crash there
    is repaired by :func:`recover_replaced_directory`. Parent directory entries are fsynced.
    """
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
    """Put back a directory parked by an interrupted :func:`replace_directory`; ``True`` if it did.

    Another process doing the same recovery at the same moment (another node on a shared filesystem)
    is not an error: whoever renames first wins, the other finds ``final`` in place and returns ``False``.
    """
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
    """This process's rank on its node from the launcher's environment (no process group needed).

    ``LOCAL_RANK`` (torchrun, Lightning's launchers), else ``SLURM_LOCALID`` (srun), else 0: a lone process.
    """
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
    """:func:`recover_replaced_directory` by local rank 0 only; the node's other processes wait for it.

    For the start of a job, before a process group exists: every rank checking and renaming the same
    path would race (the losers' renames fail). ``True`` where this process put the directory back.

    Raises:
        TimeoutError: local rank 0 did not put ``final`` back within ``timeout`` seconds (its log says why).
    """
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
