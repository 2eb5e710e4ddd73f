"""Write a Hugging Face directory from a :class:`~lightning_automodel.core.hub_layout.HubLayout`, shard by shard.

Per process memory: the output shard being assembled plus one conversion group in flight (the
group's source tensors and, when ``dtype`` casts, its cast copy). ``safetensors.save_file`` writes
from the tensors' own memory (no second copy of the shard).

Files are written into a staging directory, fsynced, and published with :func:`publish_directory`
(one ``rename``), so a reader never sees a half-written model under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.atomic_files import fsync_path, replace_directory
from lightning_automodel.core.hub_layout import ConversionGroup, HubLayout, iter_outputs

log = logging.getLogger(__name__)

#: written by every export; ``--overwrite`` replaces only a directory that holds it
EXPORT_MARKER = ".lightning-automodel-export.json"
DIR_MODE, FILE_MODE = 0o755, 0o644
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)

FetchGroups = Callable[[Sequence[ConversionGroup]], Mapping[str, torch.Tensor]]
#: the fetched tensors of one group (``group.fetch_names``) -> its ``sources`` (e.g. LoRA merged into the base)
GroupTransform = Callable[[ConversionGroup, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def shard_file_names(count: int) -> list[str]:
    """``save_pretrained``'s names: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def cast_for_output(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous()


def write_shard(
    path: Path,
    groups: Sequence[ConversionGroup],
    model: nn.Module,
    fetch: FetchGroups,
    *,
    dtype: torch.dtype | None,
    group_batch_bytes: int = 256 * 2**20,
    transform: GroupTransform | None = None,
) -> None:
    """Revert and write the groups of one output file, reading a few groups at a time.

    ``fetch`` returns the groups' ``fetch_names``; ``transform`` turns one group's into its ``sources``.
    """
    from safetensors.torch import save_file

    outputs: dict[str, torch.Tensor] = {}
    batch: list[ConversionGroup] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        sources = fetch(batch)
        for group in batch:
            if transform is not None:
                tensors = dict(transform(group, {name: sources[name] for name in group.fetch_names}))
            else:
                tensors = {name: sources[name] for name in group.sources}
            for name, tensor in iter_outputs(model, group, tensors):
                # clone when the reversion returned a view that shares storage with another output
                # (e.g. unbound experts): safetensors refuses shared storage.
                tensor = cast_for_output(tensor, dtype)
                outputs[name] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        batch, batch_bytes = [], 0

    for group in groups:
        if batch and batch_bytes + group.nbytes > group_batch_bytes:
            flush()
        batch.append(group)
        batch_bytes += group.nbytes
    flush()
    save_file(outputs, str(path), metadata={"format": "pt"})
    os.chmod(path, FILE_MODE)
    fsync_path(path)


def write_index(out: Path, layout: HubLayout, shards: Sequence[Sequence[ConversionGroup]]) -> None:
    """``model.safetensors.index.json`` (``save_pretrained``'s format); the layout's dtypes are the written ones."""
    names = shard_file_names(len(shards))
    weight_map = {t.name: names[i] for i, shard in enumerate(shards) for g in shard for t in g.outputs}
    total = layout.total_bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def write_config_files(out: Path, config: Any, *, tokenizer_dir: Path | None) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer files, all 0644."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    generation_source = tokenizer_dir / "generation_config.json" if tokenizer_dir is not None else None
    if generation_source is not None and generation_source.is_file():
        shutil.copyfile(generation_source, out / "generation_config.json")
    else:
        generation = GenerationConfig.from_model_config(config)
        if generation.to_diff_dict():  # save_pretrained writes one only when it holds something
            generation.save_pretrained(out)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for name in TOKENIZER_FILES:
            source = tokenizer_dir / name
            if source.is_file() and not source.is_symlink():
                shutil.copyfile(source, out / name)
    for file in out.iterdir():
        if file.is_file():
            os.chmod(file, FILE_MODE)
            fsync_path(file)


def staging_directory(out: Path) -> Path:
    """A fresh directory beside ``out`` (same filesystem, so publishing is one rename), mode 0755."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, DIR_MODE)
    return staging


def publish_directory(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out`` (the caller decided an existing ``out`` may be replaced).

    An existing ``out`` is swapped atomically where the filesystem can (see ``core.atomic_files``):
    a reader sees the old directory or the new one under the name, never neither.
    """
    fsync_path(staging)
    replace_directory(staging, out)


def write_adapter_directory(out: Path, config: Any, adapters: Mapping[str, torch.Tensor], base_model: str | None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors``: what ``PeftModel.from_pretrained(base, DIR)`` loads."""
    from safetensors.torch import save_file

    from lightning_automodel.core.lora import peft_adapter_files

    data, tensors = peft_adapter_files(config, adapters, base_model)
    write_text(out / "adapter_config.json", json.dumps(data, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "adapter_model.safetensors", FILE_MODE)
    fsync_path(out / "adapter_model.safetensors")


def write_marker(out: Path, source: str) -> None:
    import time

    write_text(out / EXPORT_MARKER, json.dumps({"source": source, "time": time.time()}) + "\n")
