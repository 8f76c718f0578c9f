"""The OpenAI-compatible HTTP app: build_app(async_llm, args) -> FastAPI."""

import hmac
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.protocol import APIError, ChatRequest, CompletionRequest
from lora_jax.entrypoints.openai.serving_chat import (
    ServingChat,
    load_chat_template,
    special_tokens,
)
from lora_jax.entrypoints.openai.serving_completions import ServingCompletions
from lora_jax.entrypoints.openai.serving_extra import add_routes
from lora_jax.entrypoints.openai.serving_models import ServingModels


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _respond(result):
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


def build_app(llm: AsyncLLM, args: SimpleNamespace) -> FastAPI:
    """args: model, served_model_name, lora_requests (list of LoRARequest), chat_template,
    api_key (or None)."""
    app = FastAPI(title="lora-jax")
    name = getattr(args, "served_model_name", None) or args.model
    models = ServingModels(name, getattr(args, "lora_requests", None), args.model,
                           llm.engine.max_model_len)
    completions = ServingCompletions(llm, models)
    tok, config = llm.engine.get_tokenizer(), llm.engine.model_config
    chat = ServingChat(llm, models,
                       load_chat_template(args.model, getattr(args, "chat_template", None)),
                       special_tokens(args.model, tok, config.bos_token_id, config.eos_token_id))
    api_key = getattr(args, "api_key", None)
    app.state.llm, app.state.models = llm, models

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(APIError("missing or wrong API key (send 'Authorization: Bearer "
                                       "KEY')", 401, "AuthenticationError"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(APIError(f"invalid request: {where}: {first.get('msg', exc)}",
                               param=where))

    @app.exception_handler(ValueError)
    async def value_error(_request, exc: ValueError):
        return _error(APIError(str(exc)))

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        return _error(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                               "InternalServerError"))

    @app.get("/health")
    async def health():
        if not llm.is_alive():
            return JSONResponse({"error": "the engine loop has stopped"}, status_code=503)
        return {}

    @app.get("/version")
    async def version():
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"version": version("lora-jax")}
        except PackageNotFoundError:
            return {"version": "0+unknown"}

    @app.get("/v1/models")
    async def list_models():
        return models.list()

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest):
        return await _respond(await completions.create(req))

    @app.post("/v1/chat/completions")
    async def create_chat(req: ChatRequest):
        return await _respond(await chat.create(req))

    add_routes(app, llm, models, args)
    return app
