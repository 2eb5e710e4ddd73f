"""The crossing matrix: families x {full, LoRA} x {one device, FSDP2 on 2 ranks} x every road out of a fit.

Each cell starts from a ``save_pretrained`` directory, fits 4 steps with the callback suite
(``TiedLMHead``, ``LoRA``, ``ModelCheckpoint``, ``HuggingFaceCheckpoint``), resumes a second run from
step 2, and checks the invariants a user relies on:

* the resumed run equals the uninterrupted one (losses of steps 3-4 and final logits, exactly);
* ``HuggingFaceCheckpoint``'s ``final`` directory loads with transformers to the trained logits;
* ``export`` of the final Lightning checkpoint loads with transformers to the trained logits;
* for LoRA, ``export --adapter_only`` loads with peft on the base to the trained logits.

The image-text family trains on text only, so its vision tower never gets a gradient (and so has
no optimizer state in the checkpoint): the resume must still work.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_torchrun
from scripts.crossing_matrix import FAMILIES, RESUME_AT, STEPS, auto_class, probe_ids, run_cell, write_source

# Merged LoRA weights (W + s·B@A) and the adapter forward (xW + s·(xA)B) round differently: ~1e-6 here.
# The defects this guards against are off by 0.3-2.4.
RELOAD_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits.float()


def _reload(family: str, directory) -> torch.nn.Module:
    return auto_class(family).from_pretrained(directory, dtype=torch.float32, local_files_only=True)


def _export(ckpt, out, *extra: str) -> None:
    from lightning_automodel.export import main as export_main

    assert export_main(["--ckpt_path", str(ckpt), "--out", str(out), *extra]) == 0


def _check_cell(out, family: str, mode: str) -> None:
    result = torch.load(out / "result.pt")
    steps_after_resume = list(range(RESUME_AT + 1, STEPS + 1))
    assert sorted(result["losses_b"]) == steps_after_resume, result["losses_b"]
    assert [result["losses_b"][s] for s in steps_after_resume] == [result["losses_a"][s] for s in steps_after_resume]
    torch.testing.assert_close(result["logits_b"], result["logits_a"], rtol=0, atol=0)

    trained = result["logits_a"]
    torch.testing.assert_close(_logits(_reload(family, out / "a" / "hf" / "final")), trained, **RELOAD_TOLERANCE)

    final_ckpt = out / "a" / "ckpt" / f"step={STEPS}.ckpt"
    _export(final_ckpt, out / "exported")
    torch.testing.assert_close(_logits(_reload(family, out / "exported")), trained, **RELOAD_TOLERANCE)

    if mode == "lora":
        from peft import PeftModel

        _export(final_ckpt, out / "adapter", "--adapter_only")
        peft_model = PeftModel.from_pretrained(_reload(family, out / "src"), out / "adapter")
        torch.testing.assert_close(_logits(peft_model), trained, **RELOAD_TOLERANCE)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_device(tmp_path, family, mode):
    write_source(tmp_path, family)
    run_cell(tmp_path, family, mode, "single")
    _check_cell(tmp_path, family, mode)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fsdp2_two_ranks(tmp_path, family, mode):
    write_source(tmp_path, family)
    run_torchrun("crossing_matrix.py", str(tmp_path), family, mode, "fsdp2", timeout=400)
    _check_cell(tmp_path, family, mode)
