"""The Hugging Face directory of ``export`` and ``HuggingFaceCheckpoint``; per rank: one output shard plus one group."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.atomic_files import fsync_path, rename_no_replace, replace_directory
from lightning_automodel.core.distributed import all_reduce_sum_, local_tensor
from lightning_automodel.core.hf_weight_files import SAFETENSORS_DTYPES
from lightning_automodel.core.hub_layout import ConversionGroup, HubLayout, iter_outputs, plan_hub_layout
from lightning_automodel.core.lora_merge import LoraMerge
from lightning_automodel.core.naming import canonical_name
from lightning_automodel.core.tied_head import (
    get_input_embeddings_weight_and_name,
    get_lm_head_weight_and_name,
    is_tied_word_embeddings,
    same_tensor_storage,
)

log = logging.getLogger(__name__)

#: written by every export; ``--overwrite`` replaces only a directory that holds it (and no file it did not list)
EXPORT_MARKER = ".lightning-automodel-export.json"
#: inside every staging directory while it is written: who made it (host, pid); removed when published
STAGING_MARKER = ".lightning-automodel-staging.json"
_STAGING_INFIX = ".tmp-"
DIR_MODE, FILE_MODE = 0o755, 0o644
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
#: safetensors' names of the dtypes a hub file holds (the reader's one table, reversed)
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class PublishRefused(ValueError):
    """Publishing would replace or delete something this run did not write; the message names it."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, option: str = "--max_shard_size") -> int:
    """``5GB``, ``2TiB``, ``768MiB``, ``1000`` -> bytes; anything else is a one-line ValueError naming ``option``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    factor = _SIZE_UNITS.get(match.group(2).upper()) if match else None
    if match is None or factor is None or int(float(match.group(1)) * factor) <= 0:
        raise ValueError(f"{option}: expected a positive size such as 1TB, 5GB, 2TiB or 768MiB; got {text!r}")
    return int(float(match.group(1)) * factor)


def shard_file_names(count: int) -> list[str]:
    """``save_pretrained``'s names: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _output_dtype(dtype: torch.dtype, out: torch.dtype | None) -> torch.dtype:
    return out if (out is not None and dtype.is_floating_point) else dtype


def plan_hub_write(
    meta_model: nn.Module, config: Any, specs: Specs, *, dtype: torch.dtype | None, heads_equal: Callable[[str, str], bool],
    merge: LoraMerge | None = None,
) -> HubLayout:
    """The hub layout of ``specs`` (name -> (shape, dtype)) in ``dtype``, merged with ``merge``; ``config`` to match.
    The head is omitted only when truly tied (configured tied, absent or equal, not merged), else config is untied."""
    names = merge.names() if merge is not None else {n: n for n in specs}
    planned = {n: (tuple(specs[s][0]), _output_dtype(specs[s][1], dtype)) for n, s in names.items()}
    _, head = get_lm_head_weight_and_name(meta_model)
    _, embed = get_input_embeddings_weight_and_name(meta_model)
    omit: set[str] = set()
    if head is not None and embed is not None and is_tied_word_embeddings(meta_model):
        merged = merge is not None and (merge.is_merged(head) or merge.is_merged(embed))
        if head not in planned or (embed in planned and not merged and heads_equal(names[head], names[embed])):
            omit = {head}
        else:
            log.warning("%s differs from the embedding: writing it and an untied config.", head)
    if not omit:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for part in (config, text_config):
            if getattr(part, "tie_word_embeddings", False):
                part.tie_word_embeddings = False
    layout = plan_hub_layout(meta_model, planned, omit=omit, inputs=merge.inputs if merge is not None else None)
    floats = [t.dtype for g in layout.groups for t in g.outputs if t.dtype.is_floating_point]
    if floats:
        config.dtype = max(set(floats), key=floats.count)
    return layout


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under canonical names (activation-checkpoint wrappers stripped)."""
    return {canonical_name(name): tensor for name, tensor in model.state_dict().items()}


def heads_equal_on_all_ranks(state: Mapping[str, torch.Tensor], head: str, embed: str, *, device: torch.device | None = None) -> bool:
    """Whether two live tensors are one alias or equal on every rank (a collective unless aliased)."""
    a, b = state[head], state[embed]
    if same_tensor_storage(a, b):
        return True
    differs = torch.tensor([0.0 if (a.shape == b.shape and torch.equal(local_tensor(a), local_tensor(b))) else 1.0])
    all_reduce_sum_(differs, device=device)
    return differs.item() == 0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor); an offloaded shard goes to the mesh's device: NCCL."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach().cpu()
    mesh_device = torch.device(tensor.device_mesh.device_type)
    if tensor.device.type != mesh_device.type:
        local = tensor.to_local().to(mesh_device.type)
        tensor = DTensor.from_local(local, tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor().detach().cpu()


def write_hub_files(
    staging: Path, layout_model: nn.Module, layout: HubLayout, config: Any, *, max_shard_bytes: int, dtype: torch.dtype | None,
    tokenizer_dir: Path | None = None, state: Mapping[str, torch.Tensor] | None = None,
    read: Callable[[list[str]], Mapping[str, torch.Tensor]] | None = None, merge: LoraMerge | None = None,
    rank: int = 0, world_size: int = 1, device: torch.device | None = None,
) -> list[str]:
    """Write ``layout``'s safetensors files, then (rank 0) the index and config; returns this rank's files. Tensors come
    from ``read`` (a checkpoint) or ``state`` (a live model: a collective); a rank's failure is raised on every rank."""
    from concurrent.futures import Future, ThreadPoolExecutor

    def fetch(groups: Sequence[ConversionGroup], owner: int) -> Mapping[str, torch.Tensor]:
        """The groups' fetched tensors on the CPU of ``owner`` (an empty dict elsewhere)."""
        if read is not None:
            return read(list(dict.fromkeys(name for group in groups for name in group.fetch_names)))
        out = {}
        for group in groups:
            for name in group.fetch_names:
                # a LoRA group travels in its own dtypes: the merge runs on what trained, its result is cast afterwards
                tensor = gather_to_owner(state[name], owner=owner, rank=rank, dtype=None if group.inputs else dtype)
                if tensor is not None:
                    out[name] = tensor
        return out

    shards = layout.shards(max_shard_bytes)
    names = shard_file_names(len(shards))
    direct = [state is not None and all(_rows_in_place(g, state) for g in shard) for shard in shards]
    written: list[str] = []
    error: BaseException | None = None
    # Files of renamed tensors only: the owner lays each out, every rank writes its own rows (no tensor travels).
    for index, shard in enumerate(shards):
        if direct[index] and index % world_size == rank:
            try:
                _create_in_place(staging / names[index], shard)
                written.append(names[index])
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = error or exc
    _agree_on_success(error, rank, world_size, device)
    pending: Future[None] | None = None
    flushes: list[Future[None]] = []
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-shard-writer") as writer,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-shard-fsync") as flusher):

        def write_then_flush(index: int) -> None:
            # This rank's rows of one file, then its fsync in the other thread: the disk writes back this
            # file while the next one is filled (each rank flushes its own writes: NFS needs that).
            _write_rows_in_place(staging / names[index], shards[index], state, owner=index % world_size, rank=rank)
            flushes.append(flusher.submit(fsync_path, staging / names[index]))

        # Each rank starts at another file: two processes writing one file at a time contend for it (2.5x slower here).
        order = sorted((i for i in range(len(shards)) if direct[i]), key=lambda i: (i - rank) % len(shards))
        in_place = [writer.submit(write_then_flush, i) for i in order]
        for index, shard in enumerate(shards):
            owner = index % world_size
            if direct[index]:
                continue
            if owner != rank:
                fetch(shard, owner)  # take part in the gathers; receive nothing
                continue
            if pending is not None:  # one shard in memory: the previous one is on disk first
                error = error or pending.exception()
                pending = None
            fetched: set[int] = set()

            def fetch_owned(groups: Sequence[ConversionGroup], owner: int = owner, fetched: set[int] = fetched) -> Mapping:
                tensors = fetch(groups, owner)
                fetched.update(id(g) for g in groups)
                return tensors

            try:
                if error is not None:
                    raise error  # only take part in the gathers from now on
                outputs = assemble_shard(shard, layout_model, fetch_owned, dtype=dtype, merge=merge)
                pending = writer.submit(save_shard, staging / names[index], outputs)
                del outputs
                written.append(names[index])
            except Exception as exc:  # noqa: BLE001 - reported on every rank after the walk
                error = error or exc
                if world_size > 1:
                    fetch([g for g in shard if id(g) not in fetched], owner)
        for job in [*in_place, *([pending] if pending is not None else [])]:
            error = error or job.exception()
        for job in flushes:  # complete: every write job (which submits its flush) is done
            error = error or job.exception()
    if rank == 0 and error is None:
        try:
            if len(shards) > 1:
                write_index(staging, shards)
            write_config_files(staging, config, tokenizer_dir=tokenizer_dir)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
    _agree_on_success(error, rank, world_size, device)
    return written


def _agree_on_success(error: BaseException | None, rank: int, world_size: int, device: torch.device | None) -> None:
    """Raise on every rank when any rank failed (the failing rank re-raises its own error)."""
    failed = torch.zeros(world_size)
    failed[rank] = float(error is not None)
    if world_size > 1:
        all_reduce_sum_(failed, device=device)
    if error is not None:
        raise error
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(f"HuggingFaceCheckpoint: rank(s) {ranks} failed writing their files; their logs have the error.")


def gather_to_owner(tensor: torch.Tensor, *, owner: int, rank: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The whole ``tensor`` in the output ``dtype`` on the CPU of rank ``owner``, ``None`` elsewhere. A dim-0 shard is
    gathered to the owner only, cast before it travels, on the mesh's device (NCCL has no CPU path)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    out_dtype = _output_dtype(tensor.dtype, dtype)
    if not isinstance(tensor, DTensor):
        return tensor.detach().to("cpu", out_dtype) if rank == owner else None
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or owner not in mesh.mesh.flatten().tolist():
        full = full_tensor(tensor)
        return full.to(out_dtype) if rank == owner else None
    group = mesh.get_group()
    size = dist.get_world_size(group)
    rows = tensor.shape[0]
    chunk = -(-rows // size) if rows else 0
    local = tensor.to_local().detach()
    device = torch.device(mesh.device_type)
    sent = torch.zeros((chunk, *tensor.shape[1:]), dtype=out_dtype, device=device)
    sent[: local.shape[0]].copy_(local)  # FSDP2's last shards are shorter (or empty): padded to one chunk
    if rank != owner:
        dist.gather(sent, None, dst=owner, group=group)
        return None
    received = torch.empty((chunk * size, *tensor.shape[1:]), dtype=out_dtype, device=device)
    dist.gather(sent, list(received.chunk(size)) if chunk else [received[:0]] * size, dst=owner, group=group)
    return received[:rows].cpu()


def _rows_in_place(group: ConversionGroup, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether each rank can write its rows of ``group`` straight into the file (whole, or a 1-D mesh dim-0 shard)."""
    from torch.distributed.tensor import DTensor, Shard

    if group.inputs or not group.renamed or group.outputs[0].dtype not in _SAFETENSORS_DTYPES:
        return False  # a transformed group (a LoRA merge) is computed on the owner, never written in place
    tensor = state[group.sources[0]]
    if tuple(tensor.shape) != group.outputs[0].shape:
        return False
    return not isinstance(tensor, DTensor) or (tensor.device_mesh.ndim == 1 and tuple(tensor.placements) == (Shard(0),))


def _in_place_offsets(shard: Sequence[ConversionGroup]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of ``shard``'s file and each source's byte offset in the file (the same on every rank)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets = {}
    begin = 0
    for group in shard:
        out = group.outputs[0]
        entries[out.name] = {"dtype": _SAFETENSORS_DTYPES[out.dtype], "shape": list(out.shape), "data_offsets": [begin, begin + out.nbytes]}
        offsets[group.sources[0]] = begin
        begin += out.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    prefix = len(header).to_bytes(8, "little") + header
    return prefix, {name: len(prefix) + offset for name, offset in offsets.items()}


def _create_in_place(path: Path, shard: Sequence[ConversionGroup]) -> None:
    """Write the header of ``shard``'s file and size it; the ranks fill the data (:func:`_write_rows_in_place`)."""
    prefix, _ = _in_place_offsets(shard)
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + sum(g.outputs[0].nbytes for g in shard))
    os.chmod(path, FILE_MODE)


def _write_rows_in_place(path: Path, shard: Sequence[ConversionGroup], state: Mapping[str, torch.Tensor], *, owner: int, rank: int) -> None:
    """Write this rank's rows of ``shard``'s tensors at their offsets in ``path`` (a whole tensor: the owner only)."""
    from torch.distributed.tensor import DTensor

    from lightning_automodel.core.distributed import local_index

    _, offsets = _in_place_offsets(shard)
    fd = os.open(path, os.O_WRONLY)
    try:
        for group in shard:
            name, out = group.sources[0], group.outputs[0]
            tensor = state[name]
            if isinstance(tensor, DTensor):
                local, first_row = tensor.to_local(), local_index(tensor)[0].start or 0
            elif rank == owner:
                local, first_row = tensor, 0
            else:
                continue
            if not local.numel():
                continue
            row_bytes = out.nbytes // out.shape[0] if out.shape else out.nbytes
            data = local.detach().to("cpu", out.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            position = offsets[name] + first_row * row_bytes
            view = memoryview(data)
            while view:  # pwrite may write less than asked
                done = os.pwrite(fd, view, position)
                view, position = view[done:], position + done
    finally:
        os.close(fd)


def assemble_shard(
    groups: Sequence[ConversionGroup], model: nn.Module, fetch: Callable[[Sequence[ConversionGroup]], Mapping[str, torch.Tensor]], *,
    dtype: torch.dtype | None, merge: LoraMerge | None = None, group_batch_bytes: int = 256 * 2**20,
) -> dict[str, torch.Tensor]:
    """The hub tensors of one output file: its groups fetched a few at a time, (merged,) reverted and cast."""
    outputs: dict[str, torch.Tensor] = {}
    batch: list[ConversionGroup] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        sources = fetch(batch)
        for group in batch:
            tensors = ({name: sources[name] for name in group.sources} if merge is None
                       else merge.merge(group.sources, {name: sources[name] for name in group.fetch_names}))
            for name, tensor in iter_outputs(model, group, tensors):
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensor = tensor.detach().contiguous()
                # clone a view sharing storage with another output (e.g. unbound experts): safetensors refuses shared storage
                outputs[name] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        batch, batch_bytes = [], 0

    for group in groups:
        if batch and batch_bytes + group.nbytes > group_batch_bytes:
            flush()
        batch.append(group)
        batch_bytes += group.nbytes
    flush()
    return outputs


def save_shard(path: Path, outputs: Mapping[str, torch.Tensor]) -> None:
    """Write one safetensors file (``save_pretrained``'s metadata), 0644, fsynced."""
    from safetensors.torch import save_file

    save_file(dict(outputs), str(path), metadata={"format": "pt"})
    os.chmod(path, FILE_MODE)
    fsync_path(path)


def write_index(out: Path, shards: Sequence[Sequence[ConversionGroup]]) -> None:
    """``model.safetensors.index.json`` (``save_pretrained``'s format) for the written dtypes."""
    names = shard_file_names(len(shards))
    weight_map = {t.name: names[i] for i, shard in enumerate(shards) for g in shard for t in g.outputs}
    total = sum(g.nbytes for shard in shards for g in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def regular_file_inside(directory: Path, name: str) -> Path | None:
    """``directory/name`` if a regular file (no symlink) inside it, else ``None``: copy nothing from elsewhere."""
    path = directory / name
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or path.resolve().parent != directory.resolve():
        if stat.S_ISLNK(info.st_mode) or stat.S_ISREG(info.st_mode):
            log.warning("Not copying %s: it is a symlink or lies outside %s.", path, directory)
        return None
    return path


def write_config_files(out: Path, config: Any, *, tokenizer_dir: Path | None) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer files (:func:`regular_file_inside` of ``tokenizer_dir``), 0644."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    source_dir = tokenizer_dir if tokenizer_dir is not None and tokenizer_dir.is_dir() else None
    generation_source = regular_file_inside(source_dir, "generation_config.json") if source_dir is not None else None
    if generation_source is not None:
        shutil.copyfile(generation_source, out / "generation_config.json", follow_symlinks=False)
    else:
        generation = GenerationConfig.from_model_config(config)
        if generation.to_diff_dict():  # save_pretrained writes one only when it holds something
            generation.save_pretrained(out)
    for name in TOKENIZER_FILES if source_dir is not None else ():
        source = regular_file_inside(source_dir, name)
        if source is not None:
            shutil.copyfile(source, out / name, follow_symlinks=False)
    for file in out.iterdir():
        if file.is_file():
            os.chmod(file, FILE_MODE)
            fsync_path(file)


def write_adapter_directory(out: Path, config: Any, adapters: Mapping[str, torch.Tensor], base_model: str | None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors``: what ``PeftModel.from_pretrained(base, DIR)`` loads."""
    from lightning_automodel.core.lora import peft_adapter_files

    data, tensors = peft_adapter_files(config, adapters, base_model)
    write_text(out / "adapter_config.json", json.dumps(data, indent=2) + "\n")
    save_shard(out / "adapter_model.safetensors", tensors)


def staging_directory(out: Path) -> Path:
    """A fresh directory beside ``out`` (publishing is one rename), 0755, holding :data:`STAGING_MARKER`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_INFIX}", dir=out.parent))
    os.chmod(staging, DIR_MODE)
    signature = {"tool": "lightning-automodel", "host": socket.gethostname(), "pid": os.getpid(), "target": out.name}
    write_text(staging / STAGING_MARKER, json.dumps(signature) + "\n")
    return staging


def _is_stale_staging(entry: Path) -> bool:
    """A staging directory this package made (never through a symlink) whose process is gone from this host."""
    marker = entry / STAGING_MARKER
    if entry.is_symlink() or not entry.is_dir() or _STAGING_INFIX not in entry.name or marker.is_symlink() or not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("tool") != "lightning-automodel" or not isinstance(data.get("pid"), int):
        return False
    if not entry.name.startswith(f".{data.get('target')}{_STAGING_INFIX}") or data.get("host") != socket.gethostname():
        return False  # another target's name, or another host's process (assumed alive)
    try:
        os.kill(data["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, another user's process
    return False


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging directories of killed saves in ``directory``; anything else stays."""
    removed = [entry for entry in (directory.iterdir() if directory.is_dir() else ()) if _is_stale_staging(entry)]
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    if removed:
        log.info("Removed %d staging director(y/ies) left by killed saves in %s.", len(removed), directory)
    return removed


def _files_under(root: Path) -> set[str]:
    found = set()
    for current, dirs, files in os.walk(root):
        for name in [*files, *(d for d in dirs if (Path(current) / d).is_symlink())]:
            found.add(str((Path(current) / name).relative_to(root)))
    return found


def check_replaceable(out: Path) -> None:
    """Refuse (:class:`PublishRefused`) to replace ``out`` unless a previous export holding only its marker's files."""
    marker = out / EXPORT_MARKER
    if out.is_symlink() or not out.is_dir() or marker.is_symlink() or not marker.is_file():
        raise PublishRefused(f"{out} is not a previous export (no {EXPORT_MARKER}); move it or choose another directory.")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, list):
        raise PublishRefused(f"{out} does not list the files its export wrote (an older version wrote it); remove it yourself to replace it.")
    extra = sorted(_files_under(out) - set(recorded) - {EXPORT_MARKER, STAGING_MARKER})
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise PublishRefused(f"{out} holds files its export did not write ({', '.join(extra[:5])}{more}); move them away to replace it.")


def publish_directory(staging: Path, out: Path, *, replace: bool = False) -> None:
    """Move ``staging`` to ``out`` in one step, never a silent replacement: an existing ``out`` is refused (but an empty
    directory) or, with ``replace``, must pass :func:`check_replaceable` (another export may have got there first)."""
    fsync_path(staging)
    if replace and (out.exists() or out.is_symlink()):
        check_replaceable(out)
        replace_directory(staging, out)
    else:
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            try:
                out.rmdir()  # an empty directory made for the output: only an empty one can be removed
            except OSError:
                pass
        try:
            rename_no_replace(staging, out)
        except FileExistsError:
            raise PublishRefused(
                f"{out} appeared while it was being written (another export or save to the same place?); it was left as it is."
            ) from None
    (out / STAGING_MARKER).unlink(missing_ok=True)


def write_marker(out: Path, source: str) -> None:
    """The export marker, listing every file written so far (write it last, before publishing)."""
    files = sorted(_files_under(out) - {STAGING_MARKER, EXPORT_MARKER})
    write_text(out / EXPORT_MARKER, json.dumps({"source": source, "time": time.time(), "files": files}) + "\n")


def write_published(
    out: Path, write: Callable[[Path], None], *, marker: str, replace: bool, staging: Path | None = None, owner: bool = True
) -> None:
    """``write`` into ``staging``; the ``owner`` publishes it, or removes it on any failure (nothing half-written)."""
    staging = staging if staging is not None else staging_directory(out)
    try:
        write(staging)
        if owner:
            write_marker(staging, marker)
            publish_directory(staging, out, replace=replace)
    except BaseException:
        if owner:
            shutil.rmtree(staging, ignore_errors=True)
        raise
