"""The SFT data path through the command line: configs per format, the checkpoint's tokenizer, threads per rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO_ROOT, clean_env
from lightning_automodel.cli import main

SFT = REPO_ROOT / "lightning_automodel" / "data" / "corpus" / "sft"
SFT_CONFIGS = sorted((REPO_ROOT / "configs").glob("sft-*.yaml"))


@pytest.mark.parametrize("config", SFT_CONFIGS, ids=[c.stem for c in SFT_CONFIGS])
def test_sft_config_runs(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the configs name the shipped corpus relative to the repository
    code = main(["fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                 "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path}",
                 f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0
    fmt = config.stem.removeprefix("sft-").removesuffix("-cpu").replace("-", "_").replace("chat", "messages")
    assert f"format {fmt}" in out and "padding waste" in out and "Tokenizer:" in out


def _pretrained_dir(tmp_path: Path, vocab_size: int) -> Path:
    """A tiny llama saved with the shipped tiny tokenizer (70 ids), as a fine-tuning checkpoint would be."""
    from tiny_models import build, tiny_config
    from transformers import AutoTokenizer

    out = tmp_path / f"llama-{vocab_size}"
    build(tiny_config("llama", vocab_size=vocab_size, max_position_embeddings=256)).save_pretrained(out)
    AutoTokenizer.from_pretrained(SFT / "tiny-tokenizer", local_files_only=True).save_pretrained(out)
    return out


def _fit_pretrained(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["fit", f"--model.pretrained_path={model_dir}", "--data.seq_length=64", "--data.batch_size=2",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}", *extra]


def test_the_checkpoints_tokenizer_is_the_default(tmp_path, capsys):
    # 128 embedding rows: the checkpoint's 70-id tokenizer fits, the byte tokenizer (259 ids) would not.
    model_dir = _pretrained_dir(tmp_path, 128)
    assert main(_fit_pretrained(tmp_path, model_dir)) == 0
    out = capsys.readouterr().out
    assert f"Tokenizer: {model_dir} (model.pretrained_path)" in out
    assert "Tokenizer vocabulary: 70 ids" in out
    # The SFT module too: no data.tokenizer_path needed.
    sft = ["--data=lightning_automodel.data.SFTDataModule", f"--data.train_files={SFT / 'sft_chat.jsonl'}",
           f"--data.cache_dir={tmp_path / 'cache'}"]
    assert main(_fit_pretrained(tmp_path, model_dir, *sft)) == 0
    assert f"Tokenizer: {model_dir} (TokenizersBackend, vocabulary 70)" in capsys.readouterr().out


def test_a_tokenizer_larger_than_the_embedding_is_one_line(tmp_path, capsys):
    model_dir = _pretrained_dir(tmp_path, 64)
    sft = ["--data=lightning_automodel.data.SFTDataModule", f"--data.train_files={SFT / 'sft_chat.jsonl'}",
           f"--data.cache_dir={tmp_path / 'cache'}"]
    capsys.readouterr()
    assert main(_fit_pretrained(tmp_path, model_dir, *sft)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-automodel: error:")]
    assert len(err) == 1 and "has 70 ids but the model's embedding has 64 rows" in err[0], err


def test_ranks_on_one_host_share_the_cores(tmp_path):
    """2 CPU ranks on this host get cpus // 2 torch threads each unless OMP_NUM_THREADS says otherwise."""
    script = (
        "import torch, os\n"
        "from lightning_automodel.cli import AutoModelCLI\n"
        "from lightning_automodel.models.hf_causal_lm import HFCausalLM\n"
        "from lightning.pytorch import LightningDataModule\n"
        "from lightning_automodel.core.threads import host_cpus\n"
        "before = torch.get_num_threads()\n"
        "AutoModelCLI(HFCausalLM, LightningDataModule, subclass_mode_data=True, run=False, auto_configure_optimizers=False,\n"
        "    args=['--model.config={model_type: llama}', '--trainer.accelerator=cpu', '--trainer.devices=2',\n"
        "          '--trainer.strategy=ddp', '--trainer.logger=false'])\n"
        "print(before, torch.get_num_threads(), max(1, host_cpus() // 2), os.environ.get('OMP_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    _, threads, expected, exported = out.stdout.split()[-4:]
    assert threads == expected and exported == expected
    env["OMP_NUM_THREADS"] = "3"  # the user's setting wins
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    before, threads, _, exported = out.stdout.split()[-4:]
    assert threads == before and exported == "3", out.stderr[-3000:]
