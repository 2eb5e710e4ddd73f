"""``lightning-automodel``: fit / validate / test through LightningCLI, plus ``plan`` and ``export``."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: `except Exception` misses it

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_automodel._compat.lightning import LightningCLIHooks, import_path_policy_preserved, union_member_error
from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO, CheckpointResumeError, check_resumable
from lightning_automodel.config_loading import ConfigFileError, PlanError, check_command_line_values, check_config_file, config_paths, register_parser_mode
from lightning_automodel.core.hf_weight_files import OfflineCheckpointError
from lightning_automodel.core.hub_layout import ExportError
from lightning_automodel.core.sharded_load import CheckpointLayoutError
from lightning_automodel.data import DataError
from lightning_automodel.data.tokenizer import has_tokenizer
from lightning_automodel.core.threads import set_rank_threads
from lightning_automodel.models.hf_causal_lm import HFCausalLM
from lightning_automodel.core.logs import rank_zero_logger

log = rank_zero_logger(__name__)  # one line per job: rank 0's

PROG = "lightning-automodel"
_OTHER_COMMANDS = {"plan": "lightning_automodel.planning", "export": "lightning_automodel.export"}
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


#: Import path prefixes a config may name, refused *before* import (``class_path: this.Zen`` printed the Zen).
ALLOWED_IMPORT_PREFIXES: tuple[str, ...] = ("lightning.pytorch", "lightning.fabric", "lightning_automodel", "torch.optim")
#: Comma-separated extra prefixes the user trusts, e.g. ``LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS=my_project.callbacks``.
ALLOWED_IMPORTS_ENV = "LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS"
_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|Key \"?'?([\w.]+)'?\"? is not expected|unrecognized arguments: (\S+)")
_DENIED_IMPORT = re.compile(r"Importing '([\w.]+)' is not allowed")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_SYMBOLIC_CKPT_PATHS = ("last", "best", "hpc", "registry")


def allowed_import_prefixes() -> list[str]:
    """The built-in prefixes plus the user's from ``ALLOWED_IMPORTS_ENV`` (one line when malformed)."""
    extra = [entry.strip() for entry in os.environ.get(ALLOWED_IMPORTS_ENV, "").split(",") if entry.strip()]
    for entry in extra:
        if not all(part.isidentifier() for part in entry.split(".")):
            raise ConfigError(f"{ALLOWED_IMPORTS_ENV}: {entry!r} is not a dotted module prefix (e.g. my_project.callbacks).")
    return [*ALLOWED_IMPORT_PREFIXES, *extra]


def check_command_line(argv: list[str]) -> None:
    """Before any parser reads ``argv``: the import allow-list, config files that are regular and bounded, bounded values."""
    from jsonargparse import set_parsing_settings

    # jsonargparse's public, process-wide policy: "*" denies all the allow-list does not name (main puts it back).
    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=allowed_import_prefixes())
    for path in config_paths(argv):
        check_config_file(path)  # jsonargparse would block on a FIFO before its loader sees the text
    check_command_line_values(argv)


@rank_zero_only
def _report_checkpoint(trainer: Any, argv: list[str]) -> None:
    """Where the checkpoint is, the resume command (as many steps again once max_steps is reached) and export's."""
    callback = trainer.checkpoint_callback
    path = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
    if not path:
        return
    finished = 0 < trainer.max_steps <= trainer.global_step
    dropped = ("--ckpt_path", "--trainer.max_steps") if finished else ("--ckpt_path",)
    args = [arg for i, arg in enumerate(argv[1:], 1)
            if not (arg in dropped or arg.startswith(tuple(f"{o}=" for o in dropped)) or argv[i - 1] in dropped)]
    args += ["--ckpt_path", path, *(["--trainer.max_steps", str(trainer.global_step + trainer.max_steps)] if finished else [])]
    print(
        f"Checkpoint saved at {path} | {'train further' if finished else 'resume'}: {shlex.join([PROG, argv[0], *args])} "
        f"| export to Hugging Face: {PROG} export --ckpt_path {path} --out {Path(path).parent.parent / 'exported'}",
        flush=True,
    )


def prefer_command_line_model_source(model: Any, argv: list[str]) -> None:
    """``--model.pretrained_path`` on the command line replaces the YAML's ``model.config``, and the reverse."""
    sources = ("pretrained_path", "config")
    given = [key for key in sources if any(a == f"--model.{key}" or a.startswith(f"--model.{key}=") for a in argv)]
    if model is None or len(given) != 1:
        return
    other = sources[1 - sources.index(given[0])]
    if model.get(other) is not None:
        model[other] = None
        log.info("--model.%s on the command line replaces the configuration's model.%s.", given[0], other)


class _RunStarted(Callback):
    """Marks the moment the fit / validate / test loops begin (input checks are all done by then)."""

    started = False

    def _mark(self, *args: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = _mark


class NumberedConfigSave(SaveConfigCallback):
    """Saves ``config.yaml``, or the first free ``config-<n>.yaml`` (O_EXCL): a resume keeps every earlier config."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective: every rank asks
        if "://" in str(log_dir):
            return super().setup(trainer, pl_module, stage)  # remote: Lightning's refusal of an existing file
        if trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            stem, suffix = os.path.splitext(self.config_filename)
            for n in range(10_000):
                path = Path(log_dir) / (self.config_filename if n == 0 else f"{stem}-{n}{suffix}")
                try:
                    with open(path, "x", encoding="utf-8") as f:
                        f.write(self.parser.dump(self.config, skip_none=False))
                    break
                except FileExistsError:
                    continue
            else:
                raise ConfigError(f"{log_dir} already holds 10000 {stem}-<n>{suffix} files; choose another trainer.default_root_dir.")
            log.info("Configuration saved at %s.", path)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


def _as_list(items: Any) -> list[Any]:
    """A Trainer argument that takes one object or a list of them (``callbacks``, ``plugins``), as a list."""
    return list(items) if isinstance(items, (list, tuple)) else [] if items is None else [items]


def check_ckpt_path(ckpt_path: str) -> None:
    """Fail in one line, naming the newest complete checkpoint, unless ``--ckpt_path`` can be resumed from."""
    from lightning_automodel.checkpoint_io import newest_complete_checkpoint

    check_resumable(ckpt_path)  # recovers a parked sharded checkpoint; refuses a truncated file
    path = Path(ckpt_path)
    if path.is_file() or (path / ".metadata").is_file():
        return
    problem = ("is a directory without DCP metadata (.metadata): not a sharded checkpoint, or an incomplete copy"
               if path.is_dir() else "does not exist")
    newest = newest_complete_checkpoint(path.parent) if path.parent.is_dir() else None
    hint = f"; the newest complete checkpoint in {path.parent} is {newest}" if newest is not None else ""
    raise CheckpointResumeError(f"--ckpt_path {path} {problem}{hint}.")


#: HFCausalLM arguments that decide the parameters: a checkpoint with others is refused (pretrained_path only warns).
_MODEL_DEFINING = ("config", "model_class", "quantization")


def _differences(theirs: Any, ours: Any, key: str) -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) | set(ours), key=str) for d in _differences(theirs.get(k), ours.get(k), f"{key}.{k}")]
    short = [text if len(text) <= 80 else text[:77] + "..." for text in (repr(theirs), repr(ours))]
    return [] if theirs == ours else [f"{key} (checkpoint: {short[0]}, your config: {short[1]})"]


def check_checkpoint_hparams(ckpt_path: str, model_args: dict[str, Any]) -> None:
    """Compare a checkpoint's hyper-parameters with the model arguments, never apply them (LightningCLI's merge
    would let a checkpoint switch on ``trust_remote_code`` or silently train another model)."""
    from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, read_checkpoint_metadata

    try:
        hparams = read_checkpoint_metadata(ckpt_path).get("hyper_parameters")
    except CheckpointReadError as exc:
        raise CheckpointResumeError(f"--ckpt_path: {exc}") from None
    if not isinstance(hparams, dict):
        return
    theirs, ours = hparams.get("pretrained_path"), model_args.get("pretrained_path")
    # one side an inline config: another model, not a moved directory
    keys = ["pretrained_path", *_MODEL_DEFINING] if (theirs is None) != (ours is None) else _MODEL_DEFINING
    problems = [d for key in keys if key in hparams for d in _differences(hparams[key], model_args.get(key), f"model.{key}")]
    if problems:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with another model than your config describes: {'; '.join(problems)}. "
            "The checkpoint's hyper-parameters are never applied: set these fields in your config as the checkpoint has them."
        )
    if theirs and ours and os.path.normpath(str(theirs)) != os.path.normpath(str(ours)):
        log.warning("--ckpt_path %s was trained from model.pretrained_path %s; this run uses %s.", ckpt_path, theirs, ours)


def _parser_error_line(message: str, parsers: list[Any]) -> str:
    """jsonargparse's message on one line: a refused import path named with the fix, "did you mean" for a close key."""
    line = " ".join(message.split())
    line = union_member_error(line) or line  # a subclass-mode section (data: class_path ...): the class's own error
    denied = _DENIED_IMPORT.search(line)
    if denied:
        key = _PARSER_KEY.search(line)
        return (
            f"{key.group(1) + ': ' if key else ''}{denied.group(1)!r} is outside the modules a configuration may import "
            f"({', '.join(allowed_import_prefixes())}); nothing was imported. "
            f"To trust it, set {ALLOWED_IMPORTS_ENV}={denied.group(1).rpartition('.')[0]}."
        )
    found = _UNKNOWN_OPTION.search(line)
    if not found:
        return line
    valid: set[str] = set()
    for parser in parsers:
        try:  # the option keys (``model.learning_rate``), from jsonargparse's public get_defaults
            valid.update(parser.get_defaults().keys())
        except Exception:  # noqa: BLE001 - only a "did you mean" hint depends on it
            pass
    close = difflib.get_close_matches(next(g for g in found.groups() if g).lstrip("-"), sorted(valid), n=1, cutoff=0.75)
    return f"{line} (did you mean {close[0]!r}?)" if close else line


class ResumingProgressBar(TQDMProgressBar):
    """The TQDM bar with epoch and true total in a resumed first epoch (it kept "Training: 41/?" or the steps left)."""

    _epoch_started = False
    _first_batch = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._epoch_started = False

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_started, self._first_batch = True, True

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._epoch_started:
            self.on_train_epoch_start(trainer, pl_module)
        if self._first_batch and batch_idx > 0:
            bar = self.train_progress_bar
            # total_train_batches counts what is left to run; the bar counts from the epoch's first batch
            bar.total = convert_inf(min(trainer.num_training_batches, batch_idx + self.total_train_batches))
            bar.initial = bar.n = batch_idx
            bar.refresh()
        self._first_batch = False
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


class AutoModelCLI(LightningCLIHooks, LightningCLI):
    """LightningCLI with one-line config errors, ``--ckpt_path`` checked first, ``AtomicTorchCheckpointIO`` and the
    TQDM bar unless configured (Lightning's rich bar prints ``Epoch 1/-2`` when ``max_steps`` bounds the run)."""

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
        kwargs.setdefault("parser_mode", register_parser_mode())  # the bounded YAML loader, as plan's
        parser = super().init_parser(**kwargs)
        self._parsers.append(parser)
        return parser

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            raise ConfigError(_parser_error_line(str(exc), self._parsers)) from None
        command_line = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        prefer_command_line_model_source(self._section().get("model"), command_line)

    def _section(self) -> Any:
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def check_ckpt_path_config(self) -> None:
        # Replaces LightningCLI's step that merges the checkpoint's hparams over the config (LightningCLIHooks).
        ckpt_path = self._section().get("ckpt_path")
        if not ckpt_path or ckpt_path in _SYMBOLIC_CKPT_PATHS or "://" in str(ckpt_path):
            return
        check_ckpt_path(str(ckpt_path))
        model = self._section().get("model")
        model_args = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        check_checkpoint_hparams(str(ckpt_path), model_args.get("init_args", model_args))

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `data:` without a class_path configures SFTDataModule; a class_path picks another module.
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": "lightning_automodel.data.SFTDataModule"}})

    def before_instantiate_classes(self) -> None:
        """``data.tokenizer_path`` defaults to ``model.pretrained_path``: a checkpoint trains on its own tokenizer."""
        data, model = self._section().get("data"), self._section().get("model")
        init_args = data.get("init_args") if data is not None else None
        pretrained = model.get("pretrained_path") if model is not None else None
        if init_args is None or "tokenizer_path" not in init_args:
            return
        if init_args.get("tokenizer_path") is None and pretrained:
            if has_tokenizer(pretrained):
                init_args["tokenizer_path"] = pretrained
            else:
                log.warning(
                    "model.pretrained_path %s has no tokenizer files: this run trains on the data module's default "
                    "tokenizer. Set data.tokenizer_path to the tokenizer the model was trained with.", pretrained,
                )
        tokenizer = init_args.get("tokenizer_path")
        source = " (model.pretrained_path)" if tokenizer and tokenizer == pretrained else ""
        log.info("Tokenizer: %s", f"{tokenizer}{source}" if tokenizer else "the byte tokenizer (embedded demo)")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is not None:
            log.info("Tokenizer vocabulary: %d ids (%s).", len(tokenizer), type(tokenizer).__name__)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init  # instantiated callbacks
        trainer_config = {**(config.get("trainer") or {}), **kwargs}
        callbacks = _as_list(trainer_config.get("callbacks"))
        extra: list[Callback] = [self.run_marker]
        if not any(isinstance(c, ProgressBar) for c in callbacks) and trainer_config.get("enable_progress_bar") is not False:
            extra.append(ResumingProgressBar())
        trainer = super().instantiate_trainer(**{**kwargs, "callbacks": [*callbacks, *extra]})
        # Only Lightning's default (exactly TorchCheckpointIO) is replaced, never a configured CheckpointIO.
        configured_io = any(isinstance(p, CheckpointIO) for p in _as_list(trainer_config.get("plugins")))
        if not configured_io and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicTorchCheckpointIO()
        set_rank_threads(trainer.num_devices)
        return trainer


def job_cli(cli_class: type[AutoModelCLI] = AutoModelCLI, **kwargs: Any) -> AutoModelCLI:
    """The command's LightningCLI, configured only here: fit / validate / test run it, ``plan`` parses with it."""
    kwargs.setdefault("save_config_callback", NumberedConfigSave)
    return cli_class(HFCausalLM, LightningDataModule, subclass_mode_data=True, auto_configure_optimizers=False,
                     parser_kwargs={"prog": PROG}, **kwargs)


class _CurrentStdout(logging.StreamHandler):
    """Writes to the ``sys.stdout`` of the moment (captures and redirections replace it between runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _show_data_logs() -> None:
    """The job's tokenizer, format and packing lines (INFO of the data modules and of this module) go to stdout."""
    for name in ("lightning_automodel.data", __name__):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
            handler = _CurrentStdout()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


#: OSErrors about the user's files or disk at any point of a run (a save failing at step 900 is the disk's problem).
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
)
#: A full or read-only disk, wherever it surfaces: torch.save reports ENOSPC as a RuntimeError
#: ("unexpected pos ...") raised while handling the OSError.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _full_disk_cause(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def error_line(exc: BaseException, run_started: bool = False) -> str | None:
    """The one line bad input prints, or ``None`` for a bug (whose traceback must show)."""
    if isinstance(exc, CheckpointException):
        # DCP wraps each rank's failure (a truncated or missing .distcp, a full disk).
        lines = {rank: error_line(inner) for rank, (inner, _) in exc.failures.items()}
        if not lines or None in lines.values():
            return None
        rank, line = next(iter(lines.items()))
        return f"the sharded checkpoint could not be read or written (rank {rank}): {line}"
    disk = _full_disk_cause(exc)
    if disk is not None:
        where = f" writing {disk.filename}" if disk.filename else " while writing a checkpoint or a log"
        return (
            f"{disk.strerror or disk}{where}: free space, or point trainer.default_root_dir (and any ModelCheckpoint "
            "dirpath) at a disk with room."
        )
    if isinstance(exc, UnpicklingError):
        # torch's message is a page ending in "re-run with weights_only=False": never advise that for a stranger's file.
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return (
            f"a checkpoint file holds pickled objects besides tensors ({first}); refusing to unpickle it. "
            "Load only checkpoints you created, or convert the weights to safetensors."
        )
    # ValueError / OSError / the Trainer's refusals / RecursionError: bad input until the run starts, a bug afterwards.
    input_error = isinstance(
        exc, (CheckpointResumeError, ConfigError, ConfigFileError, DataError, ExportError, PlanError, CheckpointLayoutError,
              OfflineCheckpointError)
    ) or (isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS)
    if not input_error and (run_started or not isinstance(exc, (ValueError, OSError, MisconfigurationException, RecursionError))):
        return None
    if isinstance(exc, RecursionError):
        return "a file or value is nested too deeply (JSON/YAML recursion limit); it is corrupt or hostile."
    line = " ".join(str(exc).split()) or type(exc).__name__
    return union_member_error(line) or line  # a subclass-mode data module's own error, not jsonargparse's listing


def fail_in_one_line(prog: str, exc: BaseException, run_started: bool = False) -> int:
    """Bad input: ``prog: error: <line>`` on stderr, exit code 2. Called in an ``except`` block: a bug is re-raised."""
    line = error_line(exc, run_started)
    if line is None:
        raise exc
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return 2


def _run(argv: list[str], from_command_line: bool, marker: _RunStarted) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0 if argv else 2
    if argv[0] in _OTHER_COMMANDS:
        return importlib.import_module(_OTHER_COMMANDS[argv[0]]).main(argv[1:])
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown subcommand {argv[0]!r}{hint}; choose one of {', '.join(SUBCOMMANDS)}.")
    check_command_line(argv)
    _show_data_logs()
    cli = job_cli(args=None if from_command_line else argv, run_marker=marker)
    if cli.subcommand == "fit":
        _report_checkpoint(cli.trainer, argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Bad input prints one error line and returns 2 (a traceback with ``--debug``); bugs propagate."""
    marker = _RunStarted()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
        from_command_line = False  # LightningCLI parses our stripped list (sys.argv keeps it for relaunches)
    try:
        with import_path_policy_preserved():  # the config's import allow-list ends with the command
            return _run(argv, from_command_line, marker)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if debug:
            raise
        return fail_in_one_line(PROG, exc, marker.started)


if __name__ == "__main__":
    sys.exit(main())
