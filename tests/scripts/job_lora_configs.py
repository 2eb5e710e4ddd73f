"""A shipped LoRA config, shortened, on its own device count: its HuggingFaceCheckpoint output reloads to the trained logits.

Usage: job_lora_configs.py OUT_DIR CONFIG (relative output paths of the config land in OUT_DIR)
After fit (which wrote ``hf/final``), the adapters are set to random values and the callback writes
again (merged, and ``adapter_only``), so the check exercises the merge with non-zero adapters; rank 0
reloads each directory with transformers / peft and compares the logits with the live (FSDP2) model's.
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from distributed import end_rank_cleanly
from lightning_automodel import HFCausalLM, SFTDataModule
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from lightning_automodel.cli import AutoModelCLI
from lightning_automodel.core.hub_writer import full_tensor
from lightning_automodel.core.lora import base_checkpoint_name, is_adapter_name


@torch.no_grad()
def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    model.eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    out = model(input_ids=ids).logits
    return out.full_tensor() if isinstance(out, DTensor) else out


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, rank: int) -> None:
    generator = torch.Generator().manual_seed(100 + rank)
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(0.2 * torch.randn(local.shape, generator=generator))


def check_reload(directory: Path, want: torch.Tensor, vocab: int) -> None:
    """``from_pretrained`` loads every weight of ``directory`` (none missing, none ignored) and gives ``want``."""
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (directory, info)
    # merged weights round differently from base + adapter paths (fp32, 4 layers): 1e-4; a lost adapter moves logits by ~1
    torch.testing.assert_close(logits(reloaded, vocab), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{directory}: {m}")


def main(out: Path, config: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    os.chdir(out)
    cli = AutoModelCLI(
        HFCausalLM, SFTDataModule, run=False, auto_configure_optimizers=False, save_config_callback=None,
        args=["--config", config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
    )
    trainer, module = cli.trainer, cli.model
    trainer.fit(module, datamodule=cli.datamodule)
    callback = next(c for c in trainer.callbacks if isinstance(c, HuggingFaceCheckpoint))
    final = callback.last_saved
    vocab = module.model.config.vocab_size
    trained = logits(module.model, vocab)
    if trainer.global_rank == 0:
        check_reload(final, trained, vocab)
    trainer.strategy.barrier()

    randomize_adapters(module.model, trainer.global_rank)
    merged = callback.save(trainer, module, final.parent / "random")
    adapter = HuggingFaceCheckpoint(adapter_only=True).save(trainer, module, final.parent / "adapter")
    random = logits(module.model, vocab)
    base = {base_checkpoint_name(n): full_tensor(t) for n, t in module.model.state_dict().items() if not is_adapter_name(n)}
    if trainer.global_rank == 0:
        assert not torch.allclose(random, trained, atol=1e-1), "the random adapters did not change the model"
        check_reload(merged, random, vocab)
        plain = AutoModelForCausalLM.from_config(module.model.config)
        plain.load_state_dict(base, strict=True)
        plain.tie_weights()
        torch.testing.assert_close(logits(PeftModel.from_pretrained(plain, adapter), vocab), random, rtol=1e-4, atol=1e-4)
    trainer.strategy.barrier()
    print(f"OK job_lora_configs {Path(config).name}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
