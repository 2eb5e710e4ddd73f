"""Data: the SFT data module (``datasets``), the text data module of the embedded demo, collators and tokenizers."""

from lightning_automodel.data.collators import PackedSequenceCollator, PaddingCollator
from lightning_automodel.data.sft_datamodule import SFTCollator, SFTDataModule
from lightning_automodel.data.text_datamodule import TextDataModule
from lightning_automodel.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "PackedSequenceCollator", "PaddingCollator", "SFTCollator", "SFTDataModule", "TextDataModule"]
