"""The model families' published chat templates through the server's chat path, equal to what
transformers' apply_chat_template writes.

tests/fixtures/chat_templates/<family>.jinja are the templates of Mistral-7B-Instruct-v0.3,
Qwen2.5-Instruct, Qwen3, gemma-2-2b-it, gemma-3-1b-it and Phi-3-mini-4k-instruct, verbatim
(provenance in that folder's README); expected.json holds transformers' renderings of each case
(scripts/make_chat_template_fixtures.py): the text, or the message the template raised with
raise_exception, which the server answers as a 400 naming it.
"""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from helpers.server import serve_in_thread

from lora_jax.entrypoints.openai.protocol import APIError, ChatRequest
from lora_jax.entrypoints.openai.serving_chat import (
    ServingChat,
    load_chat_template,
    special_tokens,
)
from lora_jax.tokenizer import TextTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
SOURCES = json.loads((FIXTURES / "sources.json").read_text())["families"]
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CASES = EXPECTED["cases"]


def model_folder(tmp_path: Path, family: str) -> Path:
    """A model folder whose tokenizer_config.json is the family's: its special-token strings
    and its chat template, as the hub's files give them."""
    folder = tmp_path / family
    folder.mkdir()
    config = {**SOURCES[family]["special_tokens"],
              "chat_template": (FIXTURES / f"{family}.jinja").read_text()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def request(case: str, kwargs: dict | None = None) -> ChatRequest:
    """The case as the server parses it from a request body."""
    spec = CASES[case]
    return ChatRequest.model_validate({
        "model": "m", "messages": spec["messages"],
        "add_generation_prompt": spec["add_generation_prompt"],
        "chat_template_kwargs": kwargs or spec["chat_template_kwargs"] or None})


def test_the_fixtures_cover_each_template_behaviour():
    """Gemma 2 refuses a system turn, Gemma 3 folds it into the first user turn, Mistral and
    the Gemmas refuse two user turns in a row, Qwen3's enable_thinking=False adds an empty
    think block, Phi-3 ends a prompt without a generation prompt with its eos."""
    assert "System role not supported" in EXPECTED["gemma2"]["system_user"]["error"]
    assert EXPECTED["gemma3_text"]["system_user"]["text"].startswith(
        "<bos><start_of_turn>user\nYou answer in one word.\n\nWhat is 2+2?")
    for family in ("mistral", "gemma2", "gemma3_text"):
        assert "alternate" in EXPECTED[family]["user_after_user"]["error"], family
    qwen3 = EXPECTED["qwen3"]
    assert qwen3["no_thinking"]["text"].endswith("<think>\n\n</think>\n\n")
    assert EXPECTED["phi3"]["multi_turn_no_generation_prompt"]["text"].endswith("<|endoftext|>")


@pytest.mark.parametrize("family", list(SOURCES))
def test_family_template_renders_as_transformers(family, tmp_path):
    folder = str(model_folder(tmp_path, family))
    chat = ServingChat(None, None, load_chat_template(folder),
                       special_tokens(folder, None, None, None))
    for case, want in EXPECTED[family].items():
        if "error" in want:
            with pytest.raises(APIError) as info:
                chat.render(request(case))
            assert info.value.status == 400 and info.value.param == "messages"
            assert want["error"] in info.value.message, (family, case)
        else:
            assert chat.render(request(case)) == want["text"], (family, case)


def test_chat_template_kwargs_cannot_replace_the_messages(tmp_path):
    folder = str(model_folder(tmp_path, "phi3"))
    chat = ServingChat(None, None, load_chat_template(folder),
                       special_tokens(folder, None, None, None))
    other = {"messages": [{"role": "user", "content": "other"}], "add_generation_prompt": False}
    got = chat.render(request("user", other))
    assert got == EXPECTED["phi3"]["user"]["text"]


def test_a_template_that_fails_on_the_messages_is_a_400_naming_the_problem(tmp_path):
    """Content the template cannot add to a string (a list of parts to Phi-3's `+`), and a
    message without the key the template reads: a client's error, not the server's."""
    folder = str(model_folder(tmp_path, "phi3"))
    chat = ServingChat(None, None, load_chat_template(folder),
                       special_tokens(folder, None, None, None))
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(APIError, match="cannot render these messages") as info:
        chat.render(ChatRequest(model="m", messages=parts))
    assert info.value.status == 400
    with pytest.raises(APIError, match="chat template error.*content") as info:
        chat.render(ChatRequest(model="m", messages=[{"role": "user"}]))
    assert info.value.status == 400


@pytest.fixture(scope="module")
def family_servers(server, base_model):
    """The test server's engine behind one more app per template (gemma-2-2b-it's, Phi-3-mini's):
    {family: openai client}."""
    with contextlib.ExitStack() as stack:
        clients = {}
        for family in ("gemma2", "phi3"):
            args = SimpleNamespace(model=base_model, served_model_name="tiny",
                                   chat_template=str(FIXTURES / f"{family}.jinja"))
            url = stack.enter_context(serve_in_thread(server[1], args))
            clients[family] = openai.OpenAI(base_url=url + "/v1", api_key="none",
                                            max_retries=0, timeout=60)
        yield clients


def test_raise_exception_through_the_server_is_a_400_naming_the_problem(family_servers):
    with pytest.raises(openai.BadRequestError) as info:
        family_servers["gemma2"].chat.completions.create(
            model="tiny", messages=CASES["system_user"]["messages"], max_tokens=2)
    body = info.value.body
    assert info.value.status_code == 400 and body["type"] == "BadRequestError"
    assert EXPECTED["gemma2"]["system_user"]["error"] in body["message"]


def test_served_chat_prompt_is_transformers_rendering(family_servers, base_model):
    """Phi-3's template through the server: the prompt it tokenizes is transformers' text
    (the tiny model's char tokenizer, one token per character, plus its bos)."""
    got = family_servers["phi3"].chat.completions.create(
        model="tiny", messages=CASES["user"]["messages"], max_tokens=2, temperature=0.0)
    text = EXPECTED["phi3"]["user"]["text"]
    assert got.usage.prompt_tokens == len(TextTokenizer(base_model, 1).encode(text))
