"""Read a Lightning training checkpoint's model tensors a few at a time, without running any pickle from it.

A ``.ckpt`` is read with ``os.pread`` (through the mmap every touched page would stay resident), a DCP directory
with ``dcp.load``; its ``.metadata`` and ``meta.pt`` are unpickled through allow-lists."""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from lightning_automodel._compat.torch import DCP_METADATA_PRIVATE_GLOBALS

log = logging.getLogger(__name__)

_STATE_PREFIX = "state_dict."


class CheckpointReadError(ValueError):
    """The checkpoint cannot be read; the message names the file and what is wrong."""


# Lightning's metadata types; its ``AttributeDict`` is read as a plain ``dict`` (the core never imports Lightning).
_LIGHTNING_SAFE_GLOBALS = [
    collections.OrderedDict, pathlib.PosixPath, pathlib.PurePosixPath, (dict, "lightning.fabric.utilities.data.AttributeDict"),
]


def safe_torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` with Lightning's allow-list: a pickle that needs any other global is refused, never run."""
    try:
        with torch.serialization.safe_globals(_LIGHTNING_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointReadError(
            f"{path} is not a readable Lightning checkpoint or holds a type that is not trusted ({type(exc).__name__}: {detail})."
        ) from None


_DCP_METADATA_PUBLIC_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata",
    },
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_PUBLIC_TYPES.get(module, ()) or name in DCP_METADATA_PRIVATE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata type")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader unpickling ``.metadata`` through an allow-list (DCP's ``pickle.load`` would run a crafted file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._metadata is None:
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            file = Path(self.path) / ".metadata"
            try:
                with open(file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as exc:  # noqa: BLE001
                raise CheckpointReadError(f"{file} is not a readable DCP metadata file ({type(exc).__name__}: {exc}).") from None
            if not isinstance(metadata, Metadata):
                raise CheckpointReadError(f"{file} is not a DCP metadata file.")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def read_meta_pt(directory: Path) -> dict[str, Any]:
    """Lightning's ``meta.pt`` of a sharded checkpoint (epoch, hyper-parameters, callback state), as data only; ``{}`` when absent."""
    meta_file = directory / "meta.pt"
    meta = safe_torch_load(meta_file) if meta_file.is_file() else {}
    if not isinstance(meta, dict):
        raise CheckpointReadError(f"{meta_file} is not a Lightning checkpoint's metadata.")
    return meta


_TENSOR_ENTRIES = ("state_dict", "optimizer_states", "lr_schedulers")


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All but the tensors of a ``.ckpt`` or DCP directory, as data; ``.metadata`` checked before Lightning's pickle."""
    path = Path(path)
    if _is_single_file(path):
        return {k: v for k, v in _load_ckpt(path).items() if k not in _TENSOR_ENTRIES}
    SafeFileSystemReader(path).read_metadata()
    return read_meta_pt(path)


def _load_ckpt(path: Path) -> dict[str, Any]:
    checkpoint = safe_torch_load(path, mmap=True)  # maps the file: tensor bytes are not read
    if not isinstance(checkpoint, dict):
        raise CheckpointReadError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not a dict).")
    return checkpoint


def _is_single_file(path: Path) -> bool:
    """True for a ``.ckpt`` file, False for a sharded directory (with ``.metadata``); else one-line error."""
    if path.is_file():
        return True
    if path.is_dir() and (path / ".metadata").is_file():
        return False
    if not path.exists():
        raise CheckpointReadError(f"Checkpoint {str(path)!r} does not exist.")
    raise CheckpointReadError(f"{path} is neither a Lightning .ckpt file nor a sharded checkpoint directory (with .metadata).")


class TrainedCheckpoint:
    """A Lightning checkpoint's model tensors (Lightning names) and metadata, read on demand."""

    path: Path
    metadata: dict[str, Any]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self) -> TrainedCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_trained_checkpoint(path: str | os.PathLike[str]) -> TrainedCheckpoint:
    """Open a ``.ckpt`` file or a sharded checkpoint directory (with ``.metadata``)."""
    path = Path(path)
    return SingleFileCheckpoint(path) if _is_single_file(path) else ShardedCheckpoint(path)


class SingleFileCheckpoint(TrainedCheckpoint):
    def __init__(self, path: Path) -> None:
        self.path = path
        if not zipfile.is_zipfile(path):
            raise CheckpointReadError(f"{path} is not a readable Lightning checkpoint (not a torch archive: truncated, or another kind of file).")
        checkpoint = _load_ckpt(path)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            raise CheckpointReadError(f"{path} has no 'state_dict': not a Lightning checkpoint.")
        self._tensors = {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
        self.metadata = {k: v for k, v in checkpoint.items() if k not in _TENSOR_ENTRIES}
        self.specs = {k: (tuple(t.shape), t.dtype) for k, t in self._tensors.items()}
        self._offsets = self._record_offsets()
        self._fd = os.open(path, os.O_RDONLY)

    def _record_offsets(self) -> dict[int, int] | None:
        """File offset of each mapped storage by address (address - offset is one constant); None when not proven."""
        storages = {}
        for t in self._tensors.values():
            storage = t.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        with zipfile.ZipFile(self.path) as archive:
            records = [i for i in archive.infolist() if "/data/" in i.filename and i.compress_type == zipfile.ZIP_STORED]
        starts = []
        with open(self.path, "rb") as f:
            for info in records:
                f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                starts.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
        starts.sort()
        addresses = sorted(storages)
        if not addresses or len(starts) < len(addresses):
            return None
        # Storages may be shared and records may hold optimizer state: match every storage at one address offset.
        by_offset = dict(starts)
        first = addresses[0]
        for offset, size in starts:
            base = first - offset
            if size == storages[first] and all(by_offset.get(a - base) == storages[a] for a in addresses):
                return {a: a - base for a in addresses}
        return None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            mapped = self._tensors[name]
            if mapped.numel() == 0 or self._offsets is None or not mapped.is_contiguous():
                out[name] = mapped.clone()
                continue
            storage = mapped.untyped_storage()
            start = self._offsets[storage.data_ptr()] + mapped.storage_offset() * mapped.element_size()
            tensor = torch.empty(mapped.shape, dtype=mapped.dtype)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], start + done)
                if n <= 0:
                    raise CheckpointReadError(f"{self.path} ends inside tensor {name} (truncated file).")
                done += n
            out[name] = tensor
        return out

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tensors = {}


class ShardedCheckpoint(TrainedCheckpoint):
    def __init__(self, path: Path) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if dist.is_available() and dist.is_initialized():
            # DCP would treat the read as a collective and wait for every rank.
            raise CheckpointReadError("Read a sharded checkpoint from a single process (outside torchrun / a Trainer run).")
        self.path = path
        self._reader = SafeFileSystemReader(path)
        metadata = self._reader.read_metadata()
        self._check_files(metadata)
        self.specs = {
            key[len(_STATE_PREFIX):]: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if key.startswith(_STATE_PREFIX) and isinstance(md, TensorStorageMetadata)
        }
        self.metadata = read_meta_pt(path)

    def _check_files(self, metadata: Any) -> None:
        """Every byte range the metadata points to exists (a truncated or partly copied directory fails here)."""
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for relative, end in sorted(needed.items()):
            file = (self.path / relative).resolve()
            if self.path.resolve() not in file.parents:
                raise CheckpointReadError(f"{self.path / '.metadata'} points outside the checkpoint ({relative!r}).")
            if not file.is_file():
                raise CheckpointReadError(f"{self.path} is incomplete: {relative} is missing (truncated copy or interrupted save).")
            if file.stat().st_size < end:
                raise CheckpointReadError(f"{self.path} is incomplete: {relative} is truncated ({file.stat().st_size} of {end} bytes).")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        names = list(names)
        state = {name: torch.empty(self.specs[name][0], dtype=self.specs[name][1]) for name in names}
        if not state:
            return {}
        try:
            with warnings.catch_warnings():
                # DCP warns "torch.distributed is disabled" even when no_dist=True asks for exactly that
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                dcp.load({"state_dict": state}, storage_reader=self._reader, no_dist=True)
        except CheckpointReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - DCP wraps read errors in CheckpointException
            first = str(exc).strip().splitlines()
            raise CheckpointReadError(f"{self.path}: reading {names[0]} failed ({type(exc).__name__}: {first[-1] if first else ''}).") from None
        return state

