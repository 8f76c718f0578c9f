"""Shared fixtures: a tiny checkpoint with a char tokenizer, and a tiny PEFT adapter."""

import contextlib
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from helpers.checkpoints import write_checkpoint
from helpers.peft import TinyShapes, make_adapter

from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config


@pytest.fixture(scope="package")
def base_model(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config()))
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="package")
def adapter_dir(tmp_path_factory):
    return str(make_adapter(tmp_path_factory.mktemp("lora") / "sql", seed=3,
                            shapes=TinyShapes(2, 64, 32, 96)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(llm, args):
    """build_app(llm, args) under uvicorn in a background thread on a free port; yields its
    base url, and stops it (not the engine) afterwards."""
    import uvicorn

    from lora_jax.entrypoints.openai.server import build_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(llm, args), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="package")
def server(base_model, adapter_dir):
    """A running server (uvicorn in a background thread) on a free port; stopped afterwards.
    Yields (base url, AsyncLLM, LoRARequest of adapter 'sql')."""
    from lora_jax.engine.async_llm import AsyncLLM
    from lora_jax.request import LoRARequest

    lora = LoRARequest("sql", 1, adapter_dir)
    llm = AsyncLLM.from_options(base_model, max_num_seqs=2, enable_lora=True, max_loras=1)
    args = SimpleNamespace(model=base_model, served_model_name="tiny", lora_requests=[lora],
                           chat_template=TEMPLATE, api_key=None)
    with serve_in_thread(llm, args) as url:
        yield url, llm, lora
    llm.shutdown()


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="package")
def client(server):
    """The official openai client against the test server."""
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def reference(base_model, server):
    """The same model and adapter offline: what the server's answers must equal."""
    from lora_jax import LLM

    return LLM(base_model, max_num_seqs=2, enable_lora=True, max_loras=1)
