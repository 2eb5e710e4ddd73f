"""Two DDP ranks under ``logging.basicConfig(INFO)``: each surgery and data line once per job (issue 21).

Every line goes to stderr with its rank, so the test counts lines per rank.
"""

import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl

import tiny_models as tm
from callbacks.lit_models import InitLM, loader
from distributed import end_rank_cleanly

logging.basicConfig(level=logging.INFO, format=f"rank{os.environ['RANK']}: %(message)s")

from lightning_automodel.callbacks import ParameterFreezing  # noqa: E402
from lightning_automodel.data.sft_datamodule import SFTDataModule  # noqa: E402

SFT = Path(__file__).resolve().parents[2] / "lightning_automodel" / "data" / "corpus" / "sft"


def main(tmp: Path) -> None:
    data = SFTDataModule(train_files=str(SFT / "sft_chat.jsonl"), tokenizer_path=str(SFT / "tiny-tokenizer"), seq_length=128,
                         batch_size=2, cache_dir=str(tmp / f"cache{os.environ['RANK']}"))
    data.setup("fit")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp),
                         callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.layers.0.mlp"}])])
    trainer.fit(InitLM(tm.tiny_llama), loader(n=8))
    print(f"OK first_hour_logs rank{trainer.global_rank}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_rank_cleanly()
