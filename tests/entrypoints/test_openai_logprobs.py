"""Logprobs through the server, whole and streamed, equal LLM.generate's (OpenAI's shapes)."""

import asyncio

import openai
import pytest

from lora_jax import SamplingParams
from lora_jax.tokenizer import TextTokenizer

K = 3
ARGS = {"temperature": 0.0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def offline(reference):
    """Greedy outputs of LLM.generate with K logprobs, per (prompt, adapter)."""
    llm = reference
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=K)

    def run(prompt, lora=None):
        return llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0].outputs[0]
    return run


@pytest.fixture(scope="module")
def tok(base_model):
    return TextTokenizer(base_model, 1)


def _check_completion_logprobs(lp, ref, tok):
    assert lp["tokens"] == [tok.token_text(t) for t in ref.token_ids]
    assert lp["token_logprobs"] == pytest.approx(
        [step[t] for step, t in zip(ref.logprobs, ref.token_ids, strict=True)], abs=1e-5)
    for got, want in zip(lp["top_logprobs"], ref.logprobs, strict=True):
        assert got == pytest.approx({tok.token_text(i): v for i, v in want.items()}, abs=1e-5)
        assert len(got) >= K
    lengths = [len(t) for t in lp["tokens"]]
    assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


@pytest.mark.parametrize("model", ["tiny", "sql"])
def test_completion_logprobs_equal_offline(client, server, offline, tok, model):
    ref = offline("hello", server[2] if model == "sql" else None)
    got = client.completions.create(model=model, prompt="hello", logprobs=K, **ARGS)
    assert got.choices[0].text == ref.text
    _check_completion_logprobs(got.choices[0].logprobs.model_dump(), ref, tok)


def test_streamed_completion_logprobs_join_to_offline(client, server, offline, tok):
    ref = offline("abc", server[2])
    chunks = [c.choices[0] for c in client.completions.create(
        model="sql", prompt="abc", logprobs=K, stream=True, **ARGS) if c.choices]
    joined = {key: sum((c.logprobs.model_dump()[key] for c in chunks if c.logprobs), [])
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert len([c for c in chunks if c.logprobs and c.logprobs.tokens]) > 1  # really streamed
    _check_completion_logprobs(joined, ref, tok)


def _check_chat_content(content, ref, top):
    assert [e["logprob"] for e in content] == pytest.approx(
        [step[t] for step, t in zip(ref.logprobs, ref.token_ids, strict=True)], abs=1e-5)
    for entry, step in zip(content, ref.logprobs, strict=True):
        assert entry["bytes"] == list(entry["token"].encode())
        want = sorted(step.values(), reverse=True)[:top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(want, abs=1e-5)


def test_chat_logprobs_equal_offline_whole_and_streamed(client, server, offline, tok):
    messages = [{"role": "user", "content": "hi"}]
    prompt = "<s><user>hi</s>\n<assistant>"
    ref = offline(prompt, server[2])
    whole = client.chat.completions.create(model="sql", messages=messages, logprobs=True,
                                           top_logprobs=2, **ARGS)
    content = whole.choices[0].logprobs.model_dump()["content"]
    assert [e["token"] for e in content] == [tok.token_text(t) for t in ref.token_ids]
    _check_chat_content(content, ref, 2)
    streamed = [c.choices[0] for c in client.chat.completions.create(
        model="sql", messages=messages, logprobs=True, top_logprobs=2, stream=True, **ARGS)
        if c.choices]
    joined = sum((c.logprobs.model_dump()["content"] for c in streamed if c.logprobs), [])
    assert [e["token"] for e in joined] == [e["token"] for e in content]
    _check_chat_content(joined, ref, 2)


def test_chat_logprobs_without_top_logprobs_have_empty_alternatives(client):
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                         logprobs=True, **ARGS)
    content = got.choices[0].logprobs.content
    assert len(content) == 6 and all(e.top_logprobs == [] for e in content)


def test_top_logprobs_without_logprobs_is_400(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                       top_logprobs=2, **ARGS)


def test_logprobs_through_the_async_client(server, offline, tok):
    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="none",
                                      max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(aclient.completions.create(
                model="tiny", prompt=p, logprobs=K, **ARGS) for p in ("hello", "abc")))

    for got, prompt in zip(asyncio.run(main()), ("hello", "abc"), strict=True):
        _check_completion_logprobs(got.choices[0].logprobs.model_dump(), offline(prompt), tok)
