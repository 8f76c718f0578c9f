"""POST /v1/chat/completions: messages rendered with the model's chat template, as HF does
(jinja2's ImmutableSandboxedEnvironment), then generated like a completion."""

import json
import time
import uuid
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.protocol import APIError, ChatRequest, usage
from lora_jax.entrypoints.openai.serving_completions import check_lengths, sse
from lora_jax.entrypoints.openai.serving_models import ServingModels


def load_chat_template(model_dir: str, override: str | None = None) -> str | None:
    """--chat-template (a file or the template itself), else the model folder's
    chat_template.jinja or tokenizer_config.json `chat_template`, else None."""
    if override:
        path = Path(override)
        return path.read_text() if path.is_file() else override
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _raise_exception(message):
    raise APIError(f"chat template error: {message}")


class ServingChat:
    def __init__(self, llm: AsyncLLM, models: ServingModels, template: str | None):
        self.llm, self.models = llm, models
        self.template = None
        if template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self.template = env.from_string(template)

    def render(self, req: ChatRequest) -> str:
        if self.template is None:
            raise APIError("this model has no chat template (none in its tokenizer_config.json "
                           "or chat_template.jinja); start the server with --chat-template "
                           "FILE, or use /v1/completions", param="messages")
        return self.template.render(messages=req.messages,
                                    add_generation_prompt=req.add_generation_prompt,
                                    bos_token="", eos_token="")

    async def create(self, req: ChatRequest):
        lora = self.models.resolve(req.model)
        prompt = self.render(req)
        ids = self.llm.engine.get_tokenizer().encode(prompt)
        max_tokens = check_lengths(self.llm, ids, req.max_completion_tokens or req.max_tokens)
        try:
            params = req.sampling_params(max_tokens, req.top_logprobs if req.logprobs else None)
        except ValueError as exc:
            raise APIError(str(exc)) from exc
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(req, rid, prompt, params, lora, len(ids))
        final = None
        async for out in self.llm.generate(prompt, params, rid, lora):
            final = out
        if final.error:
            raise APIError(final.error, 500, "InternalServerError")
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in final.outputs]
        n_out = sum(len(c.token_ids) for c in final.outputs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids), n_out)}

    async def _stream(self, req, rid, prompt, params, lora, n_prompt):
        created, n_out = int(time.time()), 0
        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": req.model}
        for i in range(req.n):
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                  "content": ""},
                                            "finish_reason": None}]})
        async for out in self.llm.generate(prompt, params, rid, lora):
            for c in out.outputs:
                n_out += len(c.token_ids)
                yield sse({**head, "choices": [{"index": c.index, "delta": {"content": c.text},
                                                "finish_reason": c.finish_reason}]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
