"""The hub-layout save at size (issue 18 item 2): gathered to the writer only, in the output dtype, parallel
writes, and a failed write is an error on every rank. On the code before, each of these failed."""

from __future__ import annotations

import pytest

from distributed import run_torchrun


@pytest.mark.multiprocess
def test_gather_to_writer_parallel_writes_and_failure_agreement(tmp_path):
    proc = run_torchrun("core_hf_gather.py", str(tmp_path), nproc=2, timeout=300)
    assert proc.stderr.count("OK hf gather") == 2, proc.stderr[-3000:]
