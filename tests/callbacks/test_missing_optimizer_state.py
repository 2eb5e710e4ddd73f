"""Resume when the checkpoint has no optimizer state for some trained parameters (2 FSDP2 ranks, DCP).

A LLaVA fine-tuned on text only: its vision tower and projector never get a gradient, so the
checkpoint has no optimizer state for them. See tests/scripts/job_missing_optim_state.py.
"""

from __future__ import annotations

import pytest

from distributed import run_torchrun

pytestmark = pytest.mark.multiprocess


def test_default_resumes_with_fresh_state_one_warning_and_equals_the_uninterrupted_run(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "warn", timeout=600)


def test_error_choice_stops_with_one_line_naming_them(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "error", timeout=600)


def test_freeze_dead_parameters_advice_followed_verbatim_resumes_and_quotes_the_real_key(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "advice", timeout=600)
