"""The node checks (``node_checks.py``) on 2 GPUs and on 1 GPU with NCCL; the same script on 2 gloo ranks here.

World size 1 on NCCL still catches a CPU tensor handed to a collective (NCCL has no CPU path; gloo
would take it), so the 1-GPU case is worth running on a workstation. The CPU case keeps the script's
own logic tested in the normal suite; what only GPUs can show is skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_torchrun
from tiny_models import build, tiny_config

HERE = Path(__file__).resolve().parent


def _on_gpus(count: int):
    return pytest.param(
        "gpu", count, id=f"nccl-{count}gpu",
        marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA device(s) (NCCL)")],
    )


@pytest.mark.parametrize(
    ("accelerator", "ranks"),
    [_on_gpus(2), _on_gpus(1), pytest.param("cpu", 2, id="gloo-2cpu", marks=pytest.mark.multiprocess)],
)
def test_offload_clipping_buffers_hf_checkpoint_lora_and_init(tmp_path, accelerator, ranks):
    base = tmp_path / "base"
    build(tiny_config("llama", vocab_size=260), seed=3).save_pretrained(base)
    result = run_torchrun(HERE / "node_checks.py", accelerator, str(base), str(tmp_path / "run"), nproc=ranks, timeout=900)
    for check in ("offload", "hf", "lora", "init"):
        assert f"OK node_checks {check} {accelerator} x{ranks}" in result.stderr, result.stderr[-3000:]
