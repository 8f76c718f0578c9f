"""/tokenize, /detokenize, /metrics and runtime adapter loading behind --lora-root."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.peft import TinyShapes, make_adapter
from helpers.server import Throttle, serve_in_thread

from lora_jax.entrypoints.openai.server import build_app


@pytest.fixture
def app(server, base_model, adapter_dir):
    args = SimpleNamespace(model=base_model, served_model_name="tiny",
                           allow_runtime_lora_updating=True,
                           lora_root=str(Path(adapter_dir).parent))
    return TestClient(build_app(server[1], args))


def test_tokenize_round_trips(app):
    ids = app.post("/tokenize", json={"prompt": "hello"}).json()["tokens"]
    assert len(ids) >= 5
    assert "hello" in app.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def test_runtime_load_serves_the_adapter_and_unload_removes_it(app, adapter_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Path(adapter_dir).parent / "sneaky"
    os.symlink(outside, link)
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(link)})
    assert r.status_code == 403 and "outside --lora-root" in r.json()["error"]["message"]
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "org/repo"})
    assert r.status_code == 400 and "--allow-hub-adapters" in r.json()["error"]["message"]
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": adapter_dir})
    assert r.status_code == 200
    assert "rt" in [m["id"] for m in app.get("/v1/models").json()["data"]]
    body = {"model": "rt", "prompt": "hello", "max_tokens": 3, "temperature": 0}
    assert app.post("/v1/completions", json=body).status_code == 200
    assert app.post("/v1/unload_lora_adapter", json={"lora_name": "rt"}).status_code == 200
    assert app.post("/v1/completions", json=body).status_code == 404
    assert "lora_jax_http_requests_total" in app.get("/metrics").text


def test_unloading_an_adapter_lets_its_running_request_finish(server, base_model, adapter_dir):
    llm = server[1]
    args = SimpleNamespace(model=base_model, served_model_name="tiny",
                           lora_requests=[server[2]], allow_runtime_lora_updating=True,
                           lora_root=str(Path(adapter_dir).parent))
    with serve_in_thread(llm, args) as url:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "busy",
                                                            "lora_path": "sql"}, timeout=30)
        assert r.status_code == 200
        throttle = Throttle()
        llm.observers.append(throttle)
        try:
            body = {"model": "busy", "prompt": "hello", "max_tokens": 20, "stream": True,
                    "temperature": 0.0, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
                lines = s.iter_lines()
                assert next(lines).startswith("data: ")
                r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "busy"},
                               timeout=30)
                assert r.status_code == 200
                rest = [line for line in lines if line.startswith("data: {")]
        finally:
            llm.observers.remove(throttle)
        assert json.loads(rest[-1][6:])["choices"][0]["finish_reason"] == "length"
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 404


def test_health_is_503_once_the_engine_loop_has_stopped(base_model):
    from lora_jax.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_options(base_model, max_num_seqs=2)
    app = TestClient(build_app(llm, SimpleNamespace(model=base_model)))
    assert app.get("/health").status_code == 200
    llm.shutdown()
    r = app.get("/health")
    assert r.status_code == 503 and "engine" in r.json()["error"]


def test_load_inplace_replaces_an_adapters_weights_under_its_name(app, adapter_dir):
    other = make_adapter(Path(adapter_dir).parent / "other", seed=11,
                         shapes=TinyShapes(2, 64, 32, 96))
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": adapter_dir})
    assert r.status_code == 200
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(other)})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(
        Path(adapter_dir).parent / "missing"), "load_inplace": True})
    assert r.status_code == 404
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(other),
                                                  "load_inplace": True})
    assert r.status_code == 200
    r = app.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(other)})
    assert r.status_code == 200

    def complete(model):
        body = {"model": model, "prompt": "hello", "max_tokens": 6, "temperature": 0,
                "logprobs": 1}
        choice = app.post("/v1/completions", json=body).json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    (text, logprobs), (want_text, want_logprobs) = complete("swap"), complete("fresh")
    assert text == want_text
    assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
    for name in ("swap", "fresh"):
        assert app.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_a_runtime_load_reads_its_files_while_the_engine_serves_other_requests(
        server, base_model, adapter_dir):
    """The load's read is held until the test lets it go: a completion on the base model
    is answered meanwhile, so the engine thread is not the one reading."""
    llm = server[1]
    manager = llm.engine.adapters
    plain, gate, reading = manager.reader, threading.Event(), threading.Event()

    def held_reader(req):
        if req.lora_name == "held":
            reading.set()
            if not gate.wait(60):
                raise TimeoutError("the test never let the read go")
        return plain(req)

    args = SimpleNamespace(model=base_model, served_model_name="tiny",
                           allow_runtime_lora_updating=True,
                           lora_root=str(Path(adapter_dir).parent))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0.0}
    manager.reader = held_reader
    try:
        with serve_in_thread(llm, args) as url, ThreadPoolExecutor(1) as pool:
            load = pool.submit(httpx.post, url + "/v1/load_lora_adapter",
                               json={"lora_name": "held", "lora_path": "sql"}, timeout=90)
            assert reading.wait(30)
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"]
            assert not load.done()
            gate.set()
            assert load.result().status_code == 200, load.result().text
            r = httpx.post(url + "/v1/completions", json={**body, "model": "held"}, timeout=30)
            assert r.status_code == 200
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "held"},
                           timeout=30)
            assert r.status_code == 200
    finally:
        manager.reader = plain
        gate.set()
