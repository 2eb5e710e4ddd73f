import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lightning_automodel.core.hf_weight_files import (
    OfflineCheckpointError,
    checkpoint_tensor_dtypes,
    estimate_state_dict_bytes,
    estimate_tensor_bytes,
    format_bytes,
    format_output_file_count,
    get_safetensors_index_total_size,
    read_safetensors_layout,
)


def write_sharded(tmp_path, shards):
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp_path / name))
        weight_map.update({k: name for k in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map})
    )


def test_sharded_dtypes(tmp_path):
    write_sharded(tmp_path, [{"a": torch.zeros(2, dtype=torch.bfloat16)}, {"A_log": torch.zeros(3), "n": torch.zeros(1, dtype=torch.int64)}])
    assert checkpoint_tensor_dtypes(tmp_path) == {"a": torch.bfloat16, "A_log": torch.float32, "n": torch.int64}
    assert get_safetensors_index_total_size(tmp_path) == 123


def test_reads_only_the_header(tmp_path):
    big = {"w": torch.zeros(8 * 1024 * 1024)}  # 32 MiB of tensor bytes
    save_file(big, str(tmp_path / "model.safetensors"))
    import builtins

    read_sizes = []
    real_open = builtins.open

    class Tracking:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read_sizes.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    import pathlib

    real_path_open = pathlib.Path.open
    pathlib.Path.open = lambda self, *a, **k: Tracking(real_path_open(self, *a, **k))
    try:
        assert checkpoint_tensor_dtypes(tmp_path) == {"w": torch.float32}
    finally:
        pathlib.Path.open = real_path_open
    assert sum(read_sizes) < 4096
    assert builtins.open is real_open


def test_matches_reference(tmp_path):
    cu = pytest.importorskip("nemo_automodel.components.checkpoint.utils")
    from transformers import AutoConfig

    write_sharded(tmp_path, [{"x": torch.zeros(2, dtype=torch.float16)}, {"y": torch.zeros(3)}])
    cfg = AutoConfig.for_model("llama")
    assert checkpoint_tensor_dtypes(tmp_path) == cu._get_checkpoint_tensor_dtypes(str(tmp_path), cfg)


def test_bin_on_meta(tmp_path):
    torch.save({"w": torch.zeros(2, dtype=torch.float16)}, tmp_path / "pytorch_model.bin")
    assert checkpoint_tensor_dtypes(tmp_path) == {"w": torch.float16}


def test_state_dict_and_gguf_shortcuts():
    assert checkpoint_tensor_dtypes("unused", {"state_dict": {"a": torch.zeros(1, dtype=torch.int8), "b": 1}}) == {"a": torch.int8}
    assert checkpoint_tensor_dtypes("unused", {"gguf_file": "x.gguf"}) == {}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "truncated safetensors file"),
        (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "over the 100 MB limit"),
        (struct.pack("<Q", 50) + b"{}", "truncated safetensors header"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
    ],
)
def test_corrupt_headers_name_the_file(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        read_safetensors_layout(path)
    assert str(path) in str(err.value)


def test_bad_index_and_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        checkpoint_tensor_dtypes(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        checkpoint_tensor_dtypes(tmp_path)


def test_hub_name_fails_offline_at_once(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("network touched"))
    with pytest.raises(OfflineCheckpointError, match="offline"):
        checkpoint_tensor_dtypes("meta-llama/Llama-3.1-8B")


def test_byte_helpers():
    assert estimate_tensor_bytes(torch.empty(3, 4, dtype=torch.bfloat16, device="meta")) == 24
    assert estimate_state_dict_bytes({"a": torch.zeros(2), "b": torch.zeros(1, dtype=torch.int8)}) == 9
    assert estimate_state_dict_bytes({"a": None}) is None
    assert estimate_state_dict_bytes({}) == 0
    assert format_bytes(0) == "0.0 GiB" and format_bytes(1536 * 1024**2) == "1.5 GiB"
    assert format_output_file_count(1) == "1 output file" and format_output_file_count(3) == "3 output files"
    assert get_safetensors_index_total_size(None) is None


def test_index_total_size_rejects_non_int(tmp_path):
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {"total_size": 1.5}}))
    assert get_safetensors_index_total_size(p) is None
    p.write_text(json.dumps({"metadata": {"total_size": True}}))
    assert get_safetensors_index_total_size(p) is None


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "sub/model.safetensors", 3, ["a"], ""])
def test_index_entries_must_be_plain_file_names(tmp_path, entry):
    import json as _json

    from lightning_automodel.core.hf_weight_files import resolve_checkpoint_files

    (tmp_path / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": {"w": entry}}))
    with pytest.raises(ValueError, match="weight_map entry"):
        resolve_checkpoint_files(tmp_path)


# ---- hostile files (issue 12 item 5) ---------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from lightning_automodel.core.hf_weight_files import resolve_checkpoint_files  # noqa: E402
from lightning_automodel.core.sharded_load import CheckpointReader  # noqa: E402


@contextmanager
def no_hang(seconds=10):
    """The old readers blocked forever opening a FIFO: fail the test instead of hanging the suite."""

    def timeout(*_):
        raise TimeoutError("the reader hung on a non-regular file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


READERS = {
    "resolve": resolve_checkpoint_files,
    "dtypes": checkpoint_tensor_dtypes,
    "reader": CheckpointReader,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fifo_named_model_safetensors_is_refused_at_once(tmp_path, reader):
    os.mkfifo(tmp_path / "model.safetensors")
    with no_hang(), pytest.raises(ValueError, match=r"model\.safetensors: is a FIFO, not a regular file"):
        READERS[reader](tmp_path)


def test_fifo_header_read_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with no_hang(), pytest.raises(ValueError, match="is a FIFO"):
        read_safetensors_layout(tmp_path / "model.safetensors")
    with no_hang(), pytest.raises(ValueError, match="is a FIFO"):
        resolve_checkpoint_files(tmp_path / "model.safetensors")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fifo_shard_named_in_the_index_is_refused(tmp_path, reader):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    os.mkfifo(tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with no_hang(), pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: is a FIFO"):
        READERS[reader](tmp_path)


def test_fifo_index_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    with no_hang(), pytest.raises(ValueError, match=r"index\.json: is a FIFO"):
        resolve_checkpoint_files(tmp_path)


def test_socket_and_device_are_refused(tmp_path):
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "model.safetensors"))
        with no_hang(), pytest.raises(ValueError, match="is a socket"):
            checkpoint_tensor_dtypes(tmp_path)
    finally:
        server.close()
    device = tmp_path / "dev"
    device.mkdir()
    (device / "model.safetensors").symlink_to("/dev/zero")
    with no_hang(), pytest.raises(ValueError, match="is a character device"):
        CheckpointReader(device)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'{"weight_map": {"w": 3}}', r"weight_map entry 3 \(key 'w'\)"),
        (b'{"weight_map": {"w": ["a"]}}', r"weight_map entry \['a'\] \(key 'w'\)"),
        (b'{"weight_map": {"w": {"x": 1}}}', r"\(key 'w'\)"),
        (b'{"weight_map": ["model.safetensors"]}', "no 'weight_map' object"),
        (b'{"weight_map": {"w": "model\xff.safetensors"}}', "not valid UTF-8"),
        (b'[' * 100_000 + b']' * 100_000, "nested too deeply"),
    ],
)
def test_malformed_index_values_name_the_file_and_key(tmp_path, text, match):
    (tmp_path / "model.safetensors.index.json").write_bytes(text)
    for reader in READERS.values():
        with pytest.raises(ValueError, match=match) as err:
            reader(tmp_path)
        assert "model.safetensors.index.json" in str(err.value) and "\n" not in str(err.value)
    assert get_safetensors_index_total_size(tmp_path) is None


def write_header(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"__metadata__": {"k": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}}", "nested too deeply"),
        (b'{"__metadata__": {"k": {"nested": "x"}}}', r"'__metadata__' is .*expected an object of strings"),
        (b'{"w": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}}', r"'w' is .*expected \{dtype"),
        (b'{"w": 5}', r"'w' is 5, expected"),
        (b'{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', r"'w' is"),
    ],
)
def test_nested_or_malformed_headers_name_the_file_and_key(tmp_path, header, match):
    write_header(tmp_path / "model.safetensors", header)
    for reader in (read_safetensors_layout, lambda p: CheckpointReader(p.parent), lambda p: checkpoint_tensor_dtypes(p.parent)):
        with pytest.raises(ValueError, match=match) as err:
            reader(tmp_path / "model.safetensors")
        assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)
