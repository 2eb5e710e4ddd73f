"""``lightning-automodel export``: a Lightning checkpoint (single file or sharded DCP) -> a Hugging Face directory.

What ``save_pretrained`` writes, with the tokenizer, in one output shard plus one conversion group of memory. Nothing
from the checkpoint is executed (allow-listed unpickling, its ``trust_remote_code`` ignored). The directory is built
beside ``--out`` and renamed into place: a failure leaves nothing there.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lightning_automodel.core.dtypes import export_dtype
from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY, ExportError, HubModelInfo
from lightning_automodel.core.hub_writer import (
    TOKENIZER_FILES,
    PublishRefused,
    check_replaceable,
    parse_size,
    plan_hub_write,
    regular_file_inside,
    write_adapter_directory,
    write_hub_files,
    write_published,
)
from lightning_automodel.core.lora import config_from_json, is_adapter_name
from lightning_automodel.core.lora_merge import LoraMerge, LoraMergeError
from lightning_automodel.core.model_build import build_meta_model, build_meta_model_for
from lightning_automodel.core.naming import canonical_name
from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, TrainedCheckpoint, open_trained_checkpoint

log = logging.getLogger(__name__)


def model_info(checkpoint: TrainedCheckpoint) -> HubModelInfo:
    """What the checkpoint says about its Hugging Face model (stored info, else HFCausalLM hyper-parameters)."""
    stored = checkpoint.metadata.get(EXPORT_INFO_KEY)
    if isinstance(stored, Mapping):
        try:
            return HubModelInfo.from_dict(stored)
        except ValueError as exc:
            raise ExportError(f"{checkpoint.path}: {exc}.") from None
    hparams = checkpoint.metadata.get("hyper_parameters") or {}
    # trust_remote_code is not taken from the checkpoint: export reads data, never code
    init_args = {k: v for k, v in hparams.items() if k in ("pretrained_path", "config", "model_class")}
    if not init_args:
        raise ExportError(
            f"{checkpoint.path} does not say which Hugging Face model it holds: it was written without the "
            "lightning-automodel callbacks or HFCausalLM. Add any lightning_automodel callback (e.g. "
            "HuggingFaceCheckpoint) to the Trainer and save again."
        )
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    try:
        config = HFCausalLM(**init_args, trust_remote_code=False).build_hf_config()
        model = build_meta_model(config, init_args.get("model_class", "auto"))
    except (ValueError, OSError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{checkpoint.path}: the model its hyper-parameters describe cannot be rebuilt without remote code ({detail}).") from None
    # HFCausalLM keeps the Hugging Face model at `self.model`
    return HubModelInfo(prefix="model.", model_class=type(model).__name__, config=config.to_dict(), source=init_args.get("pretrained_path"))


def lora_config_of(checkpoint: TrainedCheckpoint) -> Any | None:
    """The LoraConfig the LoRA callback recorded in the checkpoint, if any."""
    state = (checkpoint.metadata.get("callbacks") or {}).get("LoRA")
    if not isinstance(state, Mapping) or not isinstance(state.get("config"), str):
        return None
    return config_from_json(state["config"])


def export_checkpoint(
    ckpt_path: str | os.PathLike[str], out: str | os.PathLike[str], *, max_shard_size: str = "5GB", overwrite: bool = False,
    tokenizer_path: str | None = None, dtype: str = "auto", adapter_only: bool = False,
) -> Path:
    """Export and return the output directory: a LoRA checkpoint merged, or with ``adapter_only`` its adapters."""
    src, out = Path(ckpt_path), Path(out)
    if not src.exists():
        raise ExportError(f"Checkpoint {str(src)!r} does not exist.")
    try:
        out_dtype = export_dtype(dtype)
    except ValueError as exc:
        raise ExportError(f"--dtype {exc}") from None
    max_bytes = parse_size(max_shard_size)
    _check_tokenizer_path(tokenizer_path)
    _check_out(src, out, overwrite)
    try:
        checkpoint = open_trained_checkpoint(src)
    except CheckpointReadError as exc:
        raise ExportError(str(exc)) from None
    with checkpoint:
        info = model_info(checkpoint)
        model = build_meta_model_for(info, src)
        keys = {canonical_name(k)[len(info.prefix):]: k for k in checkpoint.specs if canonical_name(k).startswith(info.prefix)}
        if not keys:
            raise ExportError(f"{checkpoint.path} holds no tensors under {info.prefix!r}.")
        lora = lora_config_of(checkpoint)

        def read(names: Sequence[str]) -> dict[str, torch.Tensor]:
            tensors = checkpoint.read([keys[n] for n in names])
            return {n: tensors[keys[n]] for n in names}

        if adapter_only:
            adapters = [n for n in keys if is_adapter_name(n)]
            if lora is None or not adapters:
                raise ExportError(f"{src} holds no LoRA adapters (trained with the LoRA callback?); --adapter_only needs them.")
            write = partial(write_adapter_directory, config=lora, adapters=read(adapters), base_model=info.source)
        else:
            if (checkpoint.metadata.get("hyper_parameters") or {}).get("quantization"):
                raise ExportError(
                    f"{src} is a QLoRA checkpoint: it holds the adapters, not the 4-bit base. Export them with --adapter_only "
                    "and load with PeftModel.from_pretrained(base, DIR)."
                )
            adapted = any(is_adapter_name(n) for n in keys)
            if adapted and lora is None:
                raise ExportError(f"{src} holds LoRA adapters but no LoRA configuration (the LoRA callback's state); cannot merge them.")

            def heads_equal(head: str, embed: str) -> bool:
                pair = read([head, embed])
                return pair[head].shape == pair[embed].shape and torch.equal(pair[head], pair[embed])

            try:
                merge = LoraMerge(model, lora, keys) if adapted else None
                specs = {n: checkpoint.specs[key] for n, key in keys.items()}
                layout = plan_hub_write(model, model.config, specs, dtype=out_dtype, merge=merge, heads_equal=heads_equal)
            except ValueError as exc:  # LoraMergeError, LoraConfigError, a state the config does not describe
                raise ExportError(f"{src}: {exc}") from None
            tokenizer_dir = Path(tokenizer_path) if tokenizer_path else recorded_source_dir(info.source)
            write = partial(write_hub_files, layout_model=model, layout=layout, config=model.config, max_shard_bytes=max_bytes,
                            dtype=out_dtype, tokenizer_dir=tokenizer_dir, read=read, merge=merge)
        try:
            write_published(out, write, marker=str(src.resolve()), replace=overwrite)
        except PublishRefused as exc:
            raise ExportError(str(exc)) from None
        except LoraMergeError as exc:
            raise ExportError(f"{src}: {exc}") from None
        except (OSError, SafetensorError) as exc:
            # a full disk surfaces as OSError from our writes and as SafetensorError from safetensors'
            if isinstance(exc, OSError) and exc.strerror:
                detail = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
            else:
                detail = str(exc).strip().splitlines()[-1]
            raise ExportError(f"writing {out} failed ({detail}); nothing was written under {out}.") from None
    if not adapter_only:
        tensors = sum(len(g.outputs) for g in layout.groups)
        log.info("Exported %d tensors in %d file(s) to %s.", tensors, len(layout.shards(max_bytes)), out)
    return out


def recorded_source_dir(source: str | None) -> Path | None:
    """The checkpoint's recorded model directory as the tokenizer's source: its word, so only one with a config.json."""
    if not source:
        return None
    directory = Path(source)
    if not directory.is_dir() or regular_file_inside(directory, "config.json") is None:
        log.warning("The checkpoint's recorded model directory %s is not a model directory here: no tokenizer copied (use --tokenizer_path).", source)
        return None
    log.info("Copying the tokenizer and generation config from the checkpoint's recorded model directory %s.", directory)
    return directory


def _check_tokenizer_path(tokenizer_path: str | None) -> None:
    """An export without the tokenizer that was asked for is a silent wrong result: refuse it now."""
    if not tokenizer_path:
        return
    root = Path(tokenizer_path)
    if not root.is_dir():
        raise ExportError(f"--tokenizer_path {tokenizer_path} is not a directory; pass the local directory holding the tokenizer files.")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"--tokenizer_path {tokenizer_path} holds none of the tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...).")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output whose replacement could delete anything export did not create."""
    rsrc, rout = src.resolve(), out.resolve()
    protected = {Path(rout.anchor): "the filesystem root", Path.home().resolve(): "your home directory", Path.cwd().resolve(): "the current working directory"}
    if rout in protected:
        raise ExportError(f"--out {out} is {protected[rout]}; choose a new directory.")
    if rout == rsrc or rout in rsrc.parents:
        raise ExportError(f"--out {out} is or contains the source checkpoint {src}; choose another directory.")
    if Path.cwd().resolve().is_relative_to(rout):
        raise ExportError(f"--out {out} contains the current working directory; choose another directory.")
    if rout.exists():
        if not rout.is_dir():
            raise ExportError(f"--out {out} exists and is not a directory.")
        if any(rout.iterdir()):
            if not overwrite:
                raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it.")
            try:
                check_replaceable(rout)  # checked again when publishing: the directory may change meanwhile
            except PublishRefused as exc:
                raise ExportError(f"--overwrite: {exc}") from None


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-automodel export", description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--tokenizer_path", default=None, help="copy the tokenizer from this local directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: the dtypes the checkpoint stores")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export (a directory holding export's marker and no file it did not write)")
    parser.add_argument("--adapter_only", action="store_true", help="LoRA: write the PEFT adapter directory, not the merged model")
    args = parser.parse_args(list(argv))
    try:
        out = export_checkpoint(
            args.ckpt_path, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
            tokenizer_path=args.tokenizer_path, dtype=args.dtype, adapter_only=args.adapter_only,
        )
    except (ExportError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"lightning-automodel export: error: {exc}\n")
    print(load_hint(out))
    return 0


def auto_class_name(config_json: Mapping[str, Any]) -> str:
    """The transformers class that loads a directory with this ``config.json``: its auto class when one maps to it
    (a VLM's is ``AutoModelForImageTextToText``: ``AutoModelForCausalLM`` raises "Unrecognized configuration class")."""
    import transformers

    architectures = config_json.get("architectures") or []
    architecture = architectures[0] if architectures else None
    model_type = config_json.get("model_type")
    config_class = transformers.CONFIG_MAPPING[model_type] if model_type in transformers.CONFIG_MAPPING else None
    for auto, mapping in (("AutoModelForCausalLM", transformers.MODEL_FOR_CAUSAL_LM_MAPPING),
                          ("AutoModelForImageTextToText", transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING)):
        if config_class is not None and config_class in mapping and architecture in (None, mapping[config_class].__name__):
            return auto
    return architecture or "AutoModelForCausalLM"


def load_hint(out: Path) -> str:
    """What to paste to load the export: the auto class for a model, ``PeftModel`` on its base for an adapter."""
    import json

    adapter = out / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        base_config = Path(base) / "config.json" if base else None
        cls = auto_class_name(json.loads(base_config.read_text())) if base_config is not None and base_config.is_file() else "AutoModelForCausalLM"
        where = repr(str(base)) if base else "BASE"
        lines = ["from peft import PeftModel", f"from transformers import {cls}",
                 f"model = PeftModel.from_pretrained({cls}.from_pretrained({where}), {str(out)!r})"]
        note = "" if base else " (BASE: the model directory the adapters were trained on)"
        return f"Exported the LoRA adapters to {out}. Load them on their base model{note} with:\n" + "\n".join(f"    {line}" for line in lines)
    cls = auto_class_name(json.loads((out / "config.json").read_text()))
    lines = [f"from transformers import {cls}", f"model = {cls}.from_pretrained({str(out)!r})"]
    return f"Exported a Hugging Face model to {out}. Load it with:\n" + "\n".join(f"    {line}" for line in lines)
