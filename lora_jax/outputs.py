"""What generate returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from dataclasses import dataclass

from lora_jax.request import LoRARequest


@dataclass
class CompletionOutput:
    """One generated sequence. finish_reason: "stop", "length", "error", or None while running."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of a request's life, as vLLM reports them."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """All sequences of one prompt. `error` is set, and outputs empty, when the request failed."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None
