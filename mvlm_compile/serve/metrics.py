"""The server's Prometheus metrics, in a registry of the app's own (several apps in one process, as
in tests, do not share counters). GET /metrics serves them in the text exposition format."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from mvlm_compile.runtime.prefix_cache import PAGE_TOKENS
from mvlm_compile.runtime.scheduler import StepInfo

# Latencies of the tiny model on a CPU up to a 7B model's first token on an Orin NX.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # process-wide: no *_created series next to each counter and histogram
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total...
        self.requests = Counter(
            "mvlm_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.generations = Counter(
            "mvlm_generations",
            "Generations ended, by finish reason (stop, length, cancelled: the client hung up or the server "
            "stopped; error).",
            ["finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mvlm_prompt_tokens",
            "Prompt tokens of the generations run (image tokens included).",
            registry=self.registry,
        )
        self.completion_tokens = Counter("mvlm_completion_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = Histogram(
            "mvlm_time_to_first_token_seconds",
            "From the request's arrival (queueing included) to its first text.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "mvlm_time_per_output_token_seconds",
            "Per generation: the mean time between two tokens after the first.",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mvlm_queue_depth", "Requests admitted and waiting for the engine.", registry=self.registry
        )
        self.running = Gauge(
            "mvlm_requests_running",
            "Generations holding a KV-cache slot (decoding or prefilling).",
            registry=self.registry,
        )
        self.slots = Gauge("mvlm_slots", "KV-cache slots: requests decoded together at most.", registry=self.registry)
        self.batch_size = Histogram(
            "mvlm_decode_batch_size",
            "Sequences advanced together by each decode step.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "mvlm_step_seconds",
            "One turn of the scheduler: a prompt chunk and/or a decode step (the longest gap between two tokens).",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.prefill_tokens = Counter(
            "mvlm_prefill_tokens", "Prompt tokens prefilled, in chunks between decode steps.", registry=self.registry
        )
        self.prefix_cache_hits = Counter(
            "mvlm_prefix_cache_hits",
            "Generations whose prompt reused the K/V of a kept prefix (an earlier turn, the same system prompt "
            "and image).",
            registry=self.registry,
        )
        self.prefix_cache_reused_tokens = Counter(
            "mvlm_prefix_cache_reused_tokens",
            "Prompt tokens whose K/V a kept prefix gave, so not prefilled (usage.prompt_tokens_details.cached_tokens).",
            registry=self.registry,
        )
        self.prefix_cache_pages = Gauge(
            "mvlm_prefix_cache_pages",
            f"The prefix cache's pages, each the K/V of {PAGE_TOKENS} positions (--prefix-cache-mib; 0: no prefix "
            "reuse).",
            registry=self.registry,
        )
        self.prefix_cache_pages_used = Gauge(
            "mvlm_prefix_cache_pages_used",
            "The prefix cache's pages holding a kept prefix (the least recently used is evicted when all are).",
            registry=self.registry,
        )
        self.ready = Gauge("mvlm_ready", "1 once the model is loaded and warmed up.", registry=self.registry)

    def observe_step(self, step: StepInfo) -> None:
        """The scheduler's report of one step (on its thread)."""
        if step.decode_rows:
            self.batch_size.observe(step.decode_rows)
        self.prefill_tokens.inc(step.prefill_tokens)
        self.step_seconds.observe(step.seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
