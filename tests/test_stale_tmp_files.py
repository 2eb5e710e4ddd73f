"""Temporary files of killed single-file saves: removed at the next run's first save, only when provably ours."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

import lightning_automodel.checkpoint_io as checkpoint_io
from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_what_killed_saves_left_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io, "_swept", set())  # a fresh run
    host, dead = socket.gethostname(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed_other_name = tmp_path / f".epoch=0-step=100.ckpt.lightning-automodel-{host}-{dead}-abc123.tmp"
        killed_same_name = tmp_path / f".last.ckpt.lightning-automodel-{host}-{dead}-def456.tmp"
        running = tmp_path / f".last.ckpt.lightning-automodel-{host}-{live.pid}-ghi789.tmp"
        other_host = tmp_path / f".last.ckpt.lightning-automodel-{host}x-{dead}-jkl000.tmp"
        users = [tmp_path / ".last.ckpt.notes.tmp", tmp_path / ".last.ckpt.1.tmp", tmp_path / "mine.tmp"]
        for path in [killed_other_name, killed_same_name, running, other_host, *users]:
            path.write_bytes(b"PK\x03\x04 partial")
        AtomicTorchCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        left = {p.name for p in tmp_path.iterdir()}
        assert killed_other_name.name not in left and killed_same_name.name not in left
        assert {running.name, other_host.name, "last.ckpt", *(p.name for p in users)} == left
        assert torch.load(tmp_path / "last.ckpt")["step"] == 1
    finally:
        live.kill()
        live.wait()
