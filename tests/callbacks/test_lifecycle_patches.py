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
from lightning.pytorch.callbacks import Callback
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


def test_a_copy_taken_during_the_fit_pickles_and_its_patches_call_the_copy():
    seen = {}

    class Copier(Callback):
        def on_train_start(self, trainer, pl_module):
            before = pl_module.configure_calls
            clone, copied = pickle.loads(pickle.dumps(pl_module)), copy.deepcopy(pl_module)
            clone.configure_model()
            copied.configure_model()
            seen.update(original=pl_module.configure_calls - before, clone=clone.configure_calls, copied=copied.configure_calls)

    trainer(max_steps=1, callbacks=[*suite(), Copier()]).fit(ShardedLM(tied_llama), loader())
    assert seen == {"original": 0, "clone": 2, "copied": 2}


def test_a_patch_someone_else_wrapped_stops_acting_after_the_fit():
    class Wrapper(Callback):
        def setup(self, trainer, pl_module, stage):
            inner = pl_module.configure_model
            pl_module.configure_model = lambda: inner()  # wraps our patch of this run, and outlives it

    module = ShardedLM(tm.tiny_llama)
    trainer(max_steps=1, callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}]), Wrapper()]).fit(module, loader())
    module.trainer = trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.1.mlp"}])])
    module.configure_model()  # reaches the finished run's patch through the wrapper: it must only call through
    assert module.configure_calls == 2
    assert module.model.model.layers[1].mlp.up_proj.weight.requires_grad
