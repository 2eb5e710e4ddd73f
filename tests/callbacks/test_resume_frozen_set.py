"""Resume with a changed freeze configuration on one device: the checkpoint's frozen set, or a clear error.

The 2-rank FSDP2 counterparts are in tests/scripts/cb_fsdp2_suite.py (modes freeze_more / freeze_less).
"""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import tiny_models as tm
from callbacks.lit_models import InitLM, loader, trainer
from lightning_automodel.callbacks import ParameterFreezing

SAVED = {"glob": "model.layers.0.*"}  # what the checkpoint froze
# freeze more: layer 1's MLP too (the checkpoint trained it); freeze less: nothing of layer 0 (the checkpoint froze it)
CONFIGS = {"freeze_more": [SAVED, {"path": "model.layers.1.mlp"}], "freeze_less": [{"path": "model.layers.0.mlp.up_proj"}]}


def frozen(module):
    return {n for n, p in module.model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    module = InitLM(tm.tiny_llama)
    t = trainer(callbacks=[ParameterFreezing(freeze_modules=[SAVED])], max_steps=2)
    t.fit(module, loader())
    path = tmp_path_factory.mktemp("ckpt") / "a.ckpt"
    t.save_checkpoint(path)
    return path, frozen(module)


@pytest.mark.parametrize("direction", sorted(CONFIGS))
def test_restore_reapplies_the_checkpoint_set_and_names_the_parameters(checkpoint, direction):
    path, saved = checkpoint
    cb = ParameterFreezing(freeze_modules=CONFIGS[direction])
    module = InitLM(tm.tiny_llama)
    t = trainer(callbacks=[cb], max_steps=4)
    expected = "trained 3 that this run would freeze" if direction == "freeze_more" else "froze 8 that this run would train"
    with pytest.warns(UserWarning, match=f"differs from the checkpoint.*{expected}.*Re-applying") as record:
        t.fit(module, loader(), ckpt_path=path)
    text = next(str(w.message) for w in record if "differs from the checkpoint" in str(w.message))
    named = "model.layers.1.mlp.down_proj.weight" if direction == "freeze_more" else "model.layers.0.self_attn.q_proj.weight"
    assert named in text
    assert frozen(module) == saved
    # The optimizer got exactly the checkpoint's trainable set and its state (the step counter continues).
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    assert t.global_step == 4
    assert all(float(s["step"]) == 4 for s in t.optimizers[0].state.values())


@pytest.mark.parametrize("direction", sorted(CONFIGS))
def test_error_policy_stops_before_the_optimizer_naming_the_parameters(checkpoint, direction):
    path, _ = checkpoint
    cb = ParameterFreezing(freeze_modules=CONFIGS[direction], on_resume_mismatch="error")
    module = InitLM(tm.tiny_llama)
    named = "model.layers.1.mlp.down_proj.weight" if direction == "freeze_more" else "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(MisconfigurationException, match=f"different frozen set: .*{named.replace('.', '[.]')}.*fits only its own set"):
        trainer(callbacks=[cb], max_steps=4).fit(module, loader(), ckpt_path=path)
    assert module.model.model.layers[0].mlp.up_proj.weight.grad is None  # never trained


def test_same_configuration_resumes_silently(checkpoint):
    import warnings

    path, saved = checkpoint
    module = InitLM(tm.tiny_llama)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[ParameterFreezing(freeze_modules=[SAVED], on_resume_mismatch="error")], max_steps=3).fit(
            module, loader(), ckpt_path=path
        )
    assert not [w for w in record if "ParameterFreezing" in str(w.message)]
    assert frozen(module) == saved


def test_without_the_check_the_optimizer_load_fails(checkpoint):
    """The guard is needed: the same resume without a ParameterFreezing state fails in torch."""
    path, _ = checkpoint
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"].pop("ParameterFreezing")
    bare = path.with_name("bare.ckpt")
    torch.save(ckpt, bare)
    with pytest.raises(ValueError, match="parameter group that doesn't match the size"):
        trainer(callbacks=[ParameterFreezing(freeze_modules=CONFIGS["freeze_less"])], max_steps=4).fit(
            InitLM(tm.tiny_llama), loader(), ckpt_path=bare
        )
