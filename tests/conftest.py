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
# Materialized memory starts as NaN (core/model_build.py): a tensor no load or init writes fails loudly.
# Subprocess (torchrun) tests inherit it.
os.environ.setdefault("LIGHTNING_AUTOMODEL_FILL_UNINITIALIZED", "nan")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


import pytest  # noqa: E402


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _own_import_path_policy():
    """Tests that call the command's parser directly (``parse_fit_config``, ``check_command_line``) set
    jsonargparse's process-wide import-path policy without ``main`` putting it back; no test sees another's."""
    from lightning_automodel._compat.lightning import import_path_policy_preserved

    with import_path_policy_preserved():
        yield


@pytest.fixture(autouse=True)
def _no_leftover_distributed_state():
    """In-process ModelParallelStrategy runs leave a process group and MASTER_PORT & co. behind.

    Later tests need neither: a leftover MASTER_PORT would make every subprocess launch reuse one port.
    """
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
