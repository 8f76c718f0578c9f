"""LLMEngine: vLLM's online engine interface (add_request / abort_request / step).

A server feeds it requests as they arrive and calls `step()` in its loop; each step returns
the reports of the requests that moved, in each request's `SamplingParams.output_kind`
(CUMULATIVE, DELTA for streaming, FINAL_ONLY). `LLM.generate` is a loop over it.
"""

from collections.abc import Iterable
from typing import Any

from lora_jax.config import EngineConfig
from lora_jax.engine.core import Engine
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.outputs import RequestOutput
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import SamplingParams

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
    """One base model and its adapters, stepped by the caller. See EngineConfig."""

    def __init__(self, config: EngineConfig, *, mesh=None):
        self.config = config
        self.core = Engine(config, mesh=mesh)

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "LLMEngine":
        return cls(EngineConfig(model=model, **options))

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
        self.core.add_request(request_id, text, ids, params or SamplingParams(), lora_request)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests at once and free what they hold; unknown ids are ignored."""
        self.core.abort_request(request_ids)

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # Adapters and model facts, for servers ---------------------------------------------------

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        self.core.add_lora(lora_request, adapter)
        return True

    def reload_lora(self, lora_request: LoRARequest):
        return self.core.reload_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.core.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    def pin_lora(self, lora_id: int) -> bool:
        return self.core.pin_lora(lora_id)

    def get_tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len
