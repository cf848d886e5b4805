"""The server's Prometheus metrics, in a registry of its own (two servers in one process, as in
the tests, do not share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_worker.generation import GenerationResult

# Time to first token: a local prefill of a short prompt takes tens of ms here, a split one over
# a slow link or a queued request seconds.
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Per token: ~30 ms locally for SmolLM2 on two cores, a round trip more when split.
TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgecloud_http_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("edgecloud_prompt_tokens", "Prompt tokens of finished generations.", registry=r)
        self.completion_tokens = Counter("edgecloud_completion_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("edgecloud_time_to_first_token_seconds", "From a generation's start to its first token.",
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram("edgecloud_time_per_output_token_seconds",
                              "Mean time per token after the first, one observation per generation.",
                              buckets=TPOT_BUCKETS_S, registry=r)
        self.round_trips = Counter("edgecloud_cloud_round_trips", "Frames sent to the cloud.", registry=r)
        self.retries = Counter("edgecloud_cloud_retries", "Cloud requests retried or failed over.", registry=r)
        self.fallbacks = Counter("edgecloud_fallbacks", "Generations finished on the device after the cloud "
                                 "went away.", registry=r)
        self.cancelled = Counter("edgecloud_generations_cancelled", "Generations ended because the client went "
                                 "away.", registry=r)
        self.active = Gauge("edgecloud_active_generations", "Generations running now (each a cloud session "
                            "when split).", registry=r)

    def finished(self, result: GenerationResult) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(len(result.token_ids))
        if result.token_ids:
            self.ttft.observe(result.ttft_ms / 1e3)
        if len(result.token_ids) > 1:
            self.tpot.observe(result.ms_per_token / 1e3)
        self.round_trips.inc(result.cloud_round_trips)
        self.retries.inc(result.retries)
        if result.fallback_at_step is not None:
            self.fallbacks.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
