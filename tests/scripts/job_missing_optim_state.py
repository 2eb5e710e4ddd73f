"""2 FSDP2 ranks: a LLaVA fine-tuned on text only (the vision tower and projector get no gradient) resumes.

Usage: job_missing_optim_state.py OUT_DIR MODE

MODE ``warn``: the default resumes with fresh state for them and one warning naming them; ``error``:
``on_missing_optimizer_state="error"`` stops with one line naming them and the fix; ``advice``: the
selectors FreezeDeadParameters printed, added verbatim to ParameterFreezing, resume (with "error", so
nothing falls back) and keep those parameters frozen, and the key the warning quotes is the checkpoint's.
"""

import re
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly


class Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"].detach()))


def make_trainer(out: Path, epochs: int, callbacks: list, **strategy_args) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2,
        strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **strategy_args),
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
        enable_model_summary=False, default_root_dir=str(out), callbacks=callbacks,
    )


def first_run(out: Path, losses: Losses) -> str:
    """One epoch (2 steps: 8 samples, batch 2, 2 ranks), then a sharded checkpoint."""
    base = out / "base"
    detector = FreezeDeadParameters(detect_steps=1)
    t = make_trainer(out, 1, [ParameterFreezing(freeze_vision_tower=False), detector, losses])
    if t.global_rank == 0 and not base.exists():
        tm.tiny_llava(seed=3).save_pretrained(base)
    t.strategy.barrier()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(HFCausalLM(pretrained_path=str(base), learning_rate=1e-2), loader(n=8, batch_size=2))
    t.save_checkpoint(out / "half.ckpt")
    advice = [str(w.message) for w in record if "FreezeDeadParameters" in str(w.message)]  # rank 0 warns
    shared = [advice]
    dist.broadcast_object_list(shared, src=0)
    assert len(shared[0]) == 1 and "model.vision_tower." in shared[0][0], shared[0]
    return shared[0][0]


def resume(out: Path, callbacks: list, **strategy_args) -> tuple[pl.Trainer, HFCausalLM, list[str]]:
    t = make_trainer(out, 2, callbacks, **strategy_args)
    module = HFCausalLM(pretrained_path=str(out / "base"), learning_rate=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(module, loader(n=8, batch_size=2), ckpt_path=out / "half.ckpt")
    return t, module, [str(w.message) for w in record]


def main(out: Path, mode: str) -> None:
    first = Losses()
    advice = first_run(out, first)
    if mode == "warn":
        second, full = Losses(), Losses()
        t, _, messages = resume(out, [ParameterFreezing(freeze_vision_tower=False), FreezeDeadParameters(), second])
        assert t.global_step == 4, t.global_step
        # the state the checkpoint has was loaded: the resume equals the uninterrupted run
        uninterrupted = make_trainer(out, 2, [ParameterFreezing(freeze_vision_tower=False), full])
        uninterrupted.fit(HFCausalLM(pretrained_path=str(out / "base"), learning_rate=1e-2), loader(n=8, batch_size=2))
        assert first.values + second.values == full.values, (first.values, second.values, full.values)
        missing = [m for m in messages if "no optimizer state" in m]
        if t.global_rank == 0:
            assert len(missing) == 1, messages
            assert "model.vision_tower." in missing[0] and "fresh" in missing[0], missing[0]
    elif mode == "error":
        try:
            resume(out, [ParameterFreezing(freeze_vision_tower=False)], on_missing_optimizer_state="error")
        except Exception as exc:  # noqa: BLE001
            message = str(exc)
            assert "\n" not in message and len(message) < 1200, message
            assert "model.vision_tower." in message and "on_missing_optimizer_state" in message, message
        else:
            raise AssertionError("on_missing_optimizer_state='error' must stop the resume")
    elif mode == "advice":
        selectors = [{"path": p} for p in re.findall(r"- \{path: ([^}]+)\}", advice)]
        assert selectors, advice
        quoted = re.search(r"`Missing key in checkpoint state_dict: ([^`]+)`", advice).group(1)
        from torch.distributed.checkpoint import FileSystemReader

        keys = set(FileSystemReader(str(out / "half.ckpt")).read_metadata().state_dict_metadata)
        # the real key: absent for the dead parameter, present in the same form for a trained one
        assert quoted.startswith("optimizer_0.state.model.model.vision_tower.") and quoted not in keys, quoted
        assert re.sub(r"model\.vision_tower\..*\.step$", "lm_head.weight.step", quoted) in keys, quoted
        rule = ParameterFreezing(freeze_vision_tower=False, freeze_modules=selectors)
        t, module, messages = resume(out, [rule, FreezeDeadParameters()], on_missing_optimizer_state="error")
        assert t.global_step == 4, t.global_step
        for selector in selectors:
            params = [p for n, p in module.model.named_parameters() if n == selector["path"] or n.startswith(selector["path"] + ".")]
            assert params and not any(p.requires_grad for p in params), selector
    else:
        raise SystemExit(f"unknown mode {mode}")
    if dist.get_rank() == 0:
        print(f"OK missing_optim_state {mode}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_rank_cleanly()
