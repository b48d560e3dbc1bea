"""Text generation: KV-cached incremental decoding, sampling, and streaming text.

    from llmkit.generation import generate
    new_ids = generate(model, [prompt_ids], max_new_tokens=100, temperature=0.8, top_p=0.95)

The cache lives here, outside the model: decode.py swaps each block's attention, for one forward
at a time, for one that reads and extends the cache (see decode.py and cache.py).
"""

from llmkit.generation.cache import KVCache, SlidingWindowCache
from llmkit.generation.decode import CachedDecoder, RecomputeDecoder
from llmkit.generation.sampling import generate, next_tokens, process_logits, stream
from llmkit.generation.text import IncrementalDetokenizer, StopStrings, stream_text

__all__ = [
    "CachedDecoder", "IncrementalDetokenizer", "KVCache", "RecomputeDecoder", "SlidingWindowCache", "StopStrings",
    "generate", "next_tokens", "process_logits", "stream", "stream_text",
]
