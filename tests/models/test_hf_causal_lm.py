import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import tiny_models as tm
from callbacks.lit_models import trainer
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, TiedLMHead
from lightning_automodel.core.hf_weight_files import OfflineCheckpointError
from lightning_automodel.data import PackedSequenceCollator, SFTDataModule

TINY = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def data(**kw):
    return SFTDataModule(seq_length=32, batch_size=4, **kw)


@pytest.mark.parametrize("with_callbacks", [False, True])
def test_fit_with_and_without_the_suite(with_callbacks):
    module = HFCausalLM(config=TINY, learning_rate=1e-2)
    callbacks = [ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]), FreezeDeadParameters(), TiedLMHead(), ParameterSummary()] if with_callbacks else []
    t = trainer(callbacks=callbacks, max_steps=8, limit_val_batches=1)
    t.fit(module, datamodule=data())
    assert t.global_step == 8
    ids = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in ids for p in module.parameters() if p.requires_grad)
    assert not any(id(p) in ids for p in module.parameters() if not p.requires_grad)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight


def test_loads_a_local_directory_without_lm_head(tmp_path):
    source = tm.tiny_gemma3(seed=4)
    source.save_pretrained(tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # HF omits the tied head
    module = HFCausalLM(pretrained_path=str(tmp_path / "m"))
    module.configure_model()
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(module(input_ids=ids).logits, source(input_ids=ids, use_cache=False).logits, atol=1e-5)


def test_fsdp2_one_rank_build_loads_the_same_weights(tmp_path):
    source = tm.build(tm.tiny_config("gemma3_text", vocab_size=260), seed=4)
    source.save_pretrained(tmp_path / "m")
    module = HFCausalLM(pretrained_path=str(tmp_path / "m"))
    t = trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    from torch.distributed.tensor import DTensor

    assert isinstance(module.model.model.embed_tokens.weight, DTensor)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    # One optimizer step moved the weights; before it, the shards held exactly the checkpoint.
    fresh = HFCausalLM(pretrained_path=str(tmp_path / "m"))
    t0 = trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=0, limit_val_batches=0)
    t0.fit(fresh, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p.full_tensor(), source.state_dict()[name]), name


def test_packed_batch_never_attends_across_sequences():
    module = HFCausalLM(config=TINY)
    module.configure_model()
    module.eval()
    seqs = [[5, 9, 17, 33, 4], [7, 8, 100, 2, 2, 60, 61]]
    batch = PackedSequenceCollator()(seqs)
    with torch.no_grad():
        packed = module(**batch).logits[0]
        first = module(input_ids=torch.tensor([seqs[0]])).logits[0]
        second = module(input_ids=torch.tensor([seqs[1]])).logits[0]
    assert torch.allclose(packed[:5], first, atol=1e-5)
    assert torch.allclose(packed[5:], second, atol=1e-5)


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        HFCausalLM()
    with pytest.raises(OfflineCheckpointError, match="runs offline"):
        HFCausalLM(pretrained_path="meta-llama/Llama-3.1-8B").build_hf_config()
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFCausalLM(pretrained_path=str(tmp_path / "half")).build_hf_config()
    tm.tiny_llama().config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        HFCausalLM(pretrained_path=str(tmp_path / "noweights")).build_hf_config()
    with pytest.raises(ValueError, match="unknown key\\(s\\): 'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        HFCausalLM(config={**TINY, "hiden_size": 3}).build_hf_config()
    small_vocab = HFCausalLM(config={**TINY, "vocab_size": 128})
    with pytest.raises(ValueError, match="tokenizer has 259 ids"):
        trainer(max_steps=1).fit(small_vocab, datamodule=data())
    short = HFCausalLM(config={**TINY, "max_position_embeddings": 16})
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        trainer(max_steps=1).fit(short, datamodule=data())


def test_activation_checkpointing_is_enabled_without_a_deprecation_warning():
    """transformers 5 deprecated ``gradient_checkpointing_enable`` (FutureWarning); the current entry point is used."""
    import warnings

    module = HFCausalLM(config=TINY, activation_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.configure_model()
    # Ours and transformers' deprecations (torch's own, e.g. about torch.jit at import, are not ours to fix).
    deprecations = [
        str(w.message) for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and ("transformers" in w.filename or "lightning_automodel" in w.filename)
    ]
    assert not deprecations, deprecations
    assert module.model.is_gradient_checkpointing
    module.model.train()
    loss = module(input_ids=torch.randint(0, 200, (2, 8)), labels=torch.randint(0, 200, (2, 8))).loss
    loss.backward()  # the recompute runs: every trainable weight got a gradient
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("mixed_precision", ["bf16", "none"])
def test_mixed_precision_off_fsdp2_warns_once_in_one_line(mixed_precision):
    import warnings

    module = HFCausalLM(config=TINY, mixed_precision=mixed_precision)
    t = trainer(max_steps=0, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, datamodule=data())
        module.configure_model()  # validate/test call it again: still one warning
    lines = [str(w.message) for w in caught if "mixed_precision" in str(w.message)]
    if mixed_precision == "none":
        assert not lines
        return
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "SingleDeviceStrategy" in lines[0] and "bf16-mixed" in lines[0] and "ModelParallelStrategy" in lines[0]


def test_mixed_precision_under_fsdp2_does_not_warn():
    import warnings

    module = HFCausalLM(config=TINY, mixed_precision="bf16")
    t = trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=0, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, datamodule=data())
    assert not [w for w in caught if "mixed_precision" in str(w.message)]
