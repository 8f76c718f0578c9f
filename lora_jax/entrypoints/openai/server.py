"""The OpenAI-compatible HTTP app: build_app(async_llm, args) -> FastAPI.

Each endpoint family is a module with its own APIRouter (completions, chat, models, tokenize,
adapters, metrics, health); the handlers they call hang on `app.state`.
"""

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai import (
    metrics,
    serving_adapters,
    serving_chat,
    serving_completions,
    serving_health,
    serving_models,
    serving_tokenize,
)
from lora_jax.entrypoints.openai.middleware import ApiKey, BodyLimit, RequestCounter
from lora_jax.entrypoints.openai.protocol import APIError
from lora_jax.entrypoints.openai.serving_engine import ServerLimits


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _bad_body(_request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ())[1:]]
    where = ".".join(loc) or None
    return _error(APIError(f"invalid request: {where}: {first.get('msg', exc)}",
                           param=loc[0] if loc else None))


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request, exc: APIError):
        return _error(exc)

    async def value_error(_request, exc: ValueError):
        return _error(APIError(str(exc)))

    async def internal(_request, exc: Exception):
        return _error(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                               "InternalServerError"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(ValueError, value_error)
    app.add_exception_handler(Exception, internal)


def _add_state(app: FastAPI, llm: AsyncLLM, args: SimpleNamespace) -> None:
    state, limits = app.state, ServerLimits.from_args(args)
    state.llm, state.limits = llm, limits
    name = getattr(args, "served_model_name", None) or args.model
    state.models = models = serving_models.ServingModels(
        name, getattr(args, "lora_requests", None), args.model, llm.engine.max_model_len)
    state.completions = serving_completions.ServingCompletions(llm, models, limits)
    config = llm.engine.model_config
    state.chat = serving_chat.ServingChat(
        llm, models, serving_chat.load_chat_template(args.model,
                                                      getattr(args, "chat_template", None)),
        serving_chat.special_tokens(args.model, llm.engine.get_tokenizer(),
                                    config.bos_token_id, config.eos_token_id), limits)
    state.metrics = metrics.ServerMetrics(llm, models)
    state.adapters = serving_adapters.AdapterLoader(llm, models, args, state.metrics)


def build_app(llm: AsyncLLM, args: SimpleNamespace) -> FastAPI:
    """args: model, served_model_name, lora_requests (list of LoRARequest), chat_template,
    api_key, max_n, max_request_bytes, return_tokens_as_token_ids, allow_runtime_lora_updating,
    lora_root, allow_hub_adapters (any may be missing: its default)."""
    app = FastAPI(title="lora-jax")
    _add_state(app, llm, args)
    _add_error_handlers(app)
    for module in (serving_health, serving_models, serving_completions, serving_chat,
                   serving_tokenize, metrics):
        app.include_router(module.router)
    if getattr(args, "allow_runtime_lora_updating", False):
        app.include_router(serving_adapters.router)
    # Added last = outermost: count everything, check the key before reading the body.
    app.add_middleware(BodyLimit, max_bytes=app.state.limits.max_request_bytes)
    app.add_middleware(ApiKey, api_key=getattr(args, "api_key", None))
    app.add_middleware(RequestCounter, counter=app.state.metrics.http_requests)
    return app
