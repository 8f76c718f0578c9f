"""POST /v1/chat/completions: messages rendered with the model's chat template as transformers'
apply_chat_template renders them (the same sandboxed jinja2 environment, globals and filters),
then generated like a completion."""

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Request
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.logprobs import chat_logprobs
from lora_jax.entrypoints.openai.protocol import APIError, ChatRequest, usage
from lora_jax.entrypoints.openai.serving_engine import (
    OpenAIServing,
    ServerLimits,
    generate_whole,
    respond,
    sse,
    stream_error,
)
from lora_jax.entrypoints.openai.serving_models import ServingModels

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat(req: ChatRequest, raw: Request):
    return await respond(await raw.app.state.chat.create(req))


def load_chat_template(model_dir: str, override: str | None = None) -> str | None:
    """--chat-template (a file or the template itself), else the model folder's
    chat_template.jinja or tokenizer_config.json `chat_template`, else None."""
    if override:
        path = Path(override).expanduser()
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


def special_tokens(model_dir: str, tokenizer, bos_id: int | None, eos_id) -> dict[str, str]:
    """The special tokens the template sees, as transformers passes its special_tokens_map:
    tokenizer_config.json's strings (or {"content": ...} entries) for bos/eos/unk/pad, else the
    vocabulary's strings for the model's bos/eos ids. A token the config sets to null (Qwen's
    bos_token) is left undefined, as in transformers."""
    config = Path(model_dir) / "tokenizer_config.json"
    given = json.loads(config.read_text()) if config.is_file() else {}
    if isinstance(eos_id, list | tuple | set):
        eos_id = next(iter(eos_id), None)
    out = {}
    for name, token_id in (("bos_token", bos_id), ("eos_token", eos_id), ("unk_token", None),
                           ("pad_token", None)):
        value = given.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if name in given and value is None:
            continue
        if not isinstance(value, str) and tokenizer is not None and token_id is not None:
            value = tokenizer.token_string(token_id)
        if isinstance(value, str) or name in ("bos_token", "eos_token"):
            out[name] = value or ""
    return out


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: jinja2's own escapes <, >, & and ' for HTML, which prompts must not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# A message's reasoning may come under any of these names; templates read the first (Qwen3),
# gpt-oss's the second: transformers fills both from whichever is given.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def compile_template(source: str):
    """The template compiled in transformers' environment: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ServingChat(OpenAIServing):
    def __init__(self, llm: AsyncLLM | None, models: ServingModels | None, template: str | None,
                 specials: dict[str, str] | None = None, limits: ServerLimits | None = None):
        if llm is not None:
            super().__init__(llm, models, limits or ServerLimits())
        self.specials = specials or {"bos_token": "", "eos_token": ""}
        self.template = None if template is None else compile_template(template)

    def render(self, req: ChatRequest) -> str:
        """The prompt text, as apply_chat_template(tokenize=False) writes it; the request's
        chat_template_kwargs (Qwen3's enable_thinking) are the template's extra variables."""
        if self.template is None:
            raise APIError("this model has no chat template (none in its tokenizer_config.json "
                           "or chat_template.jinja); start the server with --chat-template "
                           "FILE_OR_STRING, or use /v1/completions", param="messages")
        variables = {**self.specials, **(req.chat_template_kwargs or {}),
                     "messages": [_alias_reasoning(m) for m in req.messages],
                     "tools": None, "documents": None,
                     "add_generation_prompt": req.add_generation_prompt}
        try:
            return self.template.render(**variables)
        except TemplateError as exc:  # raise_exception, an undefined value, a sandbox refusal
            raise APIError(f"chat template error: {exc}", param="messages") from exc
        except (TypeError, ValueError, LookupError, AttributeError) as exc:
            raise APIError(f"chat template error: the template cannot render these messages "
                           f"({type(exc).__name__}: {exc})", param="messages") from exc

    @staticmethod
    def echo(req: ChatRequest) -> str:
        """What `echo` puts before each reply, as vLLM does: the last message's content (text
        parts joined by newlines) when its role is the reply's: the assistant's, or with
        add_generation_prompt false the last message's own (the model continues it)."""
        if not req.echo or not req.messages:
            return ""
        last = req.messages[-1]
        role = "assistant" if req.add_generation_prompt else last.get("role")
        content = last.get("content") if last.get("role") == role else None
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") for part in content
                                if isinstance(part, dict) and part.get("type") == "text")
        return content if isinstance(content, str) else ""

    def _logprobs(self, req: ChatRequest, c) -> dict | None:
        if not req.logprobs or c.logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, req.top_logprobs or 0,
                             as_ids=self.as_token_ids(req))

    async def create(self, req: ChatRequest):
        lora = self.models.resolve(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        self.check_request(req)
        prompt = await asyncio.to_thread(self.render, req)
        ids = await self.encode(prompt, "messages")
        max_tokens = self.check_lengths(ids, req.max_completion_tokens or req.max_tokens)
        params = req.sampling_params(max_tokens,
                                     (req.top_logprobs or 0) if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._stream(req, rid, ids, params, lora)
        final = await generate_whole(self.llm, ids, params, rid, lora)
        echo = self.echo(req)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": echo + c.text},
                    "logprobs": self._logprobs(req, c), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in final.outputs]
        n_out = sum(len(c.token_ids) for c in final.outputs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids), n_out)}

    async def _stream(self, req, rid, ids, params, lora):
        created, n_out = int(time.time()), 0
        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": req.model}
        async with aclosing(self.llm.generate(ids, params, rid, lora)) as outputs:
            first = await outputs.__anext__()  # a bad request fails here, before any chunk
            for i in range(req.n):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                      "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            if echo := self.echo(req):  # as vLLM: one chunk per choice, after the roles
                for i in range(req.n):
                    yield sse({**head, "choices": [{"index": i, "delta": {"content": echo},
                                                    "logprobs": None, "finish_reason": None}]})
            try:
                out = first
                while True:
                    if out.error:
                        raise APIError(out.error, 500, "InternalServerError")
                    for c in out.outputs:
                        n_out += len(c.token_ids)
                        yield sse({**head, "choices": [{
                            "index": c.index, "delta": {"content": c.text},
                            "logprobs": self._logprobs(req, c),
                            "finish_reason": c.finish_reason}]})
                    if out.finished:
                        break
                    out = await outputs.__anext__()
            except (APIError, RuntimeError) as exc:
                yield stream_error(exc)
                return
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(len(ids), n_out)})
        yield "data: [DONE]\n\n"
