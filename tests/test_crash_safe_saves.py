"""Sharded saves killed at any moment leave a loadable checkpoint under its name; `save_last` costs no second copy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distributed import REPO_ROOT, clean_env, free_port, run_torchrun
from lightning_automodel.core.atomic_files import (
    exchange_paths,
    local_rank_before_group,
    recover_replaced_directory,
    recover_replaced_directory_per_node,
    replace_directory,
    sibling,
)

SCRIPT = REPO_ROOT / "tests" / "scripts" / "job_kill_save.py"


def torchrun_expecting_death(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(SCRIPT), *args]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "the save was not killed" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("point, survivor", [("rank1_writing", "A"), ("between_renames", "A"), ("after_exchange", "B")])
def test_save_killed_at_any_point_resumes(tmp_path, point, survivor):
    torchrun_expecting_death(str(tmp_path), "save", point)
    if point == "between_renames":  # the kill struck where no directory carries the name
        assert not (tmp_path / "last.ckpt").exists() and sibling(tmp_path / "last.ckpt", "old").is_dir()
    run_torchrun(SCRIPT, str(tmp_path), "resume", nproc=2, timeout=400)
    references = torch.load(tmp_path / "references.pt")
    restored = torch.load(tmp_path / "restored.pt")
    assert restored.keys() == references[survivor].keys()
    for name, tensor in references[survivor].items():
        assert torch.equal(restored[name], tensor), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt")]
    assert leftovers == [] and (tmp_path / "last.ckpt" / ".metadata").is_file()


@pytest.mark.multiprocess
def test_save_last_links_the_top_k_files(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), "link", nproc=2, timeout=400)
    ckpt = tmp_path / "ckpt"
    last, top = ckpt / "last.ckpt", ckpt / "epoch=0-step=4.ckpt"
    data = sorted(p.name for p in top.iterdir() if p.name.endswith(".distcp"))
    assert data and data == sorted(p.name for p in last.iterdir() if p.name.endswith(".distcp"))
    for name in data + [".metadata"]:
        assert os.stat(last / name).st_ino == os.stat(top / name).st_ino, name  # one copy on disk
    meta_last = torch.load(last / "meta.pt", weights_only=False)
    assert meta_last["global_step"] == 4
    assert os.stat(last / "meta.pt").st_ino != os.stat(top / "meta.pt").st_ino
    # what resume reads from last.ckpt is the final training state
    import torch.distributed.checkpoint as dcp

    final = torch.load(tmp_path / "final.pt")
    state = {"state_dict": {f"model.{k}": torch.empty_like(v) for k, v in final.items()}}
    dcp.load(state, checkpoint_id=str(last), no_dist=True)
    assert all(torch.equal(state["state_dict"][f"model.{k}"], v) for k, v in final.items())


def old_and_new(tmp_path):
    final, staging = tmp_path / "ckpt", tmp_path / ".ckpt.tmp"
    for directory, text in ((final, "old"), (staging, "new")):
        directory.mkdir()
        (directory / "f").write_text(text)
    return final, staging


def test_replace_directory_exchanges_atomically(tmp_path):
    final, staging = old_and_new(tmp_path)
    if not exchange_paths(tmp_path / "ckpt", tmp_path / "ckpt"):
        pytest.skip("this filesystem has no atomic exchange")
    replace_directory(staging, final)
    assert (final / "f").read_text() == "new" and not staging.exists() and not sibling(final, "old").exists()


def test_fallback_publication_and_recovery(tmp_path):
    final, staging = old_and_new(tmp_path)
    replace_directory(staging, final, allow_exchange=False)
    assert (final / "f").read_text() == "new" and not sibling(final, "old").exists()
    # a kill between the two renames: the name is missing, the previous directory parked
    os.replace(final, sibling(final, "old"))
    assert recover_replaced_directory(final) and (final / "f").read_text() == "new"
    assert not recover_replaced_directory(final)  # nothing to do the second time


# ---- recovery at a job's start: every rank checks --ckpt_path before a process group exists ----


def _parked(tmp_path):
    final = tmp_path / "step=4.ckpt"
    parked = sibling(final, "old")
    parked.mkdir()
    (parked / "data").write_text("previous")
    return final, parked


def _race(tmp_path, local_ranks):
    """Start one process per local rank on the same parked directory; all must come through."""
    final, parked = _parked(tmp_path)
    start = tmp_path / "start"
    script = REPO_ROOT / "tests" / "scripts" / "core_recovery_race.py"
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(final), str(start)],
            env={**clean_env(), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in local_ranks
    ]
    start.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0, f"a racing process failed (exit {code}):\n{out}\n{err[-3000:]}"
    assert (final / "data").read_text() == "previous" and not parked.exists()


@pytest.mark.multiprocess
def test_ranks_of_one_node_starting_together_recover_once(tmp_path):
    """Local rank 0 renames; the other waits for it (on the old code both renamed and the loser died)."""
    _race(tmp_path, [0, 1])


@pytest.mark.multiprocess
def test_nodes_racing_on_a_shared_filesystem_both_come_through(tmp_path):
    """Two nodes' local ranks 0 on one NFS/Lustre path: whoever renames second finds the directory back."""
    _race(tmp_path, [0, 0])


def test_a_waiting_rank_gives_up_in_one_line_when_nobody_recovers(tmp_path):
    final, parked = _parked(tmp_path)
    with pytest.raises(TimeoutError, match="local rank 0"):
        recover_replaced_directory_per_node(final, local_rank=1, timeout=0.2)
    assert parked.is_dir() and not final.exists()  # the waiting rank never touches it
    assert recover_replaced_directory_per_node(final, local_rank=0) and (final / "data").read_text() == "previous"
    assert not recover_replaced_directory_per_node(final, local_rank=1)  # nothing to wait for any more


def test_local_rank_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    assert local_rank_before_group() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank_before_group() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_rank_before_group() == 1
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        local_rank_before_group()
