"""2 FSDP2 ranks: DoRA and embedding adapters get peft's init from the loaded base, as on one device.

Usage: job_lora_init_fsdp2.py OUT_DIR [init|resume-r]. Materialized memory is NaN-filled (tests/conftest.py
sets the switch). ``resume-r``: a sharded checkpoint of r=4 resumed with r=8 stops with one line naming r
(before the weights load: no size-mismatch traceback).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA
from lightning_automodel.core.lora import initialize_adapters, inject_lora, is_adapter_name
from lightning_automodel.strategies import AtomicModelParallelStrategy
from distributed import end_rank_cleanly

LORA = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj", "v_proj"])


def main(out: Path) -> None:
    t = pl.Trainer(accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                   max_steps=0, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                   enable_model_summary=False, default_root_dir=str(out), callbacks=[LoRA(**LORA)])
    base = tm.tiny_llama(seed=3)
    if t.global_rank == 0:
        base.save_pretrained(out / "base")
    t.strategy.barrier()
    module = HFCausalLM(pretrained_path=str(out / "base"), learning_rate=1e-2, seed=7)
    t.fit(module, loader(n=8, batch_size=2))
    sharded = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in module.model.named_parameters() if is_adapter_name(n)}
    # one device: the same seed, the same loaded base
    single = tm.tiny_llama(seed=3)
    inject_lora(single, LORA_CONFIG)
    initialize_adapters(single, seed=7)
    expected = {n: p.detach() for n, p in single.named_parameters() if is_adapter_name(n)}
    assert sorted(sharded) == sorted(expected), (sorted(sharded)[:4], sorted(expected)[:4])
    for name, tensor in sharded.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, expected[name]), name
    ids = next(iter(loader(n=4, batch_size=4)))["input_ids"]
    module.model.eval()
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)
    print("OK lora_init_fsdp2", file=sys.stderr)


def resume_with_other_r(out: Path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    def trainer(r: int, steps: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                          max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                          enable_model_summary=False, default_root_dir=str(out), callbacks=[LoRA(r=r, lora_alpha=8)])

    config = dict(tm.tiny_config("llama").to_dict())
    first = trainer(4, 1)
    first.fit(HFCausalLM(config=config, learning_rate=1e-2), loader(n=8, batch_size=2))
    first.save_checkpoint(out / "r4.ckpt")
    try:
        trainer(8, 2).fit(HFCausalLM(config=config, learning_rate=1e-2), loader(n=8, batch_size=2), ckpt_path=out / "r4.ckpt")
    except MisconfigurationException as exc:
        message = str(exc)
        assert "\n" not in message and "r: 4 (checkpoint) vs 8 (this run)" in message, message
    else:
        raise AssertionError("a resume with another r must stop")
    print("OK lora_resume_r_fsdp2", file=sys.stderr)


if __name__ == "__main__":
    from lightning_automodel.core.lora import lora_config

    LORA_CONFIG = lora_config(**LORA)
    if sys.argv[2:] == ["resume-r"]:
        resume_with_other_r(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
    end_rank_cleanly()
