"""After ``configure_model`` loads a checkpoint, nothing of the load stays: no reader, no plan, no open
file, no memory map of a checkpoint file (issue 18 item 5). A mapped ``.bin`` file's touched pages, or a
reader's buffers, would stay resident next to the shards for the whole run."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from lightning_automodel import HFCausalLM
from lightning_automodel.core import sharded_load


def _checkpoint_files_in_use(root: Path) -> list[str]:
    """Checkpoint files this process still maps or holds open."""
    root = str(root.resolve())
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if root in line}
    opened = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            opened.add(target)
    return sorted(mapped | opened)


def _track_reader_and_plan(monkeypatch) -> tuple[list[weakref.ref], list[weakref.ref]]:
    readers: list[weakref.ref] = []
    plans: list[weakref.ref] = []
    original_init, original_plan = sharded_load.CheckpointReader.__init__, sharded_load.plan_checkpoint_load

    def tracked_init(self, *args, **kwargs):
        readers.append(weakref.ref(self))
        original_init(self, *args, **kwargs)

    def tracked_plan(*args, **kwargs):
        plan = original_plan(*args, **kwargs)
        plans.append(weakref.ref(plan))
        return plan

    monkeypatch.setattr(sharded_load.CheckpointReader, "__init__", tracked_init)
    monkeypatch.setattr("lightning_automodel.models.hf_causal_lm.plan_checkpoint_load", tracked_plan)
    return readers, plans


def _assert_released(readers: list[weakref.ref], plans: list[weakref.ref]) -> None:
    gc.collect()
    assert readers and plans
    assert all(ref() is None for ref in readers), "a CheckpointReader outlived the load"
    assert all(ref() is None for ref in plans), "the LoadPlan outlived the load"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("builder", [tm.tiny_llama, tm.tiny_deepseek_v4], ids=["rename", "converter"])
def test_nothing_of_the_load_survives_configure_model(tmp_path, monkeypatch, safetensors, builder):
    builder().save_pretrained(tmp_path, safe_serialization=safetensors)
    readers, plans = _track_reader_and_plan(monkeypatch)
    module = HFCausalLM(pretrained_path=str(tmp_path))
    module.configure_model()
    _assert_released(readers, plans)
    assert _checkpoint_files_in_use(tmp_path) == []
    assert all(not p.is_meta and torch.isfinite(p).all() for p in module.model.parameters())


def test_a_library_that_keeps_an_exception_does_not_pin_the_load(tmp_path, monkeypatch):
    # What happened in this suite: the LoRA step imports peft, which imports bitsandbytes, which logs its
    # failed kernel load with the exception as an argument; pytest's log capture keeps the record, so the
    # exception's traceback kept every frame above the import, configure_model's with its locals. Here a
    # stand-in for such a library keeps the exception it caught, deterministically (whatever is imported).
    tm.tiny_llama().save_pretrained(tmp_path)
    readers, plans = _track_reader_and_plan(monkeypatch)
    kept: list[BaseException] = []
    import lightning_automodel.models.hf_causal_lm as hf_causal_lm

    original = hf_causal_lm.adapted_modules

    def keeps_an_exception(model):
        try:
            raise RuntimeError("optional kernel not available")
        except RuntimeError as exc:
            kept.append(exc)  # as a log record holding the exception would
        return original(model)

    monkeypatch.setattr(hf_causal_lm, "adapted_modules", keeps_an_exception)
    HFCausalLM(pretrained_path=str(tmp_path)).configure_model()
    assert kept
    _assert_released(readers, plans)
