"""2 ranks: a filesystem step that fails on rank 0 alone (publishing, hard-linking) is an error on every rank at once.

Before, rank 0 raised and rank 1 waited at the next barrier until the process-group timeout (here 60 s).
"""

import sys
import time
import types
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl

import lightning_automodel.strategies as strategies
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def fails_on_rank_0(trainer: pl.Trainer, path: Path, attribute: str) -> float:
    """Seconds until this rank's save raised, with ``strategies.<attribute>`` failing on rank 0."""
    original = getattr(strategies, attribute)

    def refused(*args, **kwargs):
        raise OSError(f"{attribute} refused (test)")

    if trainer.global_rank == 0:  # os.link is reached through the module's ``os``
        setattr(strategies, attribute, types.SimpleNamespace(link=refused) if attribute == "os" else refused)
    start = time.perf_counter()
    try:
        trainer.save_checkpoint(path)
    except (OSError, RuntimeError) as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {trainer.global_rank}: the save with a failing {attribute} succeeded")
    finally:
        setattr(strategies, attribute, original)
    elapsed = time.perf_counter() - start
    expected = f"{attribute} refused" if trainer.global_rank == 0 else "rank 0 failed"
    assert expected in message, (trainer.global_rank, message)
    return elapsed


def main(tmp: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2,
        strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)),
        max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
        default_root_dir=str(tmp),
    )
    trainer.fit(HFCausalLM(config=CONFIG, learning_rate=1e-2), datamodule=SFTDataModule(seq_length=16, batch_size=2))
    publish = fails_on_rank_0(trainer, tmp / "a.ckpt", "replace_directory")
    trainer.save_checkpoint(tmp / "b.ckpt")  # a good save, so the next one of the same step links its files
    link = fails_on_rank_0(trainer, tmp / "c.ckpt", "os")
    assert publish < 20 and link < 20, (publish, link)
    print(f"OK rank0 failure rank {trainer.global_rank} publish {publish:.1f} s link {link:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_rank_cleanly()
