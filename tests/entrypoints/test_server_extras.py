"""/tokenize, /detokenize, /metrics and runtime adapter loading behind --lora-root."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

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
