"""Prometheus metrics for `GET /metrics`: engine gauges read at scrape time, request histograms.

`ServerMetrics(engine_stats, server_stats)` owns its own registry (no process-global state);
`engine_stats()` returns `LLMEngine.stats()`-shaped dicts, `server_stats()` the admission
counts. Latencies are observed per finished request: TTFT, TPOT, end-to-end, encoder and
preprocessing seconds. `render()` gives the text exposition format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# TTFT, TPOT and end-to-end buckets (seconds) are vLLM's (v1 `vllm:*_seconds`), so one dashboard reads
# both servers; TPOT adds 1-5 ms buckets below vLLM's first (10 ms), where small models decode on CPU.
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)  # fmt: skip
# Encoder and preprocessing seconds per request: from CPU tiny-model runs to large videos.
_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


def _ratio(hits: float, total: float) -> float:
    return hits / total if total else 0.0


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's and the server's latest snapshots."""

    def __init__(self, engine_stats: Callable[[], dict], server_stats: Callable[[], dict]) -> None:
        self.engine_stats = engine_stats
        self.server_stats = server_stats

    def collect(self) -> Iterator[Metric]:
        e, s = self.engine_stats(), self.server_stats()
        gauges = {
            "num_requests_running": ("sequences the engine is running (have KV blocks)", e["running"]),
            "num_requests_waiting": ("sequences queued inside the engine's scheduler", e["waiting"]),
            "kv_cache_usage_ratio": ("fraction of KV blocks in use (0-1)", e["kv_usage"]),
            "kv_cache_blocks_used": ("KV blocks held by requests", e["kv_blocks_used"]),
            "kv_cache_blocks_total": ("KV blocks in the pool", e["kv_blocks_total"]),
            "prefix_cache_hit_rate": ("prefix-cache hits / queries, in tokens, since start",
                                      _ratio(e["prefix_cache_hits"], e["prefix_cache_queries"])),
            "encoder_cache_hit_rate": ("encoder-cache hits / lookups, in media items, since start",
                                       _ratio(e["encoder_cache_hits"], e["encoder_cache_lookups"])),
            "encoder_cache_bytes": ("bytes of vision embeddings held in the encoder cache", e["encoder_cache_bytes"]),
            "server_requests_in_flight": ("HTTP requests admitted (fetching, preprocessing or generating)",
                                          s["in_flight"]),
            "server_requests_queued": ("HTTP requests waiting for an admission slot", s["queued"]),
            "server_requests_preprocessing": ("HTTP requests whose media are being decoded and resized",
                                              s["preprocessing"]),
            "server_decoding_pixels": ("decoded pixels held at once by all requests (--max-decoding-pixels)",
                                       s["decoding_pixels"]),
            "server_requests_waiting_to_decode": ("requests waiting for room in --max-decoding-pixels",
                                                  s["decode_waiting"]),
            "server_decoding_pixels_peak": ("the most decoded pixels held at once since start (never above "
                                            "--max-decoding-pixels)", s["decoding_pixels_peak"]),
        }  # fmt: skip
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"glimpse_{name}", doc, value=float(value))
        counters = {
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", e["prefix_cache_queries"]),
            "prefix_cache_hits": ("prompt tokens found in the prefix cache", e["prefix_cache_hits"]),
            "encoder_cache_lookups": ("media items looked up in the encoder cache", e["encoder_cache_lookups"]),
            "encoder_cache_hits": ("media items found in the encoder cache", e["encoder_cache_hits"]),
            "server_requests_rejected_busy": ("requests refused with 429 (admission queue full)", s["rejected"]),
            "server_decoded_pixels": ("pixels reserved for decoding since start (one image, or one video frame "
                                      "at a time, each counted at its decoded size)", s["decoded_pixels"]),
        }  # fmt: skip
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"glimpse_{name}", doc, value=float(value))


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict], server_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("glimpse_time_to_first_token_seconds", "request received -> first output token",
                              buckets=_TTFT, registry=reg)  # fmt: skip
        self.tpot = Histogram("glimpse_time_per_output_token_seconds",
                              "(end-to-end - TTFT) / (output tokens - 1), per sequence", buckets=_TPOT,
                              registry=reg)  # fmt: skip
        self.e2e = Histogram("glimpse_e2e_request_latency_seconds", "request received -> last token",
                             buckets=_E2E, registry=reg)  # fmt: skip
        self.encoder = Histogram("glimpse_encoder_seconds", "vision-encoder time per request (0 on a cache hit)",
                                 buckets=_LATENCY, registry=reg)  # fmt: skip
        self.preprocess = Histogram("glimpse_preprocess_seconds", "media fetch + decode + resize + prompt expansion",
                                    buckets=_LATENCY, registry=reg)  # fmt: skip
        self.prompt_tokens = Counter("glimpse_prompt_tokens", "prompt tokens of finished requests", registry=reg)  # fmt: skip
        self.generation_tokens = Counter("glimpse_generation_tokens", "output tokens of finished requests",
                                         registry=reg)  # fmt: skip
        self.finished = Counter("glimpse_request_finished", "finished sequences by finish reason",
                                ["finish_reason"], registry=reg)  # fmt: skip
        self.aborted = Counter("glimpse_request_aborted", "requests aborted before finishing (client gone, timeout, error)",
                               registry=reg)  # fmt: skip
        self.errors = Counter("glimpse_request_errors", "requests answered with an error, by HTTP status",
                              ["status"], registry=reg)  # fmt: skip
        reg.register(_EngineCollector(engine_stats, server_stats))

    def observe_request(self, *, ttft: float | None, e2e: float, prompt_tokens: int, output_tokens: list[int],
                        finish_reasons: list[str | None], encoder_s: float, preprocess_s: float) -> None:  # fmt: skip
        """Record one finished request (its `n` sequences share the prompt and the TTFT)."""
        if ttft is not None:
            self.ttft.observe(ttft)
            for n in output_tokens:
                if n > 1:
                    self.tpot.observe((e2e - ttft) / (n - 1))
        self.e2e.observe(e2e)
        self.encoder.observe(encoder_s)
        self.preprocess.observe(preprocess_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(output_tokens))
        for reason in finish_reasons:
            self.finished.labels(finish_reason=reason or "none").inc()

    def observe_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
