"""The hub-layout save at size (issue 18 item 2): gathered to the writer only, in the output dtype, parallel
writes, and a failed write is an error on every rank. On the code before, each of these failed."""

from __future__ import annotations

import pytest

from distributed import run_torchrun


@pytest.mark.multiprocess
def test_gather_to_writer_parallel_writes_and_failure_agreement(tmp_path):
    proc = run_torchrun("core_hf_gather.py", str(tmp_path), nproc=2, timeout=300)
    assert proc.stderr.count("OK hf gather") == 2, proc.stderr[-3000:]


def test_each_file_is_flushed_while_the_next_one_is_written(tmp_path, monkeypatch):
    """A rank fsyncs a file as soon as its rows are in, while it fills the next one (the disk writes back
    the first meanwhile). Before, every fsync came after all the writes: the second write waited in vain."""
    import threading
    from functools import partial

    import lightning_automodel.core.hub_writer as hub
    from core.pg import single_rank_group
    from tiny_models import tiny_llama

    model = tiny_llama()
    real_fsync, real_write = hub.fsync_path, hub._write_rows_in_place
    flushed = threading.Event()
    waited: list[bool] = []
    calls: list[str] = []

    def fsync(path):
        real_fsync(path)
        flushed.set()

    def write(path, *args, **kwargs):
        if calls:  # every write after the first: an earlier file's fsync should come meanwhile
            waited.append(flushed.wait(timeout=5))
        calls.append(path.name)
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(hub, "fsync_path", fsync)
    monkeypatch.setattr(hub, "_write_rows_in_place", write)
    with single_rank_group():
        state = hub.module_state(model)
        specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        layout = hub.plan_hub_write(model, model.config, specs, dtype=None, heads_equal=partial(hub.heads_equal_on_all_ranks, state))
        total = sum(t.numel() * t.element_size() for t in state.values())
        written = hub.write_hub_files(tmp_path, model, layout, model.config, state=state, rank=0, world_size=1,
                                      max_shard_bytes=total // 3 + 1, dtype=None)
    assert len(written) >= 2 and waited and all(waited), (written, waited)
