"""OpenAI request bodies (the fields we serve, with their ranges) and the error shape.

Integer fields are strict (a JSON `true` is not 1) and range-checked here, so no value reaches
the device that its int32 inputs cannot hold. Fields OpenAI defines that we do not implement
are refused with a 400 naming the field (`refuse_unimplemented`) rather than ignored; fields no
API defines (a client's extras) are ignored, as vLLM does.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from lora_jax.sampling_params import (
    INT32_MAX,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    RequestOutputKind,
    SamplingParams,
)

MAX_STOP_TOKEN_IDS = 256

TokenId = Annotated[StrictInt, Field(ge=0)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] = -1
    min_p: float = 0.0
    seed: Annotated[StrictInt, Field(ge=-2**63, lt=2**64)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    # Defined by OpenAI, not implemented: refused when set to anything but their no-op value.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def refuse_unimplemented(self) -> None:
        if self.response_format not in (None, {"type": "text"}):
            raise APIError("response_format is not supported (only {'type': 'text'})",
                           param="response_format")
        if self.tools:
            raise APIError("tools are not supported", param="tools")
        if self.tool_choice not in (None, "none"):
            raise APIError("tool_choice is not supported (only 'none')", param="tool_choice")

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with OpenAI's string keys read as token ids."""
        if not self.logit_bias:
            return None
        try:
            return {int(k): float(v) for k, v in self.logit_bias.items()}
        except ValueError as exc:
            raise APIError(f"logit_bias keys must be token ids (integers as strings): {exc}",
                           param="logit_bias") from exc

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                min_p=self.min_p, seed=self.seed, max_tokens=max_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                logprobs=logprobs, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
                logit_bias=self.token_bias(),
                # Always deltas, streamed or not: the server sees every step of every request,
                # which the metrics (inter-token latency) need; whole responses join them.
                output_kind=RequestOutputKind.DELTA)
        except ValueError as exc:  # SamplingParams' messages begin with the field's name
            field = str(exc).split(" ", 1)[0]
            raise APIError(str(exc), param=field if field in type(self).model_fields
                           else None) from exc


LogprobCount = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: LogprobCount | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None

    def refuse_unimplemented(self) -> None:
        super().refuse_unimplemented()
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(f"best_of is not supported (only best_of equal to n, {self.n})",
                           param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError("echo with logprobs is not supported (no prompt logprobs)",
                           param="echo")


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    logprobs: StrictBool = False
    top_logprobs: LogprobCount | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    add_generation_prompt: StrictBool = True
    # Extra variables for the chat template (vLLM's field), e.g. {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: the reply starts with the last message's content when that message has the
    # reply's role (continuing an assistant message; see ServingChat.echo).
    echo: StrictBool = False


class TokenizeRequest(BaseModel):
    prompt: str
    model: str | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[TokenId]
    model: str | None = None


class APIError(Exception):
    """An error the client caused (or may see); rendered as OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, type_: str = "BadRequestError",
                 param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
