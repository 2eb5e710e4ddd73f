"""Data: the one data module (``datasets``: every format, packing, resume), its collators and tokenizers."""

from typing import Any

from lightning_automodel.data.collators import PackedSequenceCollator, PaddingCollator, SFTCollator
from lightning_automodel.data.formats import DataError
from lightning_automodel.data.sft_datamodule import SFTDataModule
from lightning_automodel.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "DataError", "PackedSequenceCollator", "PaddingCollator", "SFTCollator", "SFTDataModule"]


def __getattr__(name: str) -> Any:
    if name in ("TextDataModule", "text_datamodule"):  # a config written before the merge: one line naming the replacement
        raise DataError(
            "lightning_automodel.data.TextDataModule was merged into SFTDataModule: write class_path: "
            "lightning_automodel.data.SFTDataModule (or drop class_path); .txt files and the demo corpus are its text format."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
