"""`llmkit serve`: an OpenAI-compatible HTTP server that decodes concurrent requests as one batch.

    engine.py       the scheduler and the batched decode loop, over llmkit/generation's cache and sampling
    batch_cache.py  the KV cache whose rows join and leave between decode steps
    app.py          the FastAPI routes (completions, chat, models, health, metrics)
    protocol.py     OpenAI's request and response shapes, and its error body
    metrics.py      the Prometheus collectors
"""
