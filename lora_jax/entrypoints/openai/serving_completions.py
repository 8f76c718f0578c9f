"""POST /v1/completions: prompts in, choices out, whole or streamed as SSE."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request

from lora_jax.entrypoints.openai.logprobs import CompletionLogprobs
from lora_jax.entrypoints.openai.protocol import APIError, CompletionRequest, usage
from lora_jax.entrypoints.openai.serving_engine import (
    OpenAIServing,
    generate_whole,
    respond,
    sse,
    stream_error,
)
from lora_jax.sampling_params import SamplingParams

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, raw: Request):
    return await respond(await raw.app.state.completions.create(req))


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt or any(len(p) == 0 for p in prompt):
        raise APIError("prompt must not be empty", param="prompt")
    return list(prompt)


@dataclass
class _Job:
    prompt: str | list[int]
    ids: list[int]
    params: SamplingParams
    echo: str  # the text put before each choice's output (echo: true)


class ServingCompletions(OpenAIServing):
    async def _prepare(self, req: CompletionRequest):
        lora = self.models.resolve(req.model)
        prompts = _prompts(req.prompt)
        self.check_request(req, len(prompts))
        jobs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = await self.encode(prompt)
            else:
                self.check_token_ids(prompt, "prompt")
                ids = prompt
            params = req.sampling_params(self.check_lengths(ids, req.max_tokens), req.logprobs)
            echo = "" if not req.echo else prompt if isinstance(prompt, str) else (
                await self.decode(ids))
            jobs.append(_Job(prompt, ids, params, echo))
        return lora, jobs

    def _logprobs(self, req: CompletionRequest) -> CompletionLogprobs:
        return CompletionLogprobs(self.tokenizer, as_ids=self.as_token_ids(req))

    async def create(self, req: CompletionRequest):
        lora, jobs = await self._prepare(req)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(req, rid, lora, jobs)
        # The prompts of one request run side by side in the engine's batch.
        finals = await asyncio.gather(*(generate_whole(self.llm, job.prompt, job.params,
                                                       f"{rid}-{i}", lora)
                                        for i, job in enumerate(jobs)))
        choices, n_prompt, n_out = [], 0, 0
        for job, final in zip(jobs, finals, strict=True):
            n_prompt += len(final.prompt_token_ids)
            for c in final.outputs:
                n_out += len(c.token_ids)
                logprobs = (self._logprobs(req).chunk(c.token_ids, c.logprobs)
                            if c.logprobs is not None else None)
                choices.append({"index": len(choices), "text": job.echo + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(n_prompt, n_out)}

    async def _stream(self, req, rid, lora, jobs) -> AsyncIterator[str]:
        try:
            async for chunk in self._chunks(req, rid, lora, jobs):
                yield chunk
        except (APIError, RuntimeError) as exc:
            yield stream_error(exc)

    async def _chunks(self, req, rid, lora, jobs: list[_Job]) -> AsyncIterator[str]:
        created, n_prompt, n_out = int(time.time()), 0, 0
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        for i, job in enumerate(jobs):
            n_prompt += len(job.ids)
            offsets: dict[int, CompletionLogprobs] = {}
            echoed: set[int] = set()
            async with aclosing(self.llm.generate(job.prompt, job.params, f"{rid}-{i}",
                                                  lora)) as outs:
                async for out in outs:
                    if out.error:
                        raise APIError(out.error, 500, "InternalServerError")
                    for c in out.outputs:
                        n_out += len(c.token_ids)
                        logprobs = None
                        if c.logprobs is not None:
                            logprobs = offsets.setdefault(c.index, self._logprobs(req)).chunk(
                                c.token_ids, c.logprobs)
                        echo = "" if c.index in echoed else job.echo
                        echoed.add(c.index)
                        choice = {"index": i * req.n + c.index, "text": echo + c.text,
                                  "logprobs": logprobs, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}
                        yield sse({**head, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
