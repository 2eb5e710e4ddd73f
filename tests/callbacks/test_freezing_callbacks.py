import re
import warnings

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import tiny_models as tm
from callbacks.lit_models import InitLM, ShardedLM, loader, trainer
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary


def optimizer_param_ids(t):
    return {id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]}


def test_frozen_parameters_never_reach_the_optimizer():
    module = InitLM(tm.tiny_llava)
    t = trainer(callbacks=[ParameterFreezing()])  # the default freezes the vision tower
    t.fit(module, loader())
    vision = [p for n, p in module.model.named_parameters() if n.startswith("model.vision_tower.")]
    assert vision and all(not p.requires_grad for p in vision)
    ids = optimizer_param_ids(t)
    assert not any(id(p) in ids for p in vision)
    assert all(id(p) in ids for p in module.parameters() if p.requires_grad)


def test_order_is_fixed_whatever_the_callback_list():
    # Unfreeze everything, yet dead parameters stay frozen: dead-param surgery always runs after freezing.
    module = ShardedLM(tm.synthetic_kv_shared)
    cbs = [FreezeDeadParameters(detect_steps=0), ParameterFreezing(unfreeze_modules=[{"glob": "*"}])]
    t = trainer(callbacks=cbs)
    t.fit(module, loader())
    dead = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert dead == set(cbs[0].frozen) and len(dead) == 12
    ids = optimizer_param_ids(t)
    assert not any(id(p) in ids for n, p in module.model.named_parameters() if n in dead)


def test_configure_model_is_wrapped_once_across_fit_and_validate():
    module = ShardedLM(tm.tiny_llama)
    cb = ParameterFreezing(freeze_modules=[{"path": "model.embed_tokens"}])
    seen = []

    class ChainProbe(Callback):
        def on_validation_start(self, trainer, pl_module):
            patch = pl_module.configure_model
            seen.append((type(patch).__name__, patch.__wrapped__.__func__, isinstance(patch.previous, type(patch))))

    t = trainer(callbacks=[cb, ChainProbe()])
    t.fit(module, loader())
    t.validate(module, loader(8))
    # Patched once per run (never a patch over a patch) and removed at each teardown.
    assert seen == [("MethodPatch", ShardedLM.configure_model, False)]
    assert "configure_model" not in vars(module)
    assert not module.model.model.embed_tokens.weight.requires_grad


def test_nothing_left_to_train_is_an_error():
    module = InitLM(tm.tiny_llama)
    with pytest.raises(MisconfigurationException, match="nothing to train"):
        trainer(callbacks=[ParameterFreezing(freeze_modules=[{"glob": "*"}])]).fit(module, loader())


def test_bad_config_is_a_misconfiguration():
    with pytest.raises(MisconfigurationException, match="valid options"):
        ParameterFreezing.from_config({"freeze_embeddings": True})
    with pytest.raises(MisconfigurationException, match="matched no parameters"):
        trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.nope"}])]).fit(InitLM(), loader())


def test_optimizer_with_frozen_parameters_warns_where_a_sharded_resume_can_fail():
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = ShardedLM(tm.tiny_llama)
    module.all_params_in_optimizer = True
    sharded = trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "lm_head"}])], devices=1,
                      strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    with pytest.warns(UserWarning, match="(?s)optimizer holds frozen parameters.*a resume with the same frozen set.*sharded.*trainable again"):
        sharded.fit(module, loader())


def test_optimizer_with_frozen_parameters_is_silent_on_one_device():
    """Issue 21: the usual configure_optimizers over self.parameters() on one device cannot hit the DCP case."""
    module = InitLM(tm.tiny_llama, all_params_in_optimizer=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "lm_head"}])]).fit(module, loader())
    assert not [w for w in record if "optimizer holds frozen" in str(w.message)]


def test_runtime_detection_names_unused_parameters():
    def with_unused():
        model = tm.tiny_llama()
        model.model.unused_adapter = torch.nn.Linear(64, 64)
        return model

    module = InitLM(with_unused)
    cb = FreezeDeadParameters(detect_steps=2)
    with pytest.warns(UserWarning, match=r"(?s)model\.unused_adapter\.weight.*- \{path: model\.unused_adapter\}") as record:
        trainer(callbacks=[cb], max_steps=4).fit(module, loader())
    assert cb.unused == ["model.unused_adapter.weight", "model.unused_adapter.bias"]
    assert any("Missing key in checkpoint state_dict" in str(w.message) for w in record)


def test_selector_suggestions_group_whole_modules_only():
    cb = FreezeDeadParameters()
    cb._watched = ["a.w", "a.b", "c.w", "c.b", "top", "x.y.w", "x.y.b", "x.z.w"]
    assert cb._selector_paths(["a.w", "a.b", "c.w", "top"]) == ["a", "c.w", "top"]
    # the outermost module whose watched parameters are all unused
    assert cb._selector_paths(["x.y.w", "x.y.b", "x.z.w"]) == ["x"]
    assert cb._selector_paths(["x.y.w", "x.y.b"]) == ["x.y"]


def test_runtime_detection_is_quiet_for_a_healthy_model():
    cb = FreezeDeadParameters(detect_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[cb]).fit(InitLM(tm.tiny_llama), loader())
    assert cb.unused == []
    assert not [w for w in record if "FreezeDeadParameters" in str(w.message)]


def test_state_key_does_not_depend_on_the_configuration():
    """A resume with a changed configuration must find the checkpoint's frozen set under the same key."""
    a, b = ParameterFreezing(freeze_modules=[{"path": "a"}]), ParameterFreezing(freeze_modules=[{"path": "b"}], strict=False)
    assert a.state_key == b.state_key == "ParameterFreezing"
    assert FreezeDeadParameters(detect_steps=1).state_key == FreezeDeadParameters(detect_steps=5).state_key


def test_bad_resume_policy_is_a_misconfiguration():
    with pytest.raises(MisconfigurationException, match="on_resume_mismatch must be 'restore' or 'error'"):
        ParameterFreezing(on_resume_mismatch="ignore")


def test_summary_table():
    module = InitLM(tm.tiny_llava)
    summary = ParameterSummary(name="VLM")
    trainer(callbacks=[ParameterFreezing(), summary], max_steps=1).fit(module, loader())
    text = summary.text
    total = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert f"of {total:,}" in text and f"Trainable parameters: {trainable:,}" in text
    assert "model.vision_tower" in text and "freeze_vision_tower" in text
    assert "optimizer state" in text


def test_runtime_detection_names_the_vision_tower_of_a_text_only_llava():
    cb = FreezeDeadParameters(detect_steps=2)
    with pytest.warns(UserWarning, match=r"(?s)received no gradient.*- \{path: model\.vision_tower\}") as record:
        trainer(callbacks=[cb], max_steps=2).fit(InitLM(tm.tiny_llava), loader())
    llava = tm.tiny_llava()
    vision = {n for n, _ in llava.named_parameters() if n.startswith("model.vision_tower.")}
    projector = {n for n, _ in llava.named_parameters() if n.startswith("model.multi_modal_projector.")}
    assert set(cb.unused) == vision | projector  # text-only batches: exactly the tower and its projector
    text = next(str(w.message) for w in record if "FreezeDeadParameters" in str(w.message))
    assert set(re.findall(r"- \{path: (\S+)\}", text)) == {"model.vision_tower", "model.multi_modal_projector"}


def test_a_failed_fit_leaves_nothing_behind():
    """A fit that fails on a selector typo, then a new Trainer with the corrected selector on the same module."""
    import gc
    import weakref

    module = ShardedLM(tm.tiny_llama, build_in_configure=False)
    from lightning_automodel.callbacks import CastMixedDtypeToBF16, TiedLMHead

    suite = lambda: [FreezeDeadParameters(), CastMixedDtypeToBF16(), TiedLMHead()]  # noqa: E731
    failed = trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mpl"}]), ParameterSummary(), *suite()])
    with pytest.raises(MisconfigurationException, match=r"model\.layers\.0\.mpl"):
        failed.fit(module, loader())
    first_trainer = weakref.ref(failed)
    del failed
    summary = ParameterSummary()
    fixed = trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]), summary, *suite()])
    fixed.fit(module, loader())
    assert {n for n, p in module.model.named_parameters() if not p.requires_grad} == {
        f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert "freeze_modules[path: model.layers.0.mlp]" in summary.text
    gc.collect()
    assert first_trainer() is None, "the module's wrappers keep the failed Trainer alive"


def test_a_second_trainer_behaves_like_the_first():
    module = ShardedLM(tm.tiny_llama, build_in_configure=False)
    texts = []
    for _ in range(2):
        freezing, summary = ParameterFreezing(freeze_modules=[{"path": "model.embed_tokens"}]), ParameterSummary()
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            t = trainer(callbacks=[freezing, summary], max_steps=1)
            t.fit(module, loader())
        texts.append(summary.text.split("Param L2 norm")[0])  # the weights moved; the table must not
        assert freezing.frozen == {"model.embed_tokens.weight": "freeze_modules[path: model.embed_tokens]"}
    assert texts[0] == texts[1]
    # A third Trainer without surgery callbacks runs none: the previous callbacks are not remembered.
    module.model.model.embed_tokens.weight.requires_grad_(True)
    trainer(max_steps=1).fit(module, loader())
    assert module.model.model.embed_tokens.weight.requires_grad


def test_summary_prints_the_restored_norm_and_the_real_optimizer_bytes(tmp_path):
    """One device: the norm of the checkpoint's weights (not the init) and AdamW state bytes as allocated."""
    from lightning_automodel.callbacks import CastMixedDtypeToBF16
    from lightning_automodel.core.hf_weight_files import format_bytes_human

    t = trainer(callbacks=[CastMixedDtypeToBF16()], max_steps=2)
    t.fit(InitLM(tm.tiny_llama), loader())
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    weights = torch.load(ckpt, weights_only=False)["state_dict"]
    restored_norm = sum(float(v.double().pow(2).sum()) for k, v in weights.items() if k.startswith("model.")) ** 0.5

    summary = ParameterSummary()
    resumed = InitLM(tm.tiny_llama)
    t2 = trainer(callbacks=[CastMixedDtypeToBF16(), summary], max_steps=3)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert f"Param L2 norm (global): {restored_norm:.4f}" in summary.text
    state_bytes = sum(v.nbytes for s in t2.optimizers[0].state.values() for k, v in s.items() if k != "step")
    assert f"optimizer state {format_bytes_human(state_bytes)}," in summary.text  # bf16 state, not fp32
