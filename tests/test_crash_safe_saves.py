"""Sharded saves killed at any moment leave a loadable checkpoint under its name; `save_last` costs no second copy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distributed import REPO_ROOT, clean_env, free_port, run_torchrun
from lightning_automodel.core.atomic_files import exchange_paths, recover_replaced_directory, replace_directory, sibling

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
