"""Case 6: training-step overhead of the whole callback suite on the embedded default model."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import yaml

from benchmarks.harness import REPO, CaseResult, Row
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, THDSqueeze, TiedLMHead


class StepTimer(pl.Callback):
    """Wall time of the steps after ``warmup`` (setup, summary and detection steps excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()  # the last step's end: teardown is not a training step

    @property
    def elapsed(self) -> float:
        return self.end - self.start


SUITE = "with the suite"
NONE = "without callbacks"
AS_CONFIGURED = "the embedded default's callbacks as configured"


def suite(variant: str) -> list[pl.Callback]:
    """Callbacks of one variant (fresh instances per fit)."""
    if variant == SUITE:
        # Every callback that can run on this fp32 model, configured so both variants train the same
        # parameters in the same dtype: what remains is the suite's own cost.
        return [ParameterFreezing(), FreezeDeadParameters(), TiedLMHead(), THDSqueeze(), ParameterSummary()]
    if variant == AS_CONFIGURED:
        # configs/tiny-llama-cpu.yaml: freezes model.layers.0.mlp, so it also trains less.
        return [ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]), FreezeDeadParameters(), TiedLMHead(),
                ParameterSummary(name="tiny-llama")]
    return []


def fit(variant: str, steps: int, warmup: int) -> float:
    config = yaml.safe_load((REPO / "configs/tiny-llama-cpu.yaml").read_text())
    config["model"].pop("warmup_steps", None)
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    callbacks = [timer, *suite(variant)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(HFCausalLM(**config["model"]), datamodule=SFTDataModule(**config["data"]))
    return timer.elapsed / (steps - warmup)


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    steps, warmup = (6, 3) if smoke else (60, 10)
    times: dict[str, list[float]] = {SUITE: [], NONE: [], AS_CONFIGURED: []}
    for _ in range(repeats):
        for variant in times:  # alternating, one fresh Trainer and model per fit
            times[variant].append(fit(variant, steps, warmup))
    r = CaseResult(f"6. Seconds per training step, embedded default (configs/tiny-llama-cpu.yaml model and data), "
                   f"{steps - warmup} steps after {warmup} warm-up", ours=SUITE, target="at most 2% slower")
    r.rows = [Row(k, v, "s/step") for k, v in times.items()]
    r.notes.append("'With the suite' = ParameterFreezing() (no-op on a text model), FreezeDeadParameters, TiedLMHead, THDSqueeze, "
                   "ParameterSummary: it trains the same parameters in the same dtype as the bare run, so the gap is the suite's "
                   "own cost. CastMixedDtypeToBF16 is left out because it changes the arithmetic (bf16 on CPU), not overhead. "
                   "FreezeDeadParameters' gradient check runs during the warm-up steps by design. The last row is for "
                   "information: it freezes one MLP, so it does less work.")
    if not smoke:
        r.met = r.rows[0].median <= 1.02 * r.rows[1].median
        if not r.met:
            r.notes.append(f"Missed by {r.rows[0].median / r.rows[1].median - 1:.1%} (medians); compare the two min–max "
                           "ranges: where they overlap, the gap is within run-to-run noise on this shared 2-core machine.")
    return [r]
