"""Export executes no pickle from user files and never deletes what it did not create (issue 12 items 1, 2)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lightning_automodel.export import ExportError, export_checkpoint


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_ckpt_payload_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}, ckpt)
    with pytest.raises(ExportError, match="evil.ckpt") as err:
        export_checkpoint(ckpt, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sharded_meta_payload_never_runs(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "MARKER"
    shard = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=str(shard), no_dist=True)
    torch.save({"hyper_parameters": {"x": Payload(marker)}}, shard / "meta.pt")
    with pytest.raises(ExportError, match="meta.pt"):
        export_checkpoint(shard, tmp_path / "out")
    assert not marker.exists()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_cli import tied_checkpoint

    return tied_checkpoint(tmp_path_factory.mktemp("src"))[1]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def run_export(src, out, cwd, *extra):
    code = "import sys; from lightning_automodel.export import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, "--ckpt_path", str(src), "--out", str(out), *extra],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["cwd", "own_folder", "parent", "root"])
def test_dangerous_out_refused_nothing_deleted(tmp_path, ckpt, where):
    work = tmp_path / "work" / "runs"
    work.mkdir(parents=True)
    src = work / "last.ckpt"
    src.write_bytes(ckpt.read_bytes())
    (work / "notes.txt").write_text("mine")
    out = {"cwd": ".", "own_folder": str(work), "parent": str(tmp_path / "work"), "root": "/"}[where]
    before = listing(tmp_path)
    proc = run_export(src, out, work, "--overwrite")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr
    assert listing(tmp_path) == before


def test_overwrite_non_export_refused_previous_export_replaced(tmp_path, ckpt):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a previous export"):
        export_checkpoint(ckpt, busy, overwrite=True)
    assert (busy / "keep.txt").read_text() == "mine"
    out = export_checkpoint(ckpt, tmp_path / "hf")
    (out / "stale.txt").write_text("old")
    # a file the user added to the previous export is named, never deleted (issue 22 finding 8)
    with pytest.raises(ExportError, match="stale.txt"):
        export_checkpoint(ckpt, tmp_path / "hf", overwrite=True)
    assert (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    export_checkpoint(ckpt, tmp_path / "hf", overwrite=True)
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf"]


def _tiny_ckpt(tmp_path, edit):
    """A single-device HFCausalLM checkpoint (written by Lightning) whose model tensors ``edit`` changes."""
    import lightning.pytorch as pl

    from lightning_automodel import HFCausalLM, SFTDataModule

    module = HFCausalLM(config=dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=64, tie_word_embeddings=False))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint["state_dict"])
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("model.model.layers.0.mlp.down_proj.weight"), r"no tensor for model\.layers\.0\.mlp\.down_proj\.weight"),
        (lambda s: s.__setitem__("model.model.norm.weight", torch.ones(16)), r"model\.norm\.weight is torch\.float32 \[16\].*\[32\]"),
        (lambda s: s.__setitem__("model.lm_head.weight", torch.ones(260, 32, dtype=torch.int32)), r"lm_head\.weight is torch\.int32"),
    ],
)
def test_export_refuses_a_state_the_config_does_not_describe(tmp_path, edit, message):
    from lightning_automodel.export import ExportError, export_checkpoint

    source = _tiny_ckpt(tmp_path, edit)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["lots", "0", "0.0GB", "5XB"])
def test_bad_max_shard_size_is_one_line_naming_the_option(tmp_path, ckpt, size):
    """The export, the callback and plan read sizes with one parser; a bad one names its option and an example."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_automodel.callbacks import HuggingFaceCheckpoint

    proc = run_export(ckpt, tmp_path / "hf", tmp_path, "--max_shard_size", size)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--max_shard_size" in proc.stderr and "5GB" in proc.stderr and not (tmp_path / "hf").exists()
    with pytest.raises(MisconfigurationException, match=r"^HuggingFaceCheckpoint\(max_shard_size=.*\): expected a positive size such as 1TB, 5GB"):
        HuggingFaceCheckpoint(max_shard_size=size)


def test_sizes_accept_decimal_binary_and_plain_bytes():
    from lightning_automodel.core.hub_writer import parse_size

    assert [parse_size(s) for s in ("100KB", "2TiB", "1.5 GB", "4096")] == [10**5, 2**41, 15 * 10**8, 4096]
