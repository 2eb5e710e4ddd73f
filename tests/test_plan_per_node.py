"""``plan`` prints the pinned host memory per node with cpu_offload and, when a node cannot hold it, the settings
that make it fit (issue 18 item 6). On the code before, plan printed per-rank numbers only and had no
``--node_host_memory``."""

from __future__ import annotations

import re

import yaml

from lightning_automodel.planning import main

LLAMA = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1000)


def _plan(tmp_path, capsys, *args, weights_dtype="float32"):
    config = {
        "model": {"config": LLAMA, "cpu_offload": True, "weights_dtype": weights_dtype},
        "trainer": {"devices": 8, "num_nodes": 1, "strategy": {
            "class_path": "lightning_automodel.strategies.AtomicModelParallelStrategy",
            "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1}}},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), *args]) == 0
    out = capsys.readouterr().out
    return out, next(line for line in out.splitlines() if line.startswith("Per node"))


def _gib(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"KiB": 2**-20, "MiB": 2**-10, "GiB": 1, "TiB": 2**10}[unit]


def test_per_node_pinned_host_is_ranks_times_the_per_rank_host(tmp_path, capsys):
    out, line = _plan(tmp_path, capsys)
    per_rank = _gib(re.search(r"host ([0-9.]+ \w+) \(this config", out).group(1))
    per_node = _gib(re.search(r"host ([0-9.]+ \w+) pinned", line).group(1))
    assert "8 ranks on each of 1 node" in line and line.endswith("fits.")
    assert abs(per_node - 8 * per_rank) <= 0.01 * per_node + 0.1 / 1024


def test_a_node_too_small_says_which_settings_fit(tmp_path, capsys):
    out, line = _plan(tmp_path, capsys, "--node_host_memory", "20MB")
    assert "does NOT fit" in line
    fixes = out.splitlines()[out.splitlines().index(line) + 1]
    nodes = int(re.search(r"--trainer.num_nodes (\d+)", fixes).group(1))
    per_node = _gib(re.search(r"host ([0-9.]+ \w+) pinned", line).group(1)) * 2**30
    assert nodes == -(-int(per_node) // 20_000_000) or nodes == -(-int(per_node) // 20_000_000) + 1  # rounding of the printed figure
    assert "--model.weights_dtype bfloat16" in fixes and "LoRA" in fixes
    _, bf16_line = _plan(tmp_path, capsys, "--node_host_memory", "20MB", weights_dtype="bfloat16")
    bf16 = _gib(re.search(r"host ([0-9.]+ \w+) pinned", bf16_line).group(1))
    assert abs(bf16 - per_node / 2**31) <= 0.02 * bf16  # the bf16 estimate is what bf16 plans


def test_node_memory_must_be_a_size(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"model": {"config": LLAMA}}))
    assert main(["--config", str(path), "--node_host_memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--node_host_memory" in err and "1TB" in err and len(err.strip().splitlines()) == 1, err
