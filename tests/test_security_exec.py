"""Issue 22, findings 1-9: a checkpoint or a config never runs code without opt-in; saves never delete what the run did not create.

Every hostile input here carries a payload that creates a marker file when it runs. Each test asserts
that no marker appears and that the command fails in one line (exit 2) or does the safe thing; the
data-loss cases assert that the user's files survive.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lightning_automodel.cli import main

TINY = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


class Payload:
    """Unpickling it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def user_config(tmp_path: Path, **model) -> Path:
    """A fit/validate/test YAML with an inline 32-wide model, no trust, one CPU step."""
    config = {
        "model": model or {"config": TINY},
        "data": {"seq_length": 16, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0, "limit_test_batches": 1,
                    "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lightning-automodel: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def remote_code_model_dir(root: Path, marker: Path) -> Path:
    """A model directory whose config.json maps AutoConfig to its own module, which touches ``marker`` on import."""
    from safetensors.torch import save_file

    directory = root / "remote_code_model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**TINY, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (directory / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    pass\n"
    )
    save_file({"model.embed_tokens.weight": torch.zeros(260, 32)}, str(directory / "model.safetensors"))
    return directory


# ---- 1. a checkpoint's hyper-parameters never override the user's config ------------------------------


@pytest.mark.parametrize("command", ["validate", "test", "fit"])
def test_checkpoint_hparams_cannot_enable_remote_code(tmp_path, capsys, command):
    marker = tmp_path / "MARKER"
    evil_dir = remote_code_model_dir(tmp_path, marker)
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0,
                "hyper_parameters": {"pretrained_path": str(evil_dir), "config": None, "trust_remote_code": True}}, ckpt)
    capsys.readouterr()
    assert main([command, "--config", str(user_config(tmp_path)), "--ckpt_path", str(ckpt)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.pretrained_path" in line and "never applied" in line
    assert not marker.exists()


def test_checkpoint_of_another_width_is_refused_naming_the_field(tmp_path, capsys):
    ckpt = tmp_path / "wide.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0,
                "hyper_parameters": {"pretrained_path": None, "config": {**TINY, "hidden_size": 128}}}, ckpt)
    capsys.readouterr()
    assert main(["validate", "--config", str(user_config(tmp_path)), "--ckpt_path", str(ckpt)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.config.hidden_size (checkpoint: 128, your config: 32)" in line


def test_pickle_payload_in_checkpoint_is_refused_before_anything_runs(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}, ckpt)
    capsys.readouterr()
    assert main(["validate", "--config", str(user_config(tmp_path)), "--ckpt_path", str(ckpt)]) == 2
    assert "payload.ckpt" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()


# ---- 2. DCP metadata is read with the restricted unpickler on every resume path -----------------------


def sharded_checkpoint_with_payload(tmp_path: Path, marker: Path, where: str) -> Path:
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": {"model.model.norm.weight": torch.ones(32)}}, checkpoint_id=str(path), no_dist=True)
    torch.save({"epoch": 0, "global_step": 0, "hyper_parameters": {"config": TINY}}, path / "meta.pt")
    if where == "metadata":
        (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"epoch": 0, "callbacks": {"x": Payload(marker)}}, path / "meta.pt")
    return path


@pytest.mark.parametrize("where", ["metadata", "meta_pt"])
def test_sharded_resume_payload_never_runs(tmp_path, where):
    marker = tmp_path / "MARKER"
    path = sharded_checkpoint_with_payload(tmp_path, marker, where)
    config = user_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["strategy"] = {"class_path": "lightning_automodel.strategies.AtomicModelParallelStrategy",
                                   "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "lightning_automodel.cli", "fit", "--config", str(config), "--ckpt_path", str(path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "sharded.ckpt" in one_error_line(proc.stderr)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["metadata", "meta_pt"])
def test_strategy_load_checks_metadata_before_dcp(tmp_path, where):
    from lightning_automodel.checkpoint_io import CheckpointResumeError
    from lightning_automodel.strategies import AtomicModelParallelStrategy

    marker = tmp_path / "MARKER"
    path = sharded_checkpoint_with_payload(tmp_path, marker, where)
    with pytest.raises(CheckpointResumeError, match="sharded.ckpt"):
        AtomicModelParallelStrategy().load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_callback_state_read_is_data_only(tmp_path, kind):
    from lightning_automodel.callbacks._lifecycle import read_callback_states

    marker = tmp_path / "MARKER"
    if kind == "file":
        path = tmp_path / "payload.ckpt"
        torch.save({"state_dict": {}, "callbacks": {"x": Payload(marker)}}, path)
    else:
        path = sharded_checkpoint_with_payload(tmp_path, marker, "meta_pt")
    assert read_callback_states(path) is None
    assert not marker.exists()


# ---- 3. export's fallback never honours the checkpoint's trust_remote_code ----------------------------


def test_export_fallback_ignores_the_checkpoints_trust_remote_code(tmp_path):
    from lightning_automodel.export import ExportError, export_checkpoint

    marker = tmp_path / "MARKER"
    evil_dir = remote_code_model_dir(tmp_path, marker)
    ckpt = tmp_path / "old-style.ckpt"
    torch.save({"state_dict": {"model.model.embed_tokens.weight": torch.zeros(260, 32)},
                "hyper_parameters": {"pretrained_path": str(evil_dir), "config": None, "trust_remote_code": True}}, ckpt)
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- 4. class_path values outside the allow-list are refused before import ----------------------------


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """An importable module ``sec_marker_mod`` whose import touches a marker (and which defines a Callback)."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "sec_marker_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from lightning.pytorch.callbacks import Callback\n\nclass Cb(Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS", raising=False)
    sys.modules.pop("sec_marker_mod", None)
    yield marker
    sys.modules.pop("sec_marker_mod", None)


@pytest.mark.parametrize(
    ("command", "how"),
    [("fit", "yaml_callback"), ("fit", "yaml_logger"), ("fit", "argv_callback"), ("validate", "yaml_callback"), ("test", "argv_callback")],
)
def test_class_path_outside_the_allow_list_is_never_imported(tmp_path, capsys, marker_module, command, how):
    config = user_config(tmp_path)
    extra: list[str] = []
    if how == "argv_callback":
        extra = ["--trainer.callbacks+=sec_marker_mod.Cb"]
    else:
        data = yaml.safe_load(config.read_text())
        key = "callbacks" if how == "yaml_callback" else "logger"
        data["trainer"][key] = [{"class_path": "sec_marker_mod.Cb"}] if key == "callbacks" else {"class_path": "sec_marker_mod.Cb"}
        config.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main([command, "--config", str(config), *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sec_marker_mod.Cb" in line and "LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS=sec_marker_mod" in line
    assert not marker_module.exists()


def test_plan_never_imports_a_class_path(tmp_path, capsys, marker_module):
    config = user_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "sec_marker_mod.Cb"}]
    config.write_text(yaml.safe_dump(data))
    main(["plan", "--config", str(config)])
    assert not marker_module.exists()


def test_allow_list_is_extended_explicitly(tmp_path, capsys, marker_module, monkeypatch):
    monkeypatch.setenv("LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS", "sec_marker_mod")
    assert main(["fit", "--config", str(user_config(tmp_path)), "--trainer.callbacks+=sec_marker_mod.Cb"]) == 0
    assert marker_module.exists()  # the user opted in: the module was imported and the callback ran



@pytest.mark.parametrize("command", ["fit", "plan"])
def test_the_allow_list_ends_with_the_command(tmp_path, capsys, command):
    """The restriction is the command's, not the process's: a fit or plan run in-process (a notebook, a
    launcher, a test) leaves jsonargparse's import policy as it found it, so the user's parsers work after."""
    import copy

    from jsonargparse import ArgumentParser, _common

    keys = ("import_path_verdicts", "import_paths_enforced")
    _common.parsing_settings.update(import_path_verdicts={}, import_paths_enforced=False)  # a permissive policy
    before = copy.deepcopy({key: _common.parsing_settings[key] for key in keys})
    assert main([command, "--config", str(user_config(tmp_path)), "--trainer.max_steps=1"]) == 0
    assert {key: _common.parsing_settings[key] for key in keys} == before
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--layer", type=torch.nn.Module)
    parsed = parser.parse_args(["--layer", '{"class_path": "torch.nn.Identity"}'])
    assert parsed.layer.class_path == "torch.nn.Identity"

# ---- 5. HuggingFaceCheckpoint never replaces the directory the run loads from -------------------------


def test_hf_checkpoint_refuses_a_dirpath_holding_the_model_source(tmp_path, capsys):
    from lightning_automodel.core.hub_writer import write_marker
    from tiny_models import build, tiny_config

    source = tmp_path / "runs" / "hfsrc" / "final"
    build(tiny_config("llama", **{k: v for k, v in TINY.items() if k != "model_type"})).save_pretrained(source)
    write_marker(source, "HuggingFaceCheckpoint step 1")  # written by a previous run's callback
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    config = user_config(tmp_path, pretrained_path=str(source))
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "lightning_automodel.callbacks.HuggingFaceCheckpoint",
                                     "init_args": {"dirpath": str(tmp_path / "runs" / "hfsrc")}}]
    config.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["fit", "--config", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "contains the model's source directory" in line
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_hf_checkpoint_check_covers_is_contains_and_inside(tmp_path):
    from lightning_automodel.callbacks.hugging_face_checkpoint import check_target_is_not_source

    source = tmp_path / "model"
    for target, relation in [(source, " is the"), (tmp_path, " contains the"), (source / "hf", " is inside the")]:
        with pytest.raises(ValueError, match=relation):
            check_target_is_not_source(target, source, what="x")
    check_target_is_not_source(tmp_path / "elsewhere", source, what="x")


def test_hf_checkpoint_refuses_at_setup_a_final_holding_user_files(tmp_path):
    from lightning_automodel.callbacks import HuggingFaceCheckpoint
    from lightning_automodel.core.hub_writer import write_marker

    final = tmp_path / "hf" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    write_marker(final, "HuggingFaceCheckpoint step 1")
    (final / "my_eval.txt").write_text("mine")
    with pytest.raises(ValueError, match="my_eval.txt"):
        HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf")).setup(SimpleNamespace(is_global_zero=True), SimpleNamespace(hparams={}), "fit")
    assert (final / "my_eval.txt").read_text() == "mine"


# ---- 6. config files are never overwritten -------------------------------------------------------------


def test_config_file_in_the_run_directory_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my notes\n")
    config = user_config(tmp_path)
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config)]) == 0
    assert (run / "config.yaml").read_text() == "my notes\n"
    saved = sorted(p.name for p in run.glob("config*.yaml"))
    assert saved == ["config-1.yaml", "config-2.yaml", "config.yaml"]
    assert yaml.safe_load((run / "config-2.yaml").read_text())["model"]["config"]["hidden_size"] == 32


# ---- 7. only staging directories that are provably ours are cleaned -----------------------------------


def _setup_callback(root: Path) -> None:
    from lightning_automodel.callbacks import HuggingFaceCheckpoint

    HuggingFaceCheckpoint(dirpath=str(root)).setup(SimpleNamespace(is_global_zero=True), SimpleNamespace(hparams={}), "fit")


def test_hf_checkpoint_setup_keeps_user_tmp_entries_and_live_staging(tmp_path):
    from lightning_automodel.core.hub_writer import staging_directory

    root = tmp_path / "hf"
    root.mkdir()
    (root / ".notes.tmp-keep").mkdir()
    (root / ".notes.tmp-keep" / "mine.txt").write_text("mine")
    (root / ".draft.tmp-1").write_text("mine too")
    live = staging_directory(root / "final")  # this process: alive, maybe another run saving right now
    _setup_callback(root)
    assert (root / ".notes.tmp-keep" / "mine.txt").read_text() == "mine"
    assert (root / ".draft.tmp-1").read_text() == "mine too"
    assert live.is_dir()


def test_hf_checkpoint_setup_removes_its_own_stale_staging_only(tmp_path):
    from lightning_automodel.core.hub_writer import STAGING_MARKER, staging_directory

    root = tmp_path / "hf"
    stale = staging_directory(root / "step-0000001")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    signature = json.loads((stale / STAGING_MARKER).read_text())
    (stale / STAGING_MARKER).write_text(json.dumps({**signature, "pid": int(dead)}))
    forged = root / ".final.tmp-forged"  # claims to be ours but names another target
    forged.mkdir()
    (forged / STAGING_MARKER).write_text(json.dumps({**signature, "pid": int(dead), "target": "other"}))
    _setup_callback(root)
    assert forged.is_dir() and not stale.exists()


# ---- 8. exports publish atomically, refuse a late --out and never delete user files -------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import lightning.pytorch as pl

    from lightning_automodel import HFCausalLM, SFTDataModule

    root = tmp_path_factory.mktemp("ckpt")
    module = HFCausalLM(config={**TINY, "tie_word_embeddings": False})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_concurrent_export_to_one_out_one_wins_the_other_fails(tmp_path, tiny_ckpt, monkeypatch):
    import lightning_automodel.core.hub_writer as hub_writer
    import lightning_automodel.export as export
    from lightning_automodel.core.hub_writer import EXPORT_MARKER

    out = tmp_path / "hf"
    real_write_marker = hub_writer.write_marker
    inner: list[Path] = []
    started = []

    def other_export_finishes_first(staging, source):
        # the second export got past its start-up check too, and publishes while this one is still writing
        if not started:
            started.append(True)
            inner.append(export.export_checkpoint(tiny_ckpt, out))
        real_write_marker(staging, source)

    monkeypatch.setattr(hub_writer, "write_marker", other_export_finishes_first)
    with pytest.raises(export.ExportError, match="appeared while it was being written"):
        export.export_checkpoint(tiny_ckpt, out)
    winner = json.loads((out / EXPORT_MARKER).read_text())
    assert inner == [out] and (out / "model.safetensors").is_file() and winner["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging left behind


def test_overwrite_names_user_files_and_keeps_them(tmp_path, tiny_ckpt):
    from lightning_automodel.export import ExportError, export_checkpoint

    out = export_checkpoint(tiny_ckpt, tmp_path / "hf")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    with pytest.raises(ExportError, match=r"eval/results\.json"):
        export_checkpoint(tiny_ckpt, out, overwrite=True)
    assert (out / "eval" / "results.json").read_text() == "{}"


def test_publish_refuses_an_existing_target_even_an_export(tmp_path):
    from lightning_automodel.core.hub_writer import PublishRefused, publish_directory, staging_directory, write_marker

    out = tmp_path / "out"
    out.mkdir()
    write_marker(out, "earlier")
    staging = staging_directory(out)
    with pytest.raises(PublishRefused):
        publish_directory(staging, out)
    assert (out / ".lightning-automodel-export.json").is_file() and staging.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_directory(staging, empty)  # an empty directory is the one thing replaced: nothing is lost
    assert not (empty / ".lightning-automodel-staging.json").exists()


# ---- 9. the checkpoint's recorded source never makes export read outside a model directory ------------


@pytest.mark.parametrize("layout", ["symlinked_files", "not_a_model_dir"])
def test_recorded_source_cannot_exfiltrate_files(tmp_path, tiny_ckpt, layout):
    from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY
    from lightning_automodel.export import export_checkpoint

    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET\n")
    source = tmp_path / "recorded"
    source.mkdir()
    if layout == "symlinked_files":
        (source / "config.json").write_text("{}")
        (source / "generation_config.json").symlink_to(secret)
        (source / "tokenizer.json").symlink_to(secret)
    else:
        (source / "generation_config.json").write_text("TOPSECRET")
        (source / "tokenizer.json").write_text("TOPSECRET")
    checkpoint = torch.load(tiny_ckpt, weights_only=True)
    checkpoint[EXPORT_INFO_KEY] = {**checkpoint[EXPORT_INFO_KEY], "source": str(source)}
    ckpt = tmp_path / "recorded.ckpt"
    torch.save(checkpoint, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "out")
    assert not (out / "tokenizer.json").exists()
    assert all("TOPSECRET" not in p.read_text(errors="replace") for p in out.iterdir() if p.is_file())
