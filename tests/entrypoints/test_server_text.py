"""Issue 23 case 11: the server's text equals LLM.generate's for the same tokens, whole and
streamed, on a byte-level tokenizer whose characters span several tokens (an output cut inside
a character ends in U+FFFD, as tokenizer.decode gives); top_logprobs keys never collide."""

from types import SimpleNamespace

import openai
import pytest
from helpers.checkpoints import tiny_config, write_checkpoint
from helpers.server import serve_in_thread
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lora_jax import LLM, SamplingParams
from lora_jax.tokenizer import TextTokenizer

PROMPTS = ["héllo wörld", "日本語", "emoji 🙂", "abc", "ÿÿ", "x"]
MAX_TOKENS = 12


def byte_level_tokenizer() -> Tokenizer:
    """<unk> <s> </s>, then one token per byte (no merges): a character of k UTF-8 bytes is
    k tokens, and a lone byte of one decodes to U+FFFD."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> str:
    folder = write_checkpoint(tmp_path_factory.mktemp("bytes"), tiny_config(vocab_size=272),
                              seed=7)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="module")
def byte_server(byte_model):
    from lora_jax.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_options(byte_model, max_num_seqs=4)
    with serve_in_thread(llm, SimpleNamespace(model=byte_model, served_model_name="b")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    llm.shutdown()


@pytest.fixture(scope="module")
def offline(byte_model):
    llm = LLM(byte_model, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [out.outputs[0] for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_byte_level_outputs_end_inside_a_character(offline):
    # What the test below relies on: some outputs are cut inside a multi-byte character.
    assert any(out.text.endswith("\ufffd") for out in offline)


def test_completion_text_equals_offline_whole_and_streamed(byte_server, offline):
    args = {"model": "b", "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "extra_body": {"ignore_eos": True}}
    for prompt, want in zip(PROMPTS, offline, strict=True):
        whole = byte_server.completions.create(prompt=prompt, **args).choices[0]
        assert whole.text == want.text, prompt
        chunks = byte_server.completions.create(prompt=prompt, stream=True, **args)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text, prompt


def test_top_logprobs_keys_never_collide(byte_server):
    got = byte_server.completions.create(model="b", prompt="日本", max_tokens=6, logprobs=8,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    collided = 0
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert len(top) >= 8 and token in top
        collided += sum(k.startswith("token_id:") for k in top)
    assert collided > 0  # byte tokens that each decode to U+FFFD are told apart by id


def test_return_tokens_as_token_ids(byte_server, byte_model):
    got = byte_server.completions.create(
        model="b", prompt="abc", max_tokens=4, logprobs=2, temperature=0.0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = got.choices[0].logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens)
    ids = [int(t.split(":")[1]) for t in lp.tokens]
    assert TextTokenizer(byte_model, 1).decode(ids) == got.choices[0].text
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)


def test_a_text_longer_than_the_context_can_hold_is_refused_untokenized(byte_server,
                                                                         byte_model):
    bound = TextTokenizer(byte_model, 1).max_chars_per_token
    assert bound == 5  # "<unk>" is the longest string; bytes are one character each
    with pytest.raises(openai.BadRequestError, match="characters"):
        byte_server.completions.create(model="b", prompt="a" * (bound * 64 + 1), max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="tokens"):  # tokenized: 1 + 100 tokens
        byte_server.completions.create(model="b", prompt="a" * 100, max_tokens=1)
