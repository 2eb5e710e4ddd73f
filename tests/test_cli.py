"""The command line: every example config parses, the embedded default runs end to end, plan and export."""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from distributed import REPO_ROOT, clean_env, run_torchrun
from lightning_automodel.cli import main
from lightning_automodel.export import ExportError, export_checkpoint
from lightning_automodel.planning import format_plan, make_plan

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
CLI = [sys.executable, "-m", "lightning_automodel.cli"]


def run_cli(*args, cwd, timeout=300, check=True):
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] and printed["trainer"]


@pytest.mark.parametrize("command", ["fit", "plan"])
def test_config_typo_is_one_line_with_a_suggestion(tmp_path, capsys, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config: {model_type: llama}\n  learning_rat: 0.1\n")
    capsys.readouterr()
    assert main([command, "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-automodel") and "learning_rat" in err[0], captured.err
    assert "did you mean" in err[0] and "learning_rate" in err[0]
    assert "usage" not in captured.err and "Traceback" not in captured.err


def test_help_lists_every_subcommand_and_typos_are_caught(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "validate", "test", "plan", "export"):
        assert re.search(rf"^  {command} ", text, re.M), command
    assert "predict" not in text
    assert main(["fti"]) == 2
    assert "did you mean 'fit'" in capsys.readouterr().err


def test_test_subcommand_runs_on_the_held_out_documents(tmp_path):
    out = run_cli("test", "--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), "--trainer.limit_test_batches=2",
                  f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path, timeout=300)
    assert re.search(r"test_loss\W+\d+\.\d+", out.stdout), out.stdout[-2000:]


@pytest.mark.parametrize("kind", ["missing", "empty_dir"])
def test_ckpt_path_is_checked_before_the_model_is_built(tmp_path, capsys, monkeypatch, kind):
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    def never(self):
        raise AssertionError("the model was built before --ckpt_path was checked")

    monkeypatch.setattr(HFCausalLM, "configure_model", never)
    path = tmp_path / "last.ckpt"
    if kind == "empty_dir":
        path.mkdir()
    assert main(["fit", "--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), "--ckpt_path", str(path),
                 f"--trainer.default_root_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "does not exist" if kind == "missing" else "without DCP metadata"
    assert err[-1].startswith("lightning-automodel: error: --ckpt_path") and expected in err[-1]


def test_progress_bar_is_tqdm_unless_configured():
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lightning_automodel.cli import AutoModelCLI, ResumingProgressBar
    from lightning_automodel.data import SFTDataModule
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    def bars(*args):
        cli = AutoModelCLI(HFCausalLM, SFTDataModule, args=["--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), *args],
                           run=False, auto_configure_optimizers=False, save_config_callback=None)
        return [type(c) for c in cli.trainer.callbacks if isinstance(c, (RichProgressBar, TQDMProgressBar))]

    assert bars() == [ResumingProgressBar] and issubclass(ResumingProgressBar, TQDMProgressBar)  # Lightning would pick the rich bar, which prints "Epoch 1/-2" under max_steps
    assert bars("--trainer.callbacks+=RichProgressBar") == [RichProgressBar]


def test_embedded_default_end_to_end(tmp_path):
    out = run_cli(
        "fit", "--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"),
        "--trainer.max_steps=30", "--trainer.val_check_interval=15",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true",
        cwd=tmp_path,
    )
    text = out.stdout + out.stderr
    assert "tiny-llama summary:" in text and "Trainable parameters:" in text
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("Checkpoint saved at") and "export" in last
    path = re.search(r"Checkpoint saved at (\S+)", last).group(1)
    assert Path(path).is_file()
    metrics = sorted((tmp_path / "lightning_logs").glob("version_*/metrics.csv"))
    lines = metrics[-1].read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("train_loss")
    losses = [float(l.split(",")[col]) for l in lines[1:] if l.split(",")[col]]
    assert losses[-1] < losses[0]


LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)


def llama_count_by_hand(h, layers, heads, kv_heads, inter, vocab):
    head_dim = h // heads
    attn = h * h + 2 * h * (kv_heads * head_dim) + h * h
    mlp = 3 * h * inter
    norms = 2 * h
    return vocab * h + layers * (attn + mlp + norms) + h + vocab * h


def test_plan_70b_against_hand_counts():
    config = {
        "model": {"config": LLAMA_70B},
        "trainer": {
            "devices": 8,
            "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
            "callbacks": [
                {"class_path": "lightning_automodel.callbacks.ParameterFreezing",
                 "init_args": {"freeze_modules": [{"path": "model.embed_tokens"}, {"glob": "model.layers.[0-9].*"}]}},
            ],
        },
    }
    plan = make_plan(config)
    total = llama_count_by_hand(8192, 80, 64, 8, 28672, 128256)
    assert plan.counts.total == total == 70_553_706_496
    per_layer = llama_count_by_hand(8192, 1, 64, 8, 28672, 0) - 8192
    frozen = 128256 * 8192 + 10 * per_layer
    assert plan.counts.trainable == total - frozen
    # fp32 params sharded on dim 0 over 8 ranks; every dim 0 here divides by 8.
    assert plan.memory.param_bytes == total * 4 // 8
    assert plan.memory.grad_bytes == (total - frozen) * 4 // 8
    assert plan.memory.optimizer_bytes == (total - frozen) * 8 // 8
    text = format_plan(plan)
    assert "freeze_modules[path: model.embed_tokens]" in text and "world size 8" in text


def test_plan_command_70b_memory_bound(tmp_path):
    cfg = tmp_path / "70b.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"config": LLAMA_70B}, "trainer": {"devices": 8}}))
    code = (
        "import resource, sys; from lightning_automodel.cli import main; rc = main(['plan', '--config', sys.argv[1]]);"
        "print('MAXRSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    rss = int(re.search(r"MAXRSS_MB (\d+)", proc.stdout).group(1))
    assert rss < 1024, rss  # a memory bound, not a timing: everything stays on meta
    assert "70,553,706,496" in proc.stdout


def tied_checkpoint(tmp_path, tie=True):
    from callbacks.lit_models import trainer
    from lightning_automodel import HFCausalLM, SFTDataModule

    config = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    module = HFCausalLM(config=config, learning_rate=1e-2)
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(module, datamodule=SFTDataModule(seq_length=16, batch_size=2))
    path = tmp_path / f"tie{tie}.ckpt"
    t.save_checkpoint(path)
    return module, path


@pytest.mark.parametrize("tie", [True, False])
def test_export_single_file_and_reload_logits(tmp_path, tie):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    module, path = tied_checkpoint(tmp_path, tie)
    out = export_checkpoint(path, tmp_path / "hf", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 40 KB
    keys = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert ("lm_head.weight" in keys) is (not tie)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, module.model(input_ids=ids, use_cache=False).logits, atol=1e-5)


def test_export_refuses_and_leaves_nothing(tmp_path):
    _, path = tied_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(path, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="not a readable Lightning checkpoint"):
        export_checkpoint(corrupt, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


@pytest.mark.multiprocess
def test_two_rank_fsdp2_fit_resume_export(tmp_path):
    run_torchrun("job_fsdp2.py", str(tmp_path), nproc=2, timeout=400)
    from transformers import AutoModelForCausalLM

    state = torch.load(tmp_path / "reference_state.pt")
    assert (tmp_path / "final.ckpt" / ".metadata").is_file()  # a sharded DCP checkpoint
    export_checkpoint(tmp_path / "final.ckpt", tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_kill_and_resume(tmp_path):
    config = REPO_ROOT / "configs/tiny-llama-cpu.yaml"
    args = [
        "fit", "--config", str(config), "--trainer.max_steps=400", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=10",
    ]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if last.exists() and torch.load(last, weights_only=False)["global_step"] >= 20:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(last, weights_only=False)
    step = saved["global_step"]
    frozen = next(v["frozen"] for k, v in saved["callbacks"].items() if k.startswith("ParameterFreezing"))
    assert 20 <= step < 400
    out = run_cli(*[a for a in args if not a.startswith("--trainer.max_steps")], f"--trainer.max_steps={step + 10}",
                  "--ckpt_path", str(last), cwd=tmp_path)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == step + 10
    assert next(v["frozen"] for k, v in resumed["callbacks"].items() if k.startswith("ParameterFreezing")) == frozen
    assert "Checkpoint saved at" in out.stdout


def test_every_callback_configurable_from_yaml(tmp_path, capsys):
    cfg = tmp_path / "all.yaml"
    cfg.write_text(
        """
model: {config: {model_type: llama, vocab_size: 260, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}}
trainer:
  callbacks:
    - class_path: lightning_automodel.callbacks.ParameterFreezing
      init_args: {freeze_modules: [{glob: "model.vision_tower.*"}], unfreeze_modules: [{path: lm_head}], strict: false}
    - class_path: lightning_automodel.callbacks.ParameterFreezing
      init_args: {freeze_language_model: true}
    - class_path: lightning_automodel.callbacks.FreezeDeadParameters
      init_args: {detect_steps: 5}
    - class_path: lightning_automodel.callbacks.CastMixedDtypeToBF16
      init_args: {cast_buffers: true}
    - class_path: lightning_automodel.callbacks.TiedLMHead
      init_args: {strict: true}
    - class_path: lightning_automodel.callbacks.THDSqueeze
      init_args: {seqlens_padding_value: -1}
    - class_path: lightning_automodel.callbacks.ParameterSummary
      init_args: {name: Draft}
"""
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = printed["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == [
        "ParameterFreezing", "ParameterFreezing", "FreezeDeadParameters", "CastMixedDtypeToBF16", "TiedLMHead", "THDSqueeze", "ParameterSummary",
    ]
    assert callbacks[0]["init_args"]["unfreeze_modules"] == [{"path": "lm_head"}]
    assert callbacks[3]["init_args"]["cast_buffers"] is True
    # The state key does not depend on the configuration (a resume with a changed config finds the saved
    # frozen set), so one ParameterFreezing per Trainer: Lightning refuses two with the same key.
    from lightning_automodel.callbacks import ParameterFreezing

    a = ParameterFreezing(**callbacks[0]["init_args"])
    b = ParameterFreezing(**callbacks[1]["init_args"])
    assert a.state_key == b.state_key == "ParameterFreezing"


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["fsdp2-cpu.yaml", "vlm-freeze-vision.yaml", "lora-fsdp2-cpu.yaml"])
def test_two_process_fsdp2_configs_run(config, tmp_path):
    # The config's own launcher starts the second process (Lightning re-runs the command).
    args = [
        "fit", "--config", str(REPO_ROOT / "configs" / config), "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
    ]
    out = run_cli(*args, cwd=tmp_path, timeout=400)
    text = out.stdout + out.stderr
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in text
    assert "Trainable parameters:" in text
    if config.startswith("vlm"):
        assert "freeze_vision_tower" in text
    if config.startswith("lora"):
        assert "LoRA: 16 adapted modules" in text and (tmp_path / "outputs/lora-fsdp2-cpu/hf/final/config.json").is_file()


@pytest.mark.multiprocess
def test_sharded_save_is_atomic(tmp_path):
    proc = run_torchrun("job_atomic_save.py", str(tmp_path), nproc=2, timeout=300)
    assert "OK atomic" in proc.stderr


@pytest.mark.multiprocess
def test_fsdp2_kill_and_resume(tmp_path):
    """SIGKILL both ranks mid-epoch; the sharded last.ckpt is complete and the run resumes from its step."""
    config = REPO_ROOT / "configs/fsdp2-cpu.yaml"
    args = [
        "fit", "--config", str(config), "--trainer.max_steps=400", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=5",
    ]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    meta = tmp_path / "ckpt" / "last.ckpt" / "meta.pt"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if meta.exists():
            try:
                step = torch.load(meta, weights_only=False)["global_step"]
            except Exception:  # noqa: BLE001 - caught between the swap's renames: try again
                step = 0
            if step >= 10:
                break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last = tmp_path / "ckpt" / "last.ckpt"
    step = torch.load(last / "meta.pt", weights_only=False)["global_step"]
    assert step >= 10 and (last / ".metadata").is_file()
    run_cli(*[a for a in args if not a.startswith("--trainer.max_steps")], f"--trainer.max_steps={step + 5}",
            "--ckpt_path", str(last), cwd=tmp_path, timeout=400)
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == step + 5


def tiny_fit(tmp_path, *extra):
    return ["fit", "--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}", *extra]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.warmup_steps=-3"], "warmup_steps must be >= 0"),
        (["--data.val_fraction=1"], r"val_fraction must be in \(0, 1\)"),
        (["--data.train_files=[BAD]"], r"bad\.txt' is not valid UTF-8: byte offset 6"),
        (["--data.train_files=[SMALL]", "--data.batch_size=4"], r"\(1 documents, \d+ tokens\) gives 1 windows .* batch_size=4"),
        (["--data.train_files=[MISSING]"], "does not exist"),
    ],
    ids=["warmup", "val_fraction", "utf8", "batch_size", "missing_file"],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, expected):
    (tmp_path / "bad.txt").write_bytes(b"hello\n\xffworld\n")
    (tmp_path / "small.txt").write_text("a short document\n")
    files = {"BAD": tmp_path / "bad.txt", "SMALL": tmp_path / "small.txt", "MISSING": tmp_path / "missing.txt"}
    extra = [e.replace(k, str(v)) for e in extra for k, v in [next(((k, v) for k, v in files.items() if k in e), ("", ""))]]
    capsys.readouterr()
    assert main(tiny_fit(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("lightning-automodel: error: ")]
    assert len(lines) == 1 and re.search(expected, lines[0]), err[-3000:]
    assert "Traceback" not in err
    # --debug: the traceback instead (the exception propagates)
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        main(tiny_fit(tmp_path, *extra, "--debug"))


def test_bad_input_from_the_command_line_exits_2(tmp_path):
    proc = run_cli(*tiny_fit(tmp_path, "--model.warmup_steps=-1"), cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "lightning-automodel: error: warmup_steps must be >= 0 (0: constant learning rate); got -1."
    )
    assert "Traceback" not in proc.stderr
    # an option the parser does not know: one line too, no usage dump
    proc = run_cli(*tiny_fit(tmp_path, "--model.no_such_option=1"), cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "no_such_option" in proc.stderr.strip().splitlines()[-1]
    assert "usage" not in proc.stderr


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    from lightning_automodel.models.hf_causal_lm import HFCausalLM

    def broken(self, *args, **kwargs):
        raise ValueError("a bug inside the training step")

    monkeypatch.setattr(HFCausalLM, "training_step", broken)
    with pytest.raises(ValueError, match="a bug inside the training step"):
        main(tiny_fit(tmp_path))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_a_command_line_model_source_replaces_the_yaml_one(config, tmp_path, monkeypatch):
    """``--model.pretrained_path`` replaces an inline ``model.config`` (and the reverse), as overrides do."""
    import yaml
    from lightning.pytorch import LightningDataModule

    from lightning_automodel.cli import AutoModelCLI
    from lightning_automodel.models import HFCausalLM

    model = yaml.safe_load(config.read_text()).get("model") or {}
    if "config" in model:
        override, expected = ["--model.pretrained_path", str(tmp_path)], ("pretrained_path", str(tmp_path))
    else:
        override, expected = ["--model.config", '{"model_type": "llama"}'], ("config", {"model_type": "llama"})
    monkeypatch.setattr(AutoModelCLI, "instantiate_classes", lambda self: None)  # the parsed configuration is what is checked
    cli = AutoModelCLI(HFCausalLM, LightningDataModule, subclass_mode_data=True, args=["--config", str(config), *override],
                       run=False, auto_configure_optimizers=False, save_config_callback=None)
    parsed = cli.config.model
    assert parsed[expected[0]] == expected[1]
    assert [k for k in ("pretrained_path", "config") if parsed[k] is not None] == [expected[0]]


def test_the_printed_resume_command_trains_further_when_pasted(tmp_path):
    import shlex

    common = ["--config", str(REPO_ROOT / "configs/tiny-llama-cpu.yaml"), "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
              f"--trainer.callbacks.dirpath={tmp_path}/ckpt", "--trainer.callbacks.save_last=true"]
    first = run_cli("fit", *common, cwd=tmp_path).stdout.strip().splitlines()[-1]
    hint = re.search(r"\| train further: (.+?) \| export", first).group(1)
    argv = shlex.split(hint)
    assert argv[0] == "lightning-automodel"
    run_cli(*argv[1:], cwd=tmp_path)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6
