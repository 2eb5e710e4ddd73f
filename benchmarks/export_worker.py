"""One export measurement in a fresh process (run by ``benchmarks/case_export.py``).

Usage: python -m benchmarks.export_worker METHOD SOURCE WARM_SOURCE OUT SHARD RESULT_JSON

Prints nothing; writes ``{"peak_kib", "seconds", "files"}`` to RESULT_JSON. The method first exports WARM_SOURCE (a
few-MB checkpoint of the same kind) so lazy imports and first-call set-up are not measured; the
baseline is the resident set after that, where the high-water mark is reset.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def previous_export(source: Path, out: Path, shard: str) -> None:
    """The export of commit 5fb7031 (whole checkpoint loaded, every tensor cloned), kept as a peer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("previous_export", Path(__file__).parent / "_work" / "previous_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.export_checkpoint(source, out, max_shard_size=shard)


def dcp_to_torch_save_then_save_pretrained(source: Path, out: Path, shard: str) -> None:
    """The documented torch route: consolidate DCP into one torch file, load it, ``save_pretrained``."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from lightning_automodel.export import build_meta_model_for, model_info
    from lightning_automodel.core.training_checkpoint_reader import open_trained_checkpoint

    with open_trained_checkpoint(source) as checkpoint:
        info = model_info(checkpoint)
    consolidated = out.parent / (out.name + ".pt")
    dcp_to_torch_save(source, consolidated)
    state = torch.load(consolidated, weights_only=True)["state_dict"]
    config = build_meta_model_for(info, source).config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k[len(info.prefix):]: v for k, v in state.items() if k.startswith(info.prefix)})
    del state
    model.save_pretrained(out, max_shard_size=shard)
    consolidated.unlink()


def export_with(method: str, src: Path, dst: Path, shard: str) -> None:
    import lightning_automodel.export as export

    if method == "ours":
        export.export_checkpoint(src, dst, max_shard_size=shard)
    elif method == "previous":
        previous_export(src, dst, shard)
    elif method == "dcp_to_torch_save":
        dcp_to_torch_save_then_save_pretrained(src, dst, shard)
    else:
        raise SystemExit(f"unknown method {method}")


def main(method: str, source: str, warm: str, out: str, shard: str, result: str) -> None:
    import gc

    from benchmarks.harness import reset_peak_rss, rss_kib

    export_with(method, Path(warm), Path(out + "-warm"), "1MB")
    gc.collect()
    base = rss_kib()
    reset_peak_rss()
    start = time.perf_counter()
    src, dst = Path(source), Path(out)
    export_with(method, src, dst, shard)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM") - base
    files = len(list(dst.glob("*.safetensors")))
    Path(result).write_text(json.dumps({"peak_kib": peak, "seconds": seconds, "files": files}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
