"""LLMEngine: vLLM's online engine interface (add_request / abort_request / step).

A server feeds it requests as they arrive and calls `step()` in its loop; each step returns
the reports of the requests that moved, in each request's `SamplingParams.output_kind`
(CUMULATIVE, DELTA for streaming, FINAL_ONLY). `LLM.generate` is a loop over it.
"""

from collections.abc import Iterable
from typing import Any

from lora_jax.config import EngineConfig
from lora_jax.engine.core import EngineCore
from lora_jax.engine.input_processor import InputProcessor
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.lora.manager import ReadWeights
from lora_jax.outputs import EngineStats, RequestOutput
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import SamplingParams
from models.config import LlamaConfig

Prompt = str | list[int] | dict[str, Any]


def parse_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of a prompt given as text, token ids, or vLLM's prompt dicts."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list):
        return None, list(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"], None
    raise ValueError("a prompt is a string, a list of token ids, or {'prompt_token_ids': "
                     f"[...]}}, got {prompt!r:.80}")


class LLMEngine:
    """One base model and its adapters, stepped by the caller. See EngineConfig.

    The public engine surface: `LLM` and `AsyncLLM` sit over it, and servers and tools call
    its methods (requests, adapters, stats, the model's facts) rather than its parts."""

    def __init__(self, config: EngineConfig, *, mesh=None):
        self.config = config
        self.core = EngineCore(config, mesh=mesh)
        self.adapters = self.core.adapters
        self.input_processor = InputProcessor(
            config, self.core.model_config, tokenizer=self.core.tokenizer,
            max_model_len=self.core.max_model_len, num_kv_blocks=self.core.num_kv_blocks,
            adapters=self.adapters, eos_ids=self.core.outputs.eos_ids)

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "LLMEngine":
        return cls(EngineConfig(model=model, **options))

    # Requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Queue a request; a bad one raises ValueError / FileNotFoundError naming why, and
        nothing of it is queued."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest or None, got "
                             f"{type(lora_request).__name__}")
        text, ids = parse_prompt(prompt)
        if self.core.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
        self.core.add_request(self.input_processor.process(
            request_id, text, ids, params or SamplingParams(), lora_request))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests at once and free what they hold; unknown ids are ignored."""
        self.core.abort_request(request_ids)

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # Adapters (the adapter manager's, see lora_jax.lora.manager) --------------------------------

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None, *,
                 read: ReadWeights | None = None) -> bool:
        """Register an adapter (from its path, or the given in-memory weights, replacing an
        adapter of the same id in place: no recompilation). `read`: what read_lora returned
        for this request, so the files are not read again here."""
        self.adapters.add(lora_request, adapter, read=read)
        return True

    def read_lora(self, lora_request: LoRARequest) -> ReadWeights:
        """Read and validate an adapter from its path without touching the engine: safe in any
        thread while the engine steps. Hand the result to add_lora or reload_lora."""
        return self.adapters.read(lora_request)

    def reload_lora(self, lora_request: LoRARequest, *,
                    read: ReadWeights | None = None) -> LoRAAdapter:
        return self.adapters.reload(lora_request, read=read)

    def remove_lora(self, lora_id: int) -> bool:
        return self.adapters.remove(lora_id)

    def list_loras(self) -> set[int]:
        return self.adapters.ids()

    def pin_lora(self, lora_id: int) -> bool:
        return self.adapters.pin(lora_id)

    # Facts and upkeep ------------------------------------------------------------------------

    def get_tokenizer(self):
        return self.core.tokenizer

    @property
    def model_config(self) -> LlamaConfig:
        return self.core.model_config

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def kv_cache_bytes(self) -> int:
        """What the device KV pool holds, in bytes."""
        return self.core.kv_cache_bytes

    def stats(self) -> EngineStats:
        """Requests, KV blocks, prefix-cache hits, preemptions, the adapters (lora_int_ids) of
        running and waiting sequences, adapter slot loads."""
        return self.core.stats()

    def compile_stats(self) -> dict:
        return self.core.compile_stats()

    def reset_prefix_cache(self) -> None:
        self.core.reset_prefix_cache()
