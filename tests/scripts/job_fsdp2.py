"""2 ranks: fit a tied tiny HFCausalLM with FSDP2, save a sharded checkpoint, resume and save again (the test exports it).

With validation every 2 steps (and the sanity check) and packing: FSDP2 swaps the module's parameter
objects around every forward, and FreezeDeadParameters must still see that every parameter trains
(no alarm). The resumed run's ParameterSummary prints the restored weights' norm.
"""

import math
import re
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, TiedLMHead
from distributed import end_rank_cleanly

CONFIG = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def make_trainer(tmp: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=2, val_check_interval=2, default_root_dir=str(tmp),
        callbacks=[
            ParameterFreezing(freeze_modules=[{"path": "model.norm"}]), FreezeDeadParameters(detect_steps=3), TiedLMHead(),
            ParameterSummary(name="job"),
        ],
    )


def callback(trainer: pl.Trainer, kind: type):
    return next(c for c in trainer.callbacks if isinstance(c, kind))


def no_dead_parameter_alarm(trainer: pl.Trainer, record: list) -> None:
    detector = callback(trainer, FreezeDeadParameters)
    assert detector._seen_backward == 3, detector._seen_backward  # the detection ran to the end
    assert detector.unused == [], detector.unused
    assert not [w for w in record if "FreezeDeadParameters" in str(w.message)]


def full_norm(module: HFCausalLM) -> float:
    unique = {id(p): p for p in module.model.parameters()}.values()
    return math.sqrt(sum(float(p.full_tensor().double().pow(2).sum()) for p in unique))


def main(tmp: Path) -> None:
    data = lambda: SFTDataModule(seq_length=32, batch_size=2, packing=True, layout="thd")
    first = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    t1 = make_trainer(tmp, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t1.fit(first, datamodule=data())
    no_dead_parameter_alarm(t1, record)
    ckpt = tmp / "sharded.ckpt"
    t1.save_checkpoint(ckpt)
    saved_norm = full_norm(first)
    resumed = HFCausalLM(config=CONFIG, learning_rate=1e-2)
    t2 = make_trainer(tmp, 5)
    t2.fit(resumed, datamodule=data(), ckpt_path=ckpt)
    if t2.global_rank == 0:
        printed = re.search(r"Param L2 norm \(global\): (\S+)", callback(t2, ParameterSummary).text).group(1)
        assert printed == f"{saved_norm:.4f}", (printed, saved_norm)
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
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
