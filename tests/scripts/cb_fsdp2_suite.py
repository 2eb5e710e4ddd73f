"""2 ranks, ModelParallelStrategy (FSDP2) on CPU/gloo: the whole suite, a sharded save and an exact resume.

Modes (argv[1]):
  resume    freezing + dead parameters + bf16 cast of a mixed-dtype model + tied head; fit 1 epoch, save a
            DCP checkpoint, resume for epoch 2; the losses match an uninterrupted 2-epoch run.
  no_head   a DCP checkpoint whose metadata lacks the tied lm_head.weight resumes with TiedLMHead and
            fails without it; a checkpoint missing another key still fails.
  mismatch  ranks freeze different parameters: a clear error on every rank, no hang.
  ddp       DDP with freezing: frozen parameters are not in the optimizer.
"""

import pickle
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import tiny_models as tm
from callbacks.lit_models import InitLM, ShardedLM, loader
from lightning_automodel.callbacks import (
    CastMixedDtypeToBF16,
    FreezeDeadParameters,
    ParameterFreezing,
    ParameterSummary,
    TiedLMHead,
)


def kv_model():
    model = tm.synthetic_kv_shared(tie_word_embeddings=True, seed=3)
    model.model.layers[1].mlp.to(torch.bfloat16)  # mixed dtypes: FSDP2 needs the cast
    return model


def suite():
    return [
        ParameterSummary(),
        TiedLMHead(),
        CastMixedDtypeToBF16(),
        FreezeDeadParameters(detect_steps=2),
        ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]),
    ]


def make_trainer(tmp: Path, max_epochs: int, callbacks, strategy=None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy or ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp), callbacks=callbacks,
    )


def data():
    return loader(n=24, batch_size=4)  # 3 steps per epoch on 2 ranks


def dead_and_frozen_not_in_optimizer(trainer, module):
    ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    frozen = [n for n, p in module.model.named_parameters() if not p.requires_grad]
    assert any("layers.3.self_attn.k_proj" in n for n in frozen), frozen
    assert any("layers.0.mlp" in n for n in frozen), frozen
    assert not any(id(p) in ids for p in module.model.parameters() if not p.requires_grad)


def mode_resume(tmp: Path) -> None:
    full = ShardedLM(kv_model, lr=5e-3)
    t_full = make_trainer(tmp / "full", 2, suite())
    t_full.fit(full, data())
    dead_and_frozen_not_in_optimizer(t_full, full)
    assert full.model.lm_head.weight is full.model.model.embed_tokens.weight
    assert {p.dtype for p in full.model.parameters()} == {torch.bfloat16}

    first = ShardedLM(kv_model, lr=5e-3)
    t1 = make_trainer(tmp / "half", 1, suite())
    t1.fit(first, data())
    ckpt = tmp / "half.ckpt"
    t1.save_checkpoint(ckpt)
    assert ckpt.is_dir() and (ckpt / ".metadata").exists()

    resumed = ShardedLM(kv_model, lr=5e-3)
    t2 = make_trainer(tmp / "resumed", 2, suite())
    t2.fit(resumed, data(), ckpt_path=ckpt)
    dead_and_frozen_not_in_optimizer(t2, resumed)
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight
    assert t2.global_step == t_full.global_step == 6
    tail_full, tail_resumed = full.losses[3:], resumed.losses
    assert len(tail_resumed) == 3, tail_resumed
    for a, b in zip(tail_full, tail_resumed):
        assert abs(a - b) < 2e-2 * max(1.0, abs(a)), (tail_full, tail_resumed)
    assert first.losses == full.losses[:3] or all(abs(a - b) < 1e-3 for a, b in zip(first.losses, full.losses[:3]))


def drop_from_dcp(src: Path, dst: Path, key_suffix: str) -> None:
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
        meta_path = dst / ".metadata"
        with meta_path.open("rb") as f:
            meta = pickle.load(f)
        keys = [k for k in meta.state_dict_metadata if k.endswith(key_suffix)]
        assert keys, key_suffix
        for k in keys:
            del meta.state_dict_metadata[k]
        with meta_path.open("wb") as f:
            pickle.dump(meta, f)
    dist.barrier()


def tied_llama():
    return tm.tiny_llama(tie_word_embeddings=True, seed=5)


def mode_no_head(tmp: Path) -> None:
    module = ShardedLM(tied_llama)
    t = make_trainer(tmp / "a", 1, [TiedLMHead()])
    t.fit(module, data())
    ckpt = tmp / "tied.ckpt"
    t.save_checkpoint(ckpt)
    no_head = tmp / "no_head.ckpt"
    drop_from_dcp(ckpt, no_head, "model.lm_head.weight")
    # Without the callback Lightning's DCP load fails on the missing key.
    try:
        make_trainer(tmp / "b", 2, []).fit(ShardedLM(tied_llama), data(), ckpt_path=no_head)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        assert "Missing key in checkpoint state_dict" in str(exc) and "lm_head.weight" in str(exc), exc
    else:
        raise AssertionError("loading a checkpoint without lm_head.weight should fail without TiedLMHead")
    resumed = ShardedLM(tied_llama)
    t2 = make_trainer(tmp / "c", 2, [TiedLMHead()])
    t2.fit(resumed, data(), ckpt_path=no_head)
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight
    assert t2.global_step == 6
    # Any other missing key still fails, with the callback too.
    no_norm = tmp / "no_norm.ckpt"
    drop_from_dcp(ckpt, no_norm, "model.model.norm.weight")
    try:
        make_trainer(tmp / "d", 2, [TiedLMHead()]).fit(ShardedLM(tied_llama), data(), ckpt_path=no_norm)
    except BaseException as exc:
        assert "Missing key in checkpoint state_dict" in str(exc) and "norm.weight" in str(exc), exc
    else:
        raise AssertionError("a checkpoint without model.norm.weight must still fail")


def mode_mismatch(tmp: Path) -> None:
    rank = int(__import__("os").environ["RANK"])
    cb = ParameterFreezing(freeze_modules=[{"path": f"model.layers.{rank}.mlp"}])
    try:
        make_trainer(tmp, 1, [cb]).fit(ShardedLM(tm.tiny_llama), data())
    except MisconfigurationException as exc:
        assert "Ranks froze different parameters: rank 1 differs from rank 0" in str(exc), exc
        print(f"rank {rank}: {exc}", file=sys.stderr)
        dist.barrier()  # both ranks raised the same error: nobody is left waiting in a collective
        dist.destroy_process_group()
        return
    raise AssertionError("expected a rank mismatch error")


def mode_ddp(tmp: Path) -> None:
    module = InitLM(tm.tiny_llava)
    # Text-only batches: the projector is unused too (DDP would reject unused trainable parameters).
    cb = ParameterFreezing(freeze_vision_tower=True, freeze_modules=[{"path": "model.multi_modal_projector"}])
    t = make_trainer(tmp, 1, [cb], strategy=DDPStrategy())
    t.fit(module, data())
    ids = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    vision = [p for n, p in module.model.named_parameters() if "vision_tower" in n]
    assert vision and not any(id(p) in ids or p.requires_grad for p in vision)


if __name__ == "__main__":
    mode, tmp = sys.argv[1], Path(sys.argv[2])
    {"resume": mode_resume, "no_head": mode_no_head, "mismatch": mode_mismatch, "ddp": mode_ddp}[mode](tmp)
    print(f"OK {mode}", file=sys.stderr)
