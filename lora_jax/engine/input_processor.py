"""Input processing: a request as the user gave it -> a validated, tokenized `NewRequest`.

Everything that can be wrong with one request is found here, before anything of it is queued:
its sampling parameters, its prompt (text needs a tokenizer; ids must be integers inside the
vocabulary), its adapter (registered here: an id taken by another path or another base model
fails now; its files are read in the background, and a failed read fails the request), the
context it needs (long-context adapters scale RoPE and may go past the base model's length)
and the KV cache it could fill. The n outputs' seeds are drawn here too.
"""

import math
from dataclasses import dataclass

import numpy as np

from lora_jax.config import EngineConfig
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.lora.manager import AdapterManager
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import MAX_HELD_TOKEN_IDS, SamplingParams
from lora_jax.tokenizer import TextTokenizer
from lora_jax.worker.input_batch import RowSampling
from models.config import LlamaConfig


@dataclass(frozen=True, kw_only=True)
class NewRequest:
    """A request the engine can run as is: n sequences of `prompt_ids`, each sampled with
    its own `rows[i]` (seed included)."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    adapter: LoRAAdapter | None  # unused: the adapter manager holds the weights by id
    rope_scale: float
    max_output: int  # outputs a sequence may have: max_tokens, or the context left
    cache_key: tuple  # prefix-cache key: (adapter identity, rope_scale)
    rows: tuple[RowSampling, ...]


class InputProcessor:
    def __init__(self, config: EngineConfig, model_config: LlamaConfig, *,
                 tokenizer: TextTokenizer | None, max_model_len: int, num_kv_blocks: int,
                 adapters: AdapterManager, eos_ids: frozenset[int] = frozenset()):
        self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
        self.eos_ids = eos_ids
        self.max_model_len, self.num_kv_blocks = max_model_len, num_kv_blocks
        self.adapters = adapters
        self._rng = np.random.default_rng(config.seed)

    def process(self, request_id: str, prompt: str | None, prompt_ids: list[int] | None,
                params: SamplingParams, lora_request: LoRARequest | None) -> NewRequest:
        """Validate one request; ValueError / FileNotFoundError say what is wrong."""
        params.validate()
        held = self._held_ids(request_id, params)
        prompt_ids = self._prompt_ids(request_id, prompt, prompt_ids)
        if lora_request is not None:  # registered only: its files are read in the background
            self.adapters.request(lora_request)
        rope_scale, max_len = self._context(lora_request)
        self._check_room(request_id, len(prompt_ids), params.max_tokens, max_len)
        seeds = [(params.seed + i) % 2**32 if params.seed is not None
                 else int(self._rng.integers(2**32)) for i in range(params.n)]
        identity = (None if lora_request is None
                    else self.adapters.identity(lora_request.lora_int_id))
        return NewRequest(
            request_id=request_id, prompt=prompt, prompt_ids=prompt_ids, params=params,
            lora_request=lora_request, adapter=None, rope_scale=rope_scale,
            max_output=min(params.max_tokens, max_len - len(prompt_ids)),
            cache_key=(identity, rope_scale),
            rows=tuple(row_sampling(params, seed, held) for seed in seeds))

    def _held_ids(self, request_id: str, params: SamplingParams) -> tuple[int, ...]:
        """The ids min_tokens holds off (vLLM's: stop_token_ids, and EOS unless ignore_eos),
        which must fit the step's fixed-size list. Checks logit_bias's ids too: the device
        would drop an id past the vocabulary without a word."""
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias or () if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: logit_bias token ids {bad[:5]} are "
                             f"outside the vocabulary [0, {vocab})")
        if not params.min_tokens:
            return ()
        held = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else self.eos_ids)
        if len(held) > MAX_HELD_TOKEN_IDS:
            raise ValueError(f"request {request_id}: min_tokens holds off at most "
                             f"{MAX_HELD_TOKEN_IDS} token ids (EOS and stop_token_ids), this "
                             f"request has {len(held)}; pass fewer stop_token_ids")
        return tuple(sorted(held))

    def _prompt_ids(self, request_id: str, prompt: str | None,
                    prompt_ids: list[int] | None) -> list[int]:
        if prompt_ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer.json in the model folder (or "
                                 "tokenizer=...); or pass {'prompt_token_ids': [...]}")
            prompt_ids = self.tokenizer.encode(prompt)
        not_ints = [t for t in prompt_ids
                    if isinstance(t, bool) or not isinstance(t, int | np.integer)]
        if not_ints:  # int() would silently truncate 6.5 to 6
            raise ValueError(f"request {request_id}: prompt_token_ids must be integers, got "
                             f"{not_ints[:5]!r}")
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token ids {bad[:5]} are outside the "
                             f"vocabulary [0, {vocab})")
        return prompt_ids

    def _context(self, lora_request: LoRARequest | None) -> tuple[float, int]:
        """(RoPE scale, context length) of a request: a long-context adapter's length, with
        RoPE positions scaled by the whole factor that brings it within the base model's."""
        if lora_request is None or not lora_request.long_lora_max_len:
            return 1.0, self.max_model_len
        long_len = lora_request.long_lora_max_len
        if long_len > self.max_model_len:
            raise ValueError(f"adapter {lora_request.lora_name!r} has long_lora_max_len "
                             f"{long_len} above max_model_len {self.max_model_len}; "
                             "create the LLM with a larger max_model_len")
        base_len = self.model_config.max_position_embeddings
        return float(max(1, math.ceil(long_len / base_len))), long_len

    def _check_room(self, request_id: str, prompt_len: int, max_tokens: int,
                    max_len: int) -> None:
        """The prompt leaves room to generate, and the whole pool could hold the request."""
        if prompt_len >= max_len:
            raise ValueError(f"request {request_id}: prompt of {prompt_len} tokens leaves "
                             f"no room to generate within max_model_len {max_len}")
        needed = min(prompt_len + max_tokens, max_len)
        block_size = self.config.block_size
        pool_tokens = self.num_kv_blocks * block_size
        if needed > pool_tokens:
            raise ValueError(f"request {request_id}: prompt ({prompt_len} tokens) + "
                             f"max_tokens ({max_tokens}) needs {needed} tokens of KV "
                             f"cache, but the whole pool holds {pool_tokens} ({self.num_kv_blocks}"
                             f" blocks of {block_size}); lower max_tokens or give "
                             "a larger kv_cache_memory_bytes")


def row_sampling(params: SamplingParams, seed: int, held_ids: tuple[int, ...] = ()
                 ) -> RowSampling:
    """One output's sampling record for the step's per-request columns."""
    bias = params.logit_bias or {}
    return RowSampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                       min_p=params.min_p, seed=seed, presence_penalty=params.presence_penalty,
                       frequency_penalty=params.frequency_penalty,
                       repetition_penalty=params.repetition_penalty,
                       bias_ids=tuple(int(t) for t in bias),
                       bias=tuple(float(v) for v in bias.values()),
                       min_tokens=params.min_tokens if held_ids else 0, held_ids=held_ids)
