"""Random init costs each rank its shard (issue 18 item 4).

On the code before, every rank built a full-size CPU twin of each module and drew all of its numbers
(the 2-rank script's largest CPU tensor was a whole embedding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distributed import run_torchrun
from lightning_automodel.core.init import init_weights_by_module


@pytest.mark.multiprocess
def test_each_rank_draws_its_rows_and_matches_one_process():
    proc = run_torchrun("core_init_shards.py", nproc=2, timeout=300)
    assert proc.stderr.count("BIGGEST rank") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("DRAWN rank") == 2, proc.stderr[-3000:]


class _Scaled(nn.Linear):
    """A linear whose init reads a plain attribute: same class and shape, different init."""

    def __init__(self, scale: float) -> None:
        super().__init__(64, 32, bias=False)
        self.scale = scale

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=getattr(self, "scale", 1.0))  # nn.Linear.__init__ calls it before scale is set


def test_an_init_is_recorded_once_per_module_kind(monkeypatch):
    """Recording (a meta twin traced op by op) runs once per distinct module kind, not once per module,
    and a plain attribute the init reads (``scale``) makes another kind."""
    import lightning_automodel.core.init as init_module

    calls = []
    record = init_module._record_init
    monkeypatch.setattr(init_module, "_record_init", lambda *a, **k: calls.append(1) or record(*a, **k))
    model = nn.Sequential(*[_Scaled(0.01) for _ in range(6)], *[_Scaled(1.0) for _ in range(6)])
    init_weights_by_module(model, seed=4)
    assert len(calls) == 2
    small, large = model[0].weight.std().item(), model[6].weight.std().item()
    assert 0.008 < small < 0.012 and 0.8 < large < 1.2, (small, large)
    assert not torch.equal(model[0].weight, model[1].weight)  # same recording, each module its own seed


class _Owner(nn.Module):
    """A stand-in for a ``PreTrainedModel``: ``init_weights_by_module`` calls the owner's ``_init_weights``."""

    def __init__(self, init) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 8, bias=False)
        self._init = init

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            self._init(module.weight)


@pytest.mark.parametrize(
    "init, check",
    [
        (lambda w: nn.init.trunc_normal_(w, std=0.5, a=-0.4, b=0.4), lambda w: w.abs().max() <= 0.4 and w.std() > 0.1),
        (lambda w: w.copy_(torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape)), lambda w: torch.equal(w.flatten(), torch.arange(128.0))),
        (lambda w: (nn.init.normal_(w, std=0.02), w[:, 0].fill_(1.0)), lambda w: torch.all(w[:, 0] == 1.0) and w[:, 1:].std() < 0.05),
    ],
    ids=["trunc_normal", "computed_copy", "column_write"],
)
def test_inits_that_are_not_rowwise_elementwise_still_apply(monkeypatch, init, check):
    """Inits the row-block replay cannot reproduce (meta-skipping, copied tensors, partial writes) get a full twin."""
    import transformers

    monkeypatch.setattr(transformers, "PreTrainedModel", _Owner)
    model = _Owner(init)
    with torch.no_grad():
        model.layer.weight.fill_(float("nan"))
    init_weights_by_module(model, seed=1)
    assert check(model.layer.weight.detach()), model.layer.weight
