"""What a GPU node runs after the load, at toy size, on NCCL (``gpu``) or on gloo (``cpu``).

Checks (one torchrun launch, every rank; the world size is torchrun's ``--nproc_per_node``):
  offload    ``cpu_offload`` with ``gradient_clip_val`` (the norm reduction over CPU DTensors needs a CPU
             backend beside NCCL), a sharded save of a model with a persistent buffer (DeepSeek-V3's
             ``e_score_correction_bias``: on the device while the shards live on the host) and its resume.
  hf         ``HuggingFaceCheckpoint`` writes a directory that ``from_pretrained`` loads to the trained weights.
  lora       ``LoRA`` under FSDP2 from a saved base: adapters train on the device, the base stays as loaded.
  init       random init of an inline config: every shard holds what one process's init draws.
On one GPU NCCL still runs every collective, so a CPU tensor handed to it fails there as on eight.

Usage (under torchrun --nproc_per_node=N): node_checks.py {gpu|cpu} BASE_DIR OUT_DIR [CHECK ...]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from distributed import end_rank_cleanly
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks import LoRA
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.lora import is_adapter_name
from lightning_automodel.core.model_build import build_meta_model, inline_config, materialize
from lightning_automodel.strategies import AtomicModelParallelStrategy

LLAMA = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
# Layer 1 is a MoE layer whose router holds the persistent buffer e_score_correction_bias.
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=260, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128)
BUFFER = "model.layers.1.mlp.gate.e_score_correction_bias"


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the host (a DTensor is gathered: a collective on the strategy's backend)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()


class Node:
    def __init__(self, accelerator: str, base: Path, out: Path) -> None:
        self.accelerator = accelerator
        self.device_type = "cuda" if accelerator == "gpu" else "cpu"
        self.world = int(os.environ["WORLD_SIZE"])
        self.base, self.out = base, out

    def fit(self, module: HFCausalLM, name: str, steps: int, ckpt_path: Path | None = None, callbacks: tuple = (), **kwargs) -> pl.Trainer:
        trainer = pl.Trainer(
            accelerator=self.accelerator, devices=self.world,
            strategy=AtomicModelParallelStrategy(data_parallel_size=self.world, tensor_parallel_size=1),
            max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(self.out / name),
            callbacks=list(callbacks), **kwargs,
        )
        trainer.fit(module, datamodule=SFTDataModule(seq_length=32, batch_size=2), ckpt_path=ckpt_path)
        assert trainer.global_step == steps, (trainer.global_step, steps)
        assert not steps or trainer.callback_metrics["train_loss"].isfinite(), trainer.callback_metrics
        return trainer

    def check_device(self, module: HFCausalLM, expected: str) -> None:
        wrong = [n for n, p in module.model.named_parameters() if getattr(p, "to_local", lambda: p)().device.type != expected]
        assert not wrong, f"not on {expected}: {wrong[:5]}"

    def offload(self) -> None:
        module = HFCausalLM(config=DEEPSEEK, cpu_offload=True, learning_rate=1e-3)
        trainer = self.fit(module, "offload", 2, gradient_clip_val=1.0)
        self.check_device(module, "cpu")  # the shards, their gradients and AdamW state live on the host
        saved = self.out / "offload" / "sharded.ckpt"
        trainer.save_checkpoint(saved)
        stored = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
        assert any(key.endswith(BUFFER) for key in stored), sorted(stored)[:10]
        resumed = HFCausalLM(config=DEEPSEEK, cpu_offload=True, learning_rate=1e-3)
        self.fit(resumed, "offload", 3, ckpt_path=saved, gradient_clip_val=1.0)
        assert torch.equal(full(resumed.model.get_buffer(BUFFER)), full(module.model.get_buffer(BUFFER)))

    def hf(self) -> None:
        module = HFCausalLM(config=LLAMA, learning_rate=1e-2)
        self.fit(module, "hf", 2, callbacks=(HuggingFaceCheckpoint(max_shard_size="40KB"),))
        self.check_device(module, self.device_type)
        trained = {name: full(t) for name, t in module.model.state_dict().items()}
        if dist.get_rank() == 0:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(self.out / "hf" / "hf" / "final").state_dict()
            differ = [name for name, t in trained.items() if not torch.equal(loaded[name], t)]
            assert not differ, differ[:5]
        dist.barrier()

    def lora(self) -> None:
        module = HFCausalLM(pretrained_path=str(self.base), learning_rate=2e-2)
        self.fit(module, "lora", 2, callbacks=(LoRA(r=4, lora_alpha=8),))
        self.check_device(module, self.device_type)
        state = {name: full(t) for name, t in module.model.state_dict().items()}
        adapters = [name for name in state if is_adapter_name(name)]
        assert adapters and any(state[n].abs().sum() > 0 for n in adapters if "lora_B" in n), "the adapters did not train"
        start = load_file(self.base / "model.safetensors")
        base_key = next(k for k in state if k.endswith("q_proj.base_layer.weight"))
        assert torch.equal(state[base_key], start[base_key.replace(".base_layer", "")]), "the frozen base moved"

    def init(self) -> None:
        module = HFCausalLM(config=LLAMA, seed=11)
        self.fit(module, "init", 0)
        self.check_device(module, self.device_type)
        whole = build_meta_model(inline_config(LLAMA))
        materialize(whole, torch.device("cpu"))
        init_weights_by_module(whole, seed=11)
        expected = whole.state_dict()
        differ = [n for n, t in module.model.state_dict().items() if not torch.equal(full(t), expected[n])]
        assert not differ, differ[:5]


def main(accelerator: str, base: Path, out: Path, checks: list[str]) -> None:
    node = Node(accelerator, base, out)
    known: dict[str, Callable[[], None]] = {"offload": node.offload, "hf": node.hf, "lora": node.lora, "init": node.init}
    for name in checks or list(known):
        known[name]()
        print(f"OK node_checks {name} {accelerator} x{node.world}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
