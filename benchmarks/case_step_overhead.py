"""Case 6: training-step overhead of the whole callback suite on the embedded default model."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import yaml

from benchmarks.harness import REPO, CaseResult, Row
from lightning_automodel import HFCausalLM, TextDataModule
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, TiedLMHead


class StepTimer(pl.Callback):
    """Wall time of the steps after ``warmup`` (setup, summary and detection steps excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.start


def fit(with_suite: bool, steps: int, warmup: int) -> float:
    config = yaml.safe_load((REPO / "configs/tiny-llama-cpu.yaml").read_text())
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    callbacks = [timer]
    if with_suite:
        callbacks += [ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]), FreezeDeadParameters(), TiedLMHead(), ParameterSummary()]
    else:
        callbacks += []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(HFCausalLM(**config["model"]), datamodule=TextDataModule(**config["data"]))
    return timer.elapsed / (steps - warmup)


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    steps, warmup = (6, 3) if smoke else (60, 10)
    times = {"with the suite": [], "without callbacks": []}
    for _ in range(repeats):
        times["with the suite"].append(fit(True, steps, warmup))
        times["without callbacks"].append(fit(False, steps, warmup))
    r = CaseResult(f"6. Seconds per training step, embedded default, {steps - warmup} steps after {warmup} warm-up",
                   ours="with the suite", target="at most 2% slower")
    r.rows = [Row(k, v, "s/step") for k, v in times.items()]
    r.notes.append("Both variants freeze nothing by default except the suite's selector, so the suite run also trains fewer parameters; "
                   "the comparison is the cost a user sees.")
    if not smoke:
        r.met = r.rows[0].median <= 1.02 * r.rows[1].median
    return [r]
