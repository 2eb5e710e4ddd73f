"""Write a live (possibly FSDP2-sharded) model in the hub layout from every rank at once.

No rank holds the model: the output files are dealt out to the ranks (file ``i`` to rank
``i % world_size``), and the tensors of each conversion group are gathered one group at a time
with ``DTensor.full_tensor()``. Every rank takes part in every gather (they are collectives, so all
ranks walk the same plan in the same order), and only the owner of the file keeps the result.

Per rank memory: one output shard it owns plus one gathered conversion group. The traffic is one
all-gather of the model, what FSDP2 already does every forward pass. Writing is spread over the
ranks, so the wall time falls with the world size while a single-writer gather would not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_automodel.core.distributed import all_reduce_sum_
from lightning_automodel.core.hub_layout import ConversionGroup, HubLayout, plan_hub_layout
from lightning_automodel.core.hub_writer import GroupTransform, shard_file_names, write_index, write_shard
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
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    differs = torch.tensor([0.0 if (a.shape == b.shape and torch.equal(local(a), local(b))) else 1.0])
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
    transform: GroupTransform | None = None,
) -> list[str]:
    """Write this rank's files of ``layout`` into ``staging``; rank 0 also writes the index. Returns the files written."""
    from torch.distributed.tensor import DTensor

    shards = layout.shards(max_shard_bytes)
    names = shard_file_names(len(shards))
    collective = any(isinstance(t, DTensor) for t in state.values())
    written = []
    for index, (file_name, shard) in enumerate(zip(names, shards)):
        owner = index % world_size
        if owner == rank:
            write_shard(staging / file_name, shard, layout_model, lambda groups: _gather(groups, state), dtype=dtype, transform=transform)
            written.append(file_name)
        elif collective:
            for group in shard:  # take part in the gathers; keep nothing
                _gather([group], state)
    if rank == 0 and len(shards) > 1:
        write_index(staging, layout, shards)
    return written


def _gather(groups: Sequence[ConversionGroup], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(state[name]) for group in groups for name in group.fetch_names}
