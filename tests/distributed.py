"""Run a script under ``torchrun`` with N CPU ranks (gloo) and return its result.

Multi-process tests never start a multi-rank strategy inside the pytest process (Lightning's
launcher re-executes ``sys.argv``); they run a script from ``tests/scripts/`` in a subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without rendezvous variables, so a child picks its own free port."""
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_torchrun(
    script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` with ``nproc`` ranks; raise with both streams on failure."""
    path = Path(script)
    if not path.is_absolute():
        path = SCRIPTS_DIR / path
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(path), *args,
    ]
    full_env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def end_rank_cleanly() -> None:
    """End a torchrun rank whose checks all passed, without Python's interpreter finalization.

    A gloo rank sometimes aborts while the interpreter shuts down ("terminate called without an active
    exception", SIGABRT, no Python frame), after every check passed and every result was written: a
    torch teardown race seen in CI here (benchmarks/load_worker.py works around the same one). Both
    ranks meet at a barrier first, so neither leaves while the other still needs it. A rank whose
    checks fail raises before reaching this and exits 1 with its traceback, as usual.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
