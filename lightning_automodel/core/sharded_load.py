"""Streaming a Hugging Face checkpoint into a (sharded) model: each rank reads only its own bytes.

Not ``from_pretrained`` (every rank would hold the whole checkpoint) nor DCP's reader (transformers 5 renames and
merges on load): names come from transformers' conversion rules, the slice from the DTensor placement, the bytes
from ``readinto`` (not a memory map: mapped pages stay resident). The plan is checked on meta on every rank alike.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_automodel._compat.torch import non_persistent_buffer_names
from lightning_automodel.core.distributed import copy_local_part, local_index, local_tensor
from lightning_automodel.core.hf_weight_files import SourceTensor, checkpoint_tensors, load_bin, open_regular, resolve_checkpoint_files
from lightning_automodel.core.naming import base_checkpoint_name, canonical_name, is_adapter_name

log = logging.getLogger(__name__)

# Largest host buffer a cast or a device copy goes through (rows are read in pieces of this size).
CHUNK_BYTES = 32 * 2**20


class CheckpointLayoutError(ValueError):
    """The checkpoint does not fit the model: a missing tensor, a shape or dtype mismatch, an unexplained layout."""


class CheckpointReader:
    """Slice-level access to every tensor of a local Hugging Face checkpoint; ``bytes_read`` counts what it handed out."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = resolve_checkpoint_files(self.path)
        self.bytes_read = 0
        self._handles: dict[Path, object] = {}
        try:
            self.tensors = checkpoint_tensors(self.files)
        except ValueError as exc:
            raise CheckpointLayoutError(str(exc)) from None

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._handles:
            try:
                self._handles[file] = load_bin(file, mmap=True)
            except ValueError as exc:
                raise CheckpointLayoutError(str(exc)) from None
        return self._handles[file]  # type: ignore[return-value]

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``key`` (or its ``index`` slice), reading only those bytes."""
        source = self.tensors[key]
        if source.offset is not None:
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
        """Read the ``index`` slice of ``key`` into ``out``; a cast or a GPU goes through a ``CHUNK_BYTES`` buffer."""
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
        """Fill the contiguous host tensor ``out`` from the file, starting at row ``start_row``."""
        if out.numel() == 0:
            return
        handle = self._handles.get(source.file)
        if handle is None:
            handle = self._handles[source.file] = open_regular(source.file, buffering=0)  # noqa: SIM115 - closed in close()
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
    if any(piece.indices(size)[:2] != (0, size) for piece, size in zip(index[1:], shape[1:])):
        return None
    start, stop, _ = index[0].indices(shape[0])
    return (start, max(start, stop))


@dataclass
class TargetGroup:
    """Checkpoint tensors that make one or more model tensors: a plain rename or one ``WeightConverter``."""

    targets: list[str]  # model state-dict names this group produces
    sources: list[tuple[str, str]]  # (checkpoint key, source pattern) in transformers' natural key order
    transform: object | None = None  # a private copy of the transformers converter; None for a rename


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


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, None]]:
    """Checkpoint name (without LoRA's ``base_layer``) -> parameter or persistent buffer; names aliasing one (ties)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, None] = {}  # ordered: every rank must plan alike
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if is_adapter_name(name):
            continue
        key = base_checkpoint_name(canonical_name(name))
        if id(param) in seen:
            if seen[id(param)] != key:
                aliases[key] = None
            continue
        seen[id(param)] = key
        tensors[key] = param
    for module_name, module in model.named_modules(remove_duplicate=False):
        transient = non_persistent_buffer_names(module)
        for buffer_name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            if buffer_name not in transient:
                key = base_checkpoint_name(canonical_name(f"{module_name}.{buffer_name}" if module_name else buffer_name))
                tensors.setdefault(key, buffer)
    return tensors, aliases


def plan_checkpoint_load(model: nn.Module, reader: CheckpointReader, ignore_keys: Sequence[str] = ()) -> LoadPlan:
    """Map checkpoint tensors to model tensors as ``from_pretrained``, checked on meta; unused need ``ignore_keys``."""
    from lightning_automodel._compat.transformers import (
        WeightConverter, WeightRenaming, dot_natural_key, get_model_conversion_mapping, rename_source_key,
    )

    tensors, aliases = _model_tensors(model)
    rules = copy.deepcopy(get_model_conversion_mapping(model))  # fresh copies: matching has side effects
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    pattern_to_converter = {pattern: conv for conv in converters for pattern in conv.source_patterns}
    base_prefix = getattr(model, "base_model_prefix", None) or None
    known = dict.fromkeys([*tensors, *aliases])
    groups: dict[str, TargetGroup] = {}
    unused: list[str] = []
    for key in sorted(reader.tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, base_prefix, known)
        if target not in known and key in known:
            target, pattern = key, None
        if target not in known:
            unused.append(key)
            continue
        if target in aliases and pattern is None:
            continue  # a tied head stored next to its embedding: the embedding is loaded, the head shares it
        if target not in groups:
            transform = copy.deepcopy(pattern_to_converter[pattern]) if pattern is not None else None
            targets = list(getattr(transform, "target_patterns", None) or [])
            targets = [target.replace(targets[0], t) for t in targets] if len(targets) > 1 else [target]
            groups[target] = TargetGroup(targets=targets, sources=[], transform=transform)
        groups[target].sources.append((key, pattern if pattern is not None else key))
    plan = LoadPlan(groups=list(groups.values()), unused=unused)
    _check_plan(plan, tensors, reader, model)
    _check_unused(plan.unused, reader, ignore_keys)
    return plan


def _check_unused(unused: list[str], reader: CheckpointReader, ignore_keys: Sequence[str]) -> None:
    """Unused tensors are an error unless named (``from_pretrained`` only warns: 2 layers into 1 is another model)."""
    try:
        patterns = [re.compile(p) for p in ignore_keys]
    except re.error as exc:
        raise CheckpointLayoutError(f"ignore_checkpoint_keys: {exc.pattern!r} is not a regular expression ({exc}).") from None
    refused = [key for key in unused if not any(p.fullmatch(key) for p in patterns)]
    if refused:
        raise CheckpointLayoutError(
            f"The checkpoint {reader.path} has {len(refused)} tensor(s) this model does not use: {_named(reader, refused)}. "
            "Is config.json the one it was saved with (e.g. num_hidden_layers)? "
            "To drop them knowingly, list them in model.ignore_checkpoint_keys (regular expressions)."
        )
    if unused:
        log.info("%d checkpoint tensors matched ignore_checkpoint_keys and are not loaded: %s", len(unused), ", ".join(unused[:10]))


def _first_five(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _named(reader: CheckpointReader, keys: list[str]) -> str:
    """The first five keys and the files that hold them."""
    files = sorted({reader.tensors[k].file.name for k in keys[:5] if k in reader.tensors})
    return f"{_first_five(keys)} (in {', '.join(files) if files else reader.path})"


def _check_plan(plan: LoadPlan, tensors: dict[str, torch.Tensor], reader: CheckpointReader, model: nn.Module) -> None:
    produced: set[str] = set()
    for group in plan.groups:
        produced.update(group.targets)
        target = group.targets[0]
        ref = tensors[target]
        for key, _ in group.sources:
            source = reader.tensors[key]
            if group.transform is None and source.shape != tuple(ref.shape):
                raise CheckpointLayoutError(
                    f"Checkpoint tensor {key!r} in {source.file.name} has shape {list(source.shape)}; the model's {target} "
                    f"expects {list(ref.shape)}. Is config.json the one this checkpoint was saved with?"
                )
            if source.dtype.is_floating_point != ref.dtype.is_floating_point:
                raise CheckpointLayoutError(
                    f"Checkpoint tensor {key!r} in {source.file.name} is {source.dtype}; the model's {target} is {ref.dtype}. "
                    "Loading would reinterpret its values; the file is corrupt or belongs to another model."
                )
        if group.transform is not None:
            _check_conversion(group, tensors, reader, model)
    # Persistent buffers the file lacks keep the values computed at build (as from_pretrained); parameters may not.
    missing = [name for name, t in tensors.items() if name not in produced and isinstance(t, nn.Parameter)]
    if missing:
        hint = f" Checkpoint tensors no conversion rule maps to this model: {_named(reader, plan.unused)}." if plan.unused else ""
        raise CheckpointLayoutError(
            f"The checkpoint {reader.path} has no tensor for {_first_five(missing)}.{hint} Is it a checkpoint of this model "
            f"({type(model).__name__})? A tied head needs `tie_word_embeddings: true` in config.json."
        )


def _check_conversion(group: TargetGroup, tensors: dict[str, torch.Tensor], reader: CheckpointReader, model: nn.Module) -> None:
    """Run the converter on meta tensors: the output names and shapes must be the model's."""
    named = _named(reader, [k for k, _ in group.sources])
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
    """Run the group's transformers converter on ``read(key)`` of its sources (with ``keep``: those indices only)."""
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


def _stacks_experts_first(group: TargetGroup, tensors: dict[str, torch.Tensor]) -> bool:
    """First op stacks on dim 0, later ops leave dim 0 alone: a rank's dim-0 slice needs only its experts' sources."""
    from lightning_automodel._compat.transformers import MergeModulelist

    operations = list(getattr(group.transform, "operations", []) or [])
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return False
    if any(getattr(op, "dim", 1) == 0 for op in operations[1:]):
        return False
    for name in group.targets:  # split on dim 0 only (FSDP2's Shard(0)), never on another dim
        if any(p.is_shard() and p.dim != 0 for p in getattr(tensors[name], "placements", ())):
            return False
    rows = {tensors[name].shape[0] for name in group.targets}
    per_pattern = Counter(pattern for _, pattern in group.sources)
    return len(rows) == 1 and all(count == next(iter(rows)) for count in per_pattern.values())


@torch.no_grad()
def load_checkpoint_into(model: nn.Module, reader: CheckpointReader, plan: LoadPlan | None = None) -> LoadReport:
    """Copy each rank's part of the checkpoint into the materialized tensors in place (ties stay); no collective."""
    start = time.perf_counter()
    before = reader.bytes_read
    plan = plan if plan is not None else plan_checkpoint_load(model, reader)
    tensors, _ = _model_tensors(model)
    count = 0
    # File order: readahead rewards front-to-back reads (with a cold page cache, key order seeks per tensor).
    def position(group: TargetGroup) -> tuple[str, int]:
        source = reader.tensors[group.sources[0][0]]
        return (str(source.file), source.offset or 0)

    for group in sorted(plan.groups, key=position):
        count += len(group.targets)
        first = tensors[group.targets[0]]
        if group.transform is None:
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
