"""2 ranks, HFCausalLM under ModelParallelStrategy (FSDP2, gloo) from a bf16 hub-style checkpoint.

Modes (argv[1]):
  fp32     ``mixed_precision: bf16`` fine-tune of a checkpoint whose config says bfloat16: the parameters
           and the AdamW state in the saved DCP checkpoint are fp32; the embedding and the norm+head pair
           are their own FSDP2 groups (not the root's).
  bf16     ``weights_dtype: bfloat16`` on a checkpoint that stores the norms in fp32: those stay fp32 and
           FSDP2 accepts the mixed layers (the fp32 norms get their own groups).
  offload  ``cpu_offload: true``: FSDP2 keeps the shards in host memory and trains.
  ac       activation checkpointing under FSDP2 trains to exactly the weights of a run without it.
  layouts  fit from save_pretrained Mixtral and LLaVA directories (CHECKPOINT_DIR holds both).
Usage: job_precision.py MODE CHECKPOINT_DIR OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.fsdp import FSDPModule, fully_shard

from lightning_automodel import HFCausalLM, SFTDataModule
from distributed import end_rank_cleanly


def fit(module: HFCausalLM, out: Path, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=SFTDataModule(seq_length=32, batch_size=2))
    return trainer


def check_fp32(checkpoint: Path, out: Path) -> None:
    module = HFCausalLM(pretrained_path=str(checkpoint), mixed_precision="bf16", learning_rate=1e-3)
    trainer = fit(module, out)
    model = module.model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = trainer.optimizers[0].state
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    # The layout: embedding alone, final norm with the head; the root manages neither.
    embed, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
    assert all(isinstance(m, FSDPModule) for m in (embed, norm, head))
    group = lambda m: fully_shard.state(m)._fsdp_param_group  # noqa: E731 - test-only peek at FSDP2's grouping
    assert group(norm) is group(head) and group(embed) is not group(head)
    root_params = {id(p.sharded_param) for p in (group(model).fsdp_params if group(model) else [])}
    assert not root_params & {id(embed.weight), id(norm.weight), id(head.weight)}
    trainer.save_checkpoint(out / "sharded.ckpt")
    trainer.strategy.barrier()
    metadata = FileSystemReader(str(out / "sharded.ckpt")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in metadata.items() if hasattr(v, "properties") and not k.endswith(".step")}
    model_keys = [k for k in dtypes if ".exp_avg" not in k]
    optim_keys = [k for k in dtypes if ".exp_avg" in k]
    assert model_keys and optim_keys, sorted(dtypes)[:10]
    assert {dtypes[k] for k in dtypes} == {torch.float32}, {k: v for k, v in dtypes.items() if v != torch.float32}


def check_bf16(checkpoint: Path, out: Path) -> None:
    module = HFCausalLM(pretrained_path=str(checkpoint), weights_dtype="bfloat16", mixed_precision="bf16", learning_rate=1e-3)
    fit(module, out, steps=2)
    model = module.model
    norms = {n for n, p in model.named_parameters() if n.endswith("norm.weight")}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in norms else torch.bfloat16), (name, p.dtype)


def check_offload(checkpoint: Path, out: Path) -> None:
    module = HFCausalLM(pretrained_path=str(checkpoint), cpu_offload=True, learning_rate=1e-3)
    trainer = fit(module, out, steps=2)
    assert trainer.global_step == 2
    for p in module.model.parameters():
        assert p.to_local().device.type == "cpu"


def check_activation_checkpointing(checkpoint: Path, out: Path) -> None:
    """Recomputing each layer in backward (checkpoint wrapper inside its FSDP2 unit) trains to the same weights."""
    results = []
    for ac in (False, True):
        pl.seed_everything(0)
        module = HFCausalLM(pretrained_path=str(checkpoint), activation_checkpointing=ac, learning_rate=1e-2)
        fit(module, out / str(ac), steps=2)
        results.append({k.replace("_checkpoint_wrapped_module.", ""): v.full_tensor() for k, v in module.model.state_dict().items()})
    plain, recomputed = results
    assert plain.keys() == recomputed.keys()
    changed = [k for k in plain if not torch.equal(plain[k], recomputed[k])]
    assert not changed, changed[:5]
    from safetensors.torch import load_file

    start = load_file(checkpoint / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    assert not torch.equal(plain["model.layers.0.self_attn.q_proj.weight"], start)  # it did train


def check_pretrained_layouts(root: Path, out: Path) -> None:
    """The job fits from hub-layout Mixtral (per-expert tensors) and LLaVA (legacy keys) directories."""
    for name in ("mixtral", "llava"):
        module = HFCausalLM(pretrained_path=str(root / name), learning_rate=1e-3)
        trainer = fit(module, out / name, steps=2)
        assert trainer.global_step == 2 and trainer.callback_metrics["train_loss"].isfinite()


if __name__ == "__main__":
    mode, checkpoint, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"fp32": check_fp32, "bf16": check_bf16, "offload": check_offload, "ac": check_activation_checkpointing, "layouts": check_pretrained_layouts}[mode](checkpoint, out)
    print(f"OK job_precision {mode}", file=sys.stderr)
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
