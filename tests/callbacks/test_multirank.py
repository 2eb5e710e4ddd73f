import pytest

from distributed import run_torchrun

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("mode", ["resume", "freeze_more", "freeze_less", "no_head", "mismatch", "ddp"])
def test_two_rank_suite(mode, tmp_path):
    proc = run_torchrun("cb_fsdp2_suite.py", mode, str(tmp_path), nproc=2, timeout=400)
    assert f"OK {mode}" in proc.stderr


def test_no_false_dead_parameter_alarm_for_a_llama_on_fsdp2(tmp_path):
    """Validation and packing on 2 FSDP2 ranks: every parameter trains, nothing is named (untied head:
    the final norm and head stay gathered after the forward, so their module objects are swapped)."""
    proc = run_torchrun("cb_dead_params_fsdp2.py", str(tmp_path), "untied", nproc=2, timeout=400)
    assert "OK dead_params untied" in proc.stderr


def test_frozen_parameters_in_the_optimizer_resume_unless_unfrozen_on_fsdp2(tmp_path):
    """What the frozen-in-optimizer warning says, measured: same frozen set resumes; some trainable again fails."""
    same = run_torchrun("cb_frozen_in_optimizer.py", "same", str(tmp_path / "same"), "fsdp2", nproc=2, timeout=400)
    assert "RESULT same fsdp2: RESUMED at step 6" in same.stderr
    unfrozen = run_torchrun("cb_frozen_in_optimizer.py", "unfrozen", str(tmp_path / "unfrozen"), "fsdp2", nproc=2, timeout=400)
    assert "RESULT unfrozen fsdp2: FAILED CheckpointException" in unfrozen.stderr
    assert "Missing key in checkpoint state_dict: optimizer_0.state" in unfrozen.stderr
    # One device resumes even then (the missing state is created at the next step).
    single = run_torchrun("cb_frozen_in_optimizer.py", "unfrozen", str(tmp_path / "single"), "single", nproc=1, timeout=400)
    assert "RESULT unfrozen single: RESUMED at step 6" in single.stderr
