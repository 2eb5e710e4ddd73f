"""What a bad or huge input costs: checked against safetensors' own rules, streamed, refused by name."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

import lightning_automodel.data.formats as formats
from lightning_automodel.cli import main
from lightning_automodel.config_loading import ConfigFileError, jsonargparse_load
from lightning_automodel.core.hf_weight_files import read_safetensors_layout
from lightning_automodel.core.sharded_load import CheckpointLayoutError, CheckpointReader, plan_checkpoint_load
from lightning_automodel.data import ByteTokenizer, DataError, SFTDataModule
from lightning_automodel.core.model_build import build_meta_model, validate_model_config
from tiny_models import build, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- safetensors: refuse exactly what safe_open refuses ---------------------------------------------


def _with_header(path: Path, header: dict | str, data: bytes) -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


CORRUPT = {
    "overlap": ({"a": _entry(0, 16), "b": _entry(0, 16)}, 16),
    "gap": ({"a": _entry(0, 16), "b": _entry(20, 36)}, 36),
    "trailing bytes": ({"a": _entry(0, 16)}, 32),
    "past the end": ({"a": _entry(0, 16), "b": _entry(16, 32)}, 24),
    "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, 16),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, 16),
    "duplicate key": ('{"a": %s, "a": %s}' % (json.dumps(_entry(0, 16)), json.dumps(_entry(0, 16))), 16),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_headers_safe_open_refuses_are_refused(case, tmp_path):
    header, size = CORRUPT[case]
    path = _with_header(tmp_path / "model.safetensors", header, bytes(size))
    if case != "duplicate key":  # safe_open's parser keeps the last duplicate; transformers' loaders see one tensor
        with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own SafetensorError
            with safe_open(str(path), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        read_safetensors_layout(path)
    with pytest.raises(CheckpointLayoutError, match=r"model\.safetensors"):
        CheckpointReader(tmp_path)


def test_valid_files_still_load(tmp_path):
    save_file({"a": torch.ones(4), "b": torch.zeros(3, 2), "empty": torch.zeros(0)}, tmp_path / "model.safetensors")
    layout = read_safetensors_layout(tmp_path / "model.safetensors")
    assert set(layout.header) >= {"a", "b", "empty"}
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("b"), torch.zeros(3, 2))


# ---- unused checkpoint tensors: an error unless allowed by name --------------------------------------


def _two_layer_checkpoint_one_layer_config(tmp_path: Path):
    build(tiny_config("llama", num_hidden_layers=2)).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.num_hidden_layers = 1
    return build_meta_model(config), CheckpointReader(tmp_path)


def test_unused_checkpoint_tensors_stop_the_load(tmp_path):
    model, reader = _two_layer_checkpoint_one_layer_config(tmp_path)
    with pytest.raises(CheckpointLayoutError, match=r"model\.layers\.1\..*model\.safetensors.*ignore_checkpoint_keys"):
        plan_checkpoint_load(model, reader)


def test_unused_checkpoint_tensors_allowed_by_name(tmp_path):
    model, reader = _two_layer_checkpoint_one_layer_config(tmp_path)
    plan = plan_checkpoint_load(model, reader, [r"model\.layers\.1\..*"])
    assert plan.unused and all(k.startswith("model.layers.1.") for k in plan.unused)
    with pytest.raises(CheckpointLayoutError, match=r"model\.layers\.1\.mlp"):
        plan_checkpoint_load(model, reader, [r"model\.layers\.1\.self_attn\..*"])  # only part of them named
    with pytest.raises(CheckpointLayoutError, match="not a regular expression"):
        plan_checkpoint_load(model, reader, ["model.layers.(1"])


def test_hf_causal_lm_takes_the_option(tmp_path):
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    _two_layer_checkpoint_one_layer_config(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointLayoutError, match="ignore_checkpoint_keys"):
        HFCausalLM(pretrained_path=str(tmp_path)).configure_model()
    module = HFCausalLM(pretrained_path=str(tmp_path), ignore_checkpoint_keys=[r"model\.layers\.1\..*"])
    module.configure_model()
    assert len(module.model.model.layers) == 1


# ---- configs: validated before any build ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"intermediate_size": [128, -1]}, "intermediate_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"text_config": {"hidden_size": 0}}, "text_config.hidden_size"),
    ],
)
def test_config_sizes_are_validated_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"model config {re.escape(field)} must be a positive integer"):
        validate_model_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **overrides})


# ---- data: streamed, compact ---------------------------------------------------------------------------


def read_documents(files: list[str]) -> list[str]:
    return [p for name in files for p in formats.read_paragraphs(Path(name))]


def test_streamed_reading_equals_whole_file_reading(tmp_path, monkeypatch):
    text = "héllo wörld\n\nzweite Absätze 日本語\n\n\n\n" + "x" * 50 + "\n\nend"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    expected = [p.strip() for p in text.split("\n\n") if p.strip()]
    for chunk in (1, 2, 3, 5, 7, 1 << 20):  # multi-byte characters split across every kind of boundary
        monkeypatch.setattr(formats, "READ_CHUNK_BYTES", chunk)
        assert read_documents([str(tmp_path / "a.txt")]) == expected, chunk


def test_a_bad_byte_in_a_later_chunk_names_its_offset_and_line(tmp_path, monkeypatch):
    good = ("line of text\n" * 5 + "\n") * 3
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"ok \xff")
    monkeypatch.setattr(formats, "READ_CHUNK_BYTES", 16)
    offset, line = len(good.encode()) + 3, good.count("\n") + 1
    with pytest.raises(DataError, match=rf"bad\.txt' is not valid UTF-8: byte offset {offset} \(line {line}\)"):
        read_documents([str(tmp_path / "bad.txt")])


def test_a_long_line_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_PIECE_CHARS", 100)
    monkeypatch.setattr(formats, "READ_CHUNK_BYTES", 64)
    words = " ".join(f"w{i}" for i in range(600))
    (tmp_path / "long.txt").write_text(words)
    docs = read_documents([str(tmp_path / "long.txt")])
    assert len(docs) > 5 and max(map(len, docs)) <= 100
    assert " ".join(docs).split() == words.split()


def test_text_windows_are_those_of_the_documents():
    tokenizer, texts = ByteTokenizer(), ["abcdefghij", "", "x", "héllo wörld"]
    docs = [tokenizer.encode(t) for t in texts]  # BOS + bytes + EOS
    out = formats.SampleTokenizer(tokenizer, "text", formats.Columns(), 4, True, "t")({"text": texts}, list(range(len(texts))))
    expected = [d[i : i + 4] for d in docs for i in range(0, len(d), 4) if len(d[i : i + 4]) >= 2]
    assert out["input_ids"] == expected and "labels" not in out  # every token is a target


def test_a_single_line_data_file_costs_a_few_times_its_size(tmp_path):
    """20 MiB on one line: 19.5x its size in peak memory before streaming (2.2 GB for 100 MB), under 8x now."""
    path = tmp_path / "one_line.txt"
    with path.open("w") as f:
        f.write("abcdefgh " * (20 * 2**20 // 9))
        f.write("".join(f"\n\nsmall document {i}" for i in range(40)))
    script = (
        "import resource, sys; from lightning_automodel.data import SFTDataModule; "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "dm = SFTDataModule(train_files=[sys.argv[1]], seq_length=128, batch_size=4, cache_dir=sys.argv[2]); dm.setup('fit'); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, check=True)
    peak = int(out.stdout.strip().splitlines()[-1]) * 1024
    assert peak < 8 * path.stat().st_size, f"{peak / 2**20:.0f} MiB for a {path.stat().st_size / 2**20:.0f} MiB file"


def test_named_empty_validation_files_are_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    dm = SFTDataModule(val_files=[str(tmp_path / "empty.txt")], batch_size=1, seq_length=128, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"validation files .*empty\.txt"):
        dm.setup("fit")


# ---- one bounded YAML loader for every command ------------------------------------------------------------


def test_the_fit_loader_refuses_an_alias_bomb_and_keeps_small_anchors():
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"b{i}: &b{i} [{', '.join(['*' + ('a' if i == 0 else f'b{i - 1}')] * 10)}]\n" for i in range(6)
    )
    with pytest.raises(ConfigFileError, match="anchors/aliases"):
        jsonargparse_load(bomb, "bomb.yaml")
    assert jsonargparse_load("x: &n 3\ny: *n\n") == {"x": 3, "y": 3}


def test_fit_reads_configs_with_small_anchors(tmp_path, capsys):
    text = (REPO_ROOT / "configs/tiny-llama-cpu.yaml").read_text().replace("seq_length: 128", "seq_length: *n")
    text = text.replace("max_position_embeddings: 512", "max_position_embeddings: &n 512")
    (tmp_path / "anchors.yaml").write_text(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "anchors.yaml"), "--print_config"])
    assert "seq_length: 512" in capsys.readouterr().out
