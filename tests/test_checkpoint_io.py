"""Single-file checkpoint saves are atomic (issue 12, item 3), and a truncated ``--ckpt_path`` is named."""

import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from distributed import REPO_ROOT, clean_env
from lightning_automodel import checkpoint_io
from lightning_automodel.checkpoint_io import (
    AtomicTorchCheckpointIO,
    CheckpointResumeError,
    check_resumable,
    incomplete_reason,
    newest_complete_checkpoint,
)
from lightning_automodel.cli import main

SAVER = """
import importlib, sys, torch
module, name = sys.argv[2].rsplit(".", 1)
io = getattr(importlib.import_module(module), name)()
step = 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "w": torch.full((3_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def other_filesystem_tmpdir(tmp_path: Path) -> Path | None:
    """A TMPDIR on another filesystem than ``tmp_path`` (the layout that broke Lightning's save), if any."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        d = shm / f"lam-ckpt-{os.getpid()}-{tmp_path.name}"
        d.mkdir(exist_ok=True)
        return d
    return None


def assert_complete(path: Path) -> int:
    assert incomplete_reason(path) is None, incomplete_reason(path)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((3_000_000,), float(state["step"])))
    return state["step"]


def run_saver_and_kill(target: Path, io_class: str, rounds: int, tmpdir: Path | None, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    steps = []
    for _ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target), io_class], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline(), proc.stderr.read()  # one save done: the target exists
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(assert_complete(target))
    return steps


def test_kill_during_saves_never_leaves_a_truncated_file(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    tmpdir = other_filesystem_tmpdir(tmp_path)
    try:
        steps = run_saver_and_kill(target, "lightning_automodel.checkpoint_io.AtomicTorchCheckpointIO", 6, tmpdir)
    finally:
        if tmpdir is not None:
            for f in tmpdir.iterdir():
                f.unlink()
            tmpdir.rmdir()
    assert all(s >= 1 for s in steps)
    # at most one temporary sibling left by the last kill; each save removes the previous ones
    assert len(list(target.parent.glob(".last.ckpt.*.tmp"))) <= 1
    AtomicTorchCheckpointIO().save_checkpoint({"step": 0, "w": torch.zeros(3_000_000)}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_save_dying_halfway_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicTorchCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint_io.os, "replace", lambda a, b: (replaced.append(Path(a)), real_replace(a, b)))

    def half_save(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 5000)
        f.flush()
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint_io.torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.ones(1000)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and not replaced
    io.save_checkpoint({"step": 3, "w": torch.ones(1000)}, target)
    assert torch.load(target, weights_only=True)["step"] == 3


def test_temporary_file_is_beside_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint_io.os, "replace", lambda a, b: (seen.append((Path(a), Path(b))), real_replace(a, b)))
    AtomicTorchCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a" / "b.ckpt")
    (src, dst), = seen
    assert src.parent == dst.parent == tmp_path / "a" and dst.name == "b.ckpt"


def truncated_copy(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def test_incomplete_reason_and_newest_complete(tmp_path):
    good = tmp_path / "epoch=0-step=10.ckpt"
    torch.save({"w": torch.ones(10_000)}, good)
    assert incomplete_reason(good) is None
    bad = truncated_copy(good, tmp_path / "last.ckpt")
    assert "central directory" in incomplete_reason(bad)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert incomplete_reason(tmp_path / "empty.ckpt") == "it is empty"
    with zipfile.ZipFile(tmp_path / "nodata.ckpt", "w") as z:
        z.writestr("x/version", "3")
    assert "data.pkl" in incomplete_reason(tmp_path / "nodata.ckpt")
    os.utime(good, (1, 1))  # older than the broken files: still the newest *complete* one
    assert newest_complete_checkpoint(tmp_path, exclude=bad) == good
    with pytest.raises(CheckpointResumeError) as info:
        check_resumable(bad)
    message = str(info.value)
    assert "\n" not in message and "truncated" in message and str(good) in message
    check_resumable(good)
    check_resumable("last")  # keywords and missing files: Lightning's own handling
    check_resumable(tmp_path / "missing.ckpt")


def test_cli_resume_from_truncated_checkpoint_is_one_line(tmp_path, capsys):
    good = tmp_path / "epoch=0-step=10.ckpt"
    torch.save({"global_step": 10, "state_dict": {}}, good)
    last = truncated_copy(good, tmp_path / "last.ckpt")
    config = REPO_ROOT / "configs/tiny-llama-cpu.yaml"
    code = main(["fit", "--config", str(config), "--ckpt_path", str(last), f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lightning-automodel: error: checkpoint ") and f"--ckpt_path {good}" in err[-1]
    assert "Traceback" not in "\n".join(err)


def trainer_io(*args):
    from lightning_automodel.cli import AutoModelCLI
    from lightning_automodel.data import SFTDataModule
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    cli = AutoModelCLI(HFCausalLM, SFTDataModule, args=["--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), *args],
                       run=False, auto_configure_optimizers=False, save_config_callback=None)
    return cli.trainer.strategy.checkpoint_io


def test_cli_wires_atomic_checkpoint_io_by_default():
    assert type(trainer_io()) is AtomicTorchCheckpointIO
    # a CheckpointIO given in the configuration is kept as it is
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    assert type(trainer_io("--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO")) is TorchCheckpointIO


def test_cli_keeps_a_checkpoint_io_the_strategy_carries():
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    io = trainer_io("--trainer.strategy=SingleDeviceStrategy", "--trainer.strategy.device=cpu",
                    "--trainer.strategy.checkpoint_io=AsyncCheckpointIO")
    assert type(io) is AsyncCheckpointIO
