"""Model families through the real server and the official openai client: Qwen2 (q/k/v biases,
tied embeddings, a windowed layer), Gemma 2 (soft-caps, norm offset, alternate windows) and
Phi-3 (adapters on the fused qkv_proj / gate_up_proj, longrope). Each serves its reference
checkpoint (tests/fixtures/reference/<family>) with both of its PEFT adapters; a greedy
completion by the base and by each adapter gives transformers + PEFT's tokens, with logprobs
within 1e-4 (float32)."""

import shutil
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from helpers.fixtures import Reference
from helpers.server import serve_in_thread

from lora_jax.tools.tiny import char_tokenizer

FAMILIES = ("qwen2", "gemma2", "phi3")


@pytest.fixture(scope="module", params=FAMILIES)
def family_client(request, tmp_path_factory):
    """(family, openai client) for a server over the family's checkpoint, with a tokenizer of
    the fixtures' ids (bos 1, eos 2) so that text and logprobs can be written."""
    from lora_jax.engine.async_llm import AsyncLLM
    from lora_jax.request import LoRARequest

    family = request.param
    ref = Reference(family)
    model = shutil.copytree(ref.model, tmp_path_factory.mktemp(family) / "model")
    char_tokenizer().save(str(model / "tokenizer.json"))
    loras = [LoRARequest(n, i + 1, ref.adapter_path(n)) for i, n in enumerate(ref.adapters)]
    llm = AsyncLLM.from_options(str(model), dtype="float32", enable_lora=True, max_loras=2,
                                max_lora_rank=8, max_num_seqs=4, block_size=4,
                                max_model_len=32)
    args = SimpleNamespace(model=str(model), served_model_name=family, lora_requests=loras)
    try:
        with serve_in_thread(llm, args) as url:
            yield family, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                        timeout=120)
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_family_completions_through_the_server_equal_peft(family_client):
    family, client = family_client
    ref = Reference(family)
    new = ref.manifest["greedy_new_tokens"]
    for name in ("base", *ref.adapters):
        for j in range(ref.num_prompts):
            got = client.completions.create(
                model=family if name == "base" else name, prompt=ref.prompt(j), max_tokens=new,
                temperature=0.0, logprobs=1,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            choice = got.choices[0]
            ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
            assert ids == ref.greedy(name, j), (family, name, j)
            assert choice.text == char_tokenizer().decode(ids), (family, name, j)
            want = ref.greedy_logprobs(name, j)[np.arange(new), ids]
            np.testing.assert_allclose(choice.logprobs.token_logprobs, want, atol=1e-4, rtol=0,
                                       err_msg=f"{family} {name} {j}")
