"""``lightning-automodel``: fit / validate / test through LightningCLI, plus ``plan`` and ``export``."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import errno
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_automodel._compat.lightning import LightningCLIHooks, import_path_policy_preserved, union_member_error
from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO, CheckpointResumeError, check_resumable
from lightning_automodel.config_loading import check_command_line_values, check_config_file, config_paths, register_parser_mode
from lightning_automodel.data import DataError
from lightning_automodel.core.threads import set_rank_threads
from lightning_automodel.models.hf_causal_lm import HFCausalLM
from lightning_automodel.core.logs import rank_zero_logger

log = rank_zero_logger(__name__)  # one line per job: rank 0's

PROG = "lightning-automodel"

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


#: Module prefixes a ``class_path`` (or any import path value) of a fit / validate / test configuration
#: may name. Everything else is refused by the parser *before* it is imported: importing a module runs
#: its code, so a type check after the import is too late (``class_path: this.Zen`` printed the Zen of
#: Python). ``plan`` never imports a class_path at all.
ALLOWED_IMPORT_PREFIXES: tuple[str, ...] = ("lightning.pytorch", "lightning.fabric", "lightning_automodel", "torch.optim")
#: Comma-separated extra prefixes the user trusts, e.g. ``LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS=my_project.callbacks``.
ALLOWED_IMPORTS_ENV = "LIGHTNING_AUTOMODEL_ALLOWED_IMPORTS"


def allowed_import_prefixes() -> list[str]:
    """The built-in prefixes plus the ones the user added through ``ALLOWED_IMPORTS_ENV`` (checked, one line when malformed)."""
    extra = [entry.strip() for entry in os.environ.get(ALLOWED_IMPORTS_ENV, "").split(",") if entry.strip()]
    for entry in extra:
        if not all(part.isidentifier() for part in entry.split(".")):
            raise ConfigError(f"{ALLOWED_IMPORTS_ENV}: {entry!r} is not a dotted module prefix (e.g. my_project.callbacks).")
    return [*ALLOWED_IMPORT_PREFIXES, *extra]


def restrict_import_paths() -> None:
    """Make the configuration parser refuse, before importing it, any import path outside :func:`allowed_import_prefixes`.

    jsonargparse's public import-path policy: ``*`` denies everything that the allow-list does not
    name (the most specific entry decides). It is process-wide, like the parser's other settings.
    """
    from jsonargparse import set_parsing_settings

    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=allowed_import_prefixes())


_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|Key \"?'?([\w.]+)'?\"? is not expected|unrecognized arguments: (\S+)")


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``--option value`` / ``--option=value`` for each of ``options``."""
    kept: list[str] = []
    for i, arg in enumerate(argv):
        if not (arg in options or arg.startswith(tuple(f"{o}=" for o in options)) or (i and argv[i - 1] in options)):
            kept.append(arg)
    return kept


def resume_command(argv: list[str], ckpt_path: str, global_step: int, max_steps: int) -> str:
    """The command that continues this run from ``ckpt_path``, as typed (the same options).

    A run that reached ``max_steps`` would stop again at once if resumed as it was, so the command
    then asks for as many steps again: pasted as printed, it trains.
    """
    import shlex

    dropped = ("--ckpt_path", "--trainer.max_steps") if max_steps > 0 and global_step >= max_steps else ("--ckpt_path",)
    args = [*_without_options(argv[1:], dropped), "--ckpt_path", ckpt_path]
    if "--trainer.max_steps" in dropped:
        args += ["--trainer.max_steps", str(global_step + max_steps)]
    return " ".join(shlex.quote(a) for a in [PROG, argv[0], *args])


@rank_zero_only
def _report_checkpoint(cli: LightningCLI, argv: list[str]) -> None:
    callback = cli.trainer.checkpoint_callback
    path = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
    if not path:
        return
    trainer = cli.trainer
    finished = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
    resume = resume_command(argv, path, trainer.global_step, trainer.max_steps)
    out = Path(path).parent.parent / "exported"
    print(
        f"Checkpoint saved at {path} | {'train further' if finished else 'resume'}: {resume} "
        f"| export to Hugging Face: {PROG} export --ckpt_path {path} --out {out}",
        flush=True,
    )


def prefer_command_line_model_source(model: Any, argv: list[str]) -> None:
    """``--model.pretrained_path`` on the command line replaces the YAML's inline ``model.config``, and the reverse.

    ``HFCausalLM`` takes exactly one of the two; a command-line override of one is meant to replace
    whichever the YAML set, as any other override replaces its YAML value.
    """
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

    def __init__(self) -> None:
        self.started = False

    def _mark(self, *args: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = _mark


def write_new_config_file(directory: Path, text: str, filename: str = "config.yaml") -> Path:
    """Write ``text`` to ``directory/config.yaml``, or to the first free ``config-<n>.yaml``; never replaces a file.

    Each name is created with ``O_EXCL``, so two runs sharing a directory (a resume, a second fit)
    keep every earlier config: a resumed run's config sits beside the first run's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(filename)
    for n in range(10_000):
        path = directory / (filename if n == 0 else f"{stem}-{n}{suffix}")
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{directory} already holds 10000 {stem}-<n>{suffix} files; choose another trainer.default_root_dir.")


class NumberedConfigSave(SaveConfigCallback):
    """Saves the run's configuration beside the logs without ever overwriting one (see :func:`write_new_config_file`)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective: every rank asks
        if "://" in str(log_dir):
            return super().setup(trainer, pl_module, stage)  # remote: Lightning's refusal of an existing file
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            path = write_new_config_file(Path(log_dir), text, self.config_filename)
            log.info("Configuration saved at %s.", path)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


def _as_list(items: Any) -> list[Any]:
    """A Trainer argument that takes one object or a list of them (``callbacks``, ``plugins``), as a list."""
    return list(items) if isinstance(items, (list, tuple)) else [] if items is None else [items]


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


_DENIED_IMPORT = re.compile(r"Importing '([\w.]+)' is not allowed")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')


def _denied_import(message: str) -> str | None:
    """One line for a refused import path (jsonargparse's own message lists every Union subtype)."""
    found = _DENIED_IMPORT.search(message)
    if not found:
        return None
    path = found.group(1)
    key = _PARSER_KEY.search(message)
    where = f"{key.group(1)}: " if key else ""
    return (
        f"{where}{path!r} is outside the modules a configuration may import ({', '.join(allowed_import_prefixes())}); "
        f"nothing was imported. To trust it, set {ALLOWED_IMPORTS_ENV}={path.rpartition('.')[0]}."
    )


#: HFCausalLM arguments that decide which parameters the model has: a checkpoint recorded with other
#: values is refused in one line. ``pretrained_path`` differing only warns (the directory may have
#: moved; the weights come from the checkpoint and the strict state load checks every shape).
_MODEL_DEFINING = ("config", "model_class", "quantization")


def _differences(theirs: Any, ours: Any, key: str) -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [d for k in sorted(set(theirs) | set(ours), key=str) for d in _differences(theirs.get(k), ours.get(k), f"{key}.{k}")]
    return [] if theirs == ours else [f"{key} (checkpoint: {_short(theirs)}, your config: {_short(ours)})"]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_checkpoint_hparams(ckpt_path: str, model_args: dict[str, Any]) -> None:
    """Compare a checkpoint's recorded hyper-parameters with the user's model arguments; never apply them.

    Lightning's CLI would merge them over the user's configuration: a checkpoint could switch on
    ``trust_remote_code`` with a ``pretrained_path`` of its choosing, or silently train another model.
    Here the checkpoint is read as data and the user's configuration wins: a difference in what defines
    the model is one line naming the fields; other differences are the user's choice for this run.
    """
    from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, read_checkpoint_metadata

    try:
        metadata = read_checkpoint_metadata(ckpt_path)
    except CheckpointReadError as exc:
        raise CheckpointResumeError(f"--ckpt_path: {exc}") from None
    hparams = metadata.get("hyper_parameters")
    if not isinstance(hparams, dict):
        return
    keys = [*_MODEL_DEFINING]
    theirs, ours = hparams.get("pretrained_path"), model_args.get("pretrained_path")
    if (theirs is None) != (ours is None):
        keys.insert(0, "pretrained_path")  # one side is an inline config: another model, not a moved directory
    problems = [d for key in keys if key in hparams for d in _differences(hparams[key], model_args.get(key), f"model.{key}")]
    if problems:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with another model than your config describes: {'; '.join(problems)}. "
            "The checkpoint's hyper-parameters are never applied: set these fields in your config as the checkpoint has them."
        )
    if theirs and ours and os.path.normpath(str(theirs)) != os.path.normpath(str(ours)):
        log.warning("--ckpt_path %s was trained from model.pretrained_path %s; this run uses %s.", ckpt_path, theirs, ours)


def _suggestion(message: str, parsers: list[Any]) -> str:
    """``message`` on one line, with "did you mean" when an unknown key is close to a valid one."""
    line = " ".join(message.split())
    line = union_member_error(line) or line  # a subclass-mode section (data: class_path ...): the class's own error
    denied = _denied_import(line)
    if denied is not None:
        return denied
    found = _UNKNOWN_OPTION.search(line)
    if not found:
        return line
    bad = next(g for g in found.groups() if g).lstrip("-")
    valid: set[str] = set()
    for parser in parsers:
        try:  # the option keys (``model.learning_rate``), from jsonargparse's public get_defaults
            valid.update(parser.get_defaults().keys())
        except Exception:  # noqa: BLE001 - only a "did you mean" hint depends on it
            pass
    close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.75)
    return f"{line} (did you mean {close[0]!r}?)" if close else line


class ResumingProgressBar(TQDMProgressBar):
    """The TQDM bar, with its epoch and a true total also in the first epoch of a resumed run.

    A resume at batch N of an epoch either skips ``on_train_epoch_start`` (the bar kept "Training: 41/?")
    or gets a total of the steps left only; the epoch's first batch in this process sets both, from N.
    """

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
    """LightningCLI that fails in one line on a config mistake, checks ``--ckpt_path`` before building
    anything, saves single files atomically and shows a sane progress bar.

    * A configuration the parser refuses raises :class:`ConfigError` (one line, "did you mean" when close).
    * ``--ckpt_path`` is checked right after parsing (:func:`check_ckpt_path`), before the model is built.
    * Unless the configuration sets a ``CheckpointIO``, the Trainer gets ``AtomicTorchCheckpointIO``
      (single-file saves written beside the target, fsynced, renamed; sharded saves use the strategy's).
    * Unless a progress bar is configured, the TQDM bar (Lightning's rich bar prints ``Epoch 1/-2`` when
      ``max_steps`` bounds the run).
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
        kwargs.setdefault("parser_mode", register_parser_mode())  # the bounded YAML loader, as plan's
        parser = super().init_parser(**kwargs)
        self._parsers.append(parser)
        return parser

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            raise ConfigError(_suggestion(str(exc), self._parsers)) from None
        subcommand = self.config.get("subcommand")
        command_line = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        prefer_command_line_model_source((self.config[subcommand] if subcommand else self.config).get("model"), command_line)
        self.after_parsing()

    def after_parsing(self) -> None:
        """Checks between parsing and building: ``--ckpt_path`` must be resumable before the model is built."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    def check_ckpt_path_config(self) -> None:
        # Runs in place of LightningCLI's own step, which merges the checkpoint's hyper-parameters over
        # the user's configuration (see check_checkpoint_hparams and _compat.lightning.LightningCLIHooks).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
        model = self.config[subcommand].get("model")
        model_args = model.as_dict() if hasattr(model, "as_dict") else dict(model or {})
        check_checkpoint_hparams(str(ckpt_path), model_args.get("init_args", model_args))

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `data:` without a class_path configures SFTDataModule (no train_files: the embedded demo);
        # `data: {class_path: ..., init_args: ...}` picks another module.
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": "lightning_automodel.data.SFTDataModule"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        default_tokenizer_to_model(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if tokenizer is not None:
            log.info("Tokenizer vocabulary: %d ids (%s).", len(tokenizer), type(tokenizer).__name__)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**(config.get("trainer") or {}), **kwargs}
        callbacks = _as_list(trainer_config.get("callbacks"))
        extra: list[Callback] = [self.run_marker]
        if not any(isinstance(c, ProgressBar) for c in callbacks) and trainer_config.get("enable_progress_bar") is not False:
            extra.append(ResumingProgressBar())
        trainer = super().instantiate_trainer(**{**kwargs, "callbacks": [*callbacks, *extra]})
        # After construction the strategy holds the configured CheckpointIO (from plugins or its own);
        # only Lightning's default (exactly TorchCheckpointIO) is replaced.
        configured_io = any(isinstance(p, CheckpointIO) for p in _as_list(trainer_config.get("plugins")))
        if not configured_io and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicTorchCheckpointIO()
        set_rank_threads(trainer.num_devices)
        return trainer


class _Parsed(Exception):
    """Ends a :class:`_ConfigOnlyCLI` right after parsing, carrying the ``fit`` section of the config."""

    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class _ConfigOnlyCLI(AutoModelCLI):
    """``fit``'s parser and nothing else: stops after parsing (LightningCLI parses in its constructor, then
    seeds and builds), so no class is instantiated and ``--ckpt_path`` is not read."""

    def __init__(self, *args: Any, add_arguments: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        self._add_arguments_fn = add_arguments
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": AutoModelCLI.subcommands()["fit"]}  # the other subcommands' parsers would be built for nothing

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        if self._add_arguments_fn is not None:
            self._add_arguments_fn(parser)

    def after_parsing(self) -> None:
        raise _Parsed(self.config["fit"])


def job_cli(cli_class: type[AutoModelCLI] = AutoModelCLI, **kwargs: Any) -> AutoModelCLI:
    """The command's LightningCLI, configured in this one place: fit / validate / test run it, ``plan`` parses with it.

    ``model:`` is :class:`HFCausalLM`, ``data:`` any LightningDataModule (``SFTDataModule`` when no
    ``class_path`` is given), no automatic optimizer arguments (the module configures its own).
    """
    kwargs.setdefault("save_config_callback", NumberedConfigSave)
    return cli_class(HFCausalLM, LightningDataModule, subclass_mode_data=True, auto_configure_optimizers=False,
                     parser_kwargs={"prog": PROG}, **kwargs)


def check_command_line(argv: list[str]) -> None:
    """Before any parser reads ``argv``: the import allow-list, config files that are regular and bounded, bounded values."""
    restrict_import_paths()
    for path in config_paths(argv):
        check_config_file(path)  # jsonargparse would block on a FIFO before its loader sees the text
    check_command_line_values(argv)


def parse_fit_config(argv: list[str], add_arguments: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """``argv`` parsed as ``fit`` parses it, returned as data: nothing instantiated, seeded or resumed.

    Every ``--config`` merged in order, ``--key value`` / ``--key=value`` / ``--key+=value`` overrides,
    the classes' defaults and type checks, "did you mean" and ``--print_config``: all of it is
    ``fit``'s own parser (:func:`job_cli`). ``add_arguments`` adds a command's own options to it.
    """
    check_command_line(argv)  # restricts import paths for the rest of the command (main puts the policy back)
    with warnings.catch_warnings():
        # LightningCLI warns when args is given while sys.argv has arguments: here argv *is* sys.argv minus "plan".
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            job_cli(_ConfigOnlyCLI, args=["fit", *argv], add_arguments=add_arguments, save_config_callback=None)
        except _Parsed as parsed:
            return parsed.config.as_dict()
    raise AssertionError("_ConfigOnlyCLI always stops after parsing")


def default_tokenizer_to_model(config: Any) -> None:
    """``data.tokenizer_path`` defaults to ``model.pretrained_path``: a checkpoint trains on its own tokenizer."""
    data, model = config.get("data"), config.get("model")
    init_args = data.get("init_args") if data is not None else None
    pretrained = model.get("pretrained_path") if model is not None else None
    if init_args is None or "tokenizer_path" not in init_args:
        return
    if init_args.get("tokenizer_path") is None and pretrained:
        if _has_tokenizer(pretrained):
            init_args["tokenizer_path"] = pretrained
        else:
            log.warning(
                "model.pretrained_path %s has no tokenizer files: this run trains on the data module's default "
                "tokenizer. Set data.tokenizer_path to the tokenizer the model was trained with.", pretrained,
            )
    tokenizer = init_args.get("tokenizer_path")
    source = " (model.pretrained_path)" if tokenizer and tokenizer == pretrained else ""
    log.info("Tokenizer: %s", f"{tokenizer}{source}" if tokenizer else "the byte tokenizer (embedded demo)")


def _has_tokenizer(directory: str) -> bool:
    from lightning_automodel.core.hub_writer import TOKENIZER_FILES

    root = Path(directory)
    return any((root / name).is_file() for name in TOKENIZER_FILES if name.startswith(("tokenizer", "vocab")))


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


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Raised on bad input wherever they happen: one line, exit code 2 (imported late: plan and export
    are not loaded for fit)."""
    from lightning_automodel.config_loading import ConfigFileError, PlanError
    from lightning_automodel.core.hf_weight_files import OfflineCheckpointError
    from lightning_automodel.core.sharded_load import CheckpointLayoutError
    from lightning_automodel.core.hub_layout import ExportError

    return (
        CheckpointResumeError, ConfigError, ConfigFileError, DataError, ExportError, PlanError, CheckpointLayoutError,
        OfflineCheckpointError,
        UnpicklingError,  # torch.load(weights_only=True) refusing a pickle: a bad or hostile file, not a bug
    )


#: OSErrors that describe the user's files or disk (a read-only or full disk, a file where a directory
#: goes), at any point of a run: a save that fails at step 900 is still the disk's problem, not ours.
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
)


#: A full or read-only disk, wherever it surfaces: torch.save reports ENOSPC as a RuntimeError
#: ("unexpected pos ...") raised while handling the OSError.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _full_disk_cause(exc: BaseException) -> OSError | None:
    """The full/read-only disk OSError this exception was raised from, if any (its cause or context chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def _checkpoint_exception_type() -> type[BaseException]:
    """DCP's CheckpointException: a BaseException, so ``except Exception`` does not see it."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _is_input_error(exc: BaseException, run_started: bool) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, _input_error_types()):
        return True
    if isinstance(exc, _checkpoint_exception_type()):
        # DCP wraps each rank's failure (a truncated or missing .distcp, a full disk) in a BaseException.
        return all(_is_input_error(inner, False) for inner, _ in exc.failures.values())
    if (isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS) or _full_disk_cause(exc) is not None:
        return True
    # Plain ValueError / FileNotFoundError / the Trainer's own refusals (devices 0, max_steps -5) and a
    # file nested past the parser's recursion limit: bad input while parsing, building and setting up;
    # a bug afterwards.
    return isinstance(exc, (ValueError, FileNotFoundError, MisconfigurationException, RecursionError)) and not run_started


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, _checkpoint_exception_type()):
        rank, (inner, _) = next(iter(exc.failures.items()))
        return f"the sharded checkpoint could not be read or written (rank {rank}): {_one_line(inner)}"
    disk = _full_disk_cause(exc)
    if disk is not None:
        where = f" writing {disk.filename}" if disk.filename else " while writing a checkpoint or a log"
        return (
            f"{disk.strerror or disk}{where}: free space, or point trainer.default_root_dir (and any ModelCheckpoint "
            "dirpath) at a disk with room."
        )
    if isinstance(exc, RecursionError):
        return "a file or value is nested too deeply (JSON/YAML recursion limit); it is corrupt or hostile."
    if isinstance(exc, UnpicklingError):
        # torch's message is a page ending in "re-run with weights_only=False": never advise that for a stranger's file.
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return (
            f"a checkpoint file holds pickled objects besides tensors ({first}); refusing to unpickle it. "
            "Load only checkpoints you created, or convert the weights to safetensors."
        )
    line = " ".join(str(exc).split()) or type(exc).__name__
    return union_member_error(line) or line  # a subclass-mode data module's own error, not jsonargparse's listing


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
    check_command_line(argv)
    _show_data_logs()
    cli = job_cli(args=None if from_command_line else argv, run_marker=marker)
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
        with import_path_policy_preserved():  # the config's import allow-list ends with the command
            return _run(argv, from_command_line, marker)
    except (Exception, _checkpoint_exception_type()) as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if debug or not _is_input_error(exc, marker.started):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
