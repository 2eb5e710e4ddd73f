"""2 ranks, ModelParallelStrategy (FSDP2) on CPU/gloo: the whole suite, a sharded save and an exact resume.

Modes (argv[1]):
  resume    freezing + dead parameters + bf16 cast of a mixed-dtype model + tied head; fit 1 epoch, save a
            DCP checkpoint, resume for epoch 2; the losses equal an uninterrupted 2-epoch run's exactly (gloo
            is bit-exact; lost AdamW state changes them), and the summary prints the restored weights' norm.
  freeze_more / freeze_less
            resume with a freeze configuration that freezes more / less than the checkpoint's: the checkpoint's
            set is re-applied before the optimizer state loads (warning naming the parameters), or with
            on_resume_mismatch='error' every rank stops with an error naming them.
  no_head   a DCP checkpoint whose metadata lacks the tied lm_head.weight resumes with TiedLMHead and
            fails without it; a checkpoint missing another key still fails.
  mismatch  ranks freeze different parameters: a clear error on every rank, no hang.
  ddp       DDP with freezing: frozen parameters are not in the optimizer.
"""

import math
import os
import pickle
import re
import shutil
import sys
import warnings
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
from lightning_automodel.core.hf_weight_files import format_bytes_human
from distributed import end_rank_cleanly


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


def full_norm(module) -> float:
    """The L2 norm of the module's full weights (each tensor once), gathered here: independent of the summary."""
    unique = {id(p): p for p in module.model.parameters()}.values()
    total = 0.0
    for p in unique:
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(full.detach().double().pow(2).sum())
    return math.sqrt(total)


def printed_norm(trainer) -> str:
    summary = next(c for c in trainer.callbacks if isinstance(c, ParameterSummary))
    return re.search(r"Param L2 norm \(global\): (\S+)", summary.text).group(1)


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
    saved_norm = full_norm(first)

    resumed = ShardedLM(kv_model, lr=5e-3)
    t2 = make_trainer(tmp / "resumed", 2, suite())
    t2.fit(resumed, data(), ckpt_path=ckpt)
    dead_and_frozen_not_in_optimizer(t2, resumed)
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight
    assert t2.global_step == t_full.global_step == 6
    # gloo is bit-exact: the resumed epoch equals the uninterrupted one exactly (lost optimizer state changes it).
    assert first.losses == full.losses[:3], (first.losses, full.losses)
    assert resumed.losses == full.losses[3:], (resumed.losses, full.losses)
    if t2.global_rank == 0:
        # The summary runs after the sharded restore: the checkpoint's weights, not the random init.
        assert printed_norm(t2) == f"{saved_norm:.4f}", (printed_norm(t2), saved_norm)
        assert printed_norm(t2) != printed_norm(t1)
        # AdamW state bytes as allocated on rank 0 (bf16 after the cast; rank 0 holds the larger half of dim 0).
        state = t2.optimizers[0].state.values()
        state_bytes = sum(v.to_local().nbytes for s in state for k, v in s.items() if k != "step")
        summary = next(c for c in t2.callbacks if isinstance(c, ParameterSummary))
        assert f"optimizer state {format_bytes_human(state_bytes)}," in summary.text, (state_bytes, summary.text)


SAVED = {"glob": "model.layers.0.*"}
CHANGED = {"freeze_more": [SAVED, {"path": "model.layers.1.mlp"}], "freeze_less": [{"path": "model.layers.0.mlp.up_proj"}]}
NAMED = {"freeze_more": "model.layers.1.mlp.down_proj.weight", "freeze_less": "model.layers.0.self_attn.q_proj.weight"}


def frozen(module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if not p.requires_grad}


def mode_changed_config(tmp: Path, direction: str) -> None:
    first = ShardedLM(tm.tiny_llama, lr=5e-3)
    t1 = make_trainer(tmp / "a", 1, [ParameterFreezing(freeze_modules=[SAVED])])
    t1.fit(first, data())
    ckpt = tmp / "a.ckpt"
    t1.save_checkpoint(ckpt)
    saved = frozen(first)

    resumed = ShardedLM(tm.tiny_llama, lr=5e-3)
    t2 = make_trainer(tmp / "b", 2, [ParameterFreezing(freeze_modules=CHANGED[direction])])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t2.fit(resumed, data(), ckpt_path=ckpt)
    assert frozen(resumed) == saved
    assert t2.global_step == 6
    # The optimizer holds exactly the checkpoint's trainable set, with its restored state (step 3 + 3).
    in_optimizer = {id(p) for g in t2.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in resumed.parameters() if p.requires_grad}
    assert all(float(s["step"]) == 6 for s in t2.optimizers[0].state.values())
    if t2.global_rank == 0:
        messages = [str(w.message) for w in record if "differs from the checkpoint" in str(w.message)]
        assert len(messages) == 1 and NAMED[direction] in messages[0] and "Re-applying" in messages[0], messages

    try:
        cb = ParameterFreezing(freeze_modules=CHANGED[direction], on_resume_mismatch="error")
        make_trainer(tmp / "c", 2, [cb]).fit(ShardedLM(tm.tiny_llama, lr=5e-3), data(), ckpt_path=ckpt)
    except MisconfigurationException as exc:
        assert "different frozen set" in str(exc) and NAMED[direction] in str(exc), exc
    else:
        raise AssertionError("on_resume_mismatch='error' must stop the resume")

    # A single-file checkpoint loaded into FSDP2 (full state dict): the same check, before the optimizer state.
    full_strategy = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    t3 = make_trainer(tmp / "d", 1, [ParameterFreezing(freeze_modules=[SAVED])], strategy=full_strategy())
    t3.fit(ShardedLM(tm.tiny_llama, lr=5e-3), data())
    single = tmp / "full.ckpt"
    t3.save_checkpoint(single)
    assert single.is_file()
    from_file = ShardedLM(tm.tiny_llama, lr=5e-3)
    t4 = make_trainer(tmp / "e", 2, [ParameterFreezing(freeze_modules=CHANGED[direction])], strategy=full_strategy())
    t4.fit(from_file, data(), ckpt_path=single)
    assert frozen(from_file) == saved and t4.global_step == 6
    assert all(float(s["step"]) == 6 for s in t4.optimizers[0].state.values())


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


class RestoredHead(pl.Callback):
    head = None

    def on_train_start(self, trainer, pl_module):
        RestoredHead.head = pl_module.model.lm_head.weight.full_tensor().detach().clone()


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
    # A full (single-file) checkpoint without the head, under ModelParallelStrategy: before the fix a
    # KeyError inside the strategy's load, before any hook.
    full_path = tmp / "full.ckpt"
    t_full = make_trainer(tmp / "e", 1, [TiedLMHead()], strategy=ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False))
    t_full.fit(ShardedLM(tied_llama), data())
    t_full.save_checkpoint(full_path)
    if dist.get_rank() == 0:
        full = torch.load(full_path, weights_only=False)
        embedding = full["state_dict"]["model.model.embed_tokens.weight"].clone()
        del full["state_dict"]["model.lm_head.weight"]
        torch.save(full, full_path)
        torch.save(embedding, tmp / "embedding.pt")
    dist.barrier()
    from_full = ShardedLM(tied_llama)
    t_from_full = make_trainer(tmp / "f", 2, [TiedLMHead(), RestoredHead()])
    t_from_full.fit(from_full, data(), ckpt_path=full_path)
    assert from_full.model.lm_head.weight is from_full.model.model.embed_tokens.weight
    assert torch.equal(RestoredHead.head, torch.load(tmp / "embedding.pt")), "the head is not the checkpoint's embedding"
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
    rank = int(os.environ["RANK"])
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
    modes = {"resume": mode_resume, "no_head": mode_no_head, "mismatch": mode_mismatch, "ddp": mode_ddp}
    modes.update({direction: (lambda tmp, d=direction: mode_changed_config(tmp, d)) for direction in CHANGED})
    modes[mode](tmp)
    print(f"OK {mode}", file=sys.stderr)
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
