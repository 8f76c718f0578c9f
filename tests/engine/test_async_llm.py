"""AsyncLLM: background-thread engine, asyncio consumers, aborts on cancellation."""

import asyncio

import pytest

from lora_jax import LLM, SamplingParams
from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.sampling_params import RequestOutputKind


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 10, "ignore_eos": True,
                             "output_kind": RequestOutputKind.DELTA, **kw})


@pytest.fixture(scope="module")
def async_llm(base_model):
    llm = AsyncLLM.from_options(base_model, max_num_seqs=2)
    yield llm
    llm.shutdown()
    assert not llm._thread.is_alive()


async def _collect(llm, prompt, rid, **kw):
    return [out async for out in llm.generate(prompt, _params(**kw), rid)]


def test_concurrent_streams_match_offline_generate(async_llm, base_model):
    want = LLM(base_model, max_num_seqs=2).generate(
        ["hello", "abc"], _params(output_kind=RequestOutputKind.FINAL_ONLY), use_tqdm=False)

    async def main():
        return await asyncio.gather(_collect(async_llm, "hello", "r1"),
                                    _collect(async_llm, "abc", "r2"))

    got = asyncio.run(main())
    for outs, ref in zip(got, want, strict=True):
        assert outs[-1].finished
        assert sum((o.outputs[0].token_ids for o in outs), []) == ref.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in outs) == ref.outputs[0].text


def test_a_bad_request_fails_only_its_caller(async_llm):
    async def main():
        good = asyncio.create_task(_collect(async_llm, "hello", "ok"))
        with pytest.raises(ValueError, match="prompt"):
            await _collect(async_llm, "x" * 500, "too-long")
        return await good

    assert asyncio.run(main())[-1].finished


def test_a_cancelled_consumer_aborts_its_request(async_llm):
    async def main():
        gen = async_llm.generate("hello", _params(max_tokens=40), "cancel-me")
        first = await gen.__anext__()
        await gen.aclose()
        return first

    assert not asyncio.run(main()).finished
    assert not async_llm.has_unfinished_requests()
