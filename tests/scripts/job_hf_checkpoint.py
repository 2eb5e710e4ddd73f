"""2 FSDP2 ranks write Hugging Face directories with HuggingFaceCheckpoint; rank 0 saves the reference.

Usage: job_hf_checkpoint.py OUT_DIR {mixtral|tied_llama}
The reference is ``save_pretrained`` of a CPU model holding the gathered trained state; the test
compares the callback's directories with it and exports the sharded checkpoint saved at the end.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from distributed import end_rank_cleanly

CONFIGS = {
    # 3 experts on 2 ranks: the fused expert tensors split unevenly (2 + 1)
    "mixtral": dict(model_type="mixtral", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_local_experts=3,
                    num_experts_per_tok=2),
    "tied_llama": dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
}


def main(out: Path, name: str) -> None:
    module = HFCausalLM(config=CONFIGS[name], learning_rate=1e-2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
        default_root_dir=str(out), callbacks=[HuggingFaceCheckpoint(every_n_train_steps=2, max_shard_size="40KB")],
    )
    trainer.fit(module, datamodule=SFTDataModule(seq_length=32, batch_size=2))
    trainer.save_checkpoint(out / "sharded.ckpt")
    full = {k: v.full_tensor() for k, v in module.model.state_dict().items()}
    if trainer.global_rank == 0:
        reference = module.build_model()
        reference.to_empty(device="cpu")
        reference.load_state_dict(full, strict=True, assign=True)
        reference.tie_weights()
        reference.save_pretrained(out / "save_pretrained", max_shard_size="40KB")
    trainer.strategy.barrier()
    print("OK job_hf_checkpoint", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
