"""2 FSDP2 ranks: a sharded save SIGKILLed at a chosen point, then a resume (crash-safe saves, issue 9).

Usage:
  job_kill_save.py OUT save POINT   fit, save A to last.ckpt, change the weights (B), save B and die at POINT
  job_kill_save.py OUT resume       resume from last.ckpt; write the restored weights; save again
  job_kill_save.py OUT link         ModelCheckpoint(save_last=True): last.ckpt shares the top-k save's files

POINT: ``rank1_writing`` (rank 1 dies inside DCP's write), ``between_renames`` (rank 0 dies between the
two renames of the fallback publication; the atomic exchange is disabled), ``after_exchange`` (rank 0
dies right after the atomic exchange, before removing the previous directory).
"""

import os
import signal
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning.pytorch.strategies.model_parallel as pl_mp
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.core import atomic_files
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def full_state(module):
    return {k: v.full_tensor().clone() for k, v in module.model.state_dict().items()}


def make_trainer(tmp: Path, steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=bool(callbacks), limit_val_batches=0,
        default_root_dir=str(tmp), callbacks=list(callbacks),
    )


def die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, rank: int) -> None:
    if point == "rank1_writing" and rank == 1:
        original = pl_mp._distributed_checkpoint_save

        def write_then_die(state, directory):
            original(state, directory)  # this rank's files are written, the save is not complete
            die()

        pl_mp._distributed_checkpoint_save = write_then_die
    elif point == "between_renames" and rank == 0:
        atomic_files.exchange_paths = lambda a, b: False
        calls = []

        def replace_then_die(src, dst):
            os.replace(src, dst)
            calls.append(dst)
            if len(calls) == 1:  # the previous directory is parked, the new one not yet in place
                die()

        atomic_files.os = types.SimpleNamespace(**{**vars(os), "replace": replace_then_die})
    elif point == "after_exchange" and rank == 0:
        atomic_files.shutil = types.SimpleNamespace(rmtree=lambda *a, **k: die())


def save(tmp: Path, point: str) -> None:
    module = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    trainer = make_trainer(tmp, 2)
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    path = tmp / "last.ckpt"
    trainer.save_checkpoint(path)
    a = full_state(module)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    b = full_state(module)
    if trainer.global_rank == 0:
        torch.save({"A": a, "B": b}, tmp / "references.pt")
    trainer.strategy.barrier()
    arm(point, trainer.global_rank)
    trainer.save_checkpoint(path)
    print("the save was not killed", file=sys.stderr)


class Restored(Callback):
    def on_train_start(self, trainer, pl_module):
        state = full_state(pl_module)
        if trainer.global_rank == 0:
            torch.save(state, Path(trainer.default_root_dir) / "restored.pt")


def resume(tmp: Path) -> None:
    module = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    trainer = make_trainer(tmp, 3, callbacks=[Restored()])
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2), ckpt_path=tmp / "last.ckpt")
    trainer.save_checkpoint(tmp / "last.ckpt")
    print("OK resumed", file=sys.stderr)


def link(tmp: Path) -> None:
    module = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp, 4, callbacks=[checkpoint])
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    final = full_state(module)
    if trainer.global_rank == 0:
        torch.save(final, tmp / "final.pt")
    trainer.strategy.barrier()
    print("OK link", file=sys.stderr)


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "save":
        save(out, sys.argv[3])
    elif mode == "resume":
        resume(out)
    else:
        link(out)
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
