"""2 ranks: fit a tied tiny HFCausalLM with FSDP2, save a sharded checkpoint, resume and save again (the test exports it)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_automodel import HFCausalLM, TextDataModule
from lightning_automodel.callbacks import ParameterFreezing, TiedLMHead

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def make_trainer(tmp: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, default_root_dir=str(tmp),
        callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.norm"}]), TiedLMHead()],
    )


def main(tmp: Path) -> None:
    data = lambda: TextDataModule(seq_length=32, batch_size=2, packing=True)
    first = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    t1 = make_trainer(tmp, 3)
    t1.fit(first, datamodule=data())
    ckpt = tmp / "sharded.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    t2 = make_trainer(tmp, 5)
    t2.fit(resumed, datamodule=data(), ckpt_path=ckpt)
    assert t2.global_step == 5
    assert not resumed.model.model.norm.weight.requires_grad
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight
    t2.save_checkpoint(tmp / "final.ckpt")
    full = {k: v.full_tensor() for k, v in resumed.model.state_dict().items()}
    if t2.global_rank == 0:
        torch.save(full, tmp / "reference_state.pt")
    t2.strategy.barrier()
    print("OK job_fsdp2", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
