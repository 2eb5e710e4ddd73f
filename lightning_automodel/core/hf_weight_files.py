"""What a local Hugging Face checkpoint holds, from index and headers; only regular files are opened (a FIFO blocks)."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_INDEX = "model.safetensors.index.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E8M0": torch.float8_e8m0fnu,
}


class OfflineCheckpointError(FileNotFoundError):
    """A checkpoint was named that is not on local disk; we never download."""


def _not_regular(path: str | os.PathLike[str], mode: int) -> ValueError:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return ValueError(f"{os.fspath(path)}: is {kind}, not a regular file; a checkpoint file must be a regular file.")


def _short_repr(value: object, limit: int = 120) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (symlinks followed), False when nothing is there, ValueError for anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    return True


def open_regular(path: str | os.PathLike[str], buffering: int = -1):
    """Open a regular file for binary reading: non-blocking (a FIFO would wait forever), checked on the descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


class SafetensorsLayout(NamedTuple):
    header: dict[str, Any]
    data_start: int  # where the tensor data starts: ``data_offsets`` count from there


def read_safetensors_layout(path: str | os.PathLike[str]) -> SafetensorsLayout:
    """A safetensors header and where its data starts; one line naming the file for anything ``safe_open`` refuses."""
    path = Path(path)
    with open_regular(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: truncated safetensors file ({len(prefix)} bytes; the 8-byte header length is missing).")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: safetensors header length {length} bytes is over the 100 MB limit; the file is corrupt or not safetensors."
            )
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"{path}: truncated safetensors header ({len(raw)} of {length} bytes); re-save or re-download the file.")
    try:
        header = json.loads(raw, object_pairs_hook=lambda items: _refuse_duplicate_keys(path, items))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header (not JSON: {exc}).") from None
    except RecursionError:
        raise ValueError(f"{path}: corrupt safetensors header (JSON nested too deeply; a header is flat).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object).")
    _check_header(path, header, file_size - 8 - length)
    return SafetensorsLayout(header, 8 + length)


def _refuse_duplicate_keys(path: Path, items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is an error (plain JSON keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise ValueError(f"{path}: corrupt safetensors header: {key!r} is listed twice; safetensors refuses such a file.")
        out[key] = value
    return out


def _check_header(path: Path, header: Mapping[str, Any], data_bytes: int) -> None:
    """Flat entries whose byte ranges tile the data area exactly (overlaps or gaps would train on wrong values)."""
    ranges = []
    for key, entry in header.items():
        if key == "__metadata__":
            ok = isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            expected = "an object of strings"
        else:
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list)
                and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
            )
            expected = "{dtype: str, shape: [int], data_offsets: [int, int]}"
        if not ok:
            raise ValueError(f"{path}: corrupt safetensors header: {key!r} is {_short_repr(entry)}, expected {expected}.")
        if key != "__metadata__":
            ranges.append((entry["data_offsets"], key))
    end, last = 0, None
    for offsets, key in sorted(ranges):
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"{path}: corrupt safetensors header: {key!r} has data_offsets {offsets}; expected [begin, end] with begin <= end.")
        if offsets[0] != end:
            problem = "overlaps another tensor's bytes" if offsets[0] < end else f"leaves a gap after byte {end}"
            raise ValueError(f"{path}: corrupt safetensors header: {key!r} (data_offsets {offsets}) {problem}; safetensors refuses such a file.")
        dtype = SAFETENSORS_DTYPES.get(header[key]["dtype"])
        shape = header[key]["shape"]
        if dtype is not None and (min(shape, default=0) < 0 or offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize):
            raise ValueError(
                f"{path}: corrupt safetensors header: {key!r} has shape {shape} {header[key]['dtype']} "
                f"but data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)."
            )
        end, last = offsets[1], key
    if end > data_bytes:
        raise ValueError(
            f"{path}: tensor {last!r} ends at data byte {end} of a {data_bytes}-byte data area; the file is truncated or corrupt."
        )
    if end < data_bytes:
        raise ValueError(f"{path}: {data_bytes - end} bytes after the last tensor's data; the file is corrupt (safetensors refuses it).")


def load_bin(file: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, ``weights_only``: on meta (shapes only), or memory-mapped (a slice touches its pages only)."""
    is_regular_file(file)
    try:
        state = torch.load(file, map_location="cpu" if mmap else "meta", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never suggest weights_only=False here
        raise ValueError(f"{file}: holds pickled objects besides tensors; refusing to unpickle it. Convert the weights to safetensors.") from None
    except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory-mapped
        raise ValueError(f"{file}: cannot memory-map this .bin file ({exc}); re-save it with torch.save or convert it to safetensors.") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(state).__name__}.")
    return state


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint, known from its file's header; ``offset``: its data's byte offset (None for ``.bin``)."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None


def _file_tensors(file: Path) -> Iterator[SourceTensor]:
    if file.suffix != ".safetensors":
        for key, tensor in load_bin(file).items():
            if isinstance(tensor, torch.Tensor):
                yield SourceTensor(key, file, tuple(tensor.shape), tensor.dtype)
        return
    header, data_start = read_safetensors_layout(file)
    for key, entry in header.items():
        if key != "__metadata__":
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {key!r} has unknown safetensors dtype {entry['dtype']!r}.")
            offset = data_start + entry["data_offsets"][0]
            yield SourceTensor(key, file, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]], offset)


def checkpoint_tensors(files: Iterable[Path]) -> dict[str, SourceTensor]:
    """Every tensor of a checkpoint's weight files, from headers only; a tensor stored twice is an error."""
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        for source in _file_tensors(file):
            if source.key in tensors:
                raise ValueError(f"Tensor {source.key!r} is stored twice: in {tensors[source.key].file.name} and {file.name}.")
            tensors[source.key] = source
    return tensors


def read_bounded_json(path: Path, what: str, max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """A small JSON file (an index, a config.json), bounded, UTF-8; else one line naming ``path`` and ``what``."""
    with open_regular(path) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: the {what} is over {max_bytes // 2**20} MiB; it is not a {what}.")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: the {what} is not valid UTF-8 ({exc}).") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the {what} is not valid JSON ({exc}).") from None
    except RecursionError:
        raise ValueError(f"{path}: the {what} is nested too deeply to be a {what}.") from None


def _read_index(index_path: Path) -> dict[str, str]:
    """``weight_map`` of an index, each value a plain file name (a downloaded ``../../etc/passwd`` must not open)."""
    index = read_bounded_json(index_path, "checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: the checkpoint index has no 'weight_map' object.")
    for key, value in weight_map.items():
        if not isinstance(value, str) or not value or value != Path(value).name or value in (".", "..") or "\x00" in value:
            raise ValueError(
                f"{index_path}: weight_map entry {_short_repr(value)} (key {key!r}) is not a file name in the checkpoint's "
                "directory; the index is corrupt."
            )
    return weight_map


def with_variant(file_name: str, variant: str | None) -> str:
    """transformers' variant naming: ``model.safetensors`` -> ``model.fp16.safetensors``."""
    if not variant:
        return file_name
    stem, extension = file_name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def resolve_checkpoint_files(
    path: str | os.PathLike[str], subfolder: str = "", *, variant: str | None = None, use_safetensors: bool | None = None
) -> list[Path]:
    """Local weight files of a checkpoint, chosen as ``from_pretrained`` does with ``variant`` and ``use_safetensors``;
    :class:`OfflineCheckpointError` for a hub name, ``FileNotFoundError`` for no weights or a missing shard."""
    root = Path(path) / subfolder if subfolder else Path(path)
    if not root.is_dir() and is_regular_file(root):  # anything but a file or directory is refused by name
        return [root]
    if not root.is_dir():
        raise OfflineCheckpointError(
            f"{os.fspath(path)!r} is not a local file or directory. lightning-automodel runs offline and never downloads: "
            "download the model once (e.g. `hf download <name> --local-dir DIR`) and pass the local DIR."
        )
    candidates = [(SAFETENSORS_INDEX, "model.safetensors")] if use_safetensors is not False else []
    candidates += [("pytorch_model.bin.index.json", "pytorch_model.bin")] if use_safetensors is not True else []
    for index_name, single_name in candidates:
        index_path = root / with_variant(index_name, variant)
        if is_regular_file(index_path):
            files = [root / shard for shard in sorted(set(_read_index(index_path).values()))]
            missing = [str(f) for f in files if not is_regular_file(f)]
            if missing:
                raise FileNotFoundError(f"{index_path} names shard(s) that are missing: {missing}. The download is incomplete.")
            return files
        if is_regular_file(root / with_variant(single_name, variant)):
            return [root / with_variant(single_name, variant)]
    if variant is None and use_safetensors is not False:
        found = sorted(root.glob("*.safetensors"))
        if found and all(is_regular_file(f) for f in found):
            return found
    wanted = ", ".join(with_variant(name, variant) for pair in candidates for name in pair)
    raise FileNotFoundError(f"{root} has no weights ({wanted}); is the directory half-written?")


def checkpoint_tensor_dtypes(
    path: str | os.PathLike[str], load_kwargs: Mapping[str, Any] | None = None
) -> dict[str, torch.dtype]:
    """Tensor name -> dtype from headers (``.bin`` on meta); ``from_pretrained``'s ``load_kwargs`` (gguf: ``{}``)."""
    kwargs = dict(load_kwargs or {})
    state_dict = kwargs.get("state_dict")
    if isinstance(state_dict, Mapping):
        return {k: v.dtype for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if kwargs.get("gguf_file"):
        return {}
    files = resolve_checkpoint_files(
        path, kwargs.get("subfolder") or "", variant=kwargs.get("variant"), use_safetensors=kwargs.get("use_safetensors")
    )
    return {key: source.dtype for key, source in checkpoint_tensors(files).items()}


def get_safetensors_index_total_size(index_path: str | os.PathLike[str] | None) -> int | None:
    """``metadata.total_size`` of a safetensors index (a directory gets the index appended), or None."""
    if index_path is None:
        return None
    path = Path(index_path)
    path = path / SAFETENSORS_INDEX if path.is_dir() else path
    try:
        index = read_bounded_json(path, "checkpoint index") if is_regular_file(path) else None
    except (OSError, ValueError):
        return None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def estimate_tensor_bytes(tensor: Any) -> int:
    """``numel * element_size`` without touching storage (meta and DTensor fine; DTensor is global)."""
    return int(tensor.numel()) * int(tensor.element_size())


def estimate_state_dict_bytes(state_dict: Mapping[str, Any]) -> int | None:
    """Sum of tensor bytes, or None when a value is not tensor-like."""
    try:
        return sum(estimate_tensor_bytes(v) for v in state_dict.values())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None


def format_bytes(num_bytes: int | float) -> str:
    """Always GiB with one decimal (reference format, relied on by log parsers)."""
    return f"{num_bytes / 1024**3:.1f} GiB"


def format_bytes_human(n: int | float) -> str:
    """Scaled units (B, KiB, MiB, GiB, TiB) for tables."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_output_file_count(count: int) -> str:
    return f"{count} output file" if count == 1 else f"{count} output files"
