"""``lightning-automodel export``: a Lightning checkpoint (single file or sharded DCP) -> a Hugging Face directory.

The directory is what ``save_pretrained`` writes for the model: the hub layout (per-expert MoE
tensors, legacy VLM keys; transformers' own reversion of its load-time conversions), safetensors
shards with an index when there is more than one, ``config.json``, ``generation_config.json`` and
the tokenizer when the weights came from a local directory that has one; directories 0755, files
0644. ``lm_head.weight`` is omitted only when the head is truly tied (config says tied and the
tensors are equal); a head that diverged is kept and the exported config is untied.

Memory: one output shard plus one conversion group, whatever the model size. Tensors are read one
group at a time (``.ckpt``: from their byte ranges; DCP: by key), the optimizer state never.

The checkpoint says which model it holds: the callbacks and ``HFCausalLM`` store the Hugging Face
config and the model's attribute prefix in it (``core.hub_layout.HubModelInfo``), so a checkpoint
from any LightningModule exports, without the original weights directory. Older ``HFCausalLM``
checkpoints fall back to their hyper-parameters.

Nothing from the checkpoint is executed: tensors and Lightning's metadata are unpickled with
``weights_only=True`` and a short allow-list, DCP's ``.metadata`` through an allow-list of DCP's
own types; the checkpoint's ``trust_remote_code`` is ignored. The directory is built beside the
target and renamed into place, so a failure (a full disk included) leaves nothing half-written under
the target name. Publishing refuses an ``--out`` that exists at that moment (two exports racing for
one name: one wins, the other fails in one line); ``--overwrite`` replaces only a previous export
that holds no file it did not write (files a user added are named, and nothing is replaced). The
tokenizer comes from ``--tokenizer_path`` or from the model directory the checkpoint records, and
only regular, non-symlink files inside that directory are copied.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lightning_automodel.core.dtypes import export_dtype
from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY, ConversionGroup, ExportError, HubModelInfo, plan_hub_layout
from lightning_automodel.core.hub_writer import (
    PublishRefused,
    TOKENIZER_FILES,
    check_replaceable,
    parse_size,
    publish_directory,
    regular_file_inside,
    shard_file_names,
    staging_directory,
    write_config_files,
    write_adapter_directory,
    write_index,
    write_marker,
    write_shard,
)
from lightning_automodel.core.lora import LoraConfigError, config_from_json, is_adapter_name
from lightning_automodel.core.lora_merge import LoraMerge, LoraMergeError
from lightning_automodel.core.model_build import build_meta_model, build_meta_model_for
from lightning_automodel.core.naming import canonical_name
from lightning_automodel.core.tied_head import get_input_embeddings_weight_and_name, get_lm_head_weight_and_name, is_tied_word_embeddings
from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, TrainedCheckpoint, open_trained_checkpoint

log = logging.getLogger(__name__)

_HF_CAUSAL_LM_PREFIX = "model."  # HFCausalLM keeps the Hugging Face model at `self.model`


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
    source = init_args.get("pretrained_path")
    return HubModelInfo(prefix=_HF_CAUSAL_LM_PREFIX, model_class=type(model).__name__, config=config.to_dict(), source=source)


def check_state_matches_config(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], model: Any, src: Path, *, tied_head: str | None) -> None:
    """The checkpoint's tensors are exactly what the config's model holds (names, shapes, int/float).

    Checked on a meta model before anything is written: an export with a missing tensor or a wrong
    shape would only fail later, in whoever loads it.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in specs and k != tied_head]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ExportError(f"{src} has no tensor for {', '.join(missing[:3])}{more}, which the model's config needs.")
    unexpected = [k for k in specs if k not in expected]
    if unexpected:
        raise ExportError(f"{src} holds tensors the model's config does not have: {', '.join(unexpected[:3])}.")
    for name, (shape, dtype) in specs.items():
        want = expected[name]
        if tuple(shape) != tuple(want.shape) or dtype.is_floating_point != want.is_floating_point():
            raise ExportError(
                f"{src}: tensor {name} is {dtype} {list(shape)}; the model's config needs "
                f"{'a floating-point' if want.is_floating_point() else 'an integer'} tensor of shape {list(want.shape)}."
            )


def module_names(checkpoint: TrainedCheckpoint, prefix: str) -> dict[str, str]:
    """Hugging Face module name -> Lightning state key, for the model at ``prefix``."""
    names = {}
    for key in checkpoint.specs:
        name = canonical_name(key)
        if name.startswith(prefix):
            names[name[len(prefix):]] = key
    if not names:
        raise ExportError(f"{checkpoint.path} holds no tensors under {prefix!r}.")
    return names


@dataclass
class StateView:
    """The Hugging Face model's tensors as a checkpoint holds them: read directly, or merged from LoRA adapters.

    For a LoRA checkpoint, ``merge`` (``core.lora_merge.LoraMerge``) gives every adapted base weight
    with peft's merge applied (``x.q_proj.weight`` from ``x.q_proj.base_layer.weight`` and its adapters,
    fused experts, embeddings, DoRA...) under the un-adapted names: the export is the plain model,
    which ``from_pretrained`` loads without peft.
    """

    checkpoint: TrainedCheckpoint
    keys: dict[str, str]
    merge: LoraMerge | None = None

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        names = self.merge.names() if self.merge is not None else {n: n for n in self.keys}
        return {name: self.checkpoint.specs[self.keys[source]] for name, source in names.items()}

    def inputs(self, names: Sequence[str]) -> tuple[str, ...]:
        """The checkpoint's module names to read for the (merged) ``names``."""
        return self.merge.inputs(names) if self.merge is not None else tuple(names)

    def read_inputs(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        read = self.checkpoint.read([self.keys[n] for n in names])
        return {n: read[self.keys[n]] for n in names}

    def transform(self, names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.merge.merge(names, tensors) if self.merge is not None else {n: tensors[n] for n in names}

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.transform(names, self.read_inputs(list(self.inputs(names))))


def lora_config_of(checkpoint: TrainedCheckpoint) -> Any | None:
    """The LoraConfig the LoRA callback recorded in the checkpoint, if any."""
    state = (checkpoint.metadata.get("callbacks") or {}).get("LoRA")
    if not isinstance(state, Mapping) or not isinstance(state.get("config"), str):
        return None
    return config_from_json(state["config"])


def state_view(checkpoint: TrainedCheckpoint, names: dict[str, str], src: Path, info: HubModelInfo) -> StateView:
    """Plain names, or LoRA adapters merged into their base weights (peft's merge, see ``core.lora_merge``)."""
    if not any(is_adapter_name(n) for n in names):
        return StateView(checkpoint, names)
    config = lora_config_of(checkpoint)
    if config is None:
        raise ExportError(f"{src} holds LoRA adapters but no LoRA configuration (the LoRA callback's state); cannot merge them.")
    try:
        merge = LoraMerge.for_config(build_meta_model_for(info, src), config, names)
    except (LoraMergeError, LoraConfigError) as exc:
        raise ExportError(f"{src}: {exc}") from None
    return StateView(checkpoint, names, merge)


def export_adapter(checkpoint: TrainedCheckpoint, names: dict[str, str], info: HubModelInfo, staging: Path, src: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors``: what ``PeftModel.from_pretrained(base, DIR)`` loads."""
    config = lora_config_of(checkpoint)
    adapters = {n: key for n, key in names.items() if is_adapter_name(n)}
    if config is None or not adapters:
        raise ExportError(f"{src} holds no LoRA adapters (trained with the LoRA callback?); --adapter_only needs them.")
    read = checkpoint.read(list(adapters.values()))
    write_adapter_directory(staging, config, {n: read[key] for n, key in adapters.items()}, info.source)


def _decide_tie(view: StateView, model: Any, config: Any) -> str | None:
    """The head name to omit (truly tied), or ``None``; unties ``config`` when the head diverged."""
    _, head = get_lm_head_weight_and_name(model)
    _, embed = get_input_embeddings_weight_and_name(model)
    if head is None or embed is None or not is_tied_word_embeddings(model):
        return None
    present = view.specs()
    if head not in present:
        return head
    if embed not in present:
        return None
    pair = view.read([head, embed])
    head_t, embed_t = pair[head], pair[embed]
    if head_t.shape == embed_t.shape and torch.equal(head_t, embed_t):
        return head
    log.warning("%s differs from the embedding: exporting it and an untied config.", head)
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    return None


def export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizer_path: str | None = None,
    dtype: str = "auto",
    adapter_only: bool = False,
) -> Path:
    """Export and return the output directory (see the module docstring).

    A checkpoint trained with the LoRA callback exports the merged model; ``adapter_only`` writes the
    PEFT adapter directory instead.
    """
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
        config = model.config
        names = module_names(checkpoint, info.prefix)
        if adapter_only:
            _write_and_publish(src, out, overwrite, lambda staging: export_adapter(checkpoint, names, info, staging, src))
            return out
        if (checkpoint.metadata.get("hyper_parameters") or {}).get("quantization"):
            raise ExportError(
                f"{src} is a QLoRA checkpoint: it holds the adapters, not the 4-bit base. Export them with --adapter_only "
                "and load with PeftModel.from_pretrained(base, DIR)."
            )
        view = state_view(checkpoint, names, src, info)
        specs = view.specs()
        _, head = get_lm_head_weight_and_name(model)
        tied_head = head if head is not None and is_tied_word_embeddings(model) else None
        check_state_matches_config(specs, model, src, tied_head=tied_head)
        omit = _decide_tie(view, model, config)
        out_specs = {n: (shape, out_dtype if (out_dtype is not None and dt.is_floating_point) else dt) for n, (shape, dt) in specs.items()}
        try:
            layout = plan_hub_layout(model, out_specs, omit={omit} if omit else set(), inputs=view.inputs if view.merge else None)
        except ValueError as exc:
            raise ExportError(f"{src}: {exc}") from None
        shards = layout.shards(max_bytes)
        floats = [t.dtype for g in layout.groups for t in g.outputs if t.dtype.is_floating_point]
        if floats:
            config.dtype = max(set(floats), key=floats.count)

        def fetch(groups: Sequence[ConversionGroup]) -> dict[str, torch.Tensor]:
            return view.read_inputs(list(dict.fromkeys(name for group in groups for name in group.fetch_names)))

        def transform(group: ConversionGroup, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            try:
                return view.transform(group.sources, tensors)
            except LoraMergeError as exc:
                raise ExportError(f"{src}: {exc}") from None

        tokenizer_dir = Path(tokenizer_path) if tokenizer_path else recorded_source_dir(info.source)

        def write_model(staging: Path) -> None:
            for file_name, shard in zip(shard_file_names(len(shards)), shards):
                write_shard(staging / file_name, shard, model, fetch, dtype=out_dtype, transform=transform)
            if len(shards) > 1:
                write_index(staging, layout, shards)
            write_config_files(staging, config, tokenizer_dir=tokenizer_dir)

        _write_and_publish(src, out, overwrite, write_model)
    log.info("Exported %d tensors in %d file(s) to %s.", len(layout.names()), len(shards), out)
    return out


def _write_and_publish(src: Path, out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """``write`` into a staging directory beside ``out``, then publish it; on any failure nothing is left behind."""
    staging = staging_directory(out)
    try:
        write(staging)
        write_marker(staging, str(src.resolve()))
        publish_directory(staging, out, replace=overwrite)
    except PublishRefused as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(str(exc)) from None
    except (OSError, SafetensorError) as exc:
        # a full disk surfaces as OSError from our writes and as SafetensorError from safetensors'
        shutil.rmtree(staging, ignore_errors=True)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1]
        raise ExportError(f"writing {out} failed ({detail}); nothing was written under {out}.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recorded_source_dir(source: str | None) -> Path | None:
    """The model directory a checkpoint says it was trained from, as the source of the tokenizer and generation config.

    The recorded path is the checkpoint's word, not the user's: it is used only when it is an existing
    directory holding a ``config.json`` (a model directory), and only regular, non-symlink files inside
    it are copied (``core.hub_writer.regular_file_inside``). The log names it; ``--tokenizer_path``
    chooses another.
    """
    if not source:
        return None
    directory = Path(source)
    if not directory.is_dir() or regular_file_inside(directory, "config.json") is None:
        log.warning("The checkpoint's recorded model directory %s is not a model directory here: no tokenizer copied (use --tokenizer_path).", source)
        return None
    log.info("Copying the tokenizer and generation config from the checkpoint's recorded model directory %s.", directory)
    return directory


def _check_tokenizer_path(tokenizer_path: str | None) -> None:
    """An explicit ``--tokenizer_path`` must be a directory holding tokenizer files: an export without the
    tokenizer that was asked for is a silent wrong result."""
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
    """The transformers class that loads a directory with this ``config.json``: its auto class when one maps to it.

    A VLM's architecture is not in ``AutoModelForCausalLM``'s mapping (that call raises "Unrecognized
    configuration class"); the image-text-to-text auto class loads it. Anything else: the class itself.
    """
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
