"""POST /v1/completions: prompts in, choices out, whole or streamed as SSE."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.logprobs import CompletionLogprobs
from lora_jax.entrypoints.openai.protocol import APIError, CompletionRequest, usage
from lora_jax.entrypoints.openai.serving_models import ServingModels
from lora_jax.outputs import CompletionOutput, RequestOutput


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    return list(prompt)


def check_lengths(llm: AsyncLLM, prompt_ids: list[int], max_tokens: int | None) -> int:
    """max_tokens to use; 400 when the prompt or prompt + max_tokens pass max_model_len."""
    limit = llm.engine.max_model_len
    if len(prompt_ids) >= limit:
        raise APIError(f"The prompt has {len(prompt_ids)} tokens; this model's maximum context "
                       f"length is {limit} tokens. Shorten the prompt.", param="prompt")
    room = limit - len(prompt_ids)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(f"max_tokens ({max_tokens}) plus the prompt's {len(prompt_ids)} tokens "
                       f"passes this model's maximum context length of {limit}; lower "
                       f"max_tokens to at most {room}.", param="max_tokens")
    return max_tokens


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


class ServingCompletions:
    def __init__(self, llm: AsyncLLM, models: ServingModels):
        self.llm, self.models = llm, models

    def _prepare(self, req: CompletionRequest):
        lora = self.models.resolve(req.model)
        tok = self.llm.engine.get_tokenizer()
        jobs = []
        for prompt in _prompts(req.prompt):
            ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
            max_tokens = check_lengths(self.llm, ids, req.max_tokens)
            try:
                params = req.sampling_params(max_tokens, req.logprobs)
            except ValueError as exc:
                raise APIError(str(exc)) from exc
            jobs.append((prompt, ids, params))
        return lora, jobs

    async def create(self, req: CompletionRequest):
        lora, jobs = self._prepare(req)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(req, rid, lora, jobs)
        # The prompts of one request run side by side in the engine's batch.
        finals = await asyncio.gather(*(generate_whole(self.llm, prompt, params, f"{rid}-{i}",
                                                       lora)
                                        for i, (prompt, _ids, params) in enumerate(jobs)))
        tok = self.llm.engine.get_tokenizer()
        choices, n_prompt, n_out = [], 0, 0
        for final in finals:
            n_prompt += len(final.prompt_token_ids)
            for c in final.outputs:
                n_out += len(c.token_ids)
                logprobs = (CompletionLogprobs(tok).chunk(c.token_ids, c.logprobs)
                            if c.logprobs is not None else None)
                choices.append({"index": len(choices), "text": c.text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(n_prompt, n_out)}

    async def _stream(self, req, rid, lora, jobs) -> AsyncIterator[str]:
        try:
            async for chunk in self._chunks(req, rid, lora, jobs):
                yield chunk
        except (APIError, RuntimeError) as exc:
            yield stream_error(exc)

    async def _chunks(self, req, rid, lora, jobs) -> AsyncIterator[str]:
        created, n_prompt, n_out = int(time.time()), 0, 0
        tok = self.llm.engine.get_tokenizer()
        for i, (prompt, ids, params) in enumerate(jobs):
            n_prompt += len(ids)
            offsets: dict[int, CompletionLogprobs] = {}
            async with aclosing(self.llm.generate(prompt, params, f"{rid}-{i}", lora)) as outs:
                async for out in outs:
                    if out.error:
                        raise APIError(out.error, 500, "InternalServerError")
                    for c in out.outputs:
                        n_out += len(c.token_ids)
                        logprobs = None
                        if c.logprobs is not None:
                            logprobs = offsets.setdefault(c.index, CompletionLogprobs(tok)).chunk(
                                c.token_ids, c.logprobs)
                        choice = {"index": i * req.n + c.index, "text": c.text,
                                  "logprobs": logprobs, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}
                        yield sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": req.model, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": req.model, "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
