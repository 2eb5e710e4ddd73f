"""What CPU/gloo cannot show: NCCL collectives, CUDA placement, bf16 compute on GPUs. Skipped here.

Run on a machine with 2 GPUs: ``make setup TORCH_PIN=`` after installing a CUDA torch into .venv, then
``.venv/bin/python -m pytest -q -m gpu tests/gpu``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed import REPO_ROOT, run_torchrun
from tiny_models import build, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)"),
]

HERE = Path(__file__).resolve().parent


def test_two_gpu_fit_resume_export(tmp_path):
    source = tmp_path / "hub"
    build(tiny_config("llama", vocab_size=260, tie_word_embeddings=True, dtype="bfloat16"), seed=0).to(torch.bfloat16).save_pretrained(source)
    run_torchrun(HERE / "fit_resume_export.py", str(source), str(tmp_path / "run"), nproc=2, timeout=900)
    exported = tmp_path / "exported"
    subprocess.run(
        # the console script users run (installed next to this interpreter by ``make setup``)
        [str(Path(sys.executable).parent / "lightning-automodel"), "export", "--ckpt_path", str(tmp_path / "run" / "resumed.ckpt"), "--out", str(exported)],
        check=True, cwd=REPO_ROOT,
    )
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
