"""Shared test setup: offline by construction, tiny models, a subprocess launcher for 2-rank runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """In-process ModelParallelStrategy runs leave a 1-rank process group behind; later tests need none."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
