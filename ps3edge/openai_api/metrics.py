"""The server's Prometheus metrics, in a registry of its own (GET /metrics): requests by route
and status, latency, time to first token, queue depth and wait, vision batch sizes, tokens."""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def import_prometheus():
    from . import require_extra

    require_extra()
    import prometheus_client

    return prometheus_client


@dataclass
class Metrics:
    registry: object
    requests: object              # counter: route, status
    latency: object               # histogram: route; until the response's last byte
    first_token: object           # histogram: admission -> first piece of text
    queue_wait: object            # histogram: admission -> its vision batch starts
    queue_depth: object           # gauge: admitted, waiting for a vision batch
    in_flight: object             # gauge: admitted, not yet answered
    batch_size: object            # histogram: requests in one vision batch
    vision_seconds: object        # histogram: one vision batch (low-res, top-down prompts, selector, high-res)
    generation_seconds: object    # histogram: one request's projector + prefill + decode
    prompt_tokens: object         # counter
    completion_tokens: object     # counter

    def render(self) -> tuple[bytes, str]:
        prometheus = import_prometheus()
        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST


def make_metrics(max_batch: int) -> Metrics:
    p = import_prometheus()
    r = p.CollectorRegistry()
    prefix = "ps3edge_openai_"
    sizes = tuple(sorted({1, 2, 4, 8, 16, 32, max_batch}))
    return Metrics(
        registry=r,
        requests=p.Counter(prefix + "requests", "HTTP requests answered, by route and status", ["route", "status"],
                           registry=r),
        latency=p.Histogram(prefix + "request_seconds", "Time from a request's arrival to its response's last byte",
                            ["route"], buckets=LATENCY_BUCKETS, registry=r),
        first_token=p.Histogram(prefix + "time_to_first_token_seconds", "Admission to the first piece of the answer",
                                buckets=LATENCY_BUCKETS, registry=r),
        queue_wait=p.Histogram(prefix + "queue_wait_seconds", "Admission to the start of the request's vision batch",
                               buckets=LATENCY_BUCKETS, registry=r),
        queue_depth=p.Gauge(prefix + "queue_depth", "Requests admitted and waiting for a vision batch", registry=r),
        in_flight=p.Gauge(prefix + "requests_in_flight", "Requests admitted and not yet answered", registry=r),
        batch_size=p.Histogram(prefix + "vision_batch_size", "Requests in one vision batch", buckets=sizes, registry=r),
        vision_seconds=p.Histogram(prefix + "vision_batch_seconds", "One vision batch: low-res, top-down prompts, "
                                   "selector, high-res", buckets=LATENCY_BUCKETS, registry=r),
        generation_seconds=p.Histogram(prefix + "generation_seconds", "One request's projector, prefill and decode",
                                       buckets=LATENCY_BUCKETS, registry=r),
        prompt_tokens=p.Counter(prefix + "prompt_tokens", "Prompt tokens (text and image) of answered requests",
                                registry=r),
        completion_tokens=p.Counter(prefix + "completion_tokens", "Generated tokens of answered requests", registry=r),
    )
