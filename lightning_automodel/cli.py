"""``lightning-automodel``: fit / validate / test through LightningCLI, plus ``plan`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path

from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_automodel.checkpoint_io import AtomicTorchCheckpointIO, CheckpointResumeError, check_resumable
from lightning_automodel.data.text_datamodule import DataError, TextDataModule
from lightning_automodel.models.hf_causal_lm import HFCausalLM

PROG = "lightning-automodel"

_USAGE_EXTRA = {
    "plan": "lightning_automodel.planning",
    "export": "lightning_automodel.export",
}


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


# Set by _RunStarted once a loop begins: a plain ValueError / FileNotFoundError after that is a bug, not bad input.
_run_started = False


class _RunStarted(Callback):
    """Marks the moment the fit / validate / test loops begin (input checks are all done by then)."""

    def _mark(self, *args: Any) -> None:
        global _run_started
        _run_started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = _mark


def _has_checkpoint_io(plugins: Any) -> bool:
    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(isinstance(p, CheckpointIO) for p in items if p is not None)


class AutoModelCLI(LightningCLI):
    """LightningCLI that checks ``--ckpt_path`` before building anything and saves single files atomically.

    Unless the configuration sets a ``CheckpointIO`` (in ``trainer.plugins`` or on the strategy), the Trainer
    gets ``AtomicTorchCheckpointIO``: single-file ``.ckpt`` saves (single device, DDP, and
    ``ModelParallelStrategy`` with ``save_distributed_checkpoint: false``) are written beside the target,
    fsynced and renamed. Sharded saves do not use a CheckpointIO (AtomicModelParallelStrategy handles them).
    """

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here: check that the file is complete first.
        if self.config.get("subcommand"):
            check_resumable(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        strategy = config.get("strategy")
        strategy_io = isinstance(strategy, Strategy) and strategy._checkpoint_io is not None
        if not strategy_io and not _has_checkpoint_io(config.get("plugins")):
            plugins = config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            config["plugins"] = [*plugins, AtomicTorchCheckpointIO()]
        return super()._instantiate_trainer(config, [*callbacks, _RunStarted()])


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Raised on bad input wherever they happen: one line, exit code 2 (imported late: plan and export
    are not loaded for fit)."""
    from lightning_automodel.core.checkpoint_files import OfflineCheckpointError
    from lightning_automodel.core.sharded_load import CheckpointLayoutError
    from lightning_automodel.export import ExportError
    from lightning_automodel.planning import PlanError

    return (CheckpointResumeError, DataError, ExportError, PlanError, CheckpointLayoutError, OfflineCheckpointError)


def _is_input_error(exc: BaseException) -> bool:
    if isinstance(exc, _input_error_types()):
        return True
    # Plain ValueError / FileNotFoundError: bad input while parsing, building and setting up; a bug afterwards.
    return isinstance(exc, (ValueError, FileNotFoundError)) and not _run_started


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(argv: list[str], from_command_line: bool) -> int:
    if argv and argv[0] in _USAGE_EXTRA:
        import importlib

        return importlib.import_module(_USAGE_EXTRA[argv[0]]).main(argv[1:])
    cli = AutoModelCLI(
        HFCausalLM,
        TextDataModule,
        args=None if from_command_line else argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    if cli.subcommand == "fit":
        _report_checkpoint(cli, argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Errors from bad input print ``lightning-automodel: error: ...`` and return 2 (the
    traceback with ``--debug``); other exceptions (bugs) propagate with their traceback."""
    global _run_started
    _run_started = False
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
        from_command_line = False  # LightningCLI parses our stripped list (sys.argv keeps it for relaunches)
    try:
        return _run(argv, from_command_line)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if debug or not _is_input_error(exc):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
