"""`echo` on chat completions, as vLLM serves it: the reply starts with the last message's
content when that message has the reply's role; through the real server and the official openai
client, against LLM.generate for the generated part."""

import pytest

from lora_jax import SamplingParams
from lora_jax.entrypoints.openai.protocol import ChatRequest
from lora_jax.entrypoints.openai.serving_chat import ServingChat

USER = {"role": "user", "content": "hi"}
PARTIAL = {"role": "assistant", "content": "The ans"}


def _offline(reference, prompt: str, n: int = 1) -> list[str]:
    params = SamplingParams(temperature=0.9, seed=3, n=n, max_tokens=5, ignore_eos=True)
    return [c.text for c in reference.generate([prompt], params, use_tqdm=False)[0].outputs]


def _chat(client, messages, stream=False, n=1, **extra):
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0.9, seed=3, n=n,
        stream=stream, extra_body={"ignore_eos": True, "echo": True, **extra})


@pytest.mark.parametrize("messages, generation_prompt, echoed", [
    ([USER, PARTIAL], False, "The ans"),  # continuing the assistant's message
    ([USER, PARTIAL], True, "The ans"),  # the last message has the reply's role
    ([USER], True, ""),  # a user message is not the reply's
    ([USER], False, "hi"),  # without a generation prompt the reply continues the last role
])
def test_echo_puts_the_last_message_before_the_reply_when_roles_match(
        client, reference, messages, generation_prompt, echoed):
    prompt = "<s>" + "".join(f"<{m['role']}>{m['content']}</s>\n" for m in messages)
    prompt += "<assistant>" if generation_prompt else ""
    want = _offline(reference, prompt, n=2)
    got = _chat(client, messages, n=2, add_generation_prompt=generation_prompt)
    assert [c.message.content for c in got.choices] == [echoed + w for w in want]
    assert got.usage.completion_tokens == 10  # the echo is not generated


def test_streamed_echo_comes_first_once_per_choice(client, reference):
    texts = {0: "", 1: ""}
    for chunk in _chat(client, [USER, PARTIAL], stream=True, n=2, add_generation_prompt=False):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    want = _offline(reference, "<s><user>hi</s>\n<assistant>The ans</s>\n", n=2)
    assert [texts[0], texts[1]] == ["The ans" + w for w in want]


def test_echo_joins_the_text_parts_of_a_list_content():
    # The test template would render the list itself (too long for the tiny model): the echo
    # alone, as the server computes it.
    parts = {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                              {"type": "image_url", "image_url": {"url": "x"}},
                                              {"type": "text", "text": "b"}]}
    req = ChatRequest(model="tiny", messages=[USER, parts], echo=True)
    assert ServingChat.echo(req) == "a\nb"
    assert ServingChat.echo(req.model_copy(update={"echo": False})) == ""
