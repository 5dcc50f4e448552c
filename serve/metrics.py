"""Prometheus metrics of the server, per model (base or adapter name), on their own registry.

/metrics serves these followed by vLLM's engine metrics (the `vllm:` family) from prometheus_client's
default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_GC_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Requests finished, by model, endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time from request to first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "Time from request to last token.",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("loraplex_requests_in_flight",
                               "Generation requests admitted and not finished (running plus waiting).", registry=r)
        self.errors = Counter("loraplex_errors", "Error responses, by HTTP status and error code.",
                              ["status", "code"], registry=r)
        self.rejected = Counter("loraplex_requests_rejected", "Requests refused because the queue was full.",
                                registry=r)
        self.aborted = Counter("loraplex_requests_aborted", "Requests aborted because the client went away.",
                               ["model"], registry=r)
        self.engine_unfinished = Gauge("loraplex_engine_unfinished_requests",
                                       "Requests inside the engine (running plus waiting).", registry=r)
        self.adapters_loaded = Gauge("loraplex_adapters_loaded", "Adapters ready to serve.", registry=r)
        self.adapters_unavailable = Gauge("loraplex_adapters_unavailable", "Adapters found but refused.", registry=r)
        self.loop_lag = Histogram("loraplex_event_loop_lag_seconds",
                                  "How late the server's event loop ran a timer that was due: every stream waits as "
                                  "long (a garbage collection, a slow handler).", buckets=_LOOP_LAG_BUCKETS, registry=r)
        self.gc_pause = Histogram("loraplex_gc_pause_seconds",
                                  "How long each garbage collection of the server's process held its event loop, by "
                                  "generation (2: a full collection).", ["generation"], buckets=_GC_PAUSE_BUCKETS,
                                  registry=r)
        # one child per generation, made once: the observation runs inside every collection, thousands a second
        self._gc_pause_by_generation = [self.gc_pause.labels(str(generation)) for generation in range(3)]

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        self._gc_pause_by_generation[generation].observe(seconds)

    def bind(self, engine_unfinished, adapters_loaded, adapters_unavailable) -> None:
        """Gauges read at scrape time from the live objects."""
        self.engine_unfinished.set_function(engine_unfinished)
        self.adapters_loaded.set_function(adapters_loaded)
        self.adapters_unavailable.set_function(adapters_unavailable)

    def render(self, names: list[str] | None = None) -> bytes:
        """The page; with `names` (sample names, as the `name[]` query parameters of prometheus_client's own
        exposition and so of vLLM's /metrics ask) only those series: with many adapters the whole page is ~1 MB of
        per-model histograms that a frequent reader of a few gauges need not make the server render."""
        registries = (self.registry, DEFAULT_REGISTRY)
        if names:
            registries = tuple(registry.restricted_registry(names) for registry in registries)
        return b"".join(generate_latest(registry) for registry in registries)


VLLM_LORA_INFO = "vllm:lora_requests_info"


def keep_latest_lora_info(registry=DEFAULT_REGISTRY) -> str:
    """Bound vLLM's `vllm:lora_requests_info` gauge to its latest series; returns what was done, for the log.

    vLLM sets that gauge once per engine step with the step's running and waiting adapter names (comma-joined) as
    label values, and prometheus_client keeps every series it has seen: each new set of adapters in use (with many
    adapters, as often as requests join and finish) adds one for the life of the process, and every scrape renders
    them all (2,000 series of ~220 adapter names: 2.2 MB in ~40 ms). Readers of the gauge take the series with the
    newest time, which is the one kept; the metric's name and labels are unchanged. Written here because neither
    vLLM nor prometheus_client bounds a gauge's label sets."""
    gauge = getattr(registry, "_names_to_collectors", {}).get(VLLM_LORA_INFO)
    if gauge is None or not hasattr(gauge, "clear"):
        return f"{VLLM_LORA_INFO}: not registered (vLLM without LoRA metrics), nothing to bound"
    labels = gauge.labels
    latest = []

    def labels_of_latest_only(*values, **named):
        key = (values, tuple(sorted(named.items())))
        if latest != [key]:
            gauge.clear()
            latest[:] = [key]
        return labels(*values, **named)

    gauge.labels = labels_of_latest_only
    return f"{VLLM_LORA_INFO}: only the latest running/waiting adapter set is kept"
