"""One cell of the crossing matrix: fit -> resume, from a ``save_pretrained`` checkpoint, with HF checkpoints.

Usage (2 FSDP2 ranks): torchrun --nproc_per_node=2 crossing_matrix.py OUT FAMILY MODE fsdp2
In-process (one device): ``run_cell(out, family, mode, "single")``.

Writes under OUT:
* ``src/``: the base model, written by ``save_pretrained`` (the hub's layout on disk);
* ``a/``: an uninterrupted 4-step fit (Lightning checkpoints at steps 2 and 4, ``HuggingFaceCheckpoint``
  ``hf/final``); ``b/``: a fit resumed from a's step-2 checkpoint to step 4;
* ``result.pt`` (rank 0): per-step losses of both runs and both trained models' logits on a probe batch.

The test (tests/test_crossing_matrix.py) asserts the invariants on these files: the resume equals the
uninterrupted run, and every Hugging Face directory (the callback's, ``export``'s merged and adapter
directories) reloads in transformers / peft to the trained model's logits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

VOCAB = 256
_TEXT = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)

#: one model per family of the matrix: dense, tied head, fused-expert MoE, image-text (trained on text only,
#: so its vision tower never gets a gradient)
FAMILIES: dict[str, dict[str, Any]] = {
    "dense": dict(model_type="llama", **_TEXT),
    "tied": dict(model_type="gemma3_text", **_TEXT),
    "moe": dict(model_type="olmoe", **_TEXT, num_experts=4, num_experts_per_tok=2),
    "vlm": dict(
        model_type="qwen2_vl",
        text_config=dict(model_type="qwen2_vl_text", **_TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
    ),
}
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")
STEPS, RESUME_AT, SEQ, BATCH = 4, 2, 32, 2


def hf_config(family: str) -> Any:
    from transformers import AutoConfig

    settings = dict(FAMILIES[family])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def auto_class(family: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if family == "vlm" else AutoModelForCausalLM


def write_source(out: Path, family: str) -> Path:
    """The base model with seeded random weights, saved the way the hub stores it."""
    src = out / "src"
    torch.manual_seed(0)
    model = auto_class(family).from_config(hf_config(family))
    model.save_pretrained(src)
    return src


def probe_ids() -> torch.Tensor:
    return torch.randint(3, 240, (2, 16), generator=torch.Generator().manual_seed(123))


class FixedTokens(pl.LightningDataModule):
    """Eight fixed random sequences in order: the data are the same whatever the run or the resume point."""

    def setup(self, stage: str) -> None:
        self.rows = torch.randint(3, 240, (8, SEQ), generator=torch.Generator().manual_seed(7))

    def train_dataloader(self) -> DataLoader:
        batch = lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)}  # noqa: E731
        return DataLoader(list(self.rows), batch_size=BATCH, shuffle=False, collate_fn=batch)


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].detach())


def _fit(out: Path, src: Path, mode: str, strategy: str, ckpt_path: Path | None) -> tuple[dict[int, float], torch.Tensor]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_automodel import HFCausalLM
    from lightning_automodel.callbacks import HuggingFaceCheckpoint, LoRA, TiedLMHead

    recorder = LossRecorder()
    callbacks: list[pl.Callback] = [
        recorder,
        TiedLMHead(),
        ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=RESUME_AT, save_top_k=-1),
        HuggingFaceCheckpoint(dirpath=out / "hf"),
    ]
    if mode == "lora":
        callbacks.insert(1, LoRA(**LORA))
    if strategy == "fsdp2":
        from lightning_automodel.strategies import AtomicModelParallelStrategy

        kwargs: dict[str, Any] = dict(devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    else:
        kwargs = dict(devices=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=STEPS, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out), callbacks=callbacks, **kwargs,
    )
    module = HFCausalLM(pretrained_path=str(src), learning_rate=1e-2)
    trainer.fit(module, datamodule=FixedTokens(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    module.model.eval()
    with torch.no_grad():
        logits = module.model(input_ids=probe_ids()).logits.float().cpu()
    return recorder.losses, logits


def run_cell(out: Path, family: str, mode: str, strategy: str) -> None:
    """Both fits of a cell; ``out/src`` must exist (the test writes it with :func:`write_source`)."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    src = out / "src"
    losses_a, logits_a = _fit(out / "a", src, mode, strategy, None)
    resume_from = out / "a" / "ckpt" / f"step={RESUME_AT}.ckpt"
    losses_b, logits_b = _fit(out / "b", src, mode, strategy, resume_from)
    if rank == 0:
        torch.save({"losses_a": losses_a, "losses_b": losses_b, "logits_a": logits_a, "logits_b": logits_b}, out / "result.pt")


if __name__ == "__main__":
    from distributed import end_rank_cleanly

    out, family, mode, strategy = Path(sys.argv[1]), *sys.argv[2:5]
    run_cell(out, family, mode, strategy)
    print(f"OK crossing_matrix {family} {mode} {strategy}", file=sys.stderr)
    end_rank_cleanly()
