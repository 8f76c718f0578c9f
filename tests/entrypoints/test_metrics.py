"""/metrics: vLLM's metric names (lora_jax: prefix) count what the server did."""

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from helpers.peft import TinyShapes, make_adapter
from helpers.server import Throttle, scrape, value

from lora_jax.entrypoints.openai.server import build_app


def _metrics(server) -> dict:
    r = httpx.get(server[0] + "/metrics", timeout=30)
    assert r.status_code == 200
    return scrape(r.text)


def test_requests_tokens_and_latency_histograms_are_counted(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)
    before = _metrics(server)
    args = {"temperature": 0.0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(model="sql", prompt="hello", **args)
    chunks = list(client.completions.create(model="sql", prompt="abc", stream=True,
                                            stream_options={"include_usage": True}, **args))
    base = client.completions.create(model="tiny", prompt="x", n=2, **args)
    after = _metrics(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    P = "lora_jax:"
    assert delta(P + "request_success_total", model_name="sql", finished_reason="length") == 2
    assert delta(P + "request_success_total", model_name="tiny", finished_reason="length") == 2
    assert delta(P + "generation_tokens_total", model_name="sql") == 10
    assert delta(P + "generation_tokens_total", model_name="tiny") == 10
    assert delta(P + "prompt_tokens_total", model_name="sql") == (
        whole.usage.prompt_tokens + chunks[-1].usage.prompt_tokens)
    assert delta(P + "prompt_tokens_total", model_name="tiny") == base.usage.prompt_tokens
    assert delta(P + "time_to_first_token_seconds_count", model_name="sql") == 2
    assert delta(P + "inter_token_latency_seconds_count", model_name="sql") == 8  # 4 gaps each
    assert delta(P + "inter_token_latency_seconds_count", model_name="tiny") == 8  # per choice
    assert delta(P + "e2e_request_latency_seconds_count", model_name="sql") == 2
    assert delta(P + "e2e_request_latency_seconds_sum", model_name="sql") >= delta(
        P + "time_to_first_token_seconds_sum", model_name="sql") > 0
    assert value(after, P + "prefix_cache_queries_total") >= value(
        after, P + "prefix_cache_hits_total")


def test_gauges_follow_a_stream_and_a_disconnect_frees_its_blocks(server):
    llm, P = server[1], "lora_jax:"
    before = _metrics(server)
    throttle = Throttle()
    llm.observers.append(throttle)
    try:
        body = {"model": "sql", "prompt": "hello", "max_tokens": 50, "stream": True,
                "temperature": 0.0, "ignore_eos": True}
        with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")
            during = _metrics(server)
        deadline = time.monotonic() + 10
        while llm.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        llm.observers.remove(throttle)
    after = _metrics(server)
    assert value(during, P + "num_requests_running") == 1
    assert value(during, P + "kv_blocks_used") >= 1
    info = [labels for (name, labels), _ in during.items() if name == P + "lora_requests_info"]
    assert info == [(("max_lora", "1"), ("running_lora_adapters", "sql"),
                     ("waiting_lora_adapters", ""))]
    assert value(after, P + "kv_blocks_used") == 0 and value(after, P + "num_requests_running") == 0
    assert value(after, P + "request_success_total", model_name="sql",
                 finished_reason="abort") == value(
        before, P + "request_success_total", model_name="sql", finished_reason="abort") + 1
    info = [labels for (name, labels), _ in after.items() if name == P + "lora_requests_info"]
    assert info == [(("max_lora", "1"), ("running_lora_adapters", ""),
                     ("waiting_lora_adapters", ""))]


@pytest.fixture
def runtime_app(server, base_model, adapter_dir):
    root = Path(adapter_dir).parent
    if not (root / "other").exists():
        make_adapter(root / "other", seed=9, shapes=TinyShapes(2, 64, 32, 96))
    args = SimpleNamespace(model=base_model, served_model_name="tiny", lora_requests=[server[2]],
                           allow_runtime_lora_updating=True, lora_root=str(root))
    return TestClient(build_app(server[1], args))


def test_adapter_slot_swaps_are_counted(runtime_app):
    name = "lora_jax:lora_slot_loads_total"
    assert runtime_app.post("/v1/load_lora_adapter", json={
        "lora_name": "other", "lora_path": "other"}).status_code in (200, 400)
    before = value(scrape(runtime_app.get("/metrics").text), name)
    for model in ("other", "sql", "other"):  # one slot (max_loras=1): each request swaps
        r = runtime_app.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                      "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert value(scrape(runtime_app.get("/metrics").text), name) - before == 3
    assert runtime_app.post("/v1/unload_lora_adapter",
                            json={"lora_name": "other"}).status_code == 200


def test_adapter_tiers_loads_and_evictions_are_reported_and_unloaded_series_go(runtime_app):
    P = "lora_jax:"

    def complete(model):
        r = runtime_app.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                      "max_tokens": 2})
        assert r.status_code == 200, r.text

    complete("sql")  # sql in the one slot (max_loras=1)
    before = scrape(runtime_app.get("/metrics").text)
    assert runtime_app.post("/v1/load_lora_adapter", json={
        "lora_name": "other", "lora_path": "other"}).status_code == 200
    for model in ("other", "sql", "other"):  # each request swaps the slot
        complete(model)
    after = scrape(runtime_app.get("/metrics").text)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(P + "lora_loads_total") == 1  # other read once; both stay in host memory
    assert delta(P + "lora_load_seconds_count") == 1
    assert delta(P + "lora_evictions_total", tier="slot") == 3
    assert delta(P + "lora_evictions_total", tier="cpu") == 0
    assert value(after, P + "lora_adapter_tier", lora_name="other", tier="slot") == 1
    assert value(after, P + "lora_adapter_tier", lora_name="sql", tier="cpu") == 1
    assert value(after, P + "lora_adapters", tier="slot") == 1
    assert value(after, P + "lora_adapter_evictions_total", lora_name="sql") >= 1
    assert value(after, P + "lora_requests_waiting_on_load") == 0
    assert runtime_app.post("/v1/unload_lora_adapter",
                            json={"lora_name": "other"}).status_code == 200
    gone = scrape(runtime_app.get("/metrics").text)
    assert not [key for key in gone if ("lora_name", "other") in key[1]]
    assert value(gone, P + "lora_adapter_tier", lora_name="sql", tier="cpu") == 1
