"""Nothing of ours outlives a Trainer run on the user's objects (issue 17, item 6).

After a fit, successful or failed, the LightningModule pickles, deep-copies and saves with torch.save;
the strategy keeps no patch; and a copy fitted by another Trainer gets that Trainer's surgery.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import tiny_models as tm
from callbacks.lit_models import InitLM, ShardedLM, loader, trainer
from distributed import REPO_ROOT, SCRIPTS_DIR, clean_env
from lightning_automodel.callbacks import FreezeDeadParameters, ParameterFreezing, ParameterSummary, TiedLMHead

_PATCHABLE = ("setup", "configure_model", "on_load_checkpoint", "load_checkpoint")


def suite(path: str = "model.layers.0.mlp") -> list:
    return [ParameterFreezing(freeze_modules=[{"path": path}]), FreezeDeadParameters(), TiedLMHead(), ParameterSummary()]


def tied_llama():
    return tm.tiny_llama(tie_word_embeddings=True)


class FailingLM(ShardedLM):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")


def assert_nothing_left(module, strategy) -> None:
    assert [name for name in _PATCHABLE if name in vars(module)] == []
    assert [name for name in _PATCHABLE if name in vars(strategy)] == []
    if isinstance(strategy, ModelParallelStrategy):
        return  # torch cannot pickle FSDP2-sharded modules (a dynamic FSDP<cls> class); nothing of ours is left
    pickle.loads(pickle.dumps(module))
    torch.save(module, io.BytesIO())
    clone = copy.deepcopy(module)
    assert [name for name in _PATCHABLE if name in vars(clone)] == []


def _fsdp2_trainer(**kwargs):
    return trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), **kwargs)


@pytest.mark.parametrize("make_trainer", [trainer, _fsdp2_trainer], ids=["single", "fsdp2"])
def test_module_pickles_and_copies_after_a_fit(make_trainer):
    module = ShardedLM(tied_llama)
    t = make_trainer(max_steps=2, callbacks=suite())
    t.fit(module, loader())
    assert not module.model.model.layers[0].mlp.up_proj.weight.requires_grad  # the surgery did run
    assert_nothing_left(module, t.strategy)


@pytest.mark.parametrize("make_trainer", [trainer, _fsdp2_trainer], ids=["single", "fsdp2"])
def test_module_pickles_and_copies_after_a_failed_fit(make_trainer):
    module = FailingLM(tied_llama)
    t = make_trainer(max_steps=2, callbacks=suite())
    with pytest.raises(RuntimeError, match="boom in training_step"):
        t.fit(module, loader())
    assert_nothing_left(module, t.strategy)


def test_a_copy_fitted_with_other_callbacks_gets_their_surgery():
    module = InitLM(tm.tiny_llama)
    trainer(max_steps=1, callbacks=suite("model.layers.0.mlp")).fit(module, loader())
    clone = copy.deepcopy(module)
    trainer(max_steps=1, callbacks=suite("model.layers.1.mlp")).fit(clone, loader())
    assert not clone.model.model.layers[1].mlp.up_proj.weight.requires_grad, "the copy did not get the new freeze"
    # and the original was not touched by the second Trainer
    assert module.model.model.layers[1].mlp.up_proj.weight.requires_grad


@pytest.mark.multiprocess
def test_ddp_spawn_fit_after_a_first_fit():
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "cb_spawn_after_fit.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0 and "OK spawn_after_fit" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-6000:]


class Owner:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def hook(self, x: int) -> int:
        self.calls.append("hook")
        return x + 1


def _record_around(owner, call_previous, x):
    owner.calls.append("around")
    return call_previous(x) * 10


def test_method_patch_is_picklable_copies_with_its_owner_and_is_removed():
    from lightning_automodel.callbacks._lifecycle import patch_method, remove_patches

    owner = Owner()
    patch_method(owner, "hook", _record_around)
    patch_method(owner, "hook", _record_around)  # once
    assert owner.hook(1) == 20 and owner.calls == ["around", "hook"]
    clone = pickle.loads(pickle.dumps(owner))
    assert clone.hook(2) == 30 and clone.calls == ["around", "hook", "around", "hook"]
    copied = copy.deepcopy(owner)
    copied.hook(0)
    assert copied.calls[-2:] == ["around", "hook"] and len(owner.calls) == 2  # the copy's patch calls the copy
    foreign = owner.hook  # someone else wraps on top of ours: ours must stop acting anyway
    owner.hook = lambda x: foreign(x)
    remove_patches(owner)
    assert owner.hook(1) == 2 and owner.calls[-1] == "hook" and owner.calls.count("around") == 1
    del owner.hook
    remove_patches(clone)
    assert "hook" not in vars(clone) and clone.hook(1) == 2
