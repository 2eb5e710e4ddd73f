"""``lightning-automodel plan``: config-only directories, fit's overrides, the callback allow-list, FSDP2 memory."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig

from distributed import REPO_ROOT, clean_env
from lightning_automodel.core.fsdp_layout import fsdp2_groups
from lightning_automodel.core import model_build as building
from lightning_automodel.planning import PlanError, format_plan, main, make_plan, parse_args

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False)
FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
SCRIPT = Path(sys.executable).with_name("lightning-automodel")


def config_only_dir(path: Path, **values) -> Path:
    """A model directory the way ``config.save_pretrained`` writes it: config.json, no weights, no tokenizer."""
    AutoConfig.for_model(values.pop("model_type", "llama"), **values).save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    return path


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_plan(*args, cwd):
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lightning_automodel.cli"]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([*cmd, "plan", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def plan_from_argv(argv):
    args, config = parse_args(argv)
    return make_plan(config, world_size=args.world_size, optimizer_state_dtype=args.optimizer_state_dtype)


# ---- a directory with only config.json ------------------------------------------------------------


def test_config_only_directory_plans_like_the_inline_config(tmp_path):
    directory = config_only_dir(tmp_path / "tiny", **TINY)
    base = {"trainer": {"devices": 2, "strategy": FSDP2}}
    from_dir = plan_from_argv(["--config", write_yaml(tmp_path / "a.yaml", base), "--model.pretrained_path", str(directory)])
    inline = plan_from_argv(["--config", write_yaml(tmp_path / "b.yaml", {**base, "model": {"config": TINY}})])
    assert from_dir.counts == inline.counts
    assert from_dir.counts.total == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 256 * 64 + 64
    assert from_dir.fsdp2 == inline.fsdp2 and from_dir.fsdp2_offload == inline.fsdp2_offload
    assert all(p.is_meta and p.dtype == torch.float32 for p in from_dir.model.parameters())


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing", "does not exist"),
        ("meta-llama/Llama-3.1-8B", "It looks like a hub name: lightning-automodel runs offline"),
        ("empty", "has no config.json"),
    ],
)
def test_bad_model_directory_is_one_line(tmp_path, capsys, path, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"pretrained_path": path}})
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ---- fit's overrides -------------------------------------------------------------------------------


def test_overrides_change_the_plan(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"devices": 2, "strategy": FSDP2}})
    two = plan_from_argv(["--config", cfg])
    four = plan_from_argv(["--config", cfg, "--trainer.devices", "4"])
    four_eq = plan_from_argv(["--config", cfg, "--trainer.devices=4"])
    explicit = plan_from_argv(["--config", cfg, "--world_size", "4"])
    assert (two.fsdp2.world_size, four.fsdp2.world_size) == (2, 4)
    assert four.fsdp2 == four_eq.fsdp2 == explicit.fsdp2
    assert four.fsdp2.param_bytes < two.fsdp2.param_bytes
    listed = plan_from_argv(["--config", cfg, "--trainer.devices", "[0, 1, 2]"])  # a YAML list: 3 devices
    assert listed.fsdp2.world_size == 3
    bf16 = plan_from_argv(["--config", cfg, "--model.mixed_precision", "bf16"])
    assert bf16.fsdp2.gather_bytes * 2 == two.fsdp2.gather_bytes  # bf16 copies of fp32 weights
    assert bf16.fsdp2.param_bytes == two.fsdp2.param_bytes
    assert "fp32 weights, bf16 compute, fp32 gradient reduction" in format_plan(bf16)
    half = plan_from_argv(["--config", cfg, "--model.weights_dtype", "bfloat16"])
    assert half.fsdp2.param_bytes * 2 == two.fsdp2.param_bytes
    assert half.fsdp2.optimizer_bytes * 2 == two.fsdp2.optimizer_bytes  # AdamW state follows the weights
    frozen = plan_from_argv(["--config", cfg, "--trainer.callbacks",
                             "[{class_path: lightning_automodel.callbacks.ParameterFreezing, init_args: {freeze_modules: [{path: model.layers}]}}]"])
    assert frozen.counts.trainable == 2 * 256 * 64 + 64


def test_configs_merge_in_order_like_lightning_cli(tmp_path):
    a = write_yaml(tmp_path / "a.yaml", {"model": {"config": TINY, "mixed_precision": "bf16"}, "trainer": {"devices": 2, "strategy": FSDP2}})
    b = write_yaml(tmp_path / "b.yaml", {"trainer": {"devices": 8}})
    assert plan_from_argv(["--config", a, "--config", b]).fsdp2.world_size == 8
    assert plan_from_argv(["--config", a, "--config", b, "--trainer.devices", "4"]).fsdp2.world_size == 4
    assert plan_from_argv(["--config", a, "--trainer.devices", "4", "-c", b]).fsdp2.world_size == 8  # the later file wins
    _, merged = parse_args(["--config", a, "--config", b])
    assert merged["model"]["mixed_precision"] == "bf16" and merged["trainer"]["strategy"]["class_path"] == FSDP2["class_path"]
    # A different class_path drops the old init_args; lists are replaced, not appended (fit's parser merges).
    freeze = {"class_path": "lightning_automodel.callbacks.ParameterFreezing", "init_args": {"freeze_modules": [{"path": "model.norm"}]}}
    c = write_yaml(tmp_path / "c.yaml", {"trainer": {"strategy": {**FSDP2, "init_args": {"data_parallel_size": 2}},
                                                      "callbacks": [freeze, {"class_path": "lightning_automodel.callbacks.TiedLMHead"}]}})
    d = write_yaml(tmp_path / "d.yaml", {"trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"},
                                                      "callbacks": [{"class_path": "lightning_automodel.callbacks.TiedLMHead"}]}})
    _, merged = parse_args(["--config", a, "--config", c, "--config", d])
    assert merged["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert "data_parallel_size" not in merged["trainer"]["strategy"]["init_args"]
    assert [cb["class_path"] for cb in merged["trainer"]["callbacks"]] == ["lightning_automodel.callbacks.TiedLMHead"]


def test_strategy_overrides_go_into_init_args(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {
        "devices": 8, "strategy": {**FSDP2, "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1}}}})
    assert plan_from_argv(["--config", cfg]).fsdp2.world_size == 8
    with pytest.raises(PlanError, match="data_parallel_size=8 x tensor_parallel_size=1 = 8, but devices x num_nodes = 4"):
        plan_from_argv(["--config", cfg, "--trainer.devices", "4"])
    plan = plan_from_argv(["--config", cfg, "--trainer.devices", "4", "--trainer.strategy.data_parallel_size", "4"])
    assert plan.fsdp2.world_size == 4
    with pytest.raises(PlanError, match="tensor parallelism"):
        plan_from_argv(["--config", cfg, "--trainer.strategy.init_args.tensor_parallel_size", "2",
                        "--trainer.strategy.init_args.data_parallel_size", "4"])


def test_seq_length_override_is_checked(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}})
    plan_from_argv(["--config", cfg, "--data.seq_length", "512"])
    with pytest.raises(PlanError, match="seq_length=4096 is above the model's max_position_embeddings=512"):
        plan_from_argv(["--config", cfg, "--data.seq_length", "4096"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # fit's parser's wording (plan parses with it): argparse accepts unique prefixes, so the typos are not prefixes
        (["--model.learning_rte", "0.1"], "--model.learning_rte 0.1 (did you mean 'model.learning_rate'?)"),
        (["--model.pretrained_pth=/x"], "--model.pretrained_pth=/x (did you mean 'model.pretrained_path'?)"),
        (["--data.seq_lenght", "8"], "Option 'seq_lenght' is not accepted"),
        (["--trainer.device", "8"], "--trainer.device could match --trainer.devices"),
        (["--world-size", "8"], "--world-size 8 (did you mean 'world_size'?)"),
        (["--world_size", "0"], "--world_size: must be >= 1"),
        (["--world_size", "-2"], "--world_size: must be >= 1"),
        (["--model.mixed_precision"], "--model.mixed_precision: expected one argument"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, expected):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}})
    assert main(["--config", cfg, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_world_size_zero_is_rejected_by_make_plan():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        make_plan({"model": {"config": TINY}}, world_size=0)


def test_unknown_key_from_the_command_is_one_line_without_traceback(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}})
    proc = run_plan("--config", cfg, "--model.learning_rte", "0.1", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["lightning-automodel plan: error: " + lines[0].split("error: ", 1)[1]]
    assert "did you mean 'model.learning_rate'" in lines[0]


# ---- only the package's callbacks are instantiated -----------------------------------------------------


def test_class_path_from_the_yaml_is_never_run(tmp_path, capsys, caplog, monkeypatch):
    """fit's parser refuses, before any import, a class path outside the allow-list; plan instantiates only ours."""
    marker = tmp_path / "SOMEFILE"
    imported = tmp_path / "IMPORTED"
    (tmp_path / "sideeffect_mod.py").write_text(f"open({str(imported)!r}, 'w').close()\nclass Cb:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for bad in ({"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}, {"class_path": "sideeffect_mod.Cb"},
                {"class_path": "no_such_package.Thing"}):
        cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [bad]}})
        assert main(["--config", cfg]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad["class_path"] in err and "nothing was imported" in err, err
    assert not marker.exists() and not imported.exists() and "sideeffect_mod" not in sys.modules
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt")}},
        {"class_path": "ParameterFreezing", "init_args": {"freeze_modules": [{"path": "model.layers.0"}]}},
        {"class_path": "lightning_automodel.callbacks.parameter_freezing.ParameterFreezing",
         "init_args": {"freeze_modules": [{"path": "model.layers.1"}]}},
    ]}})
    with caplog.at_level("WARNING", logger="lightning_automodel.planning"):
        assert main(["--config", cfg]) == 0
    assert not caplog.records  # Lightning's own: ignored quietly
    assert not (tmp_path / "ckpt").exists()
    plan = plan_from_argv(["--config", cfg])
    assert plan.counts.trainable == 2 * 256 * 64 + 64  # both allowed ParameterFreezing entries applied


def test_a_trusted_callback_is_checked_by_the_parser_but_never_built(tmp_path, caplog, monkeypatch):
    """LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS lets the parser import the user's module (fit would); plan still builds only ours."""
    built = tmp_path / "BUILT"
    (tmp_path / "trusted_cb_mod.py").write_text(
        "from lightning.pytorch.callbacks import Callback\n"
        f"class Cb(Callback):\n    def __init__(self):\n        open({str(built)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS", "trusted_cb_mod")
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [{"class_path": "trusted_cb_mod.Cb"}]}})
    with caplog.at_level("WARNING", logger="lightning_automodel.planning"):
        assert main(["--config", cfg]) == 0
    assert not built.exists()
    assert [r.getMessage() for r in caplog.records] == [
        "plan: skipped trainer.callbacks[0] trusted_cb_mod.Cb: plan instantiates only lightning_automodel.callbacks."]


def test_bad_callback_arguments_are_one_line(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [
        {"class_path": "lightning_automodel.callbacks.ParameterFreezing", "init_args": {"freez_modules": []}}]}})
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert "ParameterFreezing" in err and "freez_modules" in err and len(err.splitlines()) == 1, err


# ---- FSDP2 memory ------------------------------------------------------------------------------------


def test_planner_layout_is_the_jobs_layout():
    """fsdp2_groups partitions the parameters exactly as the job's fully_shard units do."""
    import tiny_models as tm

    for model in (tm.tiny_llama(), tm.tiny_gemma3(), tm.tiny_llava()):
        first = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
        units = [{first[id(p)] for m in unit.modules for p in m.parameters()} for unit in building.fsdp2_units(model)]
        groups = [set(names) for name, names in fsdp2_groups(model) if name != "root"]
        assert sorted(map(sorted, units)) == sorted(map(sorted, groups))


def test_plan_memory_against_hand_computation(tmp_path):
    """A 2-layer llama at world size 4, bf16 compute, embedding frozen: every byte computed here from shapes."""
    cfg = write_yaml(tmp_path / "c.yaml", {
        "model": {"config": TINY, "mixed_precision": "bf16"},
        "trainer": {"devices": 4, "strategy": FSDP2, "callbacks": [
            {"class_path": "lightning_automodel.callbacks.ParameterFreezing",
             "init_args": {"freeze_modules": [{"path": "model.embed_tokens"}]}}]},
    })
    plan = plan_from_argv(["--config", cfg])
    # Every dim 0 divides by 4, so no padding: sharded = n / 4, unsharded = n.
    layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64
    embed, norm_head = 256 * 64, 64 + 256 * 64
    total, trainable = 2 * layer + embed + norm_head, 2 * layer + norm_head
    est = plan.fsdp2
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (total * 4 // 4, trainable * 4 // 4, trainable * 8 // 4)
    assert est.gather_bytes == 2 * layer * 2 + norm_head * 2  # two layers in flight + the kept norm/head, in bf16
    assert est.reduce_bytes == layer * (2 + 4)  # bf16 grads + fp32 reduce-scatter buffer of the largest trainable group
    off = plan.fsdp2_offload
    assert off.device_bytes == est.gather_bytes + est.reduce_bytes
    assert off.host_bytes == est.param_bytes + est.grad_bytes + est.optimizer_bytes
    text = format_plan(plan)
    assert "Per rank at world size 4 (FSDP2, fp32 weights, bf16 compute, fp32 gradient reduction)" in text
    assert "with cpu_offload device" in text and "Module" in text


def llama_count_by_hand(h, layers, heads, kv_heads, inter, vocab):
    head_dim = h // heads
    return vocab * h + layers * (2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * inter + 2 * h) + h + vocab * h


def test_8b_config_only_directory_plans_from_the_command(tmp_path):
    directory = config_only_dir(tmp_path / "Llama-3.1-8B", model_type="llama", **LLAMA_8B)
    proc = run_plan("--config", str(REPO_ROOT / "configs/multi-gpu-8b.yaml"), "--model.pretrained_path", str(directory),
                    "--world_size", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = llama_count_by_hand(4096, 32, 32, 8, 14336, 128256)
    assert total == 8_030_261_248
    out = proc.stdout
    assert f"of {total:,}" in out and "Per rank at world size 8 (FSDP2, fp32 weights, bf16 compute" in out
    assert "  total " in out and "with cpu_offload device" in out
    # The sharded fp32 parameters: total * 4 bytes / 8 ranks (every dim 0 divides by 8).
    assert f"params {total * 4 / 8 / 1024**3:.1f} GiB" in out


# ---- bounded dry runs (issue 12 item 4) ------------------------------------------------------------


def test_plan_allocates_no_storage_parameters_and_buffers_on_meta(monkeypatch):
    # The old build created each parameter on the CPU first (a patched register_parameter): a
    # 256000 x 32768 embedding (33.5 GB) failed with "can't allocate memory". Any CPU parameter
    # allocation during the build is an error here.
    from lightning_automodel.planning import build_meta

    real_empty = torch.empty

    def guarded_empty(*size, **kwargs):
        device = kwargs.get("device") or torch.get_default_device()
        numel = 1
        for d in (size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size):
            numel *= int(d)
        if numel >= 256000 * 64 and torch.device(device).type != "meta":
            raise AssertionError(f"plan allocated {numel} elements on {device or 'the default device'}")
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    huge = {**TINY, "vocab_size": 256000, "hidden_size": 32768, "num_attention_heads": 256, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 64, "num_hidden_layers": 1}
    model = build_meta({"config": huge})
    assert model.model.embed_tokens.weight.shape == (256000, 32768)
    assert all(p.is_meta and p.dtype == torch.float32 for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_hub_dtype_does_not_decide_the_planned_dtype():
    plan = make_plan({"model": {"config": {**TINY, "dtype": "bfloat16"}}})
    assert {p.dtype for p in plan.model.parameters()} == {torch.float32}


def test_deep_model_builds_without_storage():
    from lightning_automodel.planning import build_meta

    deep = {**TINY, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 4, "num_hidden_layers": 1000}
    # No timing here (benchmarks time things): the guard is that nothing touches a real device, which
    # is what made the CPU-first build slow (each parameter allocated, then moved).
    allocated: list[str] = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if not t.is_meta and t.numel() >= 64:
            allocated.append(str(tuple(t.shape)))
        return t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", spy)
        model = build_meta({"config": deep})
    assert len(model.model.layers) == 1000
    assert not allocated, allocated[:5]
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())


def test_a_deep_plan_from_the_command_is_exact_and_says_it_is_building(tmp_path):
    """Every layer is constructed on meta, as in fit; a deep config gets a progress line and exact counts."""
    h, inter, heads, kv, vocab, layers = 8, 16, 2, 1, 32, 3000
    config = {"model": {"config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
                                   "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": h // heads,
                                   "num_hidden_layers": layers, "tie_word_embeddings": False}},
              "trainer": {"callbacks": [{"class_path": "ParameterFreezing",
                                         "init_args": {"freeze_modules": [{"path": f"model.layers.{layers - 1}.mlp"}]}}]}}
    proc = run_plan("--config", write_yaml(tmp_path / "deep.yaml", config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = llama_count_by_hand(h, layers, heads, kv, inter, vocab)
    frozen = 3 * h * inter
    assert f"Trainable parameters: {total - frozen:,} of {total:,}" in proc.stdout
    assert f"freeze_modules[path: model.layers.{layers - 1}.mlp]: 3 tensors" in proc.stdout
    assert f"building {layers} layers on the meta device" in proc.stderr


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append(f"model: {{config: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert main(["--config", str(bomb)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bomb.yaml" in err and "anchors/aliases" in err, err


def test_yaml_alias_bomb_on_the_command_line_is_refused():
    with pytest.raises(ValueError, match="anchors/aliases"):  # fit's check of command-line values
        parse_args(["--model.config", "{" + alias_bomb().replace("\n", ", ").rstrip(", ") + "}"])


def test_small_anchors_still_work(tmp_path):
    cfg = tmp_path / "anchors.yaml"
    config = {k: v for k, v in TINY.items() if k != "max_position_embeddings"}
    text = "data: {seq_length: &n 512}\ntrainer: {devices: 2, strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy}}\n"
    text += "model: {config: " + yaml.safe_dump(config, default_flow_style=True).strip()[:-1] + ", max_position_embeddings: *n}}\n"
    cfg.write_text(text)
    plan = plan_from_argv(["--config", str(cfg)])
    assert plan.fsdp2.world_size == 2 and plan.model.config.max_position_embeddings == 512


def test_plan_counts_lora_adapters_and_their_memory():
    """8B-shaped llama, LoRA r=16 on q/v: adapter count and per-rank state computed independently."""
    hidden, layers, inter, vocab, kv = 4096, 32, 14336, 128256, 8
    config = {
        "model": {"config": dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                 num_attention_heads=32, num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192)},
        "trainer": {"callbacks": [{"class_path": "lightning_automodel.callbacks.LoRA",
                                   "init_args": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}]},
    }
    plan = make_plan(config, world_size=8)
    head_dim = hidden // 32
    per_layer = 16 * (hidden + hidden) + 16 * (hidden + kv * head_dim)  # q: A (16 x 4096) + B (4096 x 16); v: B is (1024 x 16)
    adapters = layers * per_layer
    assert plan.counts.trainable == adapters
    assert plan.memory.grad_bytes == adapters * 4 // 8 and plan.memory.optimizer_bytes == adapters * 8 // 8
    text = format_plan(plan)
    assert f"LoRA adapter parameters: {adapters:,}" in text and "LoRA (base weights frozen)" in text


def test_plan_lora_bad_target_is_one_line(tmp_path, capsys):
    config = {"model": {"config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
                                   "intermediate_size": 128, "vocab_size": 100}},
              "trainer": {"callbacks": [{"class_path": "LoRA", "init_args": {"target_modules": ["q_prj"]}}]}}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'q_prj' matches no module" in err[0] and "q_proj" in err[0]


@pytest.mark.parametrize("double_quant", [False, True])
def test_plan_qlora_bytes_match_a_real_4bit_load(tmp_path, double_quant):
    """The planned parameter bytes of a 4-bit base against bitsandbytes' actual tensors after a real load."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import tiny_models as tm
    from lightning_automodel.core.parameters import count_parameters

    model = tm.build(tm.tiny_config("llama", hidden_size=128, intermediate_size=512, vocab_size=260))
    model.save_pretrained(tmp_path / "base")
    settings = {"load_in_4bit": True, "bnb_4bit_use_double_quant": double_quant}
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(**settings),
                                                dtype=torch.float32, device_map={"": "cpu"})
    actual = 0
    for p in real.parameters():
        actual += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            actual += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                actual += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
    plan = make_plan({"model": {"pretrained_path": str(tmp_path / "base"), "quantization": settings}, "trainer": {"devices": 1}})
    assert plan.counts.total == count_parameters(model).total  # logical counts, not packed storage
    assert abs(plan.memory.param_bytes - actual) <= 0.01 * actual, (plan.memory.param_bytes, actual)
    with pytest.raises(PlanError, match="cannot run under FSDP2"):
        make_plan({"model": {"pretrained_path": str(tmp_path / "base"), "quantization": settings}}, world_size=8)


def test_plan_checks_the_seq_length_default_of_the_data_named(tmp_path):
    """A user's train_files default to 2048-token rows, as fit's data module does: above a 512-position model."""
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}})
    with pytest.raises(PlanError, match="seq_length=2048 is above the model's max_position_embeddings=512"):
        plan_from_argv(["--config", cfg, "--data.train_files", str(tmp_path / "d.jsonl")])
    plan_from_argv(["--config", cfg])  # the demo corpus: 128
