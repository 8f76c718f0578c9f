"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with --allow-runtime-lora-updating):
adapters from inside --lora-root, by safe names."""

import asyncio
import functools
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel

from lora_jax.entrypoints.openai.protocol import APIError
from lora_jax.entrypoints.openai.serving_models import check_name
from lora_jax.lora.adapters import CONFIG_NAME, WEIGHTS_NAME
from lora_jax.request import LoRARequest

router = APIRouter()


class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace the weights of an adapter already loaded by that name


class UnloadLoRARequest(BaseModel):
    lora_name: str


def _outside(path: str, root: Path) -> APIError:
    return APIError(f"adapter path {path!r} is outside --lora-root {str(root)!r}", 403,
                    "PermissionDeniedError", "lora_path")


def check_adapter_files(path: str, folder: Path, root: Path) -> None:
    """Every entry of the adapter folder resolves inside the root (a symlinked file is
    followed), and the files the loader reads are regular files."""
    for entry in folder.iterdir():
        if not entry.resolve().is_relative_to(root):
            raise _outside(f"{path}/{entry.name}", root)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = folder / name
        if file.exists() and not file.resolve().is_file():
            raise APIError(f"adapter file {path}/{name} is not a regular file",
                           param="lora_path")


def check_adapter_path(path: str, lora_root: str | None, allow_hub: bool) -> str:
    """A local folder inside --lora-root (symlinks resolved, the folder's files too; a relative
    path is taken from the root), or a Hub id when allowed."""
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
        raise _outside(path, root)
    if not resolved.is_dir():
        raise APIError(f"adapter path {path!r} is not a folder", param="lora_path")
    check_adapter_files(path, resolved, root)
    return str(resolved)


class AdapterLoader:
    """Loads and unloads adapters; one load at a time, so a name is checked and taken
    atomically."""

    def __init__(self, llm, models, args, metrics):
        self.llm, self.models, self.metrics = llm, models, metrics
        self.root = getattr(args, "lora_root", None)
        self.allow_hub = getattr(args, "allow_hub_adapters", False)
        self.lock = asyncio.Lock()

    def _path(self, req: LoadLoRARequest) -> str:
        return check_adapter_path(req.lora_path, self.root, self.allow_hub)

    async def _add(self, lr: LoRARequest, fn) -> None:
        try:  # read and validated in a thread of its own; the engine thread only registers
            weights = await asyncio.to_thread(self.llm.engine.read_lora, lr)
            await self.llm.acall(functools.partial(fn, read=weights), lr)
        except (ValueError, OSError) as exc:  # missing files, a defective adapter
            raise APIError(f"adapter {lr.lora_name!r} cannot be served: {exc}",
                           param="lora_path") from exc
        self.models.loras[lr.lora_name] = lr

    async def load(self, req: LoadLoRARequest) -> dict:
        check_name(req.lora_name)
        async with self.lock:
            models, engine = self.models, self.llm.engine
            if req.lora_name in models.loras and req.load_inplace:
                lr = LoRARequest(req.lora_name, models.loras[req.lora_name].lora_int_id,
                                 self._path(req))
                await self._add(lr, engine.reload_lora)
                return {"message": f"adapter {req.lora_name!r} reloaded in place"}
            if req.lora_name in models.loras or req.lora_name == models.base_name:
                raise APIError(f"the name {req.lora_name!r} is taken (load_inplace: true "
                               "replaces an adapter's weights)", param="lora_name")
            path = self._path(req)
            lr = LoRARequest(req.lora_name,
                             models.next_id(await self.llm.acall(engine.list_loras)), path)
            await self._add(lr, engine.add_lora)
        return {"message": f"adapter {req.lora_name!r} loaded"}

    async def unload(self, req: UnloadLoRARequest) -> dict:
        lr = self.models.loras.get(req.lora_name)
        if lr is None:
            raise self.models.not_found(req.lora_name, "lora_name")
        del self.models.loras[req.lora_name]  # new requests for it are 404 from now on
        self.metrics.forget_model(req.lora_name)
        try:
            await self.llm.acall(self.llm.engine.remove_lora, lr.lora_int_id)
        except ValueError:  # running requests keep it; the CPU cache's LRU drops it later
            pass
        return {"message": f"adapter {req.lora_name!r} unloaded"}


@router.post("/v1/load_lora_adapter")
async def load(req: LoadLoRARequest, raw: Request):
    return await raw.app.state.adapters.load(req)


@router.post("/v1/unload_lora_adapter")
async def unload(req: UnloadLoRARequest, raw: Request):
    return await raw.app.state.adapters.unload(req)
