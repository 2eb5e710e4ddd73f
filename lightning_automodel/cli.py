"""``lightning-automodel``: fit / validate / test through LightningCLI, plus ``plan`` and ``export``."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO, CheckpointResumeError, check_resumable
from lightning_automodel.data.text_datamodule import DataError, TextDataModule
from lightning_automodel.core.threads import set_rank_threads
from lightning_automodel.models.hf_causal_lm import HFCausalLM

PROG = "lightning-automodel"
log = logging.getLogger(__name__)

_USAGE_EXTRA = {
    "plan": "lightning_automodel.planning",
    "export": "lightning_automodel.export",
}

SUBCOMMANDS = {
    "fit": "train (and validate) the model; --ckpt_path resumes",
    "validate": "run the validation split on a model or checkpoint",
    "test": "run the test split (documents held out from training and validation)",
    "plan": "parameters, frozen set and per-rank memory of a config, without weights or GPUs",
    "export": "turn a Lightning checkpoint into a Hugging Face directory",
}

HELP = f"""usage: {PROG} {{{",".join(SUBCOMMANDS)}}} [--config CONFIG.yaml] [options]

Fine-tune Hugging Face LLMs and VLMs with PyTorch Lightning on one CPU or FSDP2 across GPUs.

subcommands:
""" + "".join(f"  {name:<9} {text}\n" for name, text in SUBCOMMANDS.items()) + f"""
Details of one subcommand: {PROG} SUBCOMMAND --help. Add --debug to see tracebacks.
"""


class ConfigError(ValueError):
    """A key or value of the configuration is not accepted (one line, with a suggestion when one is close)."""


_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|Key \"?'?([\w.]+)'?\"? is not expected|unrecognized arguments: (\S+)")


@rank_zero_only
def _report_checkpoint(cli: LightningCLI, argv: list[str]) -> None:
    callback = cli.trainer.checkpoint_callback
    path = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
    if not path:
        return
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), None)
    config_arg = f" --config {config}" if config else ""
    out = Path(path).parent.parent / "exported"
    print(
        f"Checkpoint saved at {path} | resume: lightning-automodel fit{config_arg} --ckpt_path {path} "
        f"| export to Hugging Face: lightning-automodel export --ckpt_path {path} --out {out}",
        flush=True,
    )


class _RunStarted(Callback):
    """Marks the moment the fit / validate / test loops begin (input checks are all done by then)."""

    def __init__(self) -> None:
        self.started = False

    def _mark(self, *args: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = _mark


def _has_checkpoint_io(plugins: Any) -> bool:
    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(isinstance(p, CheckpointIO) for p in items if p is not None)


def _progress_bar_configured(config: dict[str, Any]) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    return any(isinstance(c, ProgressBar) for c in callbacks) or config.get("enable_progress_bar") is False


def check_ckpt_path(ckpt_path: Any) -> None:
    """Fail in one line, before anything is built, when ``--ckpt_path`` cannot be resumed from.

    A sharded checkpoint that a killed save left parked beside its name is put back first; a
    missing path, a directory without DCP metadata and a truncated file are errors naming the
    newest complete checkpoint in the same folder. ``last``/``best`` and remote paths pass through.
    """
    from lightning_automodel.checkpoint_io import newest_complete_checkpoint

    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    check_resumable(ckpt_path)  # recovers a parked sharded checkpoint; refuses a truncated file
    path = Path(ckpt_path)
    if path.is_file():
        return
    if path.is_dir():
        if (path / ".metadata").is_file():
            return
        problem = "is a directory without DCP metadata (.metadata): not a sharded checkpoint, or an incomplete copy"
    else:
        problem = "does not exist"
    newest = newest_complete_checkpoint(path.parent) if path.parent.is_dir() else None
    hint = f"; the newest complete checkpoint in {path.parent} is {newest}" if newest is not None else ""
    raise CheckpointResumeError(f"--ckpt_path {path} {problem}{hint}.")


def _suggestion(message: str, parsers: list[Any]) -> str:
    """``message`` on one line, with "did you mean" when an unknown key is close to a valid one."""
    line = " ".join(message.split())
    found = _UNKNOWN_OPTION.search(line)
    if not found:
        return line
    bad = next(g for g in found.groups() if g).lstrip("-")
    valid: set[str] = set()
    for parser in parsers:
        for action in getattr(parser, "_actions", []):
            valid.update(opt.lstrip("-") for opt in action.option_strings if opt.startswith("--"))
    close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.75)
    return f"{line} (did you mean {close[0]!r}?)" if close else line


class AutoModelCLI(LightningCLI):
    """LightningCLI that fails in one line on a config mistake, checks ``--ckpt_path`` before building
    anything, saves single files atomically and shows a sane progress bar.

    * A configuration the parser refuses raises :class:`ConfigError` (one line naming the key, with a
      "did you mean" when a valid key is close) instead of printing the usage.
    * ``--ckpt_path`` is checked right after parsing (:func:`check_ckpt_path`), before the model is built.
    * Unless the configuration sets a ``CheckpointIO`` (in ``trainer.plugins`` or on the strategy), the
      Trainer gets ``AtomicTorchCheckpointIO``: single-file ``.ckpt`` saves are written beside the target,
      fsynced and renamed. Sharded saves do not use a CheckpointIO (AtomicModelParallelStrategy handles them).
    * Lightning picks its rich progress bar when ``rich`` is installed, which prints ``Epoch 1/-2`` when
      ``max_steps`` bounds the run (``max_epochs`` becomes -1); unless a progress bar is configured, the
      TQDM bar is used (``Epoch 1: 40/75 [...]``).
    """

    def __init__(self, *args: Any, run_marker: _RunStarted | None = None, **kwargs: Any) -> None:
        self.run_marker = run_marker if run_marker is not None else _RunStarted()
        self._parsers: list[Any] = []
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict needs a predict_step the job does not have
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def init_parser(self, **kwargs: Any) -> Any:
        kwargs.setdefault("exit_on_error", False)
        parser = super().init_parser(**kwargs)
        self._parsers.append(parser)
        return parser

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            raise ConfigError(_suggestion(str(exc), self._parsers)) from None
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `data:` without a class_path configures the default TextDataModule (the embedded demo);
        # `data: {class_path: lightning_automodel.data.SFTDataModule, init_args: ...}` picks another module.
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": f"{TextDataModule.__module__}.{TextDataModule.__name__}"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        default_tokenizer_to_model(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        log_tokenizer_vocabulary(self.datamodule)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        strategy = config.get("strategy")
        strategy_io = isinstance(strategy, Strategy) and strategy_has_own_checkpoint_io(strategy)
        if not strategy_io and not _has_checkpoint_io(config.get("plugins")):
            plugins = config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            config["plugins"] = [*plugins, AtomicTorchCheckpointIO()]
        extra: list[Callback] = [self.run_marker]
        if not _progress_bar_configured(config):
            extra.append(TQDMProgressBar())
        trainer = super()._instantiate_trainer(config, [*callbacks, *extra])
        set_rank_threads(trainer.num_devices)
        return trainer


def default_tokenizer_to_model(config: Any) -> None:
    """``data.tokenizer_path`` defaults to ``model.pretrained_path``: a checkpoint trains on its own tokenizer."""
    data, model = config.get("data"), config.get("model")
    init_args = data.get("init_args") if data is not None else None
    pretrained = model.get("pretrained_path") if model is not None else None
    if init_args is None or "tokenizer_path" not in init_args:
        return
    if init_args.get("tokenizer_path") is None and pretrained:
        init_args["tokenizer_path"] = pretrained
    tokenizer = init_args.get("tokenizer_path")
    source = " (model.pretrained_path)" if tokenizer and tokenizer == pretrained else ""
    log.info("Tokenizer: %s", f"{tokenizer}{source}" if tokenizer else "the byte tokenizer (embedded demo)")


def log_tokenizer_vocabulary(datamodule: Any) -> None:
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        log.info("Tokenizer vocabulary: %d ids (%s).", len(tokenizer), type(tokenizer).__name__)


class _CurrentStdout(logging.StreamHandler):
    """Writes to the ``sys.stdout`` of the moment (captures and redirections replace it between runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _show_data_logs() -> None:
    """The job says which tokenizer, format and packing it trains with: INFO lines of the data modules and of
    the tokenizer choice go to stdout (the application configures logging; the library only logs)."""
    for name in ("lightning_automodel.data", __name__):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
            handler = _CurrentStdout()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def strategy_has_own_checkpoint_io(strategy: Strategy) -> bool:
    """Whether a strategy object was configured with a ``CheckpointIO``.

    Reading the public ``strategy.checkpoint_io`` is not an option: it creates Lightning's default on
    first access, and the Trainer then refuses a CheckpointIO given in ``plugins`` as set twice. So the
    attribute behind it is read here, and only here (tests: a strategy with its own CheckpointIO keeps
    it; a plain ModelParallelStrategy gets the atomic one).
    """
    return vars(strategy).get("_checkpoint_io") is not None


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Raised on bad input wherever they happen: one line, exit code 2 (imported late: plan and export
    are not loaded for fit)."""
    from lightning_automodel.core.checkpoint_files import OfflineCheckpointError
    from lightning_automodel.core.sharded_load import CheckpointLayoutError
    from lightning_automodel.export import ExportError
    from lightning_automodel.planning import PlanError

    return (CheckpointResumeError, ConfigError, DataError, ExportError, PlanError, CheckpointLayoutError, OfflineCheckpointError)


def _is_input_error(exc: BaseException, run_started: bool) -> bool:
    if isinstance(exc, _input_error_types()):
        return True
    # Plain ValueError / FileNotFoundError: bad input while parsing, building and setting up; a bug afterwards.
    return isinstance(exc, (ValueError, FileNotFoundError)) and not run_started


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(argv: list[str], from_command_line: bool, marker: _RunStarted) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0 if argv else 2
    if argv[0] in _USAGE_EXTRA:
        import importlib

        return importlib.import_module(_USAGE_EXTRA[argv[0]]).main(argv[1:])
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown subcommand {argv[0]!r}{hint}; choose one of {', '.join(SUBCOMMANDS)}.")
    _show_data_logs()
    cli = AutoModelCLI(
        HFCausalLM,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if from_command_line else argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": PROG},
        run_marker=marker,
    )
    if cli.subcommand == "fit":
        _report_checkpoint(cli, argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Errors from bad input print ``lightning-automodel: error: ...`` and return 2 (the
    traceback with ``--debug``); other exceptions (bugs) propagate with their traceback."""
    marker = _RunStarted()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
        from_command_line = False  # LightningCLI parses our stripped list (sys.argv keeps it for relaunches)
    try:
        return _run(argv, from_command_line, marker)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if debug or not _is_input_error(exc, marker.started):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
