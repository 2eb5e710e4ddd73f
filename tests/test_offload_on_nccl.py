"""CPU offload on GPU nodes (issue 18 item 1), with ``meta`` standing in for the GPU where a device is needed.

On the code before: the strategy created an NCCL-only process group on CUDA, so clipping the
CPU-offloaded gradients (``clip_grad_norm_`` all-reduces their norm on the CPU) failed; and the
fingerprint of every sharded save stacked CPU shard sums with device buffer sums ("Tensor on device
meta is not on the expected device cpu!").
"""

from __future__ import annotations

import types

import lightning.pytorch.strategies.model_parallel as pl_mp
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment

from lightning_automodel.strategies import AtomicModelParallelStrategy, training_state_fingerprint

STAND_IN = torch.device("meta")


class _Stop(Exception):
    pass


def _backend_chosen(monkeypatch, device: torch.device, **kwargs) -> str:
    chosen = []

    def record(environment, backend, **_):
        chosen.append(backend)
        raise _Stop

    monkeypatch.setattr(pl_mp, "_init_dist_connection", record)
    strategy = AtomicModelParallelStrategy(**kwargs)
    strategy.parallel_devices = [device]
    strategy.cluster_environment = LightningEnvironment()
    strategy.accelerator = types.SimpleNamespace(setup_device=lambda device: None)
    with pytest.raises(_Stop):
        strategy.setup_environment()
    return chosen[0]


def test_cuda_process_group_has_a_cpu_backend_for_offloaded_gradients(monkeypatch):
    backend = _backend_chosen(monkeypatch, torch.device("cuda", 0))
    per_device = dict(part.split(":") for part in backend.split(","))
    assert per_device == {"cpu": "gloo", "cuda": "nccl"}


def test_an_explicit_backend_and_cpu_runs_are_left_alone(monkeypatch):
    assert _backend_chosen(monkeypatch, torch.device("cuda", 0), process_group_backend="nccl") == "nccl"
    assert _backend_chosen(monkeypatch, torch.device("cpu")) == "gloo"


class _OffloadedWithBuffer(torch.nn.Module):
    """Shards on the CPU (offloaded), a persistent buffer on the device (DeepSeek's ``e_score_correction_bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("bias_correction", torch.ones(4, device=STAND_IN))


def test_fingerprint_of_cpu_shards_with_device_buffers(monkeypatch):
    module = _OffloadedWithBuffer()
    with torch.no_grad():
        module.linear.weight.copy_(torch.arange(6.0).reshape(2, 3))
        module.linear.bias.copy_(torch.tensor([0.5, 0.25]))
    original_cpu = torch.Tensor.cpu
    # The stand-in cannot be read back; a device's values would be. Here they read as zeros.
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: torch.zeros(self.shape, dtype=self.dtype) if self.is_meta else original_cpu(self, *a, **k))
    epoch, step, values = training_state_fingerprint(module, {"epoch": 1, "global_step": 7})
    assert (epoch, step) == (1, 7)
    assert values == (0.0, 15.0, 0.75)  # in state_dict order: the root's buffer, then the weight and bias


@pytest.mark.multiprocess
def test_a_rank_0_filesystem_failure_is_an_error_on_every_rank(tmp_path):
    from distributed import run_torchrun

    proc = run_torchrun("job_rank0_fs_failure.py", str(tmp_path), nproc=2, timeout=300)
    assert proc.stderr.count("OK rank0 failure") == 2, proc.stderr[-3000:]
