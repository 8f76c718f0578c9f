"""Text outputs: stop strings cut the text where they begin, decoded incrementally."""

import pytest
from helpers.checkpoints import write_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders

from lora_jax import LLM, SamplingParams
from lora_jax.tokenizer import TextStream
from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    base = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config()))
    char_tokenizer().save(str(base / "tokenizer.json"))
    return LLM(str(base), max_num_seqs=4)


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, **kw)


def test_a_stop_string_ends_the_output_where_it_begins(llm):
    full = llm.generate(["hello"], _greedy(), use_tqdm=False)[0].outputs[0]
    assert len(full.text) >= 8, full.text
    stop = full.text[6:8]
    out = llm.generate(["hello", "hello"], [_greedy(stop=[stop]), _greedy(stop=["\x7f"])],
                       use_tqdm=False)
    cut, uncut = out[0].outputs[0], out[1].outputs[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert len(cut.token_ids) < len(full.token_ids)
    # A stop string that never appears changes nothing, whatever shares the batch.
    assert (uncut.text, uncut.finish_reason) == (full.text, "length")


def test_the_earliest_of_several_stop_strings_wins(llm):
    full = llm.generate(["abc"], _greedy(), use_tqdm=False)[0].outputs[0].text
    early, late = full[2:4], full[9:12]
    out = llm.generate(["abc"], _greedy(stop=[late, early]), use_tqdm=False)[0].outputs[0]
    assert out.stop_reason == early and out.text == full[:full.find(early)]


def test_text_stream_equals_decoding_the_whole_output_across_multi_byte_characters():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk_decoders.ByteLevel()
    text = "héllo wörld, naïve café ✓ 東京 — done"
    # Bytes only, no merges: every non-ASCII character spans two or three tokens.
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tokenizer.encode(text).ids
    stream, pieces = TextStream(tokenizer), []
    for token in ids:
        pieces.append(stream.add(token))
    assert stream.text == "".join(pieces) == tokenizer.decode(ids) == text
    assert len(ids) == len(text.encode()) and pieces.count("") == len(ids) - len(text)
