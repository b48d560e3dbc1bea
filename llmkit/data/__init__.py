"""Data: sources, tokenizers, tokenized cache, datasets and the LightningDataModule."""

from llmkit.data.datamodule import LMDataModule

__all__ = ["LMDataModule"]
