"""Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text and Phi-3 served by LLM.generate against
transformers + PEFT (tests/fixtures/reference/<model_type>): the base model and two adapters
(q/v, or Phi-3's fused qkv_proj; rsLoRA on every linear layer) in one mixed batch.

The fixtures' sliding windows (4-6 positions) are shorter than every prompt, so each family's
windowed layers mask real keys; a small block size and token budget make prompts prefill in
chunks over a cached prefix, and the second round of the same prompts hits the prefix cache.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.lora.adapters import load_adapter, save_adapter
from models import (
    LlamaConfig,
    forward,
    init_kv_cache,
    init_lora_stacks,
    load_llama,
    pack_adapter,
    set_slot,
)

TESTS = Path(__file__).resolve().parents[1]
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# bfloat16 greedy is compared up to the first step where the reference's top-1/top-2 gap is
# under this: bfloat16 moves these random tiny models' logits by up to about 0.2 (measured:
# Mistral's all_rslora prompt 2 flips at a gap of 0.18).
BF16_GAP = 0.3


def serve(ref: Reference, dtype: str, rounds: int = 1) -> list[list]:
    llm = LLM(ref.model, dtype=dtype, enable_lora=True, max_loras=2, max_lora_rank=8,
              max_num_seqs=16, block_size=4, max_num_batched_tokens=32, max_model_len=32)
    reqs = {"base": None, **{n: LoRARequest(n, i + 1, ref.adapter_path(n))
                             for i, n in enumerate(ref.adapters)}}
    cases = [(name, j) for j in range(ref.num_prompts) for name in reqs]
    params = SamplingParams(temperature=0.0, max_tokens=ref.manifest["greedy_new_tokens"],
                            ignore_eos=True, logprobs=1)
    out = []
    for _ in range(rounds):  # the second round of the same prompts reads the prefix cache
        outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], params,
                            [reqs[name] for name, _ in cases], use_tqdm=False)
        assert all(o.error is None for o in outs), [o.error for o in outs]
        out.append(list(zip(cases, [o.outputs[0] for o in outs], strict=True)))
    if rounds > 1:  # the later rounds did read cached blocks (windowed layers' included)
        assert llm.engine.stats().prefix_cache_hits > 0
    return out


def test_each_family_config_reads_its_switches():
    configs = {f: LlamaConfig.from_pretrained(Reference(f).model) for f in FAMILIES}
    assert configs["mistral"].layer_windows == (4, 4) and configs["mistral"].head_dim == 16
    assert configs["qwen2"].attention_bias and configs["qwen2"].layer_windows == (None, 4)
    assert configs["qwen2"].tie_word_embeddings
    assert configs["qwen3"].qk_norm and configs["qwen3"].layer_windows is None
    g2, g3 = configs["gemma2"], configs["gemma3_text"]
    assert g2.norm_offset and g2.embed_scale and g2.sandwich_norms
    assert g2.hidden_act == "gelu_pytorch_tanh" and g2.attention_scale == 24 ** -0.5
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (5.0, 10.0)
    assert g2.layer_windows == (4, None)
    assert g3.qk_norm and g3.attn_logit_softcapping is None and g3.rope_local_theta == 100.0
    assert g3.layer_windows == (4, None, 4) and g3.rope_scaling["rope_type"] == "linear"
    phi = configs["phi3"]
    assert phi.fused_projections and phi.rope_type == "longrope"
    assert phi.rope_scaling["original_max_position_embeddings"] == 32
    assert phi.peft_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_mixed_batch_equals_peft_in_float32(family):
    ref = Reference(family)
    # Each adapter moves some greedy path off the base model's: a real comparison.
    assert all(any(ref.greedy(n, j) != ref.greedy("base", j) for j in range(ref.num_prompts))
               for n in ref.adapters)
    for round_ in serve(ref, "float32", rounds=2):
        for (name, j), comp in round_:
            assert comp.token_ids == ref.greedy(name, j), (family, name, j)
            want = ref.greedy_logprobs(name, j)
            for t, (token, logprobs) in enumerate(zip(comp.token_ids, comp.logprobs,
                                                      strict=True)):
                assert math.isclose(logprobs[token], want[t, token], abs_tol=1e-4), (
                    family, name, j, t)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_mixed_batch_greedy_equals_peft_in_bfloat16(family):
    ref = Reference(family)
    compared = 0
    for (name, j), comp in serve(ref, "bfloat16")[0]:
        logits = ref.expected[f"greedy_logits_{name}_{j}"]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        wide = np.flatnonzero(top2[:, 1] - top2[:, 0] < BF16_GAP)
        until = int(wide[0]) if len(wide) else len(top2)
        assert comp.token_ids[:until] == ref.greedy(name, j)[:until], (family, name, j)
        compared += until
    # The fixture script picked the prompts with the widest margins of 40 each: every family
    # has steps wide enough to compare (from 7 of 72 for Gemma 3 to all 72 for Qwen2).
    assert compared >= 6, compared


def test_phi3_prompt_past_the_original_context_uses_the_long_factors_as_transformers():
    """A whole 40-token prompt (past original_max_position_embeddings = 32): transformers
    rotates every position by the long factors, and so do we (base and rsLoRA adapter)."""
    ref = Reference("phi3")
    model = load_llama(ref.model)
    graphdef, state = nnx.split(model)
    ids = ref.expected["prompt_ids_long"]
    adapter = load_adapter(ref.adapter_path("all_rslora"), base=model.config)
    lora = set_slot(init_lora_stacks(model.config, 1, adapter.rank), 0,
                    pack_adapter(model.config, adapter.modules, adapter.rank))
    rows = len(ids) + 1
    for name, slot in (("base", -1), ("all_rslora", 0)):
        hidden, _ = jax.jit(forward, static_argnums=0)(
            graphdef, state, jnp.asarray(ids)[None], jnp.arange(len(ids))[None],
            init_kv_cache(model.config, 1, rows), jnp.zeros(1, jnp.int32), lora,
            jnp.asarray([slot], jnp.int32))
        np.testing.assert_allclose(np.asarray(model.logits(hidden))[0],
                                   ref.expected[f"logits_long_{name}"], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("families", [FAMILIES[:3], FAMILIES[3:]],
                         ids=["llama_like", "gemma_phi"])
def test_every_family_split_over_two_devices_equals_peft(families):
    """TP=2 on forced CPU devices (a subprocess: the device count is set before JAX starts):
    q|k|v biases split with their columns, q/k and Gemma's extra norms replicated. Two halves,
    so the test workers share the families."""
    script = TESTS / "helpers" / "tensor_parallel_run.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    spec = {"sizes": [2], "variants": list(families), "num_kv_blocks": 64, "max_tokens": 8,
            "compile_on_start": False, "rounds": 1}
    proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) >= set(families)
    for family in families:
        ref = Reference(family)
        for out in result[family]["rounds"][0]:
            name, j = out["case"]
            assert out["tokens"] == out["reference"], (family, name, j)
            want = ref.greedy_logprobs(name, j)
            got = np.asarray(out["logprobs"])
            np.testing.assert_allclose(got, want[np.arange(len(got)), out["tokens"]],
                                       atol=1e-4, rtol=0, err_msg=f"{family} {name} {j}")


def test_phi3_fused_qkv_adapter_loads_as_one_a_and_split_b():
    phi = LlamaConfig.from_pretrained(Reference("phi3").model)
    adapter = load_adapter(Reference("phi3").adapter_path("qv"), base=phi)
    q, k, v = (adapter.modules[p] for p in ("q_proj", "k_proj", "v_proj"))
    assert np.array_equal(q.a, k.a) and np.array_equal(q.a, v.a)
    widths = [w.b.shape[-1] for w in (q, k, v)]
    assert widths == [phi.projection_shapes()[p][1] for p in ("q_proj", "k_proj", "v_proj")]
    assert adapter.layers["v_proj"] == (0, 1)


@pytest.mark.parametrize(("adapter_family", "base_family"), [("phi3", "mistral"),
                                                             ("mistral", "phi3")])
def test_adapter_for_another_family_is_refused_naming_the_modules(adapter_family, base_family):
    base = LlamaConfig.from_pretrained(Reference(base_family).model)
    with pytest.raises(ValueError, match="another model family"):
        load_adapter(Reference(adapter_family).adapter_path("qv"), base=base)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_reloads_with_the_same_product_for_every_family(family, tmp_path):
    """save_adapter with the base: Phi-3's q/k/v and gate/up are written as the fused PEFT
    modules (A stacked, B block-diagonal), the others by their own names; reloading gives the
    same A @ B for every projection and layer."""
    ref = Reference(family)
    base = LlamaConfig.from_pretrained(ref.model)
    adapter = load_adapter(ref.adapter_path("all_rslora"), base=base)
    folder = save_adapter(adapter, tmp_path / "saved", lora_alpha=8, use_rslora=True, base=base)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(base.peft_modules)
    reloaded = load_adapter(str(folder), base=base)
    assert set(reloaded.modules) == set(adapter.modules) == set(base.projection_shapes())
    for proj, w in adapter.modules.items():
        again = reloaded.modules[proj]
        np.testing.assert_allclose(again.a @ again.b, w.a @ w.b, atol=1e-5, rtol=0,
                                   err_msg=f"{family} {proj}")
