"""`lora-jax demo` and the tiny model it builds from scratch."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from lora_jax.cli.main import main
from lora_jax.tokenizer import TextTokenizer
from lora_jax.tools.demo import (
    SHOWCASE,
    TASKS,
    Recipe,
    build_base,
    demo_dir,
    run_demo,
    spell,
    split_inputs,
)
from lora_jax.tools.tiny import char_tokenizer, save_llama, tiny_config
from models import Llama, load_llama


def _table(out: str) -> dict[str, list[str]]:
    """The printed table: first cell -> the row's cells (columns are 2+ spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    return {row[0]: row for row in rows if row[0] in ("prompt", *SHOWCASE)}


TINY = Recipe(base_steps=4, base_batch=8, adapter_steps=2, adapter_batch=4, train_size=16,
              eval_size=3)


def test_spell_writes_each_digit_as_a_word_and_leaves_words_alone():
    assert spell("2024") == "two zero two four"
    assert spell("hello") == "hello"
    assert TASKS["reverse"]("lora") == "arol" and TASKS["upper"]("jax") == "JAX"


def test_demo_folder_is_the_workdir_else_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo_dir() == tmp_path / "lora-jax" / "demo"
    assert demo_dir(tmp_path / "w") == tmp_path / "w"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(demo_dir()).endswith(".cache/lora-jax/demo")


def test_held_out_prompts_appear_neither_in_training_nor_in_the_showcase():
    train, held_out = split_inputs(Recipe())
    assert len(held_out) == Recipe().eval_size == len(set(held_out))
    assert not set(held_out) & (set(train) | set(SHOWCASE))


def test_char_tokenizer_round_trips_printable_ascii_with_bos_from_the_model_folder(tmp_path):
    config = tiny_config(hidden_size=32)
    save_llama(Llama(config, rngs=nnx.Rngs(0)), tmp_path, char_tokenizer())
    tokenizer = TextTokenizer(tmp_path, config.bos_token_id)
    ids = tokenizer.encode("Hi there, 42!")
    assert ids[0] == 1 and len(ids) == 14 and max(ids) < config.vocab_size
    assert tokenizer.decode([*ids, 2]) == "Hi there, 42!"


def test_saved_tiny_llama_loads_back_with_the_same_weights(tmp_path):
    model = Llama(tiny_config(hidden_size=32), rngs=nnx.Rngs(1))
    loaded = load_llama(save_llama(model, tmp_path))
    assert loaded.config == model.config
    for mine, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded)),
                            strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_demo_prints_every_model_side_by_side_and_fails_when_a_score_is_below_90_percent(
        tmp_path, capsys):
    assert run_demo(tmp_path, TINY, progress=False) == 1
    out = capsys.readouterr().out
    table = _table(out)
    assert table["prompt"] == ["prompt", "base", *TASKS] and set(table) == {"prompt", *SHOWCASE}
    assert "pretrained" in out and "below 90%" in out
    assert {p.name for p in (tmp_path / "adapters").iterdir()} == set(TASKS)
    assert not build_base(tmp_path / "base", TINY)  # cached: the next run reuses it
    assert re.search(r"started \(every program compiled\) in \d+ s, then served \d+ requests "
                     r"in mixed batches in [\d.]+ s \(\d+ generated tokens/s\)", out)


def test_demo_model_saves_a_chat_template_that_asks_for_the_last_user_message(tmp_path):
    from lora_jax.entrypoints.openai.protocol import APIError, ChatRequest
    from lora_jax.entrypoints.openai.serving_chat import ServingChat, load_chat_template

    build_base(tmp_path, TINY, progress=False)
    (tmp_path / "chat_template.jinja").unlink()
    assert not build_base(tmp_path, TINY, progress=False)  # cached, and the template is back
    chat = ServingChat(None, None, load_chat_template(str(tmp_path)))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "2024"}]
    assert chat.render(ChatRequest(model="demo", messages=messages)) == "2024="
    with pytest.raises(APIError, match="must be a user one"):
        chat.render(ChatRequest(model="demo", messages=messages[:3]))


@pytest.mark.slow
def test_demo_command_teaches_every_adapter_its_task_on_90_percent_of_held_out_prompts(
        tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "below" not in out and out.count(" ok") == len(TASKS)
    table = _table(out)
    assert table["hello"][2:] == ["HELLO", "olleh", "hello"]
    assert table["2024"][2:] == ["2024", "4202", "two zero two four"]
