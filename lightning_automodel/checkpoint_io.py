"""Single-file ``.ckpt`` saves that are atomic on every filesystem layout, and a check for truncated ones.
(Lightning's temporary file may live on another filesystem: its final copy, killed, truncates ``last.ckpt``.)"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_automodel.core.atomic_files import fsync_path, recover_replaced_directory_per_node

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_TMP_SUFFIX = ".tmp"
_TMP_TAG = "lightning-automodel"
#: ``.<target>.lightning-automodel-<host>-<pid>-<random>.tmp``: the temporary files this module writes.
_OUR_TMP = re.compile(r"^\.(?P<target>.+)\." + _TMP_TAG + r"-(?P<host>.+)-(?P<pid>\d+)-[^.]+\.tmp$")
_swept: set[Path] = set()


class CheckpointResumeError(ValueError):
    """``--ckpt_path`` names a checkpoint that cannot be resumed from (truncated or not a checkpoint)."""


def _is_local(path: PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through a fsynced temporary file beside ``path`` and a rename: a kill leaves the previous or
    the new complete file, plus at worst a stale temporary file that the next save there removes."""
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.resolve() not in _swept:  # once per directory and process: saves killed by earlier runs
        remove_stale_tmp_files(target.parent)
        _swept.add(target.parent.resolve())
    tmp = target.parent / f".{target.name}.{_TMP_TAG}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}{_TMP_SUFFIX}"
    # 0o666 less the umask: a checkpoint gets the mode of any file the user creates (what DCP's files get)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def remove_stale_tmp_files(directory: Path) -> list[Path]:
    """Remove the temporary files of killed saves that are provably ours (this host, writer gone); returns them."""
    removed = []
    host = socket.gethostname()
    for entry in directory.iterdir() if directory.is_dir() else ():
        found = _OUR_TMP.match(entry.name)
        if found is None or found["host"] != host or entry.is_symlink() or not entry.is_file() or _running(int(found["pid"])):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("Removed %d temporary file(s) of interrupted saves in %s.", len(removed), directory)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one save at a time: an entry of ours is from an aborted save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    return True


class AtomicTorchCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-beside, fsync, rename (remote paths: Lightning's way)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        log.debug("Saving checkpoint atomically: %s", path)
        atomic_torch_save(checkpoint, path)


def incomplete_reason(path: PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file, or ``None`` when it is (reads only zip metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "it is empty"
        if not zipfile.is_zipfile(path):
            return "no zip central directory at its end"
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not any(i.filename.endswith("data.pkl") for i in infos):
                return "its zip archive holds no data.pkl"
            for info in infos:
                # a lower bound of where the entry ends: local header (30 bytes + name) + data
                end = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size
                if end > size:
                    return f"entry {info.filename!r} ends at byte {end}, past the end of the file ({size} bytes)"
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"it cannot be read as a zip archive ({exc})"
    return None


def newest_complete_checkpoint(directory: PathLike, exclude: PathLike | None = None) -> Path | None:
    """The most recently modified complete checkpoint (``*.ckpt`` file or sharded directory) in ``directory``."""
    directory = Path(directory)
    skip = Path(exclude).resolve() if exclude is not None else None
    try:
        candidates = [p for p in directory.glob("*.ckpt") if not p.name.startswith(".") and p.resolve() != skip]
    except OSError:
        return None

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return float("-inf")

    for candidate in sorted(candidates, key=mtime, reverse=True):
        if candidate.is_file() and incomplete_reason(candidate) is None:
            return candidate
        if candidate.is_dir() and (candidate / ".metadata").is_file() and (candidate / "meta.pt").is_file():
            return candidate  # a complete sharded checkpoint
    return None


def check_resumable(ckpt_path: PathLike | None) -> None:
    """Raise ``CheckpointResumeError`` when local ``ckpt_path`` is an incomplete file, naming the newest complete one
    beside it; first put back a sharded checkpoint a killed save left parked. Lightning reports anything else."""
    if ckpt_path is None or not _is_local(ckpt_path):
        return
    path = Path(str(ckpt_path).removeprefix("file://"))
    if not path.exists():
        recover_replaced_directory_per_node(path)  # a sharded save killed between its two renames
    if not path.is_file():
        return
    reason = incomplete_reason(path)
    if reason is None:
        return
    newest = newest_complete_checkpoint(path.parent, exclude=path)
    hint = f"no complete checkpoint found in {path.parent}"
    if newest is not None:
        hint = f"the newest complete checkpoint in {path.parent} is {newest}: resume with --ckpt_path {newest}"
    raise CheckpointResumeError(f"checkpoint {path} is truncated or incomplete ({reason}); {hint}")
