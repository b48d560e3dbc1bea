"""Prometheus collectors of the server, in a registry of their own (one per server, so tests can run
several in one process). Names follow vLLM's where they mean the same (vllm:* -> llmkit_*)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a millisecond (one tiny-model decode step) to minutes (a long request in a full queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("llmkit_requests_running", "Requests in the decoding batch", registry=registry)
        self.waiting = Gauge("llmkit_requests_waiting", "Requests queued for admission", registry=registry)
        self.batch_size = Gauge("llmkit_batch_size", "Rows in the last decode step", registry=registry)
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter("llmkit_generation_tokens", "Tokens sampled", registry=registry)
        self.requests = Counter(
            "llmkit_requests", "Finished requests by finish reason", ["finish_reason"], registry=registry
        )

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)

        self.queue_time = histogram("llmkit_request_queue_time_seconds", "Submission to admission (prefill start)")
        self.time_to_first_token = histogram("llmkit_time_to_first_token_seconds", "Submission to first token")
        self.inter_token_latency = histogram("llmkit_inter_token_latency_seconds", "Between a row's tokens")
        self.e2e_latency = histogram("llmkit_e2e_request_latency_seconds", "Submission to the last token")

    def render(self) -> bytes:
        return generate_latest(self.registry)
