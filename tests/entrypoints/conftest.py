"""Shared fixtures: a tiny checkpoint with a char tokenizer, and a tiny PEFT adapter."""

import pytest
from helpers.checkpoints import write_checkpoint
from helpers.peft import make_adapter

from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config


@pytest.fixture(scope="package")
def base_model(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config()))
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="package")
def adapter_dir(tmp_path_factory):
    return str(make_adapter(tmp_path_factory.mktemp("lora") / "sql", seed=3))
