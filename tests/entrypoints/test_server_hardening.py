"""Issue 23: the server holds against bad clients. Each numbered case of the issue, with its
exact request, through the real server (uvicorn on 127.0.0.1) with --api-key,
--allow-runtime-lora-updating and --lora-root: a 4xx JSON error in OpenAI's shape (or the right
output), and afterwards the server is healthy: a greedy completion recorded at start is
unchanged."""

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from helpers.peft import TinyShapes, make_adapter
from helpers.server import scrape, serve_in_thread

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_N = 8
MAX_REQUEST_BYTES = 1 << 20
GREEDY = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0.0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("hardening")
    make_adapter(top / "root" / "good", seed=5, shapes=TinyShapes(2, 64, 32, 96))
    make_adapter(top / "outside", seed=6, shapes=TinyShapes(2, 64, 32, 96))
    return top / "root"


@pytest.fixture(scope="module")
def hard(server, base_model, root):
    """(url, http client with the key, greedy text recorded at start)."""
    args = SimpleNamespace(model=base_model, served_model_name="tiny",
                           lora_requests=[server[2]], api_key=KEY,
                           allow_runtime_lora_updating=True, lora_root=str(root),
                           max_n=MAX_N, max_request_bytes=MAX_REQUEST_BYTES)
    with serve_in_thread(server[1], args) as url, httpx.Client(
            base_url=url, headers=AUTH, timeout=60) as http:
        r = http.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200, r.text
        yield url, http, r.json()["choices"][0]["text"]


@pytest.fixture(autouse=True)
def stays_healthy(hard):
    yield
    url, http, greedy = hard
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy


def error(r: httpx.Response, status: int, param: str | None = None) -> str:
    """The error message of an OpenAI-shaped error body with this status (and param)."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    if param is not None:
        assert body["param"] == param, body
    return body["message"]


def complete(hard, **body) -> httpx.Response:
    return hard[1].post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                  "max_tokens": 3, **body})


# Case 1: n = 2**40 hung the server.

def test_1_n_above_max_n_is_400(hard):
    r = hard[1].post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                              "n": 1099511627776})
    assert "--max-n" in error(r, 400, "n")
    r = complete(hard, prompt=["a", "b", "c"], n=3)  # 9 choices in all
    assert "9 choices" in error(r, 400, "n")
    r = complete(hard, prompt=["a", "b"], n=MAX_N // 2)
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N


# Case 2: a 50 MB prompt stalled everyone.

def test_2_a_body_over_the_limit_is_413_before_it_is_parsed(hard):
    big = {"model": "tiny", "prompt": "x" * (50 << 20)}
    for path in ("/v1/completions", "/tokenize"):
        start = time.monotonic()
        r = hard[1].post(path, json=big)
        assert "--max-request-bytes" in error(r, 413)
        assert time.monotonic() - start < 30
    # A chunked body (no Content-Length) is cut off at the limit too.
    chunks = (b'{"prompt": "' + b"x" * (256 << 10) for _ in range(8))
    r = hard[1].post("/tokenize", content=chunks, headers={"content-type": "application/json"})
    error(r, 413)


def test_2_tokenizing_a_long_prompt_does_not_stall_a_completion(hard):
    url, http, greedy = hard
    prompt = "abcdefgh" * ((MAX_REQUEST_BYTES - 1000) // 8)
    done: dict[str, float] = {}

    def big():
        r = httpx.post(url + "/tokenize", json={"prompt": prompt}, headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["count"] == len(prompt) + 1
        done["big"] = time.monotonic()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)  # the big request is being tokenized
    r = http.post("/v1/completions", json=GREEDY)
    done["small"] = time.monotonic()
    thread.join(timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    assert done["small"] < done["big"]


# Case 3: every request path became a permanent /metrics label.

def test_3_metrics_labels_are_route_templates(hard):
    url, http, _ = hard
    http.get("/metrics")
    for i in range(30):
        httpx.get(f"{url}/junk/{i}")  # 401: no key
        http.get(f"/junk/{i}")  # 404
    http.get("/v1/models%00")
    first = http.get("/metrics").text
    for i in range(30, 60):
        httpx.get(f"{url}/junk/{i}")
        http.get(f"/junk/{i}")
    second = http.get("/metrics").text
    assert "\x00" not in second and "junk" not in second
    paths = {dict(labels)["path"] for (name, labels) in scrape(second)
             if name == "lora_jax_http_requests_total"}
    assert {"/v1/completions", "/health", "unknown"} <= paths
    assert paths <= {"unknown", "/health", "/version", "/metrics", "/v1/models",
                     "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                     "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    assert set(scrape(first)) >= {k for k in scrape(second) if "http_requests" in k[0]}


# Case 4: top_k of 2**31 or more gave a 500.

@pytest.mark.parametrize("top_k", [2**31, 2**63, -2])
def test_4_top_k_out_of_range_is_400(hard, top_k):
    error(complete(hard, top_k=top_k), 400, "top_k")


def test_4_the_largest_top_k_samples(hard):
    r = complete(hard, top_k=2**31 - 1, temperature=0.0, ignore_eos=True, prompt="hello",
                 max_tokens=8)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == hard[2]


# Case 5: /detokenize with [-1] or [2**63] gave a 500 and reset the connection.

@pytest.mark.parametrize("tokens", [[-1], [2**63], [128], [True]])
def test_5_detokenize_out_of_vocabulary_is_400(hard, tokens):
    http = hard[1]
    error(http.post("/detokenize", json={"tokens": tokens}), 400, "tokens")
    ids = http.post("/tokenize", json={"prompt": "he"}).json()["tokens"]  # same connection
    r = http.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "he"}


# Case 6: adapters whose files are symlinks out of the root loaded.

def test_6_symlinked_files_out_of_the_root_are_refused(hard, root):
    outside = root.parent / "outside"
    linked = root / "linked"
    linked.mkdir(exist_ok=True)
    for f in outside.iterdir():
        if not (linked / f.name).exists():
            os.symlink(f, linked / f.name)
    r = hard[1].post("/v1/load_lora_adapter", json={"lora_name": "l1", "lora_path": "linked"})
    assert "outside --lora-root" in error(r, 403, "lora_path")
    config = root / "config_link"
    config.mkdir(exist_ok=True)
    secret = root.parent / "secret.json"
    secret.write_text('{"r": 4}')
    if not (config / "adapter_config.json").exists():
        os.symlink(secret, config / "adapter_config.json")
    r = hard[1].post("/v1/load_lora_adapter", json={"lora_name": "l2",
                                                     "lora_path": "config_link"})
    assert "outside --lora-root" in error(r, 403, "lora_path")
    odd = root / "odd"
    (odd / "adapter_config.json").mkdir(parents=True, exist_ok=True)
    r = hard[1].post("/v1/load_lora_adapter", json={"lora_name": "l3", "lora_path": "odd"})
    assert "not a regular file" in error(r, 400, "lora_path")
    models = [m["id"] for m in hard[1].get("/v1/models").json()["data"]]
    assert not {"l1", "l2", "l3"} & set(models)


# Case 7: fields accepted and silently ignored.

@pytest.mark.parametrize("body, param", [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1000": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 2**70}, "min_tokens"),
    ({"min_tokens": 4, "max_tokens": 3}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [[5], []]}, "prompt"),
    ({"prompt": [2**70]}, "prompt"),
    ({"n": True}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"logprobs": 21}, "logprobs"),
])
def test_7_unsupported_or_bad_fields_are_400_naming_the_field(hard, body, param):
    error(complete(hard, **body), 400, param)


def test_7_no_op_values_of_unimplemented_fields_are_accepted(hard):
    r = complete(hard, best_of=1, response_format={"type": "text"}, tools=[],
                 tool_choice="none", suffix="", logit_bias={}, min_tokens=0)
    assert r.status_code == 200, r.text


def test_7_echo_puts_the_prompt_before_the_output(hard):
    url, http, greedy = hard
    r = http.post("/v1/completions", json={**GREEDY, "echo": True})
    assert r.json()["choices"][0]["text"] == "hello" + greedy
    ids = http.post("/tokenize", json={"prompt": "hello"}).json()["tokens"]
    r = http.post("/v1/completions", json={**GREEDY, "prompt": ids, "echo": True})
    assert r.json()["choices"][0]["text"] == "hello" + greedy
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    chunks = client.completions.create(model="tiny", prompt="hello", max_tokens=8,
                                       temperature=0.0, echo=True, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == "hello" + greedy


def test_7_tokenize_with_an_unknown_model_is_404_listing_the_served_ones(hard):
    message = error(hard[1].post("/tokenize", json={"prompt": "hi", "model": "nope"}), 404,
                    "model")
    assert "'nope'" in message and "'tiny'" in message and "'sql'" in message
    assert hard[1].post("/tokenize", json={"prompt": "hi", "model": "sql"}).status_code == 200


def test_unknown_model_404_lists_the_served_models(hard):
    client = openai.OpenAI(base_url=hard[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="Served: 'tiny', 'sql'"):
        client.completions.create(model="nope", prompt="hello", max_tokens=2)


# Case 9: heavy endpoints needed no key.

@pytest.mark.parametrize("method, path", [
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/docs"), ("GET", "/redoc"),
    ("GET", "/openapi.json"), ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"), ("GET", "/nowhere")])
def test_9_every_route_but_health_version_metrics_needs_the_key(hard, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.request(method, hard[0] + path, json={"prompt": "hi", "tokens": [5]},
                          headers=headers)
        error(r, 401)


def test_9_health_version_metrics_are_open(hard):
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(hard[0] + path).status_code == 200
    assert hard[1].get("/docs").status_code == 200


# Case 10: adapter names were unrestricted.

@pytest.mark.parametrize("name", ["a\x00b", "a\nb", "\u202eabc", "../x", "x" * 10_000, "",
                                  "a b", "a/b"])
def test_10_unsafe_adapter_names_are_400_naming_the_rule(hard, name):
    r = hard[1].post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "good"})
    assert "A-Z a-z 0-9 . _ : -" in error(r, 400, "lora_name")


def test_10_a_safe_name_loads_and_unloads(hard):
    name = "Team-1.sql_v2:prod"
    r = hard[1].post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "good"})
    assert r.status_code == 200, r.text
    r = hard[1].post("/v1/completions", json={**GREEDY, "model": name})
    assert r.status_code == 200
    assert hard[1].post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    metrics = hard[1].get("/metrics").text
    assert name not in metrics  # its series went with it


# logit_bias and min_tokens as vLLM applies them, inside the compiled step.

def _first_token(hard, text: str) -> int:
    return hard[1].post("/tokenize", json={"prompt": text}).json()["tokens"][-1]


def test_logit_bias_of_100_makes_greedy_pick_the_token(hard):
    target = "z" if not hard[2].startswith("z") else "q"
    r = hard[1].post("/v1/completions", json={
        **GREEDY, "logit_bias": {str(_first_token(hard, target)): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == target * GREEDY["max_tokens"]
    r = hard[1].post("/v1/completions", json={
        **GREEDY, "logit_bias": {str(_first_token(hard, hard[2][0])): -100}})
    assert r.status_code == 200 and not r.json()["choices"][0]["text"].startswith(hard[2][0])


def test_min_tokens_holds_off_stop_tokens_and_eos(hard):
    stop = _first_token(hard, hard[2][0])  # greedy's first token
    body = {**GREEDY, "stop_token_ids": [stop], "max_tokens": 6}
    r = hard[1].post("/v1/completions", json=body)
    assert r.json()["usage"]["completion_tokens"] == 1  # stopped at once without min_tokens
    r = hard[1].post("/v1/completions", json={**body, "min_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 3
    eos = {**GREEDY, "ignore_eos": False, "logit_bias": {"2": 100}, "min_tokens": 4}
    r = hard[1].post("/v1/completions", json=eos)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "stop"
