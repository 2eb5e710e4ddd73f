"""2 FSDP2 ranks: HFCausalLM + LoRA from a saved base; adapters sharded with their layer; a resume is bit-exact.

Two epochs of 2 steps (8 samples, batch 2, 2 ranks); the checkpoint is saved at the end of the first.

Usage: job_lora.py OUT_DIR [ddp|user]
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA
from lightning_automodel.core.lora import is_adapter_name
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly


class Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"].detach()))


def make_trainer(out: Path, epochs: int, losses: Losses) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
        enable_model_summary=False, default_root_dir=str(out), callbacks=[LoRA(r=4, lora_alpha=8), losses],
    )


def ddp(out: Path) -> None:
    """LoRA and QLoRA under DDP: every rank adapts its own copy; gradients of the adapters are averaged."""
    from lightning.pytorch.strategies import DDPStrategy

    base_dir = out / "base"
    for quantization in (None, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}):
        t = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(), max_epochs=1, logger=False,
                       enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                       default_root_dir=str(out), callbacks=[LoRA(r=4, lora_alpha=8)])
        if t.global_rank == 0 and not base_dir.exists():
            tm.tiny_llama(seed=3).save_pretrained(base_dir)
        t.strategy.barrier()
        module = HFCausalLM(pretrained_path=str(base_dir), learning_rate=2e-2, quantization=quantization)
        t.fit(module, loader(n=8, batch_size=2))
        adapters = {n: p.detach().clone() for n, p in module.model.named_parameters() if is_adapter_name(n)}
        assert adapters and all(p.requires_grad for n, p in module.model.named_parameters() if is_adapter_name(n))
        gathered = [None, None]
        dist.all_gather_object(gathered, {n: float(t.double().sum()) for n, t in adapters.items()})
        assert gathered[0] == gathered[1], "ranks diverged: the adapters' gradients were not averaged"
        assert any(float(p.abs().sum()) > 0 for n, p in adapters.items() if "lora_B" in n)
    print("OK job_lora ddp", file=sys.stderr)


def user_module(out: Path) -> None:
    """A user's module that builds and shards its model in configure_model: the one call before fully_shard."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from callbacks.lit_models import ShardedLM
    from lightning_automodel.callbacks import prepare_before_sharding

    class UserSharded(ShardedLM):
        def configure_model(self):
            if self.model is None:
                self.model = self.builder()
                prepare_before_sharding(self, self.model)  # adapters now, so fully_shard shards them with their layer
            super().configure_model()

    module = UserSharded(tm.tiny_llama)
    t = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                   max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                   enable_model_summary=False, default_root_dir=str(out), callbacks=[LoRA(r=4)])
    t.fit(module, loader(n=16, batch_size=2))
    adapters = [p for n, p in module.model.named_parameters() if is_adapter_name(n)]
    assert adapters and all(isinstance(p, DTensor) and p.requires_grad for p in adapters)
    # without the call, LoRA refuses the sharded model with the instruction
    plain = ShardedLM(tm.tiny_llama)
    t2 = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                    max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                    enable_model_summary=False, default_root_dir=str(out), callbacks=[LoRA(r=4)])
    try:
        t2.fit(plain, loader(n=16, batch_size=2))
    except Exception as exc:  # noqa: BLE001
        assert "prepare_before_sharding" in str(exc), exc
    else:
        raise AssertionError("LoRA on an already sharded model must be refused")
    print("OK job_lora user", file=sys.stderr)


def main(out: Path) -> None:
    base_dir = out / "base"
    full = Losses()
    uninterrupted = make_trainer(out, 2, full)
    if uninterrupted.global_rank == 0:
        tm.tiny_llama(seed=3).save_pretrained(base_dir)
    uninterrupted.strategy.barrier()
    module = HFCausalLM(pretrained_path=str(base_dir), learning_rate=2e-2)
    uninterrupted.fit(module, loader(n=8, batch_size=2))
    model = module.model
    adapters = {n: p for n, p in model.named_parameters() if is_adapter_name(n)}
    assert adapters and all(isinstance(p, DTensor) and p.requires_grad for p in adapters.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_adapter_name(n))

    first, second = Losses(), Losses()
    t1 = make_trainer(out, 1, first)
    t1.fit(HFCausalLM(pretrained_path=str(base_dir), learning_rate=2e-2), loader(n=8, batch_size=2))
    t1.save_checkpoint(out / "half.ckpt")
    resumed = HFCausalLM(pretrained_path=str(base_dir), learning_rate=2e-2)
    t2 = make_trainer(out, 2, second)
    t2.fit(resumed, loader(n=8, batch_size=2), ckpt_path=out / "half.ckpt")
    assert first.values + second.values == full.values, (first.values, second.values, full.values)
    for (name, a), b in zip(module.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    t2.save_checkpoint(out / "final.ckpt")
    if dist.get_rank() == 0:
        torch.save({k: v.full_tensor() for k, v in resumed.model.state_dict().items()}, out / "final_state.pt")
    else:
        {k: v.full_tensor() for k, v in resumed.model.state_dict().items()}
    t2.strategy.barrier()
    print("OK job_lora", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "ddp":
        ddp(Path(sys.argv[1]))
    elif len(sys.argv) > 2 and sys.argv[2] == "user":
        user_module(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
