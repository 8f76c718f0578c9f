"""What every generating endpoint shares: the server's limits, tokenizing off the event loop,
the checks a request passes before it reaches the engine, and SSE helpers."""

import asyncio
import json
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BYTES
from lora_jax.entrypoints.openai.protocol import APIError, _Sampling
from lora_jax.entrypoints.openai.serving_models import ServingModels
from lora_jax.outputs import CompletionOutput, RequestOutput


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on the work one request may ask for (the server's command-line flags)."""

    max_n: int = DEFAULT_MAX_N  # choices per request (prompts x n)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" by default

    @classmethod
    def from_args(cls, args) -> "ServerLimits":
        return cls(getattr(args, "max_n", None) or DEFAULT_MAX_N,
                   getattr(args, "max_request_bytes", None) or DEFAULT_MAX_REQUEST_BYTES,
                   bool(getattr(args, "return_tokens_as_token_ids", False)))


class OpenAIServing:
    """The base of the completions and chat handlers."""

    def __init__(self, llm: AsyncLLM, models: ServingModels, limits: ServerLimits):
        self.llm, self.models, self.limits = llm, models, limits
        self.tokenizer = llm.engine.get_tokenizer()
        self.vocab_size = llm.engine.model_config.vocab_size
        self.chars_per_token = self.tokenizer.max_chars_per_token if self.tokenizer else None

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text`, in a worker thread. A text too long to fit max_model_len
        whatever its tokens is refused without tokenizing it."""
        if self.tokenizer is None:
            raise APIError("this model folder has no tokenizer.json: send token ids",
                           param=param)
        bound = self.chars_per_token
        limit = self.llm.engine.max_model_len
        if bound is not None and len(text) > bound * limit:
            raise APIError(f"The {param} has {len(text)} characters, more than this model's "
                           f"maximum context length of {limit} tokens can hold (at most "
                           f"{bound} characters per token). Shorten the {param}.", param=param)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def decode(self, ids: list[int]) -> str:
        return await asyncio.to_thread(self.tokenizer.decode, ids)

    def check_request(self, req: _Sampling, num_prompts: int = 1) -> None:
        """Bounds and token ids that need the server's limits or the model's vocabulary."""
        req.refuse_unimplemented()
        choices = num_prompts * req.n
        if choices > self.limits.max_n:
            raise APIError(f"this request asks for {choices} choices ({num_prompts} prompt(s) "
                           f"x n={req.n}); the server allows at most {self.limits.max_n} "
                           "(--max-n)", param="n")
        self.check_token_ids(req.stop_token_ids or [], "stop_token_ids")
        self.check_token_ids(req.token_bias() or {}, "logit_bias")

    def check_token_ids(self, ids, param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"{param}: token ids {bad[:5]} are outside the vocabulary [0, "
                           f"{self.vocab_size})", param=param)

    def check_lengths(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """max_tokens to use; 400 when the prompt or prompt + max_tokens pass max_model_len."""
        limit = self.llm.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise APIError(f"The prompt has {len(prompt_ids)} tokens; this model's maximum "
                           f"context length is {limit} tokens. Shorten the prompt.",
                           param="prompt")
        room = limit - len(prompt_ids)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(f"max_tokens ({max_tokens}) plus the prompt's {len(prompt_ids)} "
                           f"tokens passes this model's maximum context length of {limit}; "
                           f"lower max_tokens to at most {room}.", param="max_tokens")
        return max_tokens

    def as_token_ids(self, req: _Sampling) -> bool:
        if req.return_tokens_as_token_ids is None:
            return self.limits.return_tokens_as_token_ids
        return req.return_tokens_as_token_ids


async def respond(result):
    """A dict becomes JSON; a stream is primed first, so that an error raised when its
    request is added is still a proper status code rather than a broken stream."""
    if isinstance(result, dict):
        return result
    try:
        first = await result.__anext__()
    except ValueError as exc:
        raise APIError(str(exc)) from exc

    async def body():
        yield first
        async for chunk in result:
            yield chunk

    return StreamingResponse(body(), media_type="text/event-stream")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream_error(exc: Exception) -> str:
    """A failure after the stream began: an error event (as vLLM sends), then the end."""
    if not isinstance(exc, APIError):
        exc = APIError(str(exc), 500, "InternalServerError")
    return sse(exc.body()) + "data: [DONE]\n\n"


async def generate_whole(llm: AsyncLLM, prompt, params, rid: str, lora) -> RequestOutput:
    """Run one request (its params ask for deltas) and join the deltas into its final output;
    a failed request is a 500 naming the engine's reason."""
    whole: dict[int, CompletionOutput] = {}
    last = None
    async for out in llm.generate(prompt, params, rid, lora):
        last = out
        for c in out.outputs:
            acc = whole.setdefault(c.index, CompletionOutput(
                c.index, "", [], None, [] if c.logprobs is not None else None))
            acc.text += c.text
            acc.token_ids += c.token_ids
            if c.logprobs is not None:
                acc.logprobs += c.logprobs
            acc.cumulative_logprob = c.cumulative_logprob
            acc.finish_reason, acc.stop_reason = c.finish_reason, c.stop_reason
    if last is None or last.error:
        raise APIError(last.error if last else "the request produced no output", 500,
                       "InternalServerError")
    last.outputs = [whole[i] for i in sorted(whole)]
    return last
