"""Pure-torch model components. Importing this package registers every component."""

from llmkit.model import moe  # noqa: F401  registers the "moe" ffn
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import LossOutput, Transformer

__all__ = ["LossOutput", "ModelConfig", "Transformer"]
