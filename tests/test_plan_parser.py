"""``plan`` parses with ``fit``'s own parser (issue 20 item 2, issue 21): what ``fit`` understands, ``plan`` understands.

Each test here uses a form of the command line or of the YAML that only ``fit``'s parser (LightningCLI,
jsonargparse) knew before, or a setting ``plan`` ignored: on the code before, plan failed on it, or
planned something else than ``fit`` would run.
"""

from __future__ import annotations

import yaml
from transformers import AutoConfig

from distributed import REPO_ROOT
from lightning_automodel.planning import format_plan, main, make_plan, parse_args

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
TINY_LLAMA_CPU = str(REPO_ROOT / "configs" / "tiny-llama-cpu.yaml")


def write_yaml(path, config) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def plan_of(argv):
    options, config = parse_args(argv)
    return make_plan(config, world_size=options.world_size, optimizer_state_dtype=options.optimizer_state_dtype)


def test_command_line_pretrained_path_replaces_the_yaml_inline_config(tmp_path):
    """fit's rule (issue 21 item 1): --model.pretrained_path on the command line replaces the YAML's model.config."""
    AutoConfig.for_model(**{**TINY, "num_hidden_layers": 3}).save_pretrained(tmp_path / "model")
    plan = plan_of(["--config", TINY_LLAMA_CPU, "--model.pretrained_path", str(tmp_path / "model")])
    assert len(plan.model.model.layers) == 3 and plan.model.config.hidden_size == 64  # the directory's, not the YAML's


def test_appending_a_callback_on_the_command_line(tmp_path):
    """``--trainer.callbacks+=`` appends to the YAML's list, as in fit (the old plan refused the form)."""
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [
        {"class_path": "lightning_automodel.callbacks.ParameterFreezing", "init_args": {"freeze_modules": [{"path": "model.layers"}]}}]}})
    plan = plan_of(["--config", cfg, "--trainer.callbacks+=ParameterFreezing",
                    "--trainer.callbacks.freeze_modules=[{path: model.embed_tokens}]"])
    assert plan.counts.trainable == 256 * 64 + 64  # layers and embedding frozen: the norm and the head train
    assert "freeze_modules[path: model.embed_tokens]" in format_plan(plan)


def test_subclass_mode_data_seq_length_is_checked(tmp_path, capsys):
    """``data: {class_path, init_args: {seq_length}}`` is the length fit trains with; the old plan read data.seq_length only."""
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "data": {
        "class_path": "lightning_automodel.data.SFTDataModule", "init_args": {"train_files": "x.jsonl", "seq_length": 4096}}})
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seq_length=4096 is above the model's max_position_embeddings=512" in err, err
    assert main(["--config", cfg, "--data.init_args.seq_length", "256"]) == 0


def test_print_config_shows_the_merged_config(tmp_path, capsys):
    a = write_yaml(tmp_path / "a.yaml", {"model": {"config": TINY}, "trainer": {"devices": 2}})
    b = write_yaml(tmp_path / "b.yaml", {"trainer": {"devices": 8}})
    assert main(["--config", a, "--config", b, "--model.mixed_precision=bf16", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["devices"] == 8 and printed["model"]["mixed_precision"] == "bf16"
    assert printed["model"]["config"]["hidden_size"] == 64 and printed["data"]["class_path"].endswith("SFTDataModule")


def test_bad_value_is_refused_with_fits_own_line(tmp_path, capsys):
    """The same parser, so the same one line for the same mistake (prefix aside)."""
    from lightning_automodel.cli import main as cli_main

    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY, "weights_dtype": "float16"}})
    assert cli_main(["fit", "--config", cfg]) == 2
    fit_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["--config", cfg]) == 2
    plan_line = capsys.readouterr().err.strip()
    assert "weights_dtype" in plan_line and len(plan_line.splitlines()) == 1
    assert plan_line.split("error: ", 1)[1] == fit_line.split("error: ", 1)[1]


def test_parameter_summary_settings_shape_the_table(tmp_path):
    """plan names modules at the depth the config's ParameterSummary uses, under its name (issue 21: plan ignored both)."""
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"config": TINY}, "trainer": {"callbacks": [
        {"class_path": "lightning_automodel.callbacks.ParameterSummary", "init_args": {"name": "tiny", "depth": 3}}]}})
    text = format_plan(plan_of(["--config", cfg]))
    rows = [line.split("|")[0].strip() for line in text.splitlines() if "|" in line][1:]
    assert rows == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert text.splitlines()[0].startswith("tiny plan")
    shallow = format_plan(plan_of(["--config", cfg, "--trainer.callbacks.depth=1"]))
    assert [line.split("|")[0].strip() for line in shallow.splitlines() if "|" in line][1:] == ["model", "lm_head"]
