"""Streaming a Hugging Face checkpoint into a (sharded) model: each rank reads only its own bytes.

Why not ``from_pretrained``: it loads into a model it builds itself, and under FSDP2 every rank would
hold the whole checkpoint first (8 ranks = 8x the model in host RAM per node). Why not DCP's
``HuggingFaceStorageReader`` alone: it needs the checkpoint's names to be the module's names, and
transformers 5 renames and merges on load (per-expert MoE tensors into fused experts, legacy VLM keys
into ``model.language_model.*``). So the *which* comes from transformers' own conversion rules
(``get_model_conversion_mapping``, ``rename_source_key``, the ``WeightConverter`` operations), the *how
much* from the parameter's DTensor placement, and the bytes from byte-range reads of the safetensors
files (``.bin`` files are memory-mapped with ``weights_only=True``, so a slice only touches its pages).

Per-rank host memory: its shards + one tensor in flight (a plain rename reads exactly the shard's
slice), or one conversion group in flight for converters whose operations do not commute with a
dim-0 slice. Converters that first stack a module list on dim 0 (MoE experts) read only the experts
the rank owns, as transformers' own shard-on-read does. safetensors rows are read with plain
``readinto`` from the header's offsets, not through a memory map (mapped pages stay resident); a
``.bin`` file is memory-mapped, so its touched pages count until the load ends: prefer safetensors.

The plan (which checkpoint tensors feed which parameter, with their shapes) is computed and checked on
the meta model, before anything is allocated: a missing tensor, a shape mismatch or a layout no rule
explains is an error naming the tensor and the file, raised identically on every rank (no hang).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_automodel._compat.torch import local_shape_and_offset, non_persistent_buffer_names
from lightning_automodel.core.naming import base_checkpoint_name, is_adapter_name
from lightning_automodel.core.distributed import local_tensor
from lightning_automodel.core.hf_weight_files import SAFETENSORS_DTYPES, open_regular, read_safetensors_layout, resolve_checkpoint_files
from lightning_automodel.core.naming import canonical_name

log = logging.getLogger(__name__)

# Largest host buffer a cast or a device copy goes through (rows are read in pieces of this size).
CHUNK_BYTES = 32 * 2**20


class CheckpointLayoutError(ValueError):
    """The checkpoint does not fit the model: a missing tensor, a shape or dtype mismatch, an unexplained layout."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint, known from the file header; ``offset``: its data's byte offset (None for ``.bin``)."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None


class CheckpointReader:
    """Lazy, slice-level access to every tensor of a local Hugging Face checkpoint (see the module docstring).

    ``bytes_read`` counts the bytes of every slice handed out (what the benchmark reports per rank).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = resolve_checkpoint_files(self.path)
        self.tensors: dict[str, SourceTensor] = {}
        self.bytes_read = 0
        self._handles: dict[Path, object] = {}
        for file in self.files:
            for source in self._index_file(file):
                if source.key in self.tensors:
                    raise CheckpointLayoutError(
                        f"Tensor {source.key!r} is stored twice: in {self.tensors[source.key].file.name} and {file.name}."
                    )
                self.tensors[source.key] = source

    def _index_file(self, file: Path) -> Iterator[SourceTensor]:
        if file.suffix == ".safetensors":
            # Checked there: regular file, flat entries, byte ranges that tile the data exactly with
            # numel * itemsize bytes each (as safe_open requires); only an unknown dtype is left.
            try:
                layout = read_safetensors_layout(file)
            except ValueError as exc:
                raise CheckpointLayoutError(str(exc)) from None
            for key, entry in layout.header.items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointLayoutError(f"{file}: tensor {key!r} has an invalid header entry {entry!r}.")
                offset = layout.data_start + entry["data_offsets"][0]
                yield SourceTensor(key, file, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]], offset)
        else:
            for key, tensor in self._bin(file).items():
                if isinstance(tensor, torch.Tensor):
                    yield SourceTensor(key, file, tuple(tensor.shape), tensor.dtype)

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory-mapped
                raise CheckpointLayoutError(
                    f"{file}: cannot memory-map this .bin file ({exc}); re-save it with torch.save or convert it to safetensors."
                ) from None
            except pickle.UnpicklingError:  # weights_only refused an object: never suggest weights_only=False here
                raise CheckpointLayoutError(
                    f"{file}: holds pickled objects besides tensors; refusing to unpickle it. Convert the weights to safetensors."
                ) from None
            if not isinstance(handle, dict):
                raise CheckpointLayoutError(f"{file}: expected a state dict, found {type(handle).__name__}.")
            self._handles[file] = handle
        return handle  # type: ignore[return-value]

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``key`` (or its ``index`` slice), reading only those bytes."""
        source = self.tensors[key]
        if source.file.suffix == ".safetensors":
            rows = _row_range(source.shape, index)
            if rows is not None:  # one contiguous byte range (counted in _readinto)
                out = torch.empty((rows[1] - rows[0], *source.shape[1:]) if source.shape else (), dtype=source.dtype)
                self._readinto(source, rows[0], out)
                return out
            from safetensors import safe_open  # a slice across inner dims (tensor parallel): strided reads

            with safe_open(str(source.file), framework="pt", device="cpu") as handle:
                tensor = handle.get_slice(key)[index]
        else:
            tensor = self._bin(source.file)[key]
            tensor = tensor[index] if index is not None else tensor
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read_into(self, key: str, index: tuple[slice, ...] | None, out: torch.Tensor) -> None:
        """Copy the ``index`` slice of ``key`` into ``out`` (same shape), with no full-size temporary.

        Rows of a safetensors tensor land in ``out`` directly when it is a contiguous host tensor of the
        file's dtype (no second copy, no extra page faults); otherwise they go through a reused buffer
        of at most ``CHUNK_BYTES`` (a dtype cast, a GPU destination).
        """
        source = self.tensors[key]
        rows = _row_range(source.shape, index) if source.offset is not None else None
        if rows is None or not source.shape:
            out.copy_(self.read(key, index))
            return
        start, stop = rows
        if out.device.type == "cpu" and out.dtype == source.dtype and out.is_contiguous():
            self._readinto(source, start, out)
            return
        row_bytes = max(1, math.prod(source.shape[1:]) * source.dtype.itemsize)
        step = max(1, CHUNK_BYTES // row_bytes)
        buffer = torch.empty((min(step, stop - start), *source.shape[1:]), dtype=source.dtype)
        for first in range(start, stop, step):
            piece = buffer[: min(step, stop - first)]
            self._readinto(source, first, piece)
            out[first - start : first - start + len(piece)].copy_(piece)

    def _readinto(self, source: SourceTensor, start_row: int, out: torch.Tensor) -> None:
        """Fill the contiguous host tensor ``out`` from the file, starting at row ``start_row``.

        Plain reads, not safetensors' memory map: a mapped file's touched pages stay in the process's
        resident memory until unmapped (a rank would peak at its shards plus the half it read).
        """
        if out.numel() == 0:
            return
        handle = self._handles.get(source.file)
        if handle is None:
            handle = self._handles[source.file] = open_regular(source.file, buffering=0)  # noqa: SIM115 - closed in close(); checked again on the descriptor
            if hasattr(os, "posix_fadvise"):  # forward reads: let the kernel read ahead generously
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        inner = math.prod(source.shape[1:]) if source.shape else 1
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        handle.seek(source.offset + start_row * inner * source.dtype.itemsize)  # type: ignore[attr-defined,operator]
        done = 0
        while done < len(view):
            n = handle.readinto(view[done:])  # type: ignore[attr-defined]
            if not n:
                raise CheckpointLayoutError(f"{source.file}: unexpected end of file while reading {source.key!r}.")
            done += n
        self.bytes_read += len(view)

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "close"):  # an open file; a .bin state dict needs nothing
                handle.close()  # type: ignore[union-attr]
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_range(shape: tuple[int, ...], index: tuple[slice, ...] | None) -> tuple[int, int] | None:
    """``(start, stop)`` when ``index`` selects whole rows of a row-major tensor (one byte range), else None."""
    if not shape:
        return (0, 1)
    if index is None:
        return (0, shape[0])
    if len(index) != len(shape) or any(s.step not in (None, 1) for s in index):
        return None
    for dim, piece in enumerate(index[1:], start=1):
        start, stop, _ = piece.indices(shape[dim])
        if (start, stop) != (0, shape[dim]):
            return None
    start, stop, _ = index[0].indices(shape[0])
    return (start, max(start, stop))


@dataclass
class TargetGroup:
    """Checkpoint tensors that make one or more model tensors: a plain rename or one ``WeightConverter``."""

    targets: list[str]  # model state-dict names this group produces
    sources: list[tuple[str, str]]  # (checkpoint key, source pattern) in transformers' natural key order
    transform: object | None = None  # a private copy of the transformers converter; None for a rename

    @property
    def is_rename(self) -> bool:
        return self.transform is None


@dataclass
class LoadPlan:
    """What to read for every model tensor, checked against the model before anything is allocated."""

    groups: list[TargetGroup]
    unused: list[str] = field(default_factory=list)  # checkpoint keys no model tensor needs

    def targets_stored_as(self, reader: CheckpointReader, dtype: torch.dtype) -> set[str]:
        """Model tensors whose checkpoint sources are all stored in ``dtype`` (e.g. fp32 router gates)."""
        return {
            target
            for group in self.groups
            if all(reader.tensors[key].dtype == dtype for key, _ in group.sources)
            for target in group.targets
        }


@dataclass(frozen=True)
class LoadReport:
    """What a load cost on this rank."""

    tensors: int
    bytes_read: int
    seconds: float


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint name -> parameter or persistent buffer; plus names that alias an earlier tensor (ties).

    The checkpoint name is the canonical name with a LoRA layer's ``base_layer`` component dropped: a
    model with adapters loads the un-adapted model's checkpoint (its adapters are not in it).
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: list[str] = []
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_adapter_name(name):
            continue
        key = base_checkpoint_name(canonical_name(name))
        if id(param) in seen:
            if seen[id(param)] != key:
                aliases.append(key)
            continue
        seen[id(param)] = key
        tensors[key] = param
    for module_name, module in model.named_modules(remove_duplicate=False):
        transient = non_persistent_buffer_names(module)
        for buffer_name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            if buffer_name in transient:
                continue
            key = base_checkpoint_name(canonical_name(f"{module_name}.{buffer_name}" if module_name else buffer_name))
            tensors.setdefault(key, buffer)
    return tensors, aliases


def _conversion_rules(model: nn.Module) -> tuple[list, list]:
    """transformers' renamings and converters for this model (fresh copies: matching has side effects)."""
    from lightning_automodel._compat.transformers import get_model_conversion_mapping
    from lightning_automodel._compat.transformers import WeightConverter, WeightRenaming

    rules = copy.deepcopy(get_model_conversion_mapping(model))
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    return renamings, converters


def _expanded_targets(first_target: str, transform: object) -> list[str]:
    patterns = list(getattr(transform, "target_patterns", []) or [])
    if len(patterns) <= 1:
        return [first_target]
    return [first_target.replace(patterns[0], pattern) for pattern in patterns]


def plan_checkpoint_load(model: nn.Module, reader: CheckpointReader, ignore_keys: Sequence[str] = ()) -> LoadPlan:
    """Map every checkpoint tensor to the model tensor it makes, the way ``from_pretrained`` does, and check it.

    Runs on the meta model (shapes only). Raises :class:`CheckpointLayoutError` naming the tensor and the
    file for a missing tensor, a shape or dtype mismatch, or checkpoint keys no rule maps to the model
    unless each of them matches one of the ``ignore_keys`` regular expressions (``re.fullmatch``).
    """
    from lightning_automodel._compat.transformers import dot_natural_key, rename_source_key

    tensors, aliases = _model_tensors(model)
    alias_set = set(aliases)
    renamings, converters = _conversion_rules(model)
    pattern_to_converter = {pattern: conv for conv in converters for pattern in conv.source_patterns}
    base_prefix = getattr(model, "base_model_prefix", None) or None
    known = dict.fromkeys(tensors)
    known.update(dict.fromkeys(alias_set))

    groups: dict[str, TargetGroup] = {}
    unused: list[str] = []
    for key in sorted(reader.tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, base_prefix, known)
        if target not in known and key in known:
            target, pattern = key, None
        if target not in known:
            unused.append(key)
            continue
        if target in alias_set and pattern is None:
            continue  # a tied head stored next to its embedding: the embedding is loaded, the head shares it
        group = groups.get(target)
        if group is None:
            transform = copy.deepcopy(pattern_to_converter[pattern]) if pattern is not None else None
            targets = _expanded_targets(target, transform) if transform is not None else [target]
            group = groups[target] = TargetGroup(targets=targets, sources=[], transform=transform)
        group.sources.append((key, pattern if pattern is not None else key))

    plan = LoadPlan(groups=list(groups.values()), unused=unused)
    _check_plan(plan, tensors, reader, model)
    _check_unused(plan.unused, reader, ignore_keys)
    return plan


def _check_unused(unused: list[str], reader: CheckpointReader, ignore_keys: Sequence[str]) -> None:
    """Checkpoint tensors the model does not take are an error unless the user named them.

    A checkpoint with two layers loaded into a one-layer config trains a different model than the one
    saved; ``from_pretrained`` only warns. Known extras (a vision tower the text model drops) are
    allowed by regular expression: ``ignore_checkpoint_keys: ['model\\.vision_tower\\..*']``.
    """
    try:
        patterns = [re.compile(p) for p in ignore_keys]
    except re.error as exc:
        raise CheckpointLayoutError(f"ignore_checkpoint_keys: {exc.pattern!r} is not a regular expression ({exc}).") from None
    refused = [key for key in unused if not any(p.fullmatch(key) for p in patterns)]
    if refused:
        raise CheckpointLayoutError(
            f"The checkpoint {reader.path} has {len(refused)} tensor(s) this model does not use: {_first_five(refused)} "
            f"(in {_where(reader, refused[:5])}). Is config.json the one it was saved with (e.g. num_hidden_layers)? "
            "To drop them knowingly, list them in model.ignore_checkpoint_keys (regular expressions)."
        )
    if unused:
        log.info("%d checkpoint tensors matched ignore_checkpoint_keys and are not loaded: %s", len(unused), ", ".join(unused[:10]))


def _first_five(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _where(reader: CheckpointReader, keys: Iterable[str]) -> str:
    files = sorted({reader.tensors[k].file.name for k in keys if k in reader.tensors})
    return ", ".join(files) if files else str(reader.path)


def _check_plan(plan: LoadPlan, tensors: dict[str, torch.Tensor], reader: CheckpointReader, model: nn.Module) -> None:
    produced: set[str] = set()
    for group in plan.groups:
        produced.update(group.targets)
        if group.is_rename:
            (key, _), target = group.sources[0], group.targets[0]
            _check_source(reader.tensors[key], target, tensors[target])
        else:
            _check_conversion(group, tensors, reader, model)
    # Persistent buffers the file lacks keep the values the model computed at build (from_pretrained
    # does the same); every parameter must come from the file.
    missing = [name for name, t in tensors.items() if name not in produced and isinstance(t, nn.Parameter)]
    if missing:
        hint = ""
        if plan.unused:
            extra = f"{_first_five(plan.unused)} (in {_where(reader, plan.unused[:5])})"
            hint = f" Checkpoint tensors no conversion rule maps to this model: {extra}."
        raise CheckpointLayoutError(
            f"The checkpoint {reader.path} has no tensor for {_first_five(missing)}.{hint} Is it a checkpoint of this model "
            f"({type(model).__name__})? A tied head needs `tie_word_embeddings: true` in config.json."
        )


def _check_source(source: SourceTensor, target: str, ref: torch.Tensor) -> None:
    shape = tuple(ref.shape)
    if source.shape != shape:
        raise CheckpointLayoutError(
            f"Checkpoint tensor {source.key!r} in {source.file.name} has shape {list(source.shape)}; "
            f"the model's {target} expects {list(shape)}. Is config.json the one this checkpoint was saved with?"
        )
    if source.dtype.is_floating_point != ref.dtype.is_floating_point:
        raise CheckpointLayoutError(
            f"Checkpoint tensor {source.key!r} in {source.file.name} is {source.dtype}; the model's {target} is "
            f"{ref.dtype}. Loading would reinterpret its values; the file is corrupt or belongs to another model."
        )


def _check_conversion(group: TargetGroup, tensors: dict[str, torch.Tensor], reader: CheckpointReader, model: nn.Module) -> None:
    """Run the converter on meta tensors: the output names and shapes must be the model's."""
    for key, _ in group.sources:
        source = reader.tensors[key]
        if not source.dtype.is_floating_point and tensors[group.targets[0]].dtype.is_floating_point:
            raise CheckpointLayoutError(
                f"Checkpoint tensor {key!r} in {source.file.name} is {source.dtype}; the model's {group.targets[0]} "
                "is floating point. The file is corrupt or belongs to another model."
            )
    keys = [k for k, _ in group.sources]
    named = f"{keys[:4]} (in {_where(reader, keys)})"
    try:
        outputs = _convert(group, model, lambda key: torch.empty(reader.tensors[key].shape, dtype=reader.tensors[key].dtype, device="meta"))
    except Exception as exc:  # noqa: BLE001 - surfaced with the tensor and file named
        raise CheckpointLayoutError(f"Converting {named} into {group.targets[0]} failed: {exc}") from None
    for name in group.targets:
        value = outputs.get(name)
        expected = tuple(tensors[name].shape)
        if value is None or tuple(value.shape) != expected:
            got = "nothing" if value is None else f"shape {list(value.shape)}"
            raise CheckpointLayoutError(f"Checkpoint tensors {named} convert to {got} for {name}; the model expects {list(expected)}.")


def _convert(group: TargetGroup, model: nn.Module, read: object, keep: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Run the group's transformers converter on tensors produced by ``read(key)``.

    ``keep`` (indices into each source pattern's list) restricts the sources that are read, for
    converters whose first operation stacks a module list on dim 0 (the rank's experts only).
    """
    transform = copy.deepcopy(group.transform)
    counts: dict[str, int] = {}
    kept = set(keep) if keep is not None else None
    for key, pattern in group.sources:
        index = counts.get(pattern, 0)
        counts[pattern] = index + 1
        if kept is not None and index not in kept:
            continue
        transform.add_tensor(group.targets[0], key, pattern, (lambda k=key: read(k)))  # type: ignore[attr-defined]
    outputs = transform.convert(group.targets[0], model=model, config=getattr(model, "config", None))  # type: ignore[attr-defined]
    return {name: (value[0] if isinstance(value, list) else value) for name, value in outputs.items()}


def local_index(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The global index of this rank's local piece of ``tensor`` (everything for a plain tensor).

    The package's one use of a private torch API: DTensor has no public "where is my shard" query in
    torch 2.13 (transformers' shard-on-read uses the same function). Guarded by the 2-rank bit-exactness
    tests (``tests/scripts/load_layouts.py``), which fail if it ever answers differently.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tuple(slice(0, size) for size in tensor.shape)
    shape, offset = local_shape_and_offset(tensor)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def copy_local_part(dest: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full-size ``full`` into ``dest`` (a DTensor's local shard, or all of it)."""
    local = local_tensor(dest)
    if local.numel():
        local.copy_(full[local_index(dest)])


def _stacks_experts_first(group: TargetGroup, tensors: dict[str, torch.Tensor]) -> bool:
    """A converter whose first op stacks a module list on dim 0 and whose later ops leave dim 0 alone.

    Then a dim-0 slice of the output is the same op on the sources it covers, and a rank reads only
    the experts it owns. Any other converter reads its whole group.
    """
    from torch.distributed.tensor import DTensor

    from lightning_automodel._compat.transformers import MergeModulelist

    operations = list(getattr(group.transform, "operations", []) or [])
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return False
    if any(getattr(op, "dim", 1) == 0 for op in operations[1:]):
        return False
    for name in group.targets:  # split on dim 0 only (FSDP2's Shard(0)), never on another dim
        if isinstance(tensors[name], DTensor) and any(p.is_shard() and p.dim != 0 for p in tensors[name].placements):  # type: ignore[attr-defined]
            return False
    rows = {tensors[name].shape[0] for name in group.targets}
    per_pattern = Counter(pattern for _, pattern in group.sources)
    return len(rows) == 1 and all(count == next(iter(rows)) for count in per_pattern.values())


@torch.no_grad()
def load_checkpoint_into(model: nn.Module, reader: CheckpointReader, plan: LoadPlan | None = None) -> LoadReport:
    """Copy each rank's part of the checkpoint into the model's (materialized, possibly sharded) tensors.

    Parameters keep their identity (a tied head stays tied, FSDP2 keeps its own storage). Values are
    cast to each parameter's dtype on copy. No collective: every rank works alone.
    """
    start = time.perf_counter()
    before = reader.bytes_read
    plan = plan if plan is not None else plan_checkpoint_load(model, reader)
    tensors, _ = _model_tensors(model)
    count = 0
    # In file order: each rank then walks every file front to back, which is what readahead rewards
    # (with a cold page cache, key order costs a seek per tensor).
    def position(group: TargetGroup) -> tuple[str, int]:
        source = reader.tensors[group.sources[0][0]]
        return (str(source.file), source.offset or 0)

    for group in sorted(plan.groups, key=position):
        count += len(group.targets)
        first = tensors[group.targets[0]]
        if group.is_rename:
            local = local_tensor(first)
            if local.numel():
                reader.read_into(group.sources[0][0], local_index(first), local)
        elif _stacks_experts_first(group, tensors):
            rows = local_index(first)[0] if first.ndim else slice(0, 0)
            if rows.stop > rows.start:
                outputs = _convert(group, model, reader.read, keep=range(rows.start, rows.stop))
                for name in group.targets:
                    local_tensor(tensors[name]).copy_(outputs[name])
                del outputs  # not held by this frame after the loop (a pinned frame keeps its last locals)
        else:
            outputs = _convert(group, model, reader.read)
            for name in group.targets:
                copy_local_part(tensors[name], outputs[name])
            del outputs
    return LoadReport(tensors=count, bytes_read=reader.bytes_read - before, seconds=time.perf_counter() - start)
