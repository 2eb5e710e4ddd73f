"""``plan`` and ``fit`` build the same model (issue 17, item 7).

For every shipped config, the model ``plan`` reports (per-parameter dtype, trainable set, counts) is
compared with the model ``fit`` trains, and so are the parsed configuration (one parser) and the module
table of the config's ``ParameterSummary`` (its depth): recorded at ``on_train_start`` (after ``configure_model`` and
every surgery, before the first step) of a 1-step, 1-device fit. Multi-device configs run on one
device with the same strategy; ``multi-gpu-8b.yaml`` runs on a tiny saved llama on CPU. LoRA with
``weights_dtype: bfloat16`` is added because no shipped config has it and plan got it wrong (adapters).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import Callback, LightningDataModule

import tiny_models as tm
from distributed import REPO_ROOT
from lightning_automodel.cli import AutoModelCLI
from lightning_automodel.core.naming import unique_named_parameters
from lightning_automodel.models.hf_causal_lm import HFCausalLM
from lightning_automodel.callbacks import ParameterSummary
from lightning_automodel.core.parameters import module_breakdown
from lightning_automodel.planning import Plan, make_plan, parse_args

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

CONFIGS = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))
ONE_STEP = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
ONE_DEVICE = ["--trainer.devices=1"]
ONE_RANK_FSDP2 = [*ONE_DEVICE, "--trainer.strategy.init_args.data_parallel_size=1"]


def signature(model) -> dict[str, tuple[str, bool, int]]:
    """Canonical parameter name -> (dtype, trainable, elements), each tensor once."""
    return {name: (str(p.dtype), p.requires_grad, p.numel()) for name, p in unique_named_parameters(model)}


def summary_rows(model, summary) -> list[tuple[str, int, int]]:
    """The table rows of the config's ParameterSummary (its depth; 2 without one): module, total, trainable."""
    rows = module_breakdown(model, depth=summary.depth if summary is not None else 2)
    return [(r.name, r.total, r.trainable) for r in rows]


class RecordModel(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.signature = signature(pl_module.model)
        summary = next((cb for cb in trainer.callbacks if isinstance(cb, ParameterSummary)), None)
        self.summary = (summary.name, summary.depth) if summary is not None else None
        self.rows = summary_rows(pl_module.model, summary)


def overrides_for(config: str, tmp_path: Path) -> list[str]:
    text = (REPO_ROOT / "configs" / config).read_text()
    extra = []
    if "devices: 1" not in text:
        extra += ONE_RANK_FSDP2 if "data_parallel_size" in text else ONE_DEVICE
    import yaml

    data_args = ((yaml.safe_load(text).get("data") or {}).get("init_args") or {})
    for key, value in data_args.items():  # repository-relative data files: the test runs in tmp_path
        if isinstance(value, str) and value.startswith("lightning_automodel/"):
            extra.append(f"--data.init_args.{key}={REPO_ROOT / value}")
    if config == "multi-gpu-8b.yaml":  # shrunk: a tiny llama from save_pretrained, CPU, the embedded corpus
        model_dir = tmp_path / "tiny-llama"
        tm.build(tm.tiny_config("llama", vocab_size=128)).save_pretrained(model_dir)
        sft = REPO_ROOT / "lightning_automodel" / "data" / "corpus" / "sft"
        extra += [
            f"--model.pretrained_path={model_dir}", "--trainer.accelerator=cpu",
            f"--data.init_args.train_files={sft / 'sft_text.jsonl'}", "--data.init_args.format=text",
            f"--data.init_args.tokenizer_path={sft / 'tiny-tokenizer'}", "--data.init_args.seq_length=64",
            "--data.init_args.num_workers=0", "--data.init_args.num_proc=1",
        ]
    return extra


def fit_record(config: str, overrides: list[str]) -> tuple[RecordModel, dict]:
    cli = AutoModelCLI(
        HFCausalLM, LightningDataModule, subclass_mode_data=True, args=["--config", str(REPO_ROOT / "configs" / config), *ONE_STEP, *overrides],
        run=False, auto_configure_optimizers=False, save_config_callback=None,
    )
    recorder = RecordModel()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder, cli.config.as_dict()


def plan_of(config: str, overrides: list[str]) -> tuple[Plan, dict]:
    _, merged = parse_args(["--config", str(REPO_ROOT / "configs" / config), *ONE_STEP, *overrides])
    return make_plan(merged), merged


CASES = [(c, []) for c in CONFIGS] + [
    ("lora-tiny-cpu.yaml", ["--model.weights_dtype=bfloat16"]),
    ("lora-fsdp2-cpu.yaml", ["--model.weights_dtype=bfloat16"]),
]


@pytest.mark.parametrize(("config", "extra"), CASES, ids=[c + ("+bf16" if e else "") for c, e in CASES])
def test_plan_equals_the_model_fit_trains(config, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' checkpoints go to ./outputs
    overrides = [*overrides_for(config, tmp_path), *extra]
    plan, plan_config = plan_of(config, overrides)
    fit, fit_config = fit_record(config, overrides)
    for section in ("model", "data", "trainer"):  # one parser: the same configuration, defaults included
        assert plan_config[section] == fit_config[section], section
    planned, fitted = signature(plan.model), fit.signature
    assert sorted(planned) == sorted(fitted)
    differ = {n: (planned[n], fitted[n]) for n in planned if planned[n] != fitted[n]}
    assert differ == {}, f"plan vs fit (dtype, trainable, elements) differ for {len(differ)} tensors: {dict(list(differ.items())[:5])}"
    assert sum(t[2] for t in planned.values() if t[1]) == sum(t[2] for t in fitted.values() if t[1])
    # plan's table is the config's ParameterSummary's: its name, its depth, the same module rows and counts
    assert ((plan.summary.name, plan.summary.depth) if plan.summary else None) == fit.summary
    assert summary_rows(plan.model, plan.summary) == fit.rows


def test_one_schedule_orders_the_surgery():
    """LoRA, weights dtype, freeze, dead parameters, mixed cast, tie: whatever the order of the callbacks list."""
    from lightning_automodel.callbacks import CastMixedDtypeToBF16, FreezeDeadParameters, LoRA, ParameterFreezing, TiedLMHead
    from lightning_automodel.callbacks._lifecycle import WeightsDtypeCast, surgery_schedule

    callbacks = [TiedLMHead(), CastMixedDtypeToBF16(), FreezeDeadParameters(), ParameterFreezing(), LoRA()]
    steps = surgery_schedule(callbacks, weights_cast=lambda model: None)
    assert [type(s) for s in steps] == [LoRA, WeightsDtypeCast, ParameterFreezing, FreezeDeadParameters, CastMixedDtypeToBF16, TiedLMHead]
