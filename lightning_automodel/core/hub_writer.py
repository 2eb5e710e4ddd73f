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

from lightning_automodel.core.atomic_files import fsync_path, rename_no_replace, replace_directory
from lightning_automodel.core.hub_layout import ConversionGroup, HubLayout, iter_outputs

log = logging.getLogger(__name__)

#: written by every export; ``--overwrite`` replaces only a directory that holds it (and no file it did not list)
EXPORT_MARKER = ".lightning-automodel-export.json"
#: inside every staging directory while it is written: who made it (host, pid); removed when published
STAGING_MARKER = ".lightning-automodel-staging.json"
_STAGING_INFIX = ".tmp-"


class PublishRefused(ValueError):
    """Publishing would replace or delete something this run did not write; the message names it."""
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


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            value = int(float(upper[: -len(unit)]) * factor)
            break
    else:
        value = int(upper)
    if value <= 0:
        raise ValueError(f"--max_shard_size must be positive; got {text!r}.")
    return value


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
    save_shard(path, assemble_shard(groups, model, fetch, dtype=dtype, group_batch_bytes=group_batch_bytes, transform=transform))


def assemble_shard(
    groups: Sequence[ConversionGroup],
    model: nn.Module,
    fetch: FetchGroups,
    *,
    dtype: torch.dtype | None,
    group_batch_bytes: int = 256 * 2**20,
    transform: GroupTransform | None = None,
) -> dict[str, torch.Tensor]:
    """The hub tensors of one output file: its groups fetched a few at a time, (transformed,) reverted and cast."""
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
    return outputs


def save_shard(path: Path, outputs: Mapping[str, torch.Tensor]) -> None:
    """Write one safetensors file (``save_pretrained``'s metadata), 0644, fsynced."""
    from safetensors.torch import save_file

    save_file(dict(outputs), str(path), metadata={"format": "pt"})
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


def regular_file_inside(directory: Path, name: str) -> Path | None:
    """``directory/name`` when it is a regular file that is not a symlink and resolves inside ``directory``; else ``None``.

    Files copied into an output come from directories a checkpoint may name: a symlink (or a
    ``..`` name) there must not make a save copy a file from anywhere else on the machine.
    """
    import stat

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
    """``config.json``, ``generation_config.json`` and the tokenizer files, all 0644.

    From ``tokenizer_dir`` only regular, non-symlink files inside it are copied (:func:`regular_file_inside`).
    """
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
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            source = regular_file_inside(source_dir, name)
            if source is not None:
                shutil.copyfile(source, out / name, follow_symlinks=False)
    for file in out.iterdir():
        if file.is_file():
            os.chmod(file, FILE_MODE)
            fsync_path(file)


def staging_directory(out: Path) -> Path:
    """A fresh directory beside ``out`` (same filesystem, so publishing is one rename), mode 0755.

    Its name is unique (``mkdtemp``) and it holds :data:`STAGING_MARKER` (this host and process), so
    :func:`remove_stale_staging` can tell a staging directory a killed save left from anything else.
    """
    import socket

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_INFIX}", dir=out.parent))
    os.chmod(staging, DIR_MODE)
    signature = {"tool": "lightning-automodel", "host": socket.gethostname(), "pid": os.getpid(), "target": out.name}
    write_text(staging / STAGING_MARKER, json.dumps(signature) + "\n")
    return staging


def _staging_signature(entry: Path) -> dict[str, Any] | None:
    """The signature inside a staging directory this package made, else ``None`` (never follows a symlink)."""
    if entry.is_symlink() or not entry.is_dir() or _STAGING_INFIX not in entry.name:
        return None
    marker = entry / STAGING_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "lightning-automodel" or not isinstance(data.get("pid"), int):
        return None
    return data if entry.name.startswith(f".{data.get('target')}{_STAGING_INFIX}") else None


def _alive_here(signature: Mapping[str, Any]) -> bool:
    """Whether the process that made a staging directory still runs on this host (another host: assumed alive)."""
    import socket

    if signature.get("host") != socket.gethostname():
        return True
    try:
        os.kill(signature["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging directories of killed saves in ``directory``: only those holding our signature
    whose process is gone. Anything else (a user's ``.x.tmp-y``, another live run's staging) stays."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        signature = _staging_signature(entry)
        if signature is not None and not _alive_here(signature):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
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
    """Refuse (:class:`PublishRefused`) to replace ``out`` unless it is a previous export holding only files it wrote.

    The export marker lists the files the export wrote; a file the user added since (notes, an
    evaluation) would be deleted by the replacement, so it is named and nothing happens.
    """
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
    """Move ``staging`` to ``out`` in one step; never a silent replacement.

    Without ``replace``, an ``out`` that exists at this moment (another export or save got there
    first) is refused (``renameat2(RENAME_NOREPLACE)``); an empty directory is the one exception
    (removed first: nothing is lost). With ``replace``, an existing ``out`` must pass
    :func:`check_replaceable` right here and is swapped atomically where the filesystem can (see
    ``core.atomic_files``): a reader sees the old directory or the new one under the name, never neither.
    """
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
    """The export marker, listing every file written so far (write it last, before publishing)."""
    import time

    files = sorted(_files_under(out) - {STAGING_MARKER, EXPORT_MARKER})
    write_text(out / EXPORT_MARKER, json.dumps({"source": source, "time": time.time(), "files": files}) + "\n")
