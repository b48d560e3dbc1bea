"""llmkit: train decoder-only language models from scratch as configurable experiments."""

__version__ = "0.1.0"
