import pytest

from distributed import run_torchrun


@pytest.mark.multiprocess
def test_two_rank_global_norm_and_counts():
    run_torchrun("core_dtensor_stats.py", nproc=2, timeout=240)
