"""llmkit: train decoder-only language models from scratch as configurable experiments."""

__version__ = "0.1.0"

from llmkit import resolvers  # noqa: E402,F401  (registers ${mul:...} for conf/)
