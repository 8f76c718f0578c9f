"""n > 1 streamed (chunks per choice join to LLM.generate's n outputs, same seed), and chat
templates: the tokenizer's bos/eos strings, add_generation_prompt, --chat-template."""

import asyncio
import json
from collections import defaultdict

import openai

from lora_jax import SamplingParams
from lora_jax.entrypoints.openai.serving_chat import load_chat_template, special_tokens
from lora_jax.tokenizer import TextTokenizer
from lora_jax.tools.tiny import char_tokenizer

SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 7, "n": 3}


def _offline(llm, prompt, lora=None, **kw):
    params = SamplingParams(ignore_eos=True, **{**SEEDED, **kw})
    return [c.text for c in llm.generate([prompt], params, lora_request=lora,
                                         use_tqdm=False)[0].outputs]


def test_n_streamed_completions_join_per_choice_to_offline(client, server, reference):
    texts = defaultdict(str)
    finished = {}
    for chunk in client.completions.create(model="sql", prompt="hello", stream=True,
                                           extra_body={"ignore_eos": True}, **SEEDED):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    want = _offline(reference, "hello", server[2])
    assert [texts[i] for i in range(3)] == want
    assert len(set(want)) > 1  # the three samples differ, so the indices matter
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_n_streamed_chat_through_the_async_client_joins_to_offline(server, reference):
    messages = [{"role": "user", "content": "abc"}]

    async def main():
        async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="none",
                                      max_retries=0, timeout=60) as aclient:
            texts = defaultdict(str)
            stream = await aclient.chat.completions.create(
                model="tiny", messages=messages, stream=True, extra_body={"ignore_eos": True},
                **SEEDED)
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
            return [texts[i] for i in range(3)]

    assert asyncio.run(main()) == _offline(reference, "<s><user>abc</s>\n<assistant>")


def test_template_gets_the_tokenizers_bos_and_eos_strings(base_model, tmp_path):
    tok = TextTokenizer(base_model, 1)
    assert special_tokens(base_model, tok, 1, 2) == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>"}))
    assert special_tokens(str(tmp_path), tok, 1, [2, 5]) == {
        "bos_token": "<|begin|>", "eos_token": "<|end|>"}


def test_chat_prompt_carries_one_bos_from_the_template(client):
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                  "content": "hi"}],
                                         max_tokens=2, temperature=0.0)
    ids = char_tokenizer().encode("<s><user>hi</s>\n<assistant>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert got.usage.prompt_tokens == len(ids)  # bos from the template, none added twice


def test_add_generation_prompt_false_leaves_the_assistant_tag_out(client, reference):
    messages = [{"role": "user", "content": "hi"}]
    got = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0.0,
        extra_body={"add_generation_prompt": False, "ignore_eos": True})
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = reference.generate(["<s><user>hi</s>\n"], params, use_tqdm=False)[0].outputs[0]
    assert got.choices[0].message.content == want.text


def test_chat_template_option_takes_a_file_or_the_template_itself(tmp_path, base_model):
    file = tmp_path / "t.jinja"
    file.write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_chat_template(base_model, str(file)) == file.read_text()
    assert load_chat_template(base_model, "{{ messages }}") == "{{ messages }}"
    assert load_chat_template(base_model) is None
