"""Case 6: training-step overhead of the whole callback suite on the embedded default model."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import yaml

from benchmarks.harness import REPO, CaseResult, Row
from lightning_automodel import HFCausalLM, TextDataModule
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, THDSqueeze, TiedLMHead


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
    config["model"].pop("warmup_steps", None)
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    callbacks = [timer]
    if with_suite:
        # Every callback that can run on this model, configured so both variants train the same
        # parameters in the same dtype: what remains is the suite's own cost.
        callbacks += [ParameterFreezing(), FreezeDeadParameters(), TiedLMHead(), THDSqueeze(), ParameterSummary()]
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
    r.notes.append("The suite run trains the same parameters in the same dtype (ParameterFreezing() is a no-op on a text model); "
                   "FreezeDeadParameters' gradient check runs during the warm-up steps by design.")
    if not smoke:
        r.met = r.rows[0].median <= 1.02 * r.rows[1].median
    return [r]
