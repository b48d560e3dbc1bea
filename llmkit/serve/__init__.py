"""`llmkit serve`: an OpenAI-compatible HTTP server that decodes concurrent requests as one batch.

    engine.py   the scheduler and the batched decode loop, over llmkit/generation's cache and sampling
    app.py      the FastAPI routes (completions, chat, models, health, metrics) and OpenAI-shaped errors
    metrics.py  the Prometheus collectors
"""
