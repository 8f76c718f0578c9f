"""The server's fixtures: a running test server over the tiny checkpoint of tests/conftest.py,
the openai client for it, and the same model offline."""

from types import SimpleNamespace

import pytest
from helpers.server import TEMPLATE, serve_in_thread


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
