"""``lightning-automodel``: fit / validate / test through LightningCLI, plus ``plan`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_automodel.data.text_datamodule import TextDataModule
from lightning_automodel.models.hf_causal_lm import HFCausalLM

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


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _USAGE_EXTRA:
        import importlib

        return importlib.import_module(_USAGE_EXTRA[argv[0]]).main(argv[1:])
    cli = LightningCLI(
        HFCausalLM,
        TextDataModule,
        args=None if from_command_line else argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    if cli.subcommand == "fit":
        _report_checkpoint(cli, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
