"""Data: the text data module, collators (padding and THD packing) and an offline byte tokenizer."""

from lightning_automodel.data.collators import PackedSequenceCollator, PaddingCollator
from lightning_automodel.data.text_datamodule import TextDataModule
from lightning_automodel.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "PackedSequenceCollator", "PaddingCollator", "TextDataModule"]
