"""Data: sources, cleaning, splits, shards, streaming and the LightningDataModule; the staged preparation
pipeline (clean, dedup, encode as units of work on any executor) lives in llmkit/data/prep/."""

from typing import Any

__all__ = ["LMDataModule"]


def __getattr__(name: str) -> Any:
    # Lazy: encoding workers import llmkit.data.* and should not pay for importing Lightning.
    if name == "LMDataModule":
        from llmkit.data.datamodule import LMDataModule

        return LMDataModule
    raise AttributeError(f"module 'llmkit.data' has no attribute '{name}'")
