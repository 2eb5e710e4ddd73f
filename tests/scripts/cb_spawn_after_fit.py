"""A first fit with the surgery suite, then a ``ddp_spawn`` fit of the same module on 2 CPU processes (gloo).

``ddp_spawn`` pickles the LightningModule into its workers: anything a callback left on the module
(a closure) makes that fail. The spawned run freezes other modules than the first, and the result
comes back to this process.
"""

import os
import sys

import lightning.pytorch as pl
import torch

import tiny_models as tm
from callbacks.lit_models import InitLM, loader
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, TiedLMHead


class RecordFrozen(pl.Callback):
    """What trains in the spawned workers, sent back through callback_metrics (ddp_spawn returns those)."""

    def on_train_end(self, trainer, pl_module):
        layers = pl_module.model.model.layers
        trainer.callback_metrics["layer0_frozen"] = torch.tensor(float(not layers[0].mlp.up_proj.weight.requires_grad))
        trainer.callback_metrics["layer1_frozen"] = torch.tensor(float(not layers[1].mlp.up_proj.weight.requires_grad))


def suite(path: str) -> list:
    return [ParameterFreezing(freeze_modules=[{"path": path}]), FreezeDeadParameters(), TiedLMHead(), ParameterSummary()]


def main() -> None:
    common = dict(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, num_sanity_val_steps=0)
    module = InitLM(tm.tiny_llama)
    pl.Trainer(devices=1, callbacks=suite("model.layers.0.mlp"), **common).fit(module, loader())
    spawned = pl.Trainer(devices=2, strategy="ddp_spawn", callbacks=[*suite("model.layers.1.mlp"), RecordFrozen()], **common)
    spawned.fit(module, loader())
    metrics = spawned.callback_metrics
    # layer 0 stays frozen from the first fit (requires_grad travels with the module); layer 1 is the spawned run's freeze.
    assert float(metrics["layer0_frozen"]) == 1.0 and float(metrics["layer1_frozen"]) == 1.0, dict(metrics)
    print("OK spawn_after_fit", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
