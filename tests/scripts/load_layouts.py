"""2 ranks: each checkpoint layout is sharded with FSDP2 and streamed in; every rank's shards must equal
``from_pretrained``'s tensors bit for bit, and each rank must read only its part (when no conversion
forces a whole group). A bad checkpoint must fail on every rank before anything is allocated.

Usage: load_layouts.py ROOT NAME [NAME ...]   (ROOT/NAME written by tests/models/layouts.py)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig

from lightning_automodel.core.distributed import local_index
from lightning_automodel.core.sharded_load import CheckpointLayoutError, CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize, model_class_for
from distributed import end_rank_cleanly


def check_layout(path: Path, mesh) -> dict:
    config = AutoConfig.from_pretrained(path)
    model = build_meta_model(config)
    reader = CheckpointReader(path)
    plan = plan_checkpoint_load(model, reader)
    apply_fsdp2(model, mesh)
    materialize(model, torch.device("cpu"))
    report = load_checkpoint_into(model, reader, plan)
    reference = model_class_for(config).from_pretrained(path, dtype=torch.float32)
    expected = reference.state_dict()
    got = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.state_dict().items()}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for name, value in got.items():
        want = expected[name]
        if hasattr(value, "to_local"):
            local, want = value.to_local(), want[local_index(value)]
        else:
            local = value
        assert local.dtype == torch.float32, (name, local.dtype)
        assert torch.equal(local, want.to(local.dtype)), f"{path.name}: {name} differs on rank {dist.get_rank()}"
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(s.numel() * s.dtype.itemsize for s in (torch.empty(t.shape, dtype=t.dtype, device="meta") for t in reader.tensors.values()))
    converted = any(g.transform is not None for g in plan.groups)
    return {"bytes_read": report.bytes_read, "checkpoint_bytes": total, "converted": converted}


def check_bad_checkpoint(root: Path, mesh) -> None:
    """A tensor missing from the file: both ranks raise the same error while the model is still on meta."""
    from safetensors.torch import load_file, save_file

    source = root / "llama_bf16_sharded"
    bad = root / "bad_missing"
    if dist.get_rank() == 0:
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text((source / "config.json").read_text())
        state = {}
        for file in sorted(source.glob("*.safetensors")):
            state.update(load_file(file))
        state.pop("model.layers.1.mlp.down_proj.weight")
        save_file(state, bad / "model.safetensors")
    dist.barrier()
    model = build_meta_model(AutoConfig.from_pretrained(bad))
    try:
        plan_checkpoint_load(model, CheckpointReader(bad))
    except CheckpointLayoutError as exc:
        assert "model.layers.1.mlp.down_proj.weight" in str(exc) and str(bad) in str(exc), exc
        assert all(p.is_meta for p in model.parameters())
    else:
        raise AssertionError("a missing tensor was not reported")


def check_random_init(root: Path, mesh) -> None:
    """Random init of an inline config on 2 ranks equals the one-process init: no rank builds the model,
    and the weights do not depend on the world size."""
    from lightning_automodel.core.init import init_weights_by_module

    for name in ("gemma3_tied", "llava"):
        config = AutoConfig.from_pretrained(root / name)
        sharded = build_meta_model(config)
        apply_fsdp2(sharded, mesh)
        materialize(sharded, torch.device("cpu"))
        init_weights_by_module(sharded, seed=5)
        whole = build_meta_model(config)
        materialize(whole, torch.device("cpu"))
        init_weights_by_module(whole, seed=5)
        expected = dict(whole.named_parameters())
        for pname, param in sharded.named_parameters():
            want = expected[pname.replace("_checkpoint_wrapped_module.", "")]
            assert torch.equal(param.to_local(), want[local_index(param)]), (name, pname)
        weight = expected[next(n for n in expected if n.endswith("q_proj.weight"))]
        std = getattr(config.get_text_config(), "initializer_range", 0.02)
        assert abs(weight.std().item() - std) < 0.3 * std, (name, weight.std().item())


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    root = Path(sys.argv[1])
    results = {name: check_layout(root / name, mesh) for name in sys.argv[2:]}
    check_bad_checkpoint(root, mesh)
    check_random_init(root, mesh)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
