"""Export's bad inputs: one clear line, nothing half-written, nothing from the checkpoint executed."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_automodel.export import ExportError, export_checkpoint
from lightning_automodel.core.training_checkpoint_reader import SafeFileSystemReader, open_trained_checkpoint

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A single-process DCP checkpoint in Lightning's layout, from a trained HFCausalLM .ckpt."""
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, str(HERE))
    from test_cli import tied_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    module, ckpt = tied_checkpoint(root)
    full = torch.load(ckpt, weights_only=False)
    out = root / "dcp.ckpt"
    dcp.save({"state_dict": full.pop("state_dict"), "optimizer_0": full.pop("optimizer_states")[0]}, checkpoint_id=str(out), no_dist=True)
    torch.save(full, out / "meta.pt")
    return module, ckpt, out


def test_sharded_export_equals_single_file_export(sharded, tmp_path):
    _, ckpt, dcp_dir = sharded
    a = export_checkpoint(ckpt, tmp_path / "a", max_shard_size="40KB")
    b = export_checkpoint(dcp_dir, tmp_path / "b", max_shard_size="40KB")
    from safetensors.torch import load_file

    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and len(files) > 1
    for name in files:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_dcp_metadata_payload_never_runs(sharded, tmp_path):
    import shutil

    _, _, dcp_dir = sharded
    evil = tmp_path / "evil.ckpt"
    shutil.copytree(dcp_dir, evil)
    marker = tmp_path / "MARKER"
    metadata = SafeFileSystemReader(dcp_dir).read_metadata()
    metadata.planner_data = Payload(marker)  # rides along in the pickle
    (evil / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ExportError, match=r"\.metadata is not a readable DCP metadata file.*pathlib.Path.touch|\.metadata is not a readable"):
        export_checkpoint(evil, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing_file", "truncated_file"])
def test_incomplete_dcp_directory_is_refused_by_name(sharded, tmp_path, damage):
    import shutil

    _, _, dcp_dir = sharded
    broken = tmp_path / "broken.ckpt"
    shutil.copytree(dcp_dir, broken)
    data = sorted(broken.glob("*.distcp"))[0]
    if damage == "missing_file":
        data.unlink()
        expected = f"{data.name} is missing"
    else:
        data.write_bytes(data.read_bytes()[:100])
        expected = f"{data.name} is truncated"
    with pytest.raises(ExportError, match=expected) as err:
        export_checkpoint(broken, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_truncated_single_file_is_refused(sharded, tmp_path):
    _, ckpt, _ = sharded
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ExportError, match="cut.ckpt"):
        export_checkpoint(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_disk_full_mid_export_leaves_nothing(sharded, tmp_path):
    """A file-size limit makes the second shard's write fail as a full disk would (EFBIG instead of ENOSPC)."""
    _, ckpt, _ = sharded
    (tmp_path / "out").mkdir()
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000));"
        "from lightning_automodel.export import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), "--max_shard_size", "40KB"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "writing" in lines[0] and "nothing was written" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_single_file_reads_use_byte_ranges_not_the_mapping(sharded):
    """The offsets of the mapped storages are proven, so reads do not leave the file resident."""
    _, ckpt, _ = sharded
    full = torch.load(ckpt, weights_only=False)["state_dict"]
    with open_trained_checkpoint(ckpt) as source:
        assert source._offsets is not None
        got = source.read(list(source.specs))
    assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)


def test_no_info_no_hyper_parameters_says_what_to_do(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(2)}, "epoch": 0}, path)
    with pytest.raises(ExportError, match="HuggingFaceCheckpoint"):
        export_checkpoint(path, tmp_path / "out")


def test_hf_causal_lm_checkpoint_exports_without_its_weights_directory(tmp_path):
    """The config travels in the checkpoint: the directory the weights came from may be gone."""
    import shutil

    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    import tiny_models as tm
    from callbacks.lit_models import loader
    from lightning_automodel import HFCausalLM

    source = tmp_path / "weights"
    tm.tiny_llama().save_pretrained(source)
    module = HFCausalLM(pretrained_path=str(source))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(n=8, batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    shutil.rmtree(source)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in module.model.state_dict().items())


def test_any_surgery_callback_records_what_export_needs(tmp_path):
    import lightning.pytorch as pl

    import tiny_models as tm
    from callbacks.lit_models import loader
    from lightning_automodel.callbacks import ParameterFreezing
    from test_export_layouts import UserLM, tensors_of

    module = UserLM(tm.tiny_llama)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0"}])])
    trainer.fit(module, loader(n=4, batch_size=4))
    ckpt = tmp_path / "user.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    got = tensors_of(out)
    assert all(torch.equal(got[k], v) for k, v in module.net.state_dict().items())
