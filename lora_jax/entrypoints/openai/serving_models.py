"""Model names: the served base name and the adapters registered for it; GET /v1/models."""

import re
import time

from fastapi import APIRouter, Request

from lora_jax.entrypoints.openai.protocol import APIError
from lora_jax.request import LoRARequest

router = APIRouter()

# What a runtime-loaded adapter may be called: it appears in URLs, logs and metric labels.
NAME_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# How many names a 404 lists (the list may be long with many adapters).
_LISTED = 20


@router.get("/v1/models")
async def list_models(raw: Request):
    return raw.app.state.models.list()


def check_name(name: str, param: str = "lora_name") -> None:
    if not _NAME.fullmatch(name):
        raise APIError(f"{param} {name[:40]!r} is not a valid adapter name: use {NAME_RULE}",
                       param=param)


class ServingModels:
    def __init__(self, base_name: str, loras: list[LoRARequest] | None = None,
                 root: str | None = None, max_model_len: int | None = None):
        self.base_name, self.root, self.max_model_len = base_name, root or base_name, max_model_len
        self.loras: dict[str, LoRARequest] = {lr.lora_name: lr for lr in loras or []}
        self.created = int(time.time())
        self._last_id = 0

    def not_found(self, model: str, param: str = "model") -> APIError:
        names = [self.base_name, *self.loras]
        listed = ", ".join(repr(n) for n in names[:_LISTED])
        more = f" and {len(names) - _LISTED} more (GET /v1/models)" if len(names) > _LISTED else ""
        return APIError(f"The model '{model[:100]}' does not exist. Served: {listed}{more}.",
                        404, "NotFoundError", param)

    def resolve(self, model: str) -> LoRARequest | None:
        """The adapter `model` names, or None for the base; 404 for anything else."""
        if model == self.base_name:
            return None
        if model in self.loras:
            return self.loras[model]
        raise self.not_found(model)

    def next_id(self, taken=()) -> int:
        """A lora_int_id never handed out before, above every id in `taken` (the engine's)."""
        self._last_id = max([self._last_id, *taken,
                             *(lr.lora_int_id for lr in self.loras.values())]) + 1
        return self._last_id

    def list(self) -> dict:
        cards = [{"id": self.base_name, "object": "model", "created": self.created,
                  "owned_by": "lora-jax", "root": self.root, "parent": None,
                  "max_model_len": self.max_model_len}]
        cards += [{"id": name, "object": "model", "created": self.created,
                   "owned_by": "lora-jax", "root": lr.lora_path, "parent": self.base_name}
                  for name, lr in self.loras.items()]
        return {"object": "list", "data": cards}
