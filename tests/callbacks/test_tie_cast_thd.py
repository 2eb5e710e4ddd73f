import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import tiny_models as tm
from callbacks.lit_models import InitLM, ShardedLM, loader, trainer
from lightning_automodel.callbacks import CastMixedDtypeToBF16, TiedLMHead, THDSqueeze
from lightning_automodel.callbacks.thd_squeeze import squeeze_thd_batch


def broken_tie_gemma():
    model = tm.tiny_gemma3()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def test_broken_tie_is_repaired_before_the_optimizer():
    module = InitLM(broken_tie_gemma)
    t = trainer(callbacks=[TiedLMHead()], max_steps=2)
    t.fit(module, loader())
    m = module.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    params = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert sum(p is m.model.embed_tokens.weight for p in params) == 1
    assert len(params) == len({id(p) for p in params})


def test_checkpoint_without_head_resumes_and_head_equals_embedding(tmp_path):
    module = InitLM(tm.tiny_gemma3)
    t = trainer(callbacks=[TiedLMHead()], max_steps=2)
    t.fit(module, loader())
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["model.lm_head.weight"]
    torch.save(ckpt, path)
    trained_embedding = module.model.model.embed_tokens.weight.detach().clone()

    resumed = InitLM(broken_tie_gemma)
    t2 = trainer(callbacks=[TiedLMHead()], max_steps=3)
    t2.fit(resumed, loader(), ckpt_path=path)
    m = resumed.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert t2.global_step == 3
    # Without the callback the same checkpoint does not load.
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        trainer(max_steps=3).fit(InitLM(broken_tie_gemma), loader(), ckpt_path=path)
    assert trained_embedding.shape == m.model.embed_tokens.weight.shape


def test_shape_mismatch_is_reported_clearly():
    def mismatched():
        model = tm.tiny_gemma3()
        model.lm_head = torch.nn.Linear(64, tm.VOCAB - 8, bias=False)
        return model

    with pytest.warns(UserWarning, match="differ in shape"):
        TiedLMHead()._tie(mismatched(), "test")
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="cannot be tied"):
        TiedLMHead(strict=True)._tie(mismatched(), "test")


def mixed_dtype_llama():
    model = tm.tiny_llama()
    model.model.layers[0].mlp.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("build_in_configure", [True, False])
def test_cast_makes_fsdp2_accept_a_mixed_dtype_model(build_in_configure):
    # One rank in process is a real fully_shard / DTensor run.
    module = ShardedLM(mixed_dtype_llama, build_in_configure=build_in_configure)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    t = trainer(strategy=strategy, callbacks=[CastMixedDtypeToBF16()], max_steps=2)
    t.fit(module, loader())
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert module.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_thd_batch_squeezed_in_place_with_exact_values():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[5, 6, 7, 8, 9]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
        "cu_seqlens": torch.tensor([[0, 3, 5, -1000]], dtype=torch.int32),
        "cu_seqlens_padded": torch.tensor([[0, 3, 6, -1000]], dtype=torch.int32),
        "max_seqlen": 3,
        "qkv_format": "thd",
    }
    squeeze_thd_batch(batch)
    assert batch["input_ids"].tolist() == [5, 6, 7, 8, 9] and batch["labels"].dim() == 1
    assert batch["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5] and batch["cu_seqlens_padded"].tolist() == [0, 3, 6]
    assert batch["max_seqlen"] == 3


def test_non_thd_batch_untouched():
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    before = batch["input_ids"]
    THDSqueeze().on_train_batch_start(None, None, batch, 0)
    assert batch["input_ids"] is before


def test_summary_counts_adamw_state_in_the_parameters_dtype():
    """After a bf16 cast AdamW's state is bf16: the summary must not report fp32 (2x too much)."""
    import tiny_models as tm

    from lightning_automodel.callbacks import ParameterSummary
    from lightning_automodel.core.hf_weight_files import format_bytes_human

    model = tm.tiny_llama().to(torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters())
    text = ParameterSummary().summarize(None, model, model, 1)
    assert f"optimizer state {format_bytes_human(2 * 2 * trainable)}," in text
