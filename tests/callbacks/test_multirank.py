import pytest

from distributed import run_torchrun

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("mode", ["resume", "no_head", "mismatch", "ddp"])
def test_two_rank_suite(mode, tmp_path):
    proc = run_torchrun("cb_fsdp2_suite.py", mode, str(tmp_path), nproc=2, timeout=400)
    assert f"OK {mode}" in proc.stderr
