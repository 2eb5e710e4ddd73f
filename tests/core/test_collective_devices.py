"""Every collective runs on the strategy's device (NCCL has no CPU path; gloo would hide a CPU tensor).

The strategy's root device is stood in for by ``meta``: the patched collectives record the device of
each tensor they are handed and stop the flow (a meta tensor cannot be read back). On the code before
this guard existed, ``FreezeDeadParameters`` handed a CPU tensor to ``all_reduce`` and this test failed.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

import tiny_models as tm
from callbacks.lit_models import InitLM
from core.pg import single_rank_group
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterSummary
from lightning_automodel.core import distributed as core_distributed

STAND_IN = torch.device("meta")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce")


class _Stop(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch):
    devices: list[torch.device] = []

    def record(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, (list, tuple)) else [tensor_or_list]
        devices.extend(t.device for t in tensors if isinstance(t, torch.Tensor))
        raise _Stop

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, record)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    with single_rank_group():
        yield devices


def _trainer_on_stand_in():
    strategy = DDPStrategy(parallel_devices=[STAND_IN])
    return types.SimpleNamespace(strategy=strategy, world_size=1, precision="32-true", callbacks=[])


def test_dead_parameter_report_reduces_on_the_strategy_device(recorded):
    module = InitLM(tm.tiny_llama)
    callback = FreezeDeadParameters(detect_steps=1)
    trainer = _trainer_on_stand_in()
    callback.on_train_start(trainer, module)
    with pytest.raises(_Stop):
        callback.on_after_backward(trainer, module)
    assert recorded and all(d == STAND_IN for d in recorded), recorded


def test_summary_norm_reduces_on_the_strategy_device(recorded):
    module = InitLM(tm.tiny_llama)
    with pytest.raises(_Stop):
        ParameterSummary().summarize(_trainer_on_stand_in(), module, module.model, 1)
    assert recorded and all(d == STAND_IN for d in recorded), recorded


def test_core_default_device_follows_the_backend(monkeypatch):
    with single_rank_group():
        assert core_distributed.collective_device() == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert core_distributed.collective_device() == torch.device("cuda", 3)


def test_collectives_are_called_in_one_place_only():
    """A new ``dist.all_reduce(...)`` elsewhere would bypass the device choice; it must go through core.distributed."""
    package = Path(__file__).resolve().parents[2] / "lightning_automodel"
    pattern = re.compile(r"\b(?:dist|torch\.distributed)\.(?:" + "|".join(COLLECTIVES) + r")\(")
    offenders = [
        f"{path.relative_to(package)}:{i}"
        for path in package.rglob("*.py")
        if path.name != "distributed.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
