"""Routes beyond OpenAI's: /tokenize, /detokenize, /metrics, runtime adapter (un)loading."""

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel

from lora_jax.engine.async_llm import AsyncLLM
from lora_jax.entrypoints.openai.metrics import ServerMetrics
from lora_jax.entrypoints.openai.protocol import APIError
from lora_jax.entrypoints.openai.serving_models import ServingModels
from lora_jax.request import LoRARequest


class TokenizeRequest(BaseModel):
    prompt: str
    model: str | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[int]
    model: str | None = None


class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace the weights of an adapter already loaded by that name


class UnloadLoRARequest(BaseModel):
    lora_name: str


def check_adapter_path(path: str, lora_root: str | None, allow_hub: bool) -> str:
    """A local path inside --lora-root (symlinks resolved; a relative path is taken from the
    root), or a Hub id when allowed."""
    local = Path(path).expanduser()
    if not local.is_absolute() and lora_root is not None:
        local = Path(lora_root).expanduser() / local
    if not local.exists():
        hub_like = "/" in path and not path.startswith(("/", ".", "~"))
        if allow_hub and hub_like:
            return path
        if hub_like:
            raise APIError(f"adapter path {path!r} does not exist here, and Hub ids need "
                           "--allow-hub-adapters", param="lora_path")
        raise APIError(f"adapter path {path!r} does not exist", 404, "NotFoundError",
                       "lora_path")
    resolved = local.resolve()
    if lora_root is None:
        raise APIError("runtime adapter loading needs --lora-root, the folder adapters may "
                       "be loaded from", param="lora_path")
    root = Path(lora_root).expanduser().resolve()
    if not resolved.is_relative_to(root):
        raise APIError(f"adapter path {path!r} is outside --lora-root {str(root)!r}",
                       403, "PermissionDeniedError", "lora_path")
    return str(resolved)


def add_routes(app: FastAPI, llm: AsyncLLM, models: ServingModels, args) -> None:
    metrics = ServerMetrics(llm, models)
    registry = metrics.registry
    requests = Counter("lora_jax_http_requests", "HTTP requests served", ["path", "status"],
                       registry=registry)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def metrics():
        # Reading the engine's gauges waits for the step in progress: off the event loop.
        text = await asyncio.to_thread(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ids = llm.engine.get_tokenizer().encode(req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return {"prompt": llm.engine.get_tokenizer().decode(req.tokens)}

    if not getattr(args, "allow_runtime_lora_updating", False):
        return

    loading = asyncio.Lock()  # one load at a time: a name is checked and taken atomically

    @app.post("/v1/load_lora_adapter")
    async def load(req: LoadLoRARequest):
        async with loading:
            if req.lora_name in models.loras and req.load_inplace:
                return await _reload(req)
            if req.lora_name in models.loras or req.lora_name == models.base_name:
                raise APIError(f"the name {req.lora_name!r} is taken (load_inplace: true "
                               "replaces an adapter's weights)", param="lora_name")
            path = check_adapter_path(req.lora_path, getattr(args, "lora_root", None),
                                      getattr(args, "allow_hub_adapters", False))
            lr = LoRARequest(req.lora_name, models.next_id(await llm.acall(llm.engine.list_loras)),
                             path)
            try:  # the engine thread reads the files between steps
                await llm.acall(llm.engine.add_lora, lr)
            except (ValueError, OSError) as exc:  # missing files, a defective adapter
                raise APIError(f"adapter {req.lora_name!r} cannot be served: {exc}",
                               param="lora_path") from exc
            models.loras[lr.lora_name] = lr
        return {"message": f"adapter {req.lora_name!r} loaded"}

    async def _reload(req: LoadLoRARequest):
        path = check_adapter_path(req.lora_path, getattr(args, "lora_root", None),
                                  getattr(args, "allow_hub_adapters", False))
        lr = LoRARequest(req.lora_name, models.loras[req.lora_name].lora_int_id, path)
        try:
            await llm.acall(llm.engine.reload_lora, lr)
        except (ValueError, OSError) as exc:
            raise APIError(f"adapter {req.lora_name!r} cannot be served: {exc}",
                           param="lora_path") from exc
        models.loras[lr.lora_name] = lr
        return {"message": f"adapter {req.lora_name!r} reloaded in place"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: UnloadLoRARequest):
        lr = models.loras.get(req.lora_name)
        if lr is None:
            raise APIError(f"The model '{req.lora_name}' does not exist.", 404,
                           "NotFoundError", "lora_name")
        del models.loras[req.lora_name]  # new requests for it are 404 from now on
        try:
            await llm.acall(llm.engine.remove_lora, lr.lora_int_id)
        except ValueError:  # running requests keep it; the CPU cache's LRU drops it later
            pass
        return {"message": f"adapter {req.lora_name!r} unloaded"}
