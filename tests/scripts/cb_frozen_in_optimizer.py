"""Does a resume fail when the optimizer holds frozen parameters? (issue 11 item 3, measured on gloo).

Modes (argv[1]), each: fit 3 steps with AdamW over *all* parameters while ``model.layers.0.mlp`` is
frozen, save, resume for 3 more steps with the same module class:
  same       the resumed run freezes the same parameters               (resumes)
  unfrozen   the resumed run freezes nothing (same optimizer groups)   (FSDP2: fails, one device: resumes)
Strategy by argv[3]: ``fsdp2`` (2 ranks, DCP directory) or ``single`` (one device, .ckpt file).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import tiny_models as tm
from callbacks.lit_models import ShardedLM, loader
from distributed import end_rank_cleanly


class AllParamsLM(ShardedLM):
    def __init__(self, freeze: bool):
        super().__init__(tm.tiny_llama, lr=5e-3)
        self.freeze = freeze

    def configure_model(self):
        super().configure_model()
        if self.freeze:
            for p in self.model.model.layers[0].mlp.parameters():
                p.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_trainer(tmp: Path, steps: int, strategy: str) -> pl.Trainer:
    kwargs = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) if strategy == "fsdp2" else dict(devices=1)
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp), **kwargs)


def main(mode: str, tmp: Path, strategy: str) -> None:
    t1 = make_trainer(tmp, 3, strategy)
    t1.fit(AllParamsLM(freeze=True), loader(n=48))
    ckpt = tmp / "a.ckpt"
    t1.save_checkpoint(ckpt)
    t2 = make_trainer(tmp, 6, strategy)
    try:
        t2.fit(AllParamsLM(freeze=mode == "same"), loader(n=48), ckpt_path=ckpt)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        missing = next((line.strip() for line in str(exc).splitlines() if line.strip().startswith("RuntimeError: Missing key")), str(exc)[:300])
        print(f"RESULT {mode} {strategy}: FAILED {type(exc).__name__}: {missing}", file=sys.stderr)
        return
    print(f"RESULT {mode} {strategy}: RESUMED at step {t2.global_step}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
