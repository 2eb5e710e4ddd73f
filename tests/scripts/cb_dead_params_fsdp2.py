"""2 ranks, FSDP2: FreezeDeadParameters raises no false alarm for a llama that trains everything.

The job's FSDP2 layout keeps the final norm and the head gathered after the forward, and validation
(the sanity check, then every 2 steps) runs forwards between training steps: the module's parameter
objects are swapped between sharded and unsharded ones. Packing gives per-sequence position ids.
argv[2] ``tied`` / ``untied`` chooses the head.
"""

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks import FreezeDeadParameters
from distributed import end_rank_cleanly

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def main(tmp: Path, head: str) -> None:
    detector = FreezeDeadParameters(detect_steps=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=4, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=2, val_check_interval=2, default_root_dir=str(tmp), callbacks=[detector],
    )
    module = HFCausalLM(config={**CONFIG, "tie_word_embeddings": head == "tied"}, learning_rate=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=SFTDataModule(seq_length=32, batch_size=2, packing=True, layout="thd"))
    assert detector._seen_backward == 4, detector._seen_backward  # detection ran to the end (and all-reduced)
    assert detector.unused == [], detector.unused
    assert not [w for w in record if "FreezeDeadParameters" in str(w.message)], [str(w.message) for w in record]
    print(f"OK dead_params {head}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
