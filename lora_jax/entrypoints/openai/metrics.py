"""GET /metrics: vLLM's metric names under a `lora_jax:` prefix, in Prometheus format.

Per-request figures (requests by finish reason, tokens, time to first token, inter-token and
end-to-end latency) are observed in the engine thread as each step's outputs come out
(AsyncLLM observers); gauges (running and waiting requests and adapters, KV blocks, prefix
cache, slot loads) are read from the engine's stats when Prometheus scrapes.

Label values stay bounded: per-model series of an unloaded adapter are removed (once its last
request is done), and HTTP requests are counted by route template, never by raw path.
"""

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.serving_models import ServingModels
from lora_jax.outputs import RequestOutput

P = "lora_jax:"
router = APIRouter()


@router.get("/metrics")
async def metrics(raw: Request):
    # Reading the engine's gauges waits for the step in progress: off the event loop.
    text = await asyncio.to_thread(generate_latest, raw.app.state.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)

# vLLM's buckets, cut to the range a CPU or one accelerator sees.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0)


@dataclass
class _Live:
    """What the metrics remember of a running request."""

    model: str
    arrival: float
    last_token: dict[int, float] = field(default_factory=dict)  # choice index -> time
    done: set[int] = field(default_factory=set)  # choice indices finished


class ServerMetrics:
    """The server's Prometheus registry; registered as an observer of the AsyncLLM."""

    def __init__(self, llm: AsyncLLM, models: ServingModels):
        self.llm, self.models = llm, models
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.success = Counter(P + "request_success", "Finished requests (one per choice), "
                               "by finish reason", [*labels, "finished_reason"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", labels,
                                         registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between two tokens of "
                             "one choice", labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token",
                             labels, buckets=E2E_BUCKETS, registry=r)
        self.http_requests = Counter("lora_jax_http_requests", "HTTP requests served, by "
                                     "route template", ["path", "status"], registry=r)
        r.register(_EngineGauges(self))
        self._live: dict[str, _Live] = {}
        llm.observers.append(self)

    def _per_model(self):
        return (self.success, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl,
                self.e2e)

    def forget_model(self, model: str) -> None:
        """Remove an unloaded adapter's series (they come back if a request still running
        for it reports; that request's end removes them again)."""
        for metric in self._per_model():
            metric.remove_by_labels({"model_name": model})

    def _served(self, model: str) -> bool:
        return model == self.models.base_name or model in self.models.loras

    def model_of(self, out: RequestOutput) -> str:
        return out.lora_request.lora_name if out.lora_request else self.models.base_name

    def on_step(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:  # its first report: the prompt was computed
                arrival = out.metrics.arrival_time if out.metrics else now
                live = self._live[out.request_id] = _Live(self.model_of(out), arrival)
                self.prompt_tokens.labels(live.model).inc(len(out.prompt_token_ids))
                if out.metrics and out.metrics.first_token_time is not None:
                    self.ttft.labels(live.model).observe(out.metrics.first_token_time - arrival)
            if out.error:
                self.success.labels(live.model, "error").inc()
            for c in out.outputs:
                if c.token_ids:
                    self.generation_tokens.labels(live.model).inc(len(c.token_ids))
                    last = live.last_token.get(c.index)
                    if last is not None:
                        self.itl.labels(live.model).observe(now - last)
                    live.last_token[c.index] = now
                if c.finish_reason is not None and c.index not in live.done:
                    live.done.add(c.index)
                    self.success.labels(live.model, c.finish_reason).inc()
            if out.finished:
                self.e2e.labels(live.model).observe(now - live.arrival)
                del self._live[out.request_id]
                if not self._served(live.model):
                    self.forget_model(live.model)

    def on_abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            self.success.labels(live.model, "abort").inc()
            if not self._served(live.model):
                self.forget_model(live.model)


class _EngineGauges(Collector):
    """Read at scrape time from AsyncLLM.stats()."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def _names(self, ids: list[int]) -> str:
        by_id = {lr.lora_int_id: name for name, lr in list(self.metrics.models.loras.items())}
        return ",".join(by_id.get(i, str(i)) for i in ids)

    def collect(self):
        s = self.metrics.llm.stats()

        def gauge(name, doc, value):
            return GaugeMetricFamily(P + name, doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(P + name, doc, value=value)

        yield gauge("num_requests_running", "Sequences running in the engine",
                    s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to start", s.num_waiting)
        info = GaugeMetricFamily(P + "lora_requests_info", "Adapters of running and waiting "
                                 "requests (value: the time of this reading)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters",
                                         "max_lora"])
        info.add_metric([self._names(s.running_adapters), self._names(s.waiting_adapters),
                         str(s.max_loras)], time.time())
        yield info
        yield gauge("kv_blocks_used", "KV cache blocks held by requests", s.kv_blocks_used)
        yield gauge("kv_blocks_total", "KV cache blocks in the pool", s.kv_blocks_total)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)",
                    s.kv_blocks_used / max(1, s.kv_blocks_total))
        yield counter("prefix_cache_queries", "Prompt blocks looked up in the prefix cache",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt blocks found in the prefix cache",
                      s.prefix_cache_hits)
        yield gauge("prefix_cache_hit_rate", "Prefix cache hits over queries, since start",
                    s.prefix_cache_hits / max(1, s.prefix_cache_queries))
        yield counter("num_preemptions", "Sequences preempted (recomputed later)",
                      s.num_preemptions)
        yield counter("lora_slot_loads", "Adapters written into a device slot (swaps)",
                      s.adapter_slot_loads)
        served = {lr.lora_int_id: n for n, lr in list(self.metrics.models.loras.items())}
        yield from _adapter_families(s, lambda a: served.get(a.lora_int_id, a.name))


def _adapter_families(s, name_of):
    """The adapter tiers: totals, load seconds, and one series per adapter in a slot, in host
    memory or loading (an adapter back on disk only has none: the label count stays bounded
    by max_cpu_loras and the loads under way)."""
    yield CounterMetricFamily(P + "lora_loads", "Adapters read from disk", s.adapter_loads)
    yield CounterMetricFamily(P + "lora_load_failures", "Adapter reads that failed",
                              s.adapter_load_failures)
    evictions = CounterMetricFamily(P + "lora_evictions", "Adapters evicted from a tier",
                                    labels=["tier"])
    for tier, count in sorted(s.adapter_evictions.items()):
        evictions.add_metric([tier], count)
    yield evictions
    yield HistogramMetricFamily(P + "lora_load_seconds", "Seconds to read an adapter",
                                buckets=s.adapter_load_seconds or [("+Inf", 0)],
                                sum_value=s.adapter_load_seconds_sum)
    yield GaugeMetricFamily(P + "lora_requests_waiting_on_load", "Requests waiting for their "
                            "adapter to load", value=s.requests_waiting_on_load)
    tiers = GaugeMetricFamily(P + "lora_adapters", "Adapters by tier (disk: known, not loaded)",
                              labels=["tier"])
    for tier, count in sorted(s.adapters_by_tier.items()):
        tiers.add_metric([tier], count)
    yield tiers
    where = GaugeMetricFamily(P + "lora_adapter_tier", "Where an adapter is (value 1)",
                              labels=["lora_name", "tier"])
    loads = CounterMetricFamily(P + "lora_adapter_loads", "Reads of this adapter from disk",
                                labels=["lora_name"])
    evicted = CounterMetricFamily(P + "lora_adapter_evictions", "Evictions of this adapter",
                                  labels=["lora_name"])
    waiting = GaugeMetricFamily(P + "lora_adapter_waiting_requests", "Requests waiting for "
                                "this adapter (to load, or for a slot)", labels=["lora_name"])
    for a in s.adapters:
        name = name_of(a)
        where.add_metric([name, a.tier], 1)
        loads.add_metric([name], a.loads)
        evicted.add_metric([name], a.evictions)
        waiting.add_metric([name], a.waiting_requests)
    yield from (where, loads, evicted, waiting)
