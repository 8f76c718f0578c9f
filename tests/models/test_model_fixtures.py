"""Equal to transformers + PEFT: logits and greedy tokens from tests/fixtures/reference.

Every (adapter or base, prompt) pair of a variant runs as one row of a single mixed batch, so
each comparison also checks that a row's neighbours (other adapters, the base model, other
lengths) do not change its result.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax.lora.adapters import load_adapter
from models import forward, init_kv_cache, init_lora_stacks, load_llama, pack_adapter, set_slot

FIXTURES = Path(__file__).parent.parent / "fixtures" / "reference"
VARIANTS = ("gqa", "tied", "llama3", "long_lora", "partial", "mistral", "qwen2", "qwen3", "gemma2",
            "gemma3_text", "phi3")
ATOL = 1e-4

_forward = jax.jit(forward, static_argnums=0)
_logits = jax.jit(lambda g, s, h: nnx.merge(g, s).logits(h), static_argnums=0)


class Variant:
    """One fixture variant loaded once: the model, every adapter in a slot, one row per pair."""

    def __init__(self, name: str):
        folder = FIXTURES / name
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.expected = dict(np.load(folder / "expected.npz"))
        model = load_llama(folder / "model")
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        names = list(self.manifest["adapters"])
        adapters = [load_adapter(str(folder / "adapters" / n), name=n, base=self.config)
                    for n in names]
        max_rank = max(a.rank for a in adapters)
        self.lora = init_lora_stacks(self.config, len(adapters), max_rank)
        for slot, adapter in enumerate(adapters):
            self.lora = set_slot(self.lora, slot,
                                 pack_adapter(self.config, adapter.modules, max_rank))
        prompts = [self.expected[f"prompt_ids_{j}"] for j in range(self.manifest["num_prompts"])]
        # Rows: every (adapter, prompt) pair, the base model as slot -1.
        self.pairs = [(a, j) for a in ["base", *names] for j in range(len(prompts))]
        self.slots = np.array([names.index(a) if a != "base" else -1 for a, _ in self.pairs],
                              np.int32)
        self.prompts = [prompts[j] for _, j in self.pairs]
        factor = self.manifest.get("linear_factor")  # long_lora: position scaling per row
        self.rope_scale = None if factor is None else jnp.full(len(self.pairs), factor, jnp.float32)
        self.max_len = max(map(len, prompts)) + self.manifest["greedy_new_tokens"]

    def step(self, tokens, positions, cache):
        """tokens, positions [rows, L] -> (logits [rows, L, V] numpy, cache)."""
        rows = jnp.arange(len(self.pairs), dtype=jnp.int32)
        hidden, cache = _forward(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32),
                                 jnp.asarray(positions, jnp.int32), cache, rows, self.lora,
                                 jnp.asarray(self.slots), self.rope_scale)
        return np.asarray(_logits(self.graphdef, self.state, hidden)), cache

    def prefill(self):
        length = max(map(len, self.prompts))
        tokens = np.zeros((len(self.prompts), length), np.int32)
        positions = np.full((len(self.prompts), length), -1, np.int32)
        for b, p in enumerate(self.prompts):
            tokens[b, :len(p)], positions[b, :len(p)] = p, np.arange(len(p))
        return self.step(tokens, positions, init_kv_cache(self.config, len(self.pairs),
                                                          self.max_len))

    def decode_one(self, tokens, positions, cache):
        logits, cache = self.step(np.asarray(tokens)[:, None], np.asarray(positions)[:, None],
                                  cache)
        return logits[:, 0], cache


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return Variant(request.param)


def test_prefill_logits_equal_transformers_for_base_and_every_adapter(variant):
    logits, _ = variant.prefill()
    for b, (adapter, j) in enumerate(variant.pairs):
        want = variant.expected[f"logits_{adapter}_{j}"]
        np.testing.assert_allclose(logits[b, :len(want)], want, atol=ATOL, rtol=0,
                                   err_msg=f"{adapter} prompt {j}")


def test_decode_token_by_token_through_the_cache_equals_transformers(variant):
    cache = init_kv_cache(variant.config, len(variant.pairs), variant.max_len)
    longest = max(map(len, variant.prompts))
    steps = []
    for t in range(longest):
        live = [t < len(p) for p in variant.prompts]
        tokens = [p[t] if ok else 0 for p, ok in zip(variant.prompts, live, strict=True)]
        logits, cache = variant.decode_one(tokens, [t if ok else -1 for ok in live], cache)
        steps.append(logits)
    decoded = np.stack(steps, axis=1)
    for b, (adapter, j) in enumerate(variant.pairs):
        want = variant.expected[f"logits_{adapter}_{j}"]
        np.testing.assert_allclose(decoded[b, :len(want)], want, atol=ATOL, rtol=0,
                                   err_msg=f"{adapter} prompt {j}")


# long_lora's references are logits under linear RoPE scaling; it has no greedy runs.
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "long_lora"], indirect=True)
def test_greedy_generation_equals_transformers(variant):
    logits, cache = variant.prefill()
    lengths = np.array([len(p) for p in variant.prompts])
    next_tokens = logits[np.arange(len(lengths)), lengths - 1].argmax(-1)
    generated = [next_tokens]
    for step in range(variant.manifest["greedy_new_tokens"] - 1):
        logits, cache = variant.decode_one(next_tokens, lengths + step, cache)
        next_tokens = logits.argmax(-1)
        generated.append(next_tokens)
    generated = np.stack(generated, axis=1)
    for b, (adapter, j) in enumerate(variant.pairs):
        np.testing.assert_array_equal(generated[b], variant.expected[f"greedy_{adapter}_{j}"],
                                      err_msg=f"{adapter} prompt {j}")
