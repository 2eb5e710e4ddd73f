"""One process of a job start racing on a parked checkpoint directory (tests/test_crash_safe_saves.py).

Every rank runs the CLI's ``--ckpt_path`` check before a process group exists. The rename is slowed
down so that processes that all try it overlap; the script waits for a start file so they begin together.
Usage: core_recovery_race.py FINAL START_FILE
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_replace = os.replace


def _slow_replace(source, target, **kwargs):
    time.sleep(0.5)  # widens the window between the check and the rename
    return _replace(source, target, **kwargs)


def main() -> None:
    final, start = Path(sys.argv[1]), Path(sys.argv[2])
    from lightning_automodel.checkpoint_io import check_resumable

    os.replace = _slow_replace
    while not start.exists():
        time.sleep(0.01)
    check_resumable(final)
    assert (final / "data").read_text() == "previous", "the recovered directory lost its contents"
    print(f"local rank {os.environ.get('LOCAL_RANK')}: {final.name} in place")


if __name__ == "__main__":
    main()
