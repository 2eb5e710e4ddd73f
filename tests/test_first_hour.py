"""Issue 21, the first hour: hints that work when pasted, output that is quiet and true, one file policy."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import tiny_models as tm
from callbacks.lit_models import InitLM, loader


def quiet_trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, max_steps=1)
    return pl.Trainer(**{**defaults, **kwargs})


def run_printed_hint(text: str) -> dict:
    """Execute the indented snippet lines of a printed hint, as a user pasting them would."""
    snippet = "\n".join(line[4:] for line in text.splitlines() if line.startswith("    "))
    assert snippet, text
    scope: dict = {}
    exec(compile(snippet, "<hint>", "exec"), scope)  # noqa: S102 - the hint is our own output
    return scope


@pytest.mark.parametrize("builder, cls", [(tm.tiny_llama, "LlamaForCausalLM"), (tm.tiny_llava, "LlavaForConditionalGeneration")])
def test_the_export_hint_loads_the_export_when_pasted(builder, cls, tmp_path, capsys):
    from lightning_automodel.callbacks import HuggingFaceCheckpoint
    from lightning_automodel.export import main

    module = InitLM(builder)
    t = quiet_trainer(callbacks=[HuggingFaceCheckpoint()], default_root_dir=tmp_path)
    t.fit(module, loader(n=4))
    t.save_checkpoint(tmp_path / "m.ckpt")
    capsys.readouterr()
    assert main(["--ckpt_path", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "export")]) == 0
    model = run_printed_hint(capsys.readouterr().out)["model"]
    assert type(model).__name__ == cls


def test_the_adapter_only_hint_loads_the_adapters_on_their_base_when_pasted(tmp_path, capsys):
    pytest.importorskip("peft")
    from lightning_automodel import HFCausalLM
    from lightning_automodel.callbacks import LoRA
    from lightning_automodel.export import main

    tm.tiny_llama().save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2)
    t = quiet_trainer(max_steps=2, callbacks=[LoRA(r=4)])
    t.fit(module, loader(n=8))
    t.save_checkpoint(tmp_path / "lora.ckpt")
    capsys.readouterr()
    assert main(["--ckpt_path", str(tmp_path / "lora.ckpt"), "--out", str(tmp_path / "adapter"), "--adapter_only"]) == 0
    model = run_printed_hint(capsys.readouterr().out)["model"]
    assert type(model).__name__ == "PeftModelForCausalLM" or type(model).__name__ == "PeftModel"
    b = next(iter(loader(n=4)))
    model.eval()
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=b["input_ids"]).logits, module.model(input_ids=b["input_ids"]).logits, atol=1e-5)


def test_export_of_a_sharded_checkpoint_gives_no_torch_distributed_warning(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from lightning_automodel.callbacks import HuggingFaceCheckpoint
    from lightning_automodel.export import export_checkpoint

    t = quiet_trainer(callbacks=[HuggingFaceCheckpoint()], default_root_dir=tmp_path)
    t.fit(InitLM(tm.tiny_llama), loader(n=4))
    t.save_checkpoint(tmp_path / "m.ckpt")
    full = torch.load(tmp_path / "m.ckpt", weights_only=False)
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": full.pop("state_dict")}, checkpoint_id=str(sharded), no_dist=True)
    full.pop("optimizer_states", None)
    torch.save(full, sharded / "meta.pt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        export_checkpoint(sharded, tmp_path / "export")
    assert (tmp_path / "export" / "config.json").is_file()
    assert not [w for w in record if "torch.distributed" in str(w.message)], [str(w.message) for w in record]


TINY_YAML = """\
model:
  config: {model_type: llama, vocab_size: 260, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
           num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}
data: {seq_length: 32, batch_size: 4, packing: false}
trainer: {accelerator: cpu, devices: 1, max_steps: 4, limit_val_batches: 0, logger: false, default_root_dir: ROOT}
"""


def tiny_yaml(tmp_path, extra: str = "") -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.replace("ROOT", str(tmp_path / "run")) + extra)
    return str(path)


def test_the_progress_bar_has_its_epoch_and_total_on_a_mid_epoch_resume(tmp_path, capsys):
    from lightning_automodel.cli import main

    config = tiny_yaml(tmp_path)
    assert main(["fit", "--config", config]) == 0
    ckpt = next((tmp_path / "run").rglob("*step=4.ckpt"))
    capsys.readouterr()
    assert main(["fit", "--config", config, "--ckpt_path", str(ckpt), "--trainer.max_steps", "8"]) == 0
    bars = [line for line in capsys.readouterr().out.replace("\r", "\n").splitlines() if "it/s" in line]
    import re

    assert not [line for line in bars if re.search(r"[1-9]\d*/\?", line)], bars  # no "Training: 5/?" without a total
    assert bars[-1].startswith("Epoch 0") and "8/8 " in bars[-1], bars[-1]  # batches 5..8 of 8, counted from the epoch's start


@pytest.mark.multiprocess
def test_surgery_and_data_lines_appear_once_per_job_under_basic_config(tmp_path):
    """basicConfig on 2 DDP ranks: one freeze line and one tokenizer line for the job, from rank 0."""
    from distributed import run_torchrun

    proc = run_torchrun("first_hour_logs.py", str(tmp_path), nproc=2, timeout=300)
    assert "OK first_hour_logs rank0" in proc.stderr and "OK first_hour_logs rank1" in proc.stderr
    lines = proc.stderr.splitlines()
    froze = [line for line in lines if "froze" in line.lower() and "parameter tensors" in line]
    assert froze == ["rank0: ParameterFreezing: froze 3 parameter tensors."], froze
    tokenizer = [line for line in lines if "Tokenizer:" in line]
    assert len(tokenizer) == 1 and tokenizer[0].startswith("rank0: "), tokenizer


def test_print_trainable_parameters_shows_without_logging_configuration(tmp_path):
    """A user who configured no logging still sees the summary (and it is written once)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, 'tests'); import tiny_models as tm; "
            "from lightning_automodel.model_utils import print_trainable_parameters; print_trainable_parameters(tm.tiny_llama())")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120,
                          env={"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Trainable parameters:") == 1, proc.stderr


@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "fsdp2-one-rank"])
def test_the_freeze_count_is_the_one_after_a_resume_restores_the_checkpoints_set(sharded, tmp_path, caplog):
    """Single device restores before on_fit_start, FSDP2 after it (in load_checkpoint): both say the restored count."""
    import logging
    import warnings

    from lightning.pytorch.strategies import ModelParallelStrategy

    from callbacks.lit_models import ShardedLM
    from lightning_automodel.callbacks import ParameterFreezing

    def strategy():
        return dict(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)) if sharded else {}

    lm = ShardedLM if sharded else InitLM
    first = quiet_trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}])], **strategy())
    first.fit(lm(tm.tiny_llama), loader(n=8))
    first.save_checkpoint(tmp_path / "a.ckpt")
    # the resumed run's configuration freezes the whole layer (9 tensors); the resume restores the checkpoint's 3
    second = quiet_trainer(max_steps=2, callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0"}])], **strategy())
    module = lm(tm.tiny_llama)
    caplog.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second.fit(module, loader(n=8), ckpt_path=tmp_path / "a.ckpt")
    assert sum(not p.requires_grad for p in module.parameters()) == 3
    counts = [r.getMessage() for r in caplog.records if "ParameterFreezing: froze" in r.getMessage()]
    assert counts == ["ParameterFreezing: froze 3 parameter tensors (after restoring the checkpoint)."], counts


def test_qlora_trains_in_train_mode_without_the_eval_mode_warning(tmp_path):
    pytest.importorskip("bitsandbytes")
    import warnings

    from lightning_automodel import HFCausalLM
    from lightning_automodel.callbacks import LoRA

    tm.tiny_llama().save_pretrained(tmp_path / "base")
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), quantization=quantization)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[LoRA(r=4)]).fit(module, loader(n=8))
    assert not [w for w in record if "eval mode" in str(w.message)], [str(w.message) for w in record]
    assert all(m.training for m in module.modules())


def test_lora_on_a_moe_model_gives_no_spurious_peft_pattern_warning():
    """peft warns that its own fused gate_up_proj rank pattern was ignored; it was applied (rank 2r)."""
    pytest.importorskip("peft")
    import warnings

    from lightning_automodel.callbacks import LoRA

    model = tm.build(tm.tiny_config("mixtral", num_local_experts=3, num_experts_per_tok=2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        LoRA(r=4).inject(model)
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in record]
    fused = dict(model.named_parameters())["model.layers.0.mlp.experts.base_layer.lora_A.default.weight"]
    assert fused.shape[0] == 2 * 4 * 3  # gate and up fused: rank 2r per expert, 3 experts


def test_max_steps_0_still_prints_the_summary(caplog):
    import logging

    from lightning_automodel.callbacks import ParameterSummary

    summary = ParameterSummary(name="zero-steps")
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=0, callbacks=[summary]).fit(InitLM(tm.tiny_llama), loader(n=4))
    assert summary.text is not None and "zero-steps" in summary.text
    assert [r for r in caplog.records if "zero-steps" in r.getMessage()]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_single_file_checkpoints_follow_the_umask_as_sharded_ones_do(umask, tmp_path):
    import os
    import stat

    import torch.distributed.checkpoint as dcp

    from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO

    old = os.umask(umask)
    try:
        t = quiet_trainer(plugins=[AtomicTorchCheckpointIO()])
        t.fit(InitLM(tm.tiny_llama), loader(n=4))
        t.save_checkpoint(tmp_path / "one.ckpt")
        dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "sharded"), no_dist=True)
    finally:
        os.umask(old)
    sharded_mode = stat.S_IMODE((tmp_path / "sharded" / ".metadata").stat().st_mode)
    assert sharded_mode == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "one.ckpt").stat().st_mode) == sharded_mode


@pytest.mark.parametrize("limits", [{"max_steps": 4}, {"max_steps": -1, "max_epochs": 1}])
def test_a_periodic_hf_save_on_the_last_step_is_written_once_as_final(limits, tmp_path):
    from lightning_automodel.callbacks import HuggingFaceCheckpoint

    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), every_n_train_steps=2)
    quiet_trainer(callbacks=[callback], **limits).fit(InitLM(tm.tiny_llama), loader(n=16))  # 4 batches of 4
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["final", "step-0000002"]


def walkthrough_commands() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- first-hour: begin -->", 1)[1].split("<!-- first-hour: end -->", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]


def test_the_readme_first_hour_runs_as_written(tmp_path):
    """Every command of the README's walk-through, verbatim, from a directory holding the shipped configs."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "configs").symlink_to(repo / "configs")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    commands = walkthrough_commands()
    assert [c.split()[0] for c in commands] == ["lightning-automodel"] * 3 + ["python"]
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        argv = [sys.executable, "-m", "lightning_automodel.cli", *argv[1:]] if argv[0] == "lightning-automodel" else [sys.executable, *argv[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(proc)
    first, resumed, export, load = outputs
    assert "--trainer.max_steps 20" in first.stdout  # the second command is the one the first run printed
    assert "froze 3 parameter tensors (after restoring the checkpoint)" in resumed.stderr
    assert "20/20" in resumed.stdout.replace("\r", "\n").splitlines()[-1] or "20/20 " in resumed.stdout
    assert "AutoModelForCausalLM.from_pretrained('outputs/tiny-llama-cpu/exported')" in export.stdout
    assert int(load.stdout.strip().splitlines()[-1]) > 0
