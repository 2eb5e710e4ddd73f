"""Write a live (possibly FSDP2-sharded) model in the hub layout from every rank at once.

No rank holds the model: the output files are dealt out to the ranks (file ``i`` to rank
``i % world_size``), and each tensor is gathered to the owner of its file only, in the output
dtype (``dist.gather`` of the FSDP2 shards). Every rank takes part in every gather (they are
collectives, so all ranks walk the same plan in the same order); the others send their shard and
receive nothing. Owners write in a background thread while the walk goes on, so files are
written in parallel.

Per rank memory: one output shard it owns plus one gathered conversion group. The traffic is the
model once, each tensor to one rank (an all-gather would send it to every rank).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_automodel.core.atomic_files import fsync_path
from lightning_automodel.core.distributed import all_reduce_sum_, local_tensor
from lightning_automodel.core.hf_weight_files import SAFETENSORS_DTYPES
from lightning_automodel.core.hub_layout import ConversionGroup, HubLayout, HubTensor, is_renaming, plan_hub_layout
from lightning_automodel.core.hub_writer import FILE_MODE, GroupTransform, assemble_shard, save_shard, shard_file_names, write_index
from lightning_automodel.core.lora_merge import LoraMerge
from lightning_automodel.core.naming import canonical_name
from lightning_automodel.core.tied_head import (
    get_input_embeddings_weight_and_name,
    get_lm_head_weight_and_name,
    is_tied_word_embeddings,
    same_tensor_storage,
)

log = logging.getLogger(__name__)


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under canonical names (activation-checkpoint wrappers stripped)."""
    return {canonical_name(name): tensor for name, tensor in model.state_dict().items()}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a collective for a DTensor (every rank must call it).

    A CPU-offloaded FSDP2 shard is a DTensor on the CPU while its mesh is on the GPU: NCCL would be
    handed a CPU tensor. So the local shard goes to the mesh's device first.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach().cpu()
    mesh_device = torch.device(tensor.device_mesh.device_type)
    if tensor.device.type != mesh_device.type:
        local = tensor.to_local().to(mesh_device.type)
        tensor = DTensor.from_local(local, tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor().detach().cpu()


def tied_head_to_omit(model: nn.Module, state: dict[str, torch.Tensor], *, device: torch.device | None = None) -> str | None:
    """The head's name when it is truly tied (configured tied and equal on every rank), else ``None``."""
    _, head = get_lm_head_weight_and_name(model)
    _, embed = get_input_embeddings_weight_and_name(model)
    if head is None or embed is None or head not in state or embed not in state or not is_tied_word_embeddings(model):
        return None
    a, b = state[head], state[embed]
    if same_tensor_storage(a, b):
        return head
    differs = torch.tensor([0.0 if (a.shape == b.shape and torch.equal(local_tensor(a), local_tensor(b))) else 1.0])
    all_reduce_sum_(differs, device=device)
    return head if differs.item() == 0 else None


def plan_module_layout(
    model: nn.Module,
    layout_model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    omit: str | None,
    dtype: torch.dtype | None,
    merge: LoraMerge | None = None,
) -> HubLayout:
    """The hub layout of ``model``'s state; ``layout_model`` is its meta twin (the conversion rules' model).

    With ``merge`` (a LoRA model) the layout is the merged model's: its groups fetch each base with its adapters.
    """
    spec_of = merge.names() if merge is not None else {name: name for name in state}
    specs = {}
    for name, source in spec_of.items():
        t = state[source]
        specs[name] = (tuple(t.shape), dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
    return plan_hub_layout(layout_model, specs, omit={omit} if omit else set(), inputs=merge.inputs if merge is not None else None)


def merge_transform(merge: LoraMerge) -> GroupTransform:
    """The write transform of a LoRA layout: a group's fetched base and adapters -> its merged sources."""
    return lambda group, tensors: merge.merge(group.sources, tensors)


def write_shards_from_all_ranks(
    layout_model: nn.Module,
    state: dict[str, torch.Tensor],
    layout: HubLayout,
    staging: Path,
    *,
    rank: int,
    world_size: int,
    max_shard_bytes: int,
    dtype: torch.dtype | None,
    device: torch.device | None = None,
    transform: GroupTransform | None = None,
) -> list[str]:
    """Write this rank's files of ``layout`` into ``staging``; rank 0 also writes the index. Returns the files written.

    A collective: every rank walks every file's groups in the same order; each tensor is gathered
    to the file's owner only (:func:`gather_to_owner`), in the output ``dtype``. The owner hands
    the assembled file to a writer thread and goes on with the next gathers, so the files are
    written in parallel; it waits for that write before assembling its next file (one output
    shard in memory). A failure on any rank (a write, a reversion) is an error on every rank once
    the walk is done: one all-reduce on ``device`` (default: ``collective_device()``), no hang.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    shards = layout.shards(max_shard_bytes)
    names = shard_file_names(len(shards))
    direct = [all(_rows_in_place(layout_model, g, state) for g in shard) for shard in shards]
    written: list[str] = []
    error: BaseException | None = None
    # Files of renamed tensors only: the owner lays each out (header, full size), then every rank
    # writes its own rows in place. No tensor crosses the network.
    for index, (file_name, shard) in enumerate(zip(names, shards)):
        if direct[index] and index % world_size == rank:
            try:
                _create_in_place(staging / file_name, shard)
                written.append(file_name)
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
        for index, (file_name, shard) in enumerate(zip(names, shards)):
            owner = index % world_size
            if direct[index]:
                continue
            if owner != rank:
                fetch_groups(shard, state, owner=owner, rank=rank, dtype=dtype)  # take part in the gathers; receive nothing
                continue
            if pending is not None:  # one shard in memory: the previous one is on disk first
                error = error or pending.exception()
                pending = None
            fetched: set[int] = set()

            def fetch(groups: Sequence[ConversionGroup], owner: int = owner, fetched: set[int] = fetched) -> dict[str, torch.Tensor]:
                tensors = fetch_groups(groups, state, owner=owner, rank=rank, dtype=dtype)
                fetched.update(id(g) for g in groups)
                return tensors

            try:
                if error is not None:
                    raise error  # only take part in the gathers from now on
                outputs = assemble_shard(shard, layout_model, fetch, dtype=dtype, transform=transform)
                pending = writer.submit(save_shard, staging / file_name, outputs)
                del outputs
                written.append(file_name)
            except Exception as exc:  # noqa: BLE001 - reported on every rank after the walk
                error = error or exc
                fetch_groups([g for g in shard if id(g) not in fetched], state, owner=owner, rank=rank, dtype=dtype)
        for job in [*in_place, *([pending] if pending is not None else [])]:
            error = error or job.exception()
        for job in flushes:  # complete: every write job (which submits its flush) is done
            error = error or job.exception()
    if rank == 0 and len(shards) > 1 and error is None:
        try:
            write_index(staging, layout, shards)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
    _agree_on_success(error, rank, world_size, device)
    return written


def _agree_on_success(error: BaseException | None, rank: int, world_size: int, device: torch.device | None) -> None:
    """Raise on every rank when any rank failed (the failing rank re-raises its own error)."""
    failed = torch.zeros(world_size, dtype=torch.float32)
    failed[rank] = 1.0 if error is not None else 0.0
    all_reduce_sum_(failed, device=device)
    if error is not None:
        raise error
    ranks = [r for r, flag in enumerate(failed.tolist()) if flag]
    if ranks:
        raise RuntimeError(f"HuggingFaceCheckpoint: rank(s) {ranks} failed writing their files; their logs have the error.")


def fetch_groups(
    groups: Sequence[ConversionGroup], state: dict[str, torch.Tensor], *, owner: int, rank: int, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The full source tensors of ``groups`` on the CPU of ``owner`` (an empty dict elsewhere); a collective.

    The seam between gathering and writing: transforms of the fetched group (a LoRA merge) apply
    to what this returns, on the owner.
    """
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        # A transformed group (LoRA base + adapters, merged on the owner) travels in its own dtypes:
        # the merge runs on what trained; the merged result is cast for output afterwards.
        travel_dtype = dtype if not group.inputs else None
        for name in group.fetch_names:
            tensor = gather_to_owner(state[name], owner=owner, rank=rank, dtype=travel_dtype)
            if tensor is not None:
                out[name] = tensor
    return out


def _output_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype


def gather_to_owner(tensor: torch.Tensor, *, owner: int, rank: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The whole ``tensor`` in the output ``dtype`` on the CPU of global rank ``owner``; ``None`` on the others.

    An FSDP2 shard (a DTensor split on dim 0 over one mesh dimension) is gathered to the owner
    only (``dist.gather`` into one buffer: the owner receives the tensor once, the others send their
    shard and receive nothing), cast before it travels. Other DTensor layouts are all-gathered
    (:func:`full_tensor`). A CPU-offloaded shard travels on the mesh's device (NCCL has no CPU path).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    out_dtype = _output_dtype(tensor, dtype)
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
    device = torch.device(mesh.device_type) if mesh.device_type != "cpu" else torch.device("cpu")
    sent = torch.zeros((chunk, *tensor.shape[1:]), dtype=out_dtype, device=device)
    sent[: local.shape[0]].copy_(local)  # FSDP2's last shards are shorter (or empty): padded to one chunk
    if rank != owner:
        dist.gather(sent, None, dst=owner, group=group)
        return None
    received = torch.empty((chunk * size, *tensor.shape[1:]), dtype=out_dtype, device=device)
    dist.gather(sent, list(received.chunk(size)) if chunk else [received[:0]] * size, dst=owner, group=group)
    return received[:rows].cpu()


#: safetensors' names of the dtypes a hub file holds (the reader's one table, reversed)
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _rows_in_place(layout_model: nn.Module, group: ConversionGroup, state: dict[str, torch.Tensor]) -> bool:
    """Whether each rank can write its rows of ``group``'s one output straight into the file.

    A renamed tensor (the data is the module's) that is whole on every rank or an FSDP2 dim-0 shard
    over one mesh dimension: then a rank's rows are one contiguous byte range of the output.
    """
    from torch.distributed.tensor import DTensor, Shard

    if group.inputs or group.outputs[0].dtype not in _SAFETENSORS_DTYPES or not is_renaming(layout_model, group):
        return False  # a transformed group (a LoRA merge) is computed on the owner, never written in place
    tensor = state[group.sources[0]]
    if tuple(tensor.shape) != group.outputs[0].shape:
        return False
    return not isinstance(tensor, DTensor) or (tensor.device_mesh.ndim == 1 and tuple(tensor.placements) == (Shard(0),))


def _in_place_offsets(shard: Sequence[ConversionGroup]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of ``shard``'s file and each output's byte offset in the file (the same on every rank)."""
    import json

    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for group in shard:
        out: HubTensor = group.outputs[0]
        entries[out.name] = {"dtype": _SAFETENSORS_DTYPES[out.dtype], "shape": list(out.shape), "data_offsets": [begin, begin + out.nbytes]}
        begin += out.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    prefix = len(header).to_bytes(8, "little") + header
    data_start = len(prefix)
    offsets = {}
    for group in shard:
        spec = entries[group.outputs[0].name]
        offsets[group.sources[0]] = data_start + spec["data_offsets"][0]  # type: ignore[index]
    return prefix, offsets


def _create_in_place(path: Path, shard: Sequence[ConversionGroup]) -> None:
    """Write the header of ``shard``'s file and size it; the ranks fill the data (:func:`_write_rows_in_place`)."""
    import os

    prefix, _ = _in_place_offsets(shard)
    total = len(prefix) + sum(g.outputs[0].nbytes for g in shard)
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(total)
    os.chmod(path, FILE_MODE)


def _write_rows_in_place(path: Path, shard: Sequence[ConversionGroup], state: dict[str, torch.Tensor], *, owner: int, rank: int) -> None:
    """Write this rank's rows of every tensor of ``shard`` at their offsets in ``path``, cast to the file's dtypes (not fsynced yet).

    A tensor that every rank holds whole is written by the file's owner only.
    """
    import os

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
