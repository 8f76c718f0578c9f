"""POST /v1/completions: prompts in, choices out, whole or streamed as SSE."""

import json
import time
import uuid
from collections.abc import AsyncIterator

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.protocol import APIError, CompletionRequest, usage
from lora_jax.entrypoints.openai.serving_models import ServingModels


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
        choices, n_prompt, n_out = [], 0, 0
        for i, (prompt, _ids, params) in enumerate(jobs):
            final = None
            async for out in self.llm.generate(prompt, params, f"{rid}-{i}", lora):
                final = out
            if final.error:
                raise APIError(final.error, 500, "InternalServerError")
            n_prompt += len(final.prompt_token_ids)
            for c in final.outputs:
                n_out += len(c.token_ids)
                choices.append({"index": len(choices), "text": c.text,
                                "logprobs": _logprobs(c) if req.logprobs is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(n_prompt, n_out)}

    async def _stream(self, req, rid, lora, jobs) -> AsyncIterator[str]:
        created, n_prompt, n_out = int(time.time()), 0, 0
        for i, (prompt, ids, params) in enumerate(jobs):
            n_prompt += len(ids)
            async for out in self.llm.generate(prompt, params, f"{rid}-{i}", lora):
                for c in out.outputs:
                    n_out += len(c.token_ids)
                    choice = {"index": i * req.n + c.index, "text": c.text, "logprobs": None,
                              "finish_reason": c.finish_reason}
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": req.model, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": req.model, "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"


def _logprobs(c) -> dict | None:
    if c.logprobs is None:
        return None
    return {"token_logprobs": [step.get(t) for step, t in zip(c.logprobs, c.token_ids,
                                                               strict=False)],
            "top_logprobs": [{str(k): v for k, v in step.items()} for step in c.logprobs],
            "tokens": [str(t) for t in c.token_ids]}
