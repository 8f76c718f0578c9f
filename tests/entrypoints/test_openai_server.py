"""The OpenAI-compatible server through the official openai client."""

import httpx
import openai
import pytest
from helpers.server import TEMPLATE

from lora_jax import SamplingParams
from lora_jax.entrypoints.openai.protocol import ChatRequest
from lora_jax.entrypoints.openai.serving_chat import ServingChat

GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


def _ref(llm, prompt, lora=None):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0].outputs[0].text


def test_models_lists_the_base_and_the_adapter(client, base_model, server):
    base, sql = client.models.list().data
    assert (base.id, base.root, base.parent, base.max_model_len) == ("tiny", base_model, None, 64)
    assert (sql.id, sql.root, sql.parent) == ("sql", server[2].lora_path, "tiny")


@pytest.mark.parametrize("model", ["tiny", "sql"])
def test_completion_equals_offline_greedy(client, server, reference, model):
    lora = server[2] if model == "sql" else None
    got = client.completions.create(model=model, prompt="hello", **GREEDY)
    assert got.choices[0].text == _ref(reference, "hello", lora)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 8


def test_adapter_changes_the_output(client):
    base = client.completions.create(model="tiny", prompt="hello", **GREEDY).choices[0].text
    sql = client.completions.create(model="sql", prompt="hello", **GREEDY).choices[0].text
    assert base != sql


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    whole = client.completions.create(model="sql", prompt="abc", **GREEDY).choices[0].text
    chunks = list(client.completions.create(model="sql", prompt="abc", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_equals_offline_greedy_on_the_rendered_template(client, server, reference):
    messages = [{"role": "user", "content": "hi"}]
    got = client.chat.completions.create(model="sql", messages=messages, **GREEDY)
    prompt = ServingChat(None, None, TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}).render(
        ChatRequest(model="sql", messages=messages))
    assert prompt == "<s><user>hi</s>\n<assistant>"
    assert got.choices[0].message.content == _ref(reference, prompt, server[2])
    streamed = client.chat.completions.create(model="sql", messages=messages, stream=True,
                                              **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
        got.choices[0].message.content


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist."):
        client.completions.create(model="nope", prompt="hello", max_tokens=2)


@pytest.mark.parametrize("kw, word", [({"prompt": "x" * 500}, "prompt"),
                                      ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
                                      ({"prompt": "hi", "temperature": -1}, "temperature")])
def test_bad_parameters_are_400_with_openai_error_body(server, kw, word):
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", **kw}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert word in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_aborts_the_request(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    llm = server[1]
    deadline = __import__("time").monotonic() + 10
    while llm.has_unfinished_requests() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert not llm.has_unfinished_requests()


def test_api_key_guards_v1_routes_only(server, base_model):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from lora_jax.entrypoints.openai.server import build_app

    args = SimpleNamespace(model=base_model, served_model_name="tiny", api_key="k3y")
    app = TestClient(build_app(server[1], args))
    r = app.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert app.get("/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert app.get("/health").status_code == 200


def test_chat_without_a_template_is_400_saying_so(server, base_model):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from lora_jax.entrypoints.openai.server import build_app

    app = TestClient(build_app(server[1], SimpleNamespace(model=base_model)))
    r = app.post("/v1/chat/completions", json={"model": base_model,
                                               "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
