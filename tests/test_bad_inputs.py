"""Every user mistake or bad file is one line on stderr and exit code 2, naming the file or the field.

Table-driven: each case builds its bad input in ``tmp_path`` and returns the command line; the
expectation is a regular expression the one error line must match (the file or field it names).
Nothing here may print a traceback, and no payload may run (``MARKER`` files stay absent).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from lightning_automodel.cli import main
from tiny_models import build, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs/tiny-llama-cpu.yaml")
ERROR = re.compile(r"^lightning-automodel( export| plan)?: error: ")


class Payload:
    """Unpickling this creates ``path``: the proof that a file ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def tiny_fit(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", TINY, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
            "--trainer.callbacks=[]", *extra]


def pretrained_dir(tmp_path: Path, layers: int = 1) -> Path:
    """A 1-layer llama (vocab 260, the byte tokenizer's size) saved as transformers saves it."""
    root = tmp_path / "model"
    build(tiny_config("llama", vocab_size=260, num_hidden_layers=layers)).save_pretrained(root)
    return root


def pretrained_fit(tmp_path: Path, root: Path) -> list[str]:
    config = {
        "model": {"pretrained_path": str(root)},
        "data": {"seq_length": 32, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0, "logger": False,
                    "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


def rewrite_header(path: Path, edit: Callable[[dict], None], extra: bytes = b"") -> None:
    """Edit a safetensors file's JSON header in place (the data bytes stay as they were)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :] + extra)


Q_PROJ, O_PROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


# ---- the cases: tmp_path -> command line ------------------------------------------------------------


def config_fifo(tmp_path):
    os.mkfifo(tmp_path / "config.fifo")
    return ["fit", "--config", str(tmp_path / "config.fifo")]


def config_alias_bomb(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\nmodel: {config: *a8}\n")
    return ["fit", "--config", str(tmp_path / "bomb.yaml")]


def config_directory(tmp_path):
    return ["fit", "--config", str(tmp_path)]


def overlapping_safetensors(tmp_path):
    """q_proj's header entry points at o_proj's bytes: transformers' safe_open refuses it; loading trains on o_proj."""
    root = pretrained_dir(tmp_path)

    def edit(header):
        header[Q_PROJ]["data_offsets"] = list(header[O_PROJ]["data_offsets"])

    rewrite_header(root / "model.safetensors", edit)
    return pretrained_fit(tmp_path, root)


def duplicate_safetensors_key(tmp_path):
    root = pretrained_dir(tmp_path)
    path = root / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header)
    # the same name twice: json.loads keeps the second entry (o_proj's bytes) silently
    text = text[:-1] + f', "{Q_PROJ}": ' + json.dumps(header[O_PROJ]) + "}"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + length :])
    return pretrained_fit(tmp_path, root)


def safetensors_data_past_eof(tmp_path):
    root = pretrained_dir(tmp_path)
    path = root / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return pretrained_fit(tmp_path, root)


def safetensors_trailing_bytes(tmp_path):
    root = pretrained_dir(tmp_path)
    rewrite_header(root / "model.safetensors", lambda header: None, extra=b"\0" * 64)
    return pretrained_fit(tmp_path, root)


def unmapped_checkpoint_tensors(tmp_path):
    """The checkpoint has 2 layers, config.json says 1: layer 1 would be dropped silently."""
    root = pretrained_dir(tmp_path, layers=2)
    config = json.loads((root / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (root / "config.json").write_text(json.dumps(config))
    return pretrained_fit(tmp_path, root)


def pickle_bin_payload(tmp_path):
    root = pretrained_dir(tmp_path)
    (root / "model.safetensors").unlink()
    torch.save({"payload": Payload(tmp_path / "MARKER")}, root / "pytorch_model.bin")
    return pretrained_fit(tmp_path, root)


def deep_config_json(tmp_path):
    root = pretrained_dir(tmp_path)
    (root / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return pretrained_fit(tmp_path, root)


def config_json_heads_zero(tmp_path):
    root = pretrained_dir(tmp_path)
    config = json.loads((root / "config.json").read_text())
    config["num_attention_heads"] = 0
    (root / "config.json").write_text(json.dumps(config))
    return pretrained_fit(tmp_path, root)


def payload_ckpt(tmp_path):
    torch.save({"state_dict": {}, "payload": Payload(tmp_path / "MARKER")}, tmp_path / "payload.ckpt")
    return [*tiny_fit(tmp_path), "--ckpt_path", str(tmp_path / "payload.ckpt")]


def deep_jsonl(tmp_path):
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return tiny_fit(tmp_path, f"--data.train_files=[{tmp_path / 'deep.jsonl'}]")


def empty_validation_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    return tiny_fit(tmp_path, f"--data.val_files=[{tmp_path / 'empty.txt'}]")


def data_fifo(tmp_path):
    os.mkfifo(tmp_path / "data.txt")
    return tiny_fit(tmp_path, f"--data.train_files=[{tmp_path / 'data.txt'}]")


def fit_with(*extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp_path: tiny_fit(tmp_path, *extra)


def export_with(*extra: str) -> Callable[[Path], list[str]]:
    def argv(tmp_path):
        shutil.copyfile(trained_checkpoint(), tmp_path / "some.ckpt")
        (tmp_path / "a_file").write_text("in the way")
        return ["export", "--ckpt_path", str(tmp_path / "some.ckpt"), *(e.replace("TMP", str(tmp_path)) for e in extra)]

    return argv


@functools.cache
def trained_checkpoint() -> Path:
    """One real ``.ckpt`` of the tiny config (one step), shared by the cases that need one."""
    root = Path(tempfile.mkdtemp(prefix="bad-inputs-ckpt-"))
    assert main(["fit", "--config", TINY, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}",
                 "--trainer.callbacks=[]", "--trainer.logger=false"]) == 0
    return next(root.rglob("*.ckpt"))


def truncated_ckpt_resume(tmp_path):
    data = trained_checkpoint().read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return [*tiny_fit(tmp_path), "--ckpt_path", str(tmp_path / "cut.ckpt")]


def full_disk_during_save(tmp_path):
    """default_root_dir on a 1 MiB tmpfs: the first checkpoint save runs out of space after training started."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    MOUNTS.append(disk)
    return ["fit", "--config", TINY, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={disk}",
            "--trainer.callbacks=[]", "--trainer.logger=false"]


MOUNTS: list[Path] = []


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while MOUNTS:
        subprocess.run(["umount", str(MOUNTS.pop())], check=False)


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "config_fifo": (config_fifo, r"config\.fifo.* not a regular file"),
    "config_alias_bomb": (config_alias_bomb, r"bomb\.yaml.*anchors/aliases"),
    "config_directory": (config_directory, r"not a regular file"),
    "layers_negative": (fit_with("--model.config.num_hidden_layers=-1"), r"num_hidden_layers must be a positive integer"),
    "heads_zero": (fit_with("--model.config.num_attention_heads=0"), r"num_attention_heads must be a positive integer"),
    "hidden_negative": (fit_with("--model.config.hidden_size=-8"), r"hidden_size must be a positive integer"),
    "heads_do_not_divide": (fit_with("--model.config.hidden_size=130"), r"hidden_size=130 is not divisible by num_attention_heads=4"),
    "kv_heads_do_not_divide": (fit_with("--model.config.num_key_value_heads=3"), r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    "vocab_1e12": (fit_with("--model.config.vocab_size=1000000000000"), r"parameters .*vocab_size"),
    "vocab_1e10": (fit_with("--model.config.vocab_size=10000000000"), r"GiB of memory of cpu; the largest tensor is .*embed_tokens.weight \[10000000000, 128\]"),
    "layers_1e6": (fit_with("--model.config.num_hidden_layers=1000000"), r"num_hidden_layers=1,000,000 is above"),
    "max_steps_negative": (fit_with("--trainer.max_steps=-5"), r"max_steps"),
    "devices_zero": (fit_with("--trainer.devices=0"), r"devices"),
    "pad_to_multiple_of_zero": (fit_with("--data.packing=true", "--data.pad_to_multiple_of=0"), r"pad_to_multiple_of must be at least 1"),
    "empty_validation_file": (empty_validation_file, r"validation files .*empty\.txt"),
    "data_fifo": (data_fifo, r"data\.txt' is not a regular file"),
    "deep_jsonl": (deep_jsonl, r"deep\.jsonl:1: .*nested too deeply"),
    "overlapping_safetensors": (overlapping_safetensors, r"model\.safetensors.*q_proj.*overlaps"),
    "duplicate_safetensors_key": (duplicate_safetensors_key, r"model\.safetensors.*q_proj.* listed twice"),
    "safetensors_data_past_eof": (safetensors_data_past_eof, r"model\.safetensors.*truncated"),
    "safetensors_trailing_bytes": (safetensors_trailing_bytes, r"model\.safetensors: 64 bytes after the last tensor"),
    "unmapped_checkpoint_tensors": (unmapped_checkpoint_tensors, r"model\.layers\.1\..*ignore_checkpoint_keys"),
    "pickle_bin_payload": (pickle_bin_payload, r"pytorch_model\.bin: holds pickled objects"),
    "deep_config_json": (deep_config_json, r"config\.json.*nested too deeply"),
    "config_json_heads_zero": (config_json_heads_zero, r"config\.json: .*num_attention_heads must be a positive integer"),
    "payload_ckpt": (payload_ckpt, r"pickled objects besides tensors|payload\.ckpt .*not trusted"),
    "export_tokenizer_missing": (export_with("--out", "TMP/out", "--tokenizer_path", "TMP/no_tokenizer"), r"--tokenizer_path .*no_tokenizer"),
    "export_tokenizer_empty": (export_with("--out", "TMP/out", "--tokenizer_path", "TMP"), r"--tokenizer_path .* holds none of the tokenizer files"),
    "export_out_is_a_file": (export_with("--out", "TMP/a_file"), r"a_file exists and is not a directory"),
    "export_out_under_a_file": (export_with("--out", "TMP/a_file/out"), r"File exists: .*a_file"),
    "plan_layers_1e6": (lambda tmp_path: ["plan", "--config", TINY, "--model.config.num_hidden_layers=1000000"], r"num_hidden_layers=1,000,000 is above"),
    "plan_heads_zero": (lambda tmp_path: ["plan", "--config", TINY, "--model.config.num_attention_heads=0"], r"num_attention_heads must be a positive integer"),
    "plan_config_fifo": (lambda tmp_path: ["plan", *config_fifo(tmp_path)[1:]], r"config\.fifo.* not a regular file"),
    "plan_deep_config_json": (lambda tmp_path: ["plan", *deep_config_json(tmp_path)[1:]], r"config\.json.*nested too deeply"),
    "truncated_ckpt_resume": (truncated_ckpt_resume, r"cut\.ckpt"),
    "full_disk_during_save": (full_disk_during_save, r"No space left on device .*trainer\.default_root_dir"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_exit_code_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, expected = CASES[case]
    argv = make(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # export's own argparse exit
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not _known_library_line(line)]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and ERROR.match(lines[0]), err[-3000:]
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not (tmp_path / "MARKER").exists(), "a payload ran"


def _known_library_line(line: str) -> bool:
    """Lightning's start-up notes, printed before any input is read (not errors)."""
    return line.startswith(("Seed set to", "💡 Tip", "GPU available", "TPU available", "HPU available"))


def _raise_from_run(monkeypatch, exc: BaseException) -> None:
    import lightning_automodel.cli as cli

    def run(*args):
        raise exc

    monkeypatch.setattr(cli, "_run", run)


def test_a_dcp_failure_on_a_bad_file_is_one_line(monkeypatch, capsys):
    """DCP wraps each rank's error in CheckpointException, a BaseException that ``except Exception`` misses."""
    from torch.distributed.checkpoint.api import CheckpointException

    missing = FileNotFoundError(2, "No such file or directory", "/ckpts/last.ckpt/__0_0.distcp")
    _raise_from_run(monkeypatch, CheckpointException("load failed", {0: (missing, None)}))
    assert main(["fit"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ERROR.match(lines[0]) and "rank 0" in lines[0] and "__0_0.distcp" in lines[0], lines


def test_a_dcp_failure_from_a_bug_keeps_its_traceback(monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    _raise_from_run(monkeypatch, CheckpointException("save failed", {1: (ZeroDivisionError("a bug"), None)}))
    with pytest.raises(CheckpointException):
        main(["fit"])


def test_a_runtime_error_without_a_full_disk_behind_it_keeps_its_traceback(monkeypatch):
    _raise_from_run(monkeypatch, RuntimeError("a bug in a kernel"))
    with pytest.raises(RuntimeError, match="a bug in a kernel"):
        main(["fit"])


def test_an_os_error_before_the_run_is_one_line_as_in_plan(monkeypatch, capsys):
    """fit and plan share one error -> line mapping: an OSError on a user's file before the loops start (here an
    I/O error reading a model's config) is bad input in both, never a traceback."""
    import errno

    _raise_from_run(monkeypatch, OSError(errno.EIO, "Input/output error", "/models/tiny/config.json"))
    assert main(["fit"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ERROR.match(lines[0]) and "config.json" in lines[0], lines
