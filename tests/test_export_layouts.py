"""Export and HuggingFaceCheckpoint write what ``save_pretrained`` writes, for a user's own LightningModule.

Per layout (llama, tied Gemma3, Mixtral with fused experts, LLaVA with legacy keys): a module that
keeps the Hugging Face model at ``self.net`` (not HFCausalLM) trains a few steps with the
``HuggingFaceCheckpoint`` callback; its ``.ckpt`` is exported. Both directories must hold exactly
``save_pretrained``'s tensor names and shapes for the trained model, and reload to its loss.
"""

from __future__ import annotations

import json
import os
import stat

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from lightning_automodel.export import export_checkpoint


class UserLM(pl.LightningModule):
    def __init__(self, builder):
        super().__init__()
        self.net = builder()

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


LAYOUTS = {
    "llama": lambda: tm.tiny_llama(),
    "gemma3_tied": lambda: tm.tiny_gemma3(),
    "mixtral": lambda: tm.build(tm.tiny_config("mixtral", num_local_experts=3, num_experts_per_tok=2)),
    "llava": lambda: tm.tiny_llava(),
}


def tensors_of(directory):
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                assert key not in found, f"{key} in two files"
                found[key] = f.get_tensor(key)
    return found


def loss_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    module = UserLM(LAYOUTS[request.param])
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=[HuggingFaceCheckpoint(max_shard_size="60KB")],
    )
    trainer.fit(module, loader(n=12, batch_size=4))
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    reference = root / "save_pretrained"
    module.net.save_pretrained(reference, max_shard_size="60KB")
    return request.param, module, ckpt, reference, root


def test_export_matches_save_pretrained_and_reloads_to_the_loss(trained, tmp_path):
    name, module, ckpt, reference, _ = trained
    out = export_checkpoint(ckpt, tmp_path / "hf", max_shard_size="60KB")
    check_directory(out, module, reference)


def test_hugging_face_checkpoint_matches_save_pretrained(trained):
    name, module, _, reference, root = trained
    check_directory(root / "hf" / "final", module, reference)


def check_directory(out, module, reference):
    want = tensors_of(reference)
    got = tensors_of(out)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file() == (reference / "generation_config.json").is_file()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o644 for f in out.iterdir())
    reloaded = type(module.net).from_pretrained(out)
    batch = next(iter(loader(n=4, batch_size=4)))
    assert torch.equal(loss_of(reloaded, batch), loss_of(module.net, batch))


def test_export_bf16(trained, tmp_path):
    name, module, ckpt, reference, _ = trained
    out = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bf16")
    got = tensors_of(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values() if t.is_floating_point())
    want = tensors_of(reference)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["mixtral", "tied_llama"])
def test_two_rank_fsdp2_hugging_face_checkpoint_and_sharded_export(tmp_path, name):
    from distributed import run_torchrun
    from transformers import AutoModelForCausalLM

    run_torchrun("job_hf_checkpoint.py", str(tmp_path), name, nproc=2, timeout=400)
    reference = tmp_path / "save_pretrained"
    want = tensors_of(reference)
    exported = export_checkpoint(tmp_path / "sharded.ckpt", tmp_path / "exported", max_shard_size="40KB")
    for out in (tmp_path / "hf" / "final", exported):
        got = tensors_of(out)
        assert sorted(got) == sorted(want), out
        assert all(torch.equal(got[k], want[k]) for k in want), out
    assert ("lm_head.weight" in want) is (name == "mixtral")
    step = tensors_of(tmp_path / "hf" / "step-0000002")
    assert sorted(step) == sorted(want) and not all(torch.equal(step[k], want[k]) for k in want)  # an earlier state
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "final")
    if name == "tied_llama":
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert not list((tmp_path / "hf").glob(".*"))  # no staging left behind
