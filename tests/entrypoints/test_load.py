"""Load: 64 concurrent streams over 8 runtime-loaded adapters and the base (max_loras=2,
max_cpu_loras=4) while a dozen bad loads are tried; then disconnects free their KV blocks."""

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from helpers.peft import TinyShapes, make_adapter, write_adapter
from helpers.server import Throttle, scrape, serve_in_thread, value

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.engine.async_llm import AsyncLLM

SHAPES = TinyShapes(2, 64, 32, 192)  # the tiny base model's projections
NUM_ADAPTERS, NUM_REQUESTS, MAX_TOKENS = 8, 64, 10
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    """8 good adapters in root/, defective ones beside them, and one adapter outside."""
    top = tmp_path_factory.mktemp("load")
    root = top / "root"
    for i in range(NUM_ADAPTERS):
        make_adapter(root / f"a{i}", seed=100 + i, shapes=SHAPES, r=4 + 2 * (i % 3),
                     modules=("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj",
                                                                 "gate_proj", "down_proj"))
    make_adapter(root / "rank_too_big", shapes=SHAPES, r=32)  # above max_lora_rank 16
    make_adapter(root / "wrong_shapes", shapes=TinyShapes())  # for a hidden size of 16
    make_adapter(root / "no_weights", shapes=SHAPES).joinpath(
        "adapter_model.safetensors").unlink()
    garbage = write_adapter(root / "garbage", {"r": 4, "lora_alpha": 8,
                                               "target_modules": ["q_proj"], "peft_type": "LORA"},
                            {})
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    make_adapter(top / "outside", shapes=SHAPES)
    os.symlink(top / "outside", root / "link_out")
    return root


def bad_loads(root: Path) -> list[dict]:
    outside = str(root.parent / "outside")
    return [{"lora_name": "m1", "lora_path": "missing"},
            {"lora_name": "m2", "lora_path": str(root / "missing")},
            {"lora_name": "d1", "lora_path": "rank_too_big"},
            {"lora_name": "d2", "lora_path": "wrong_shapes"},
            {"lora_name": "d3", "lora_path": "no_weights"},
            {"lora_name": "d4", "lora_path": "garbage"},
            {"lora_name": "t1", "lora_path": "../outside"},
            {"lora_name": "t2", "lora_path": outside},
            {"lora_name": "t3", "lora_path": "link_out"},
            {"lora_name": "t4", "lora_path": "a0/../../outside"},
            {"lora_name": "a0", "lora_path": "a1"},  # a duplicate name
            {"lora_name": "tiny", "lora_path": "a1"}]  # the base's name


def workload():
    models = ["tiny"] + [f"a{i}" for i in range(NUM_ADAPTERS)]
    return [(models[i % len(models)], f"{chr(97 + i % 26)}{i}?") for i in range(NUM_REQUESTS)]


def test_concurrent_streams_over_runtime_adapters_survive_bad_loads(base_model, lora_root):
    llm = AsyncLLM.from_options(base_model, enable_lora=True, max_loras=2, max_cpu_loras=4,
                                max_num_seqs=8)
    args = SimpleNamespace(model=base_model, served_model_name="tiny",
                           allow_runtime_lora_updating=True, lora_root=str(lora_root))
    try:
        with serve_in_thread(llm, args) as url:
            got, bad, idle_blocks = asyncio.run(asyncio.wait_for(_drive(url, llm, lora_root),
                                                                 timeout=600))
            after = scrape(httpx.get(url + "/metrics", timeout=30).text)
    finally:
        llm.shutdown()

    for status, body in bad:
        assert 400 <= status < 500 and body["error"]["message"], (status, body)
    reference = LLM(base_model, enable_lora=True, max_loras=2, max_cpu_loras=8, max_num_seqs=8)
    loras = {f"a{i}": LoRARequest(f"a{i}", i + 1, str(lora_root / f"a{i}"))
             for i in range(NUM_ADAPTERS)}
    jobs = workload()
    want = reference.generate([p for _, p in jobs], SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), lora_request=[
        loras.get(m) for m, _ in jobs], use_tqdm=False)
    assert got == [w.outputs[0].text for w in want]
    assert len(set(got)) > NUM_ADAPTERS  # the adapters answer differently
    assert idle_blocks == 0
    assert value(after, "lora_jax:kv_blocks_used") == 0
    assert value(after, "lora_jax:lora_slot_loads_total") >= NUM_ADAPTERS
    assert value(after, "lora_jax:request_success_total", model_name="a3",
                 finished_reason="length") == NUM_REQUESTS // (NUM_ADAPTERS + 1)


async def _drive(url: str, llm: AsyncLLM, root: Path):
    async with httpx.AsyncClient(base_url=url, timeout=120) as http, openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
        goods = [{"lora_name": f"a{i}", "lora_path": f"a{i}"} for i in range(NUM_ADAPTERS)]
        # The good ones first: a bad load reuses a good one's name, and concurrent requests
        # reach the server in no fixed order.
        loads = await asyncio.gather(*(http.post("/v1/load_lora_adapter", json=b)
                                       for b in goods))
        loads += await asyncio.gather(*(http.post("/v1/load_lora_adapter", json=b)
                                        for b in bad_loads(root)))
        assert [r.status_code for r in loads[:NUM_ADAPTERS]] == [200] * NUM_ADAPTERS, [
            r.text for r in loads]
        models = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
        assert models == {"tiny", *(b["lora_name"] for b in goods)}

        async def stream(model, prompt):
            chunks = await client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in chunks if c.choices])

        async def bad(body):
            r = await http.post("/v1/load_lora_adapter", json=body)
            return r.status_code, r.json()

        results = await asyncio.gather(*(stream(m, p) for m, p in workload()),
                                       *(bad(b) for b in bad_loads(root)))
        got, bad_results = list(results[:NUM_REQUESTS]), [
            (r.status_code, r.json()) for r in loads[NUM_ADAPTERS:]] + list(
            results[NUM_REQUESTS:])
        assert (await http.get("/health")).status_code == 200

        # Disconnects mid-stream: the engine is slowed so the streams are still running.
        throttle = Throttle()
        llm.observers.append(throttle)
        try:
            body = {"model": "a5", "prompt": "hello", "max_tokens": 40, "stream": True,
                    "temperature": 0.0, "ignore_eos": True}
            for _ in range(4):
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for _line in r.aiter_lines():
                        break  # one chunk, then hang up
            deadline = time.monotonic() + 30
            while llm.has_unfinished_requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            llm.observers.remove(throttle)
        metrics = scrape((await http.get("/metrics")).text)
        assert value(metrics, "lora_jax:request_success_total", model_name="a5",
                     finished_reason="abort") == 4
        return got, bad_results, llm.stats().kv_blocks_used
