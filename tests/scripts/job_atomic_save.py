"""2 ranks: a save that dies halfway leaves the previous sharded checkpoint intact and loadable."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning.fabric.strategies.model_parallel as fabric_mp
import lightning.pytorch.strategies.model_parallel as pl_mp
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make_trainer(tmp: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
        default_root_dir=str(tmp),
    )


def main(tmp: Path) -> None:
    module = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    trainer = make_trainer(tmp, 2)
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    path = tmp / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = {k: v.full_tensor().clone() for k, v in module.model.state_dict().items()}
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)

    original = pl_mp._distributed_checkpoint_save

    def dies_halfway(state, directory):
        original(state, directory)
        raise RuntimeError("killed while saving")

    pl_mp._distributed_checkpoint_save = dies_halfway
    try:
        trainer.save_checkpoint(path)
    except RuntimeError as exc:
        assert "killed while saving" in str(exc)
    else:
        raise AssertionError("the save should have died")
    finally:
        pl_mp._distributed_checkpoint_save = original
    trainer.strategy.barrier()
    # The final directory still holds the first, complete checkpoint.
    resumed = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    t2 = make_trainer(tmp, 2)
    t2.fit(resumed, datamodule=SFTDataModule(seq_length=16, batch_size=2), ckpt_path=path)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v.full_tensor(), saved[k]), k
    # And a save that completes replaces it.
    t2.save_checkpoint(path)
    assert (path / ".metadata").is_file() and not (tmp / ".last.ckpt.old").exists()
    print("OK atomic", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
