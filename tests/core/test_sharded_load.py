"""The streaming loader: every layout ``from_pretrained`` reads, bit for bit, each rank reading its part;
bad checkpoints fail on meta with the tensor and the file named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from checkpoint_layouts import LAYOUTS, write_layout
from distributed import run_torchrun
from lightning_automodel.core.sharded_load import CheckpointLayoutError, CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.model_build import build_meta_model, materialize, model_class_for
from tiny_models import build, tiny_config


def _load_whole(path):
    config = AutoConfig.from_pretrained(path)
    model = build_meta_model(config)
    reader = CheckpointReader(path)
    plan = plan_checkpoint_load(model, reader)
    materialize(model, torch.device("cpu"))
    report = load_checkpoint_into(model, reader, plan)
    return model, report, config


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_process_equals_from_pretrained(tmp_path, layout):
    path = write_layout(layout, tmp_path)
    model, report, config = _load_whole(path)
    reference = model_class_for(config).from_pretrained(path, dtype=torch.float32).state_dict()
    got = model.state_dict()
    assert set(got) == set(reference)
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, reference[name]), name
    on_disk = sum(t.numel() * t.element_size() for t in _all_tensors(path).values())
    assert report.bytes_read == on_disk  # one process reads everything exactly once


def _all_tensors(path):
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", weights_only=True)
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.multiprocess
def test_two_ranks_every_layout(tmp_path):
    for name in LAYOUTS:
        write_layout(name, tmp_path)
    proc = run_torchrun("load_layouts.py", str(tmp_path), *LAYOUTS, timeout=600)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    per_rank = json.loads(line.removeprefix("RESULT "))
    for name in LAYOUTS:
        total = per_rank[0][name]["checkpoint_bytes"]
        read = [rank[name]["bytes_read"] for rank in per_rank]
        # FSDP2 splits dim 0 in two: together the ranks read the checkpoint once (no whole-file reads),
        # MoE experts included (each rank reads only the experts it owns).
        assert sum(read) <= 1.1 * total, (name, read, total)
        assert max(read) < 0.7 * total, (name, read, total)


def _llama_dir(tmp_path, **overrides):
    model = build(tiny_config("llama", **overrides), seed=0)
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor_names_tensor_and_file_on_meta(tmp_path):
    path = _llama_dir(tmp_path)
    _rewrite(path, lambda s: s.pop("model.layers.0.self_attn.q_proj.weight"))
    model = build_meta_model(AutoConfig.from_pretrained(path))
    with pytest.raises(CheckpointLayoutError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight") as err:
        plan_checkpoint_load(model, CheckpointReader(path))
    assert str(path) in str(err.value)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    path = _llama_dir(tmp_path)
    config = AutoConfig.from_pretrained(path)
    config.intermediate_size = 96  # the checkpoint was saved with 128
    with pytest.raises(CheckpointLayoutError, match=r"mlp\.(gate|up|down)_proj\.weight.*model\.safetensors.*\[") :
        plan_checkpoint_load(build_meta_model(config), CheckpointReader(path))


def test_integer_tensor_is_not_loaded_as_raw_bits(tmp_path):
    path = _llama_dir(tmp_path)
    _rewrite(path, lambda s: s.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointLayoutError, match=r"model\.norm\.weight.*int32"):
        plan_checkpoint_load(build_meta_model(AutoConfig.from_pretrained(path)), CheckpointReader(path))


def test_unexplained_layout_lists_unmapped_keys(tmp_path):
    path = _llama_dir(tmp_path)
    _rewrite(path, lambda s: s.__setitem__("transformer.h.0.attn.w", s.pop("model.layers.0.self_attn.o_proj.weight")))
    with pytest.raises(CheckpointLayoutError, match=r"o_proj\.weight.*no conversion rule.*transformer\.h\.0\.attn\.w"):
        plan_checkpoint_load(build_meta_model(AutoConfig.from_pretrained(path)), CheckpointReader(path))


def test_untied_head_missing_is_an_error(tmp_path):
    path = _llama_dir(tmp_path, tie_word_embeddings=False)
    _rewrite(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointLayoutError, match=r"lm_head\.weight.*tie_word_embeddings"):
        plan_checkpoint_load(build_meta_model(AutoConfig.from_pretrained(path)), CheckpointReader(path))


def test_config_dtype_never_decides_precision(tmp_path):
    model = build(tiny_config("llama", dtype="bfloat16"), seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16
    loaded, _, _ = _load_whole(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight.float())


def test_bin_files_are_memory_mapped_without_code(tmp_path, monkeypatch):
    path = write_layout("llama_bin", tmp_path)
    seen = {}
    original = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _load_whole(path)
    assert seen.get("mmap") is True and seen.get("weights_only") is True


def test_slices_read_only_the_requested_rows(tmp_path):
    path = _llama_dir(tmp_path)
    reader = CheckpointReader(path)
    rows = reader.read("model.embed_tokens.weight", (slice(10, 20), slice(0, 64)))
    assert rows.shape == (10, 64) and reader.bytes_read == 10 * 64 * 4
    assert torch.equal(rows, load_file(path / "model.safetensors")["model.embed_tokens.weight"][10:20])


def test_reads_are_plain_and_exact_for_every_slice_shape(tmp_path):
    """Whole rows go through one byte range; inner-dim slices, scalars and empty ranges read right too."""
    tensors = {
        "m": torch.arange(60, dtype=torch.float32).reshape(5, 12),
        "b": torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4),
        "s": torch.tensor(7.5),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.read("m", (slice(1, 3), slice(0, 12))), tensors["m"][1:3])
    assert torch.equal(reader.read("m", (slice(0, 5), slice(4, 8))), tensors["m"][:, 4:8])
    assert torch.equal(reader.read("b", (slice(1, 2), slice(0, 3), slice(0, 4))), tensors["b"][1:2])
    assert torch.equal(reader.read("s"), tensors["s"])
    assert reader.read("m", (slice(5, 5), slice(0, 12))).shape == (0, 12)
    reader.close()


def test_a_header_that_claims_bytes_past_the_end_is_an_error(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # truncated payload, intact header
    with pytest.raises(CheckpointLayoutError, match=r"'w'.*truncated or corrupt"):
        CheckpointReader(tmp_path)


def test_casting_reads_go_through_small_chunks(tmp_path, monkeypatch):
    """bf16 on disk into fp32 parameters: rows are read in pieces of CHUNK_BYTES, with the same result."""
    import lightning_automodel.core.sharded_load as sharded_load

    monkeypatch.setattr(sharded_load, "CHUNK_BYTES", 100)  # a few rows per piece, uneven last piece
    path = write_layout("llama_bf16_sharded", tmp_path)
    model, report, config = _load_whole(path)
    reference = model_class_for(config).from_pretrained(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in _all_tensors(path).values())


def test_a_shard_swapped_for_a_fifo_after_indexing_is_refused_not_waited_on(tmp_path):
    import os

    model = build(tiny_config("llama"), seed=0)
    model.save_pretrained(tmp_path / "m")
    reader = CheckpointReader(tmp_path / "m")
    shard = tmp_path / "m" / "model.safetensors"
    shard.unlink()
    os.mkfifo(shard)  # what a reader blocked on forever before the descriptor check
    key = next(iter(reader.tensors))
    with pytest.raises(ValueError, match="regular file"):
        reader.read(key)
    reader.close()
