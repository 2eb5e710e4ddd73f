"""Exact mid-epoch resume of SFTDataModule: a run resumed at step 4 equals the uninterrupted run bit for bit.

Run in-process for 1 device (tests/data/test_sft.py imports ``check_resume``) and under torchrun for 2 gloo
DDP ranks: ``data_sft_resume.py OUT_DIR`` (each rank checks its own shard of the batches).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_automodel.data.sft_datamodule import SFTDataModule
from lightning_automodel.models.hf_causal_lm import HFCausalLM

SFT = Path(__file__).resolve().parents[2] / "lightning_automodel" / "data" / "corpus" / "sft"


class Record(Callback):
    """Batches and losses by global step."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = batch["input_ids"].clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].detach().clone()


def fit(out: Path, max_steps: int, devices: int, ckpt_path: str | None = None, save_every: int | None = None):
    pl.seed_everything(0)
    model = HFCausalLM(
        config={"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256},
        learning_rate=1e-2,
    )
    record = Record()
    callbacks: list[Callback] = [record]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        enable_checkpointing=bool(save_every),
    )
    dm = SFTDataModule(train_files=str(SFT / "sft_chat.jsonl"), tokenizer_path=str(SFT / "tiny-tokenizer"), seq_length=64,
                       batch_size=2, packing=True, val_fraction=0, cache_dir=str(out / "cache"))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return record, model, len(dm.train_dataloader())


def check_resume(out: Path, devices: int = 1) -> None:
    full, full_model, steps_per_epoch = fit(out / "a", 9, devices)
    assert steps_per_epoch > 9, steps_per_epoch  # the resume point (step 4) is mid-epoch
    first, _, _ = fit(out / "b", 4, devices, save_every=4)
    ckpt = next((out / "b" / "ckpt").glob("*step=4*.ckpt"))
    resumed, resumed_model, _ = fit(out / "b", 9, devices, ckpt_path=str(ckpt))
    assert sorted(resumed.batches) == list(range(4, 9))
    for step in range(4):
        assert torch.equal(first.batches[step], full.batches[step])
    for step in range(4, 9):
        assert torch.equal(resumed.batches[step], full.batches[step]), f"step {step} trained on another batch"
        assert torch.equal(resumed.losses[step], full.losses[step]), f"step {step}: loss differs"
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


if __name__ == "__main__":
    from distributed import end_rank_cleanly

    check_resume(Path(sys.argv[1]), devices=2)
    import torch.distributed as dist

    print(f"OK data_sft_resume rank {dist.get_rank()}", flush=True)
    end_rank_cleanly()
