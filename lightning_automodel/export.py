"""``lightning-automodel export``: a Lightning checkpoint (single file or sharded DCP) -> a Hugging Face directory.

The directory holds ``config.json``, safetensors shards with an index, and the tokenizer when the
model came from a local directory that has one; ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it.
``lm_head.weight`` is omitted only when the head is truly tied (config says tied and the tensors are
equal); a head that diverged is kept and the exported config is untied. The directory is built
next to the target and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_automodel.core.naming import canonical_name

log = logging.getLogger(__name__)

_MODULE_PREFIX = "model."  # HFCausalLM keeps the Hugging Face model at `self.model`
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message says why and what to do."""


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def _safe_globals() -> list[Any]:
    """The only non-tensor types a Lightning checkpoint's metadata may hold; nothing else is unpickled."""
    import collections
    import pathlib

    from lightning.fabric.utilities.data import AttributeDict

    return [collections.OrderedDict, pathlib.PosixPath, pathlib.PurePosixPath, AttributeDict]


def _safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that needs any other global is refused, never run."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise ExportError(f"{path} is not a readable Lightning checkpoint or holds a type export does not trust ({type(exc).__name__}: {detail}).") from None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model tensors (Lightning keys) and hyper-parameters of a ``.ckpt`` file or a DCP directory."""
    if path.is_file():
        checkpoint = _safe_load(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ExportError(f"{path} has no 'state_dict': not a Lightning checkpoint.")
        return checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}
    if path.is_dir() and (path / ".metadata").is_file():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # DCP would treat the read as a collective and wait for every rank.
            raise ExportError("Export a sharded checkpoint from a single process (outside torchrun / a Trainer run).")
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        keys = {k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata if k.startswith("state_dict.")}
        loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
        state = loaded.get("state_dict", {})
        meta_file = path / "meta.pt"
        meta = _safe_load(meta_file) if meta_file.is_file() else {}
        if not isinstance(meta, dict):
            raise ExportError(f"{meta_file} is not a Lightning checkpoint's metadata.")
        return state, meta.get("hyper_parameters") or {}
    raise ExportError(f"{path} is neither a Lightning .ckpt file nor a sharded checkpoint directory (with .metadata).")


def hf_state_dict(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in lightning_state.items():
        key = canonical_name(key)
        if key.startswith(_MODULE_PREFIX):
            state[key[len(_MODULE_PREFIX):]] = value.full_tensor() if hasattr(value, "full_tensor") else value
    if not state:
        raise ExportError("The checkpoint holds no `model.` tensors: was it written by HFCausalLM?")
    return state


def check_state_matches_config(state: dict[str, torch.Tensor], config: Any, model_class: str, src: Path) -> None:
    """The checkpoint's tensors are exactly what the config's model holds (names, shapes, int/float).

    Checked on a meta model before anything is written: an export with a missing tensor or a wrong
    shape would only fail later, in whoever loads it.
    """
    from lightning_automodel.models.building import build_on_meta

    expected = build_on_meta(config, model_class).state_dict()  # shapes only: no storage, whatever the size
    tied_head = "lm_head.weight" if bool(getattr(config, "tie_word_embeddings", False)) else None
    missing = [k for k in expected if k not in state and k != tied_head]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ExportError(f"{src} has no tensor for {', '.join(missing[:3])}{more}, which the model's config needs.")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ExportError(f"{src} holds tensors the model's config does not have: {', '.join(unexpected[:3])}.")
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.is_floating_point() != want.is_floating_point():
            raise ExportError(
                f"{src}: tensor {name} is {tensor.dtype} {list(tensor.shape)}; the model's config needs "
                f"{'a floating-point' if want.is_floating_point() else 'an integer'} tensor of shape {list(want.shape)}."
            )


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


def write_hf_directory(state: dict[str, torch.Tensor], config: Any, out: Path, *, max_shard_bytes: int, tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(out)
    # safetensors refuses tensors that share storage; each exported tensor gets its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)


def export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizer_path: str | None = None,
) -> Path:
    """Export and return the output directory (see the module docstring)."""
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    src, out = Path(ckpt_path), Path(out)
    if not src.exists():
        raise ExportError(f"Checkpoint {str(src)!r} does not exist.")
    _check_out(src, out, overwrite)
    lightning_state, hparams = read_checkpoint(src)
    init_args = {k: v for k, v in hparams.items() if k in ("pretrained_path", "config", "model_class", "trust_remote_code")}
    if not init_args:
        raise ExportError(f"{src} has no HFCausalLM hyper-parameters, so the model config is unknown.")
    config = HFCausalLM(**init_args).build_hf_config()
    state = hf_state_dict(lightning_state)
    check_state_matches_config(state, config, init_args.get("model_class", "auto"), src)
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None:
        for key in state:
            if key.endswith("embed_tokens.weight"):
                embed = state[key]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and head is not None and embed is not None:
        if head.shape == embed.shape and torch.equal(head, embed):
            del state["lm_head.weight"]
        else:
            log.warning("lm_head.weight differs from the embedding: exporting it and an untied config.")
            config.tie_word_embeddings = False
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path else (Path(init_args["pretrained_path"]) if init_args.get("pretrained_path") else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_hf_directory(state, config, tmp, max_shard_bytes=parse_size(max_shard_size), tokenizer_dir=tokenizer_dir)
        (tmp / _MARKER).write_text(json.dumps({"source": str(src.resolve()), "time": time.time()}))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_MARKER = ".lightning-automodel-export.json"


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
            if not (rout / _MARKER).is_file():
                raise ExportError(f"{out} is not a previous export; remove it yourself or choose another --out.")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-automodel export", description=__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--tokenizer_path", default=None, help="copy the tokenizer from this local directory")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(list(argv))
    try:
        out = export_checkpoint(
            args.ckpt_path, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite, tokenizer_path=args.tokenizer_path
        )
    except (ExportError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"lightning-automodel export: error: {exc}\n")
    print(f"Exported a Hugging Face model to {out} (load it with AutoModelForCausalLM.from_pretrained).")
    return 0
