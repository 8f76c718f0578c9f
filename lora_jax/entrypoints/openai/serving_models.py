"""Model names: the served base name and the adapters registered for it."""

import time

from lora_jax.entrypoints.openai.protocol import APIError
from lora_jax.request import LoRARequest


class ServingModels:
    def __init__(self, base_name: str, loras: list[LoRARequest] | None = None,
                 root: str | None = None, max_model_len: int | None = None):
        self.base_name, self.root, self.max_model_len = base_name, root or base_name, max_model_len
        self.loras: dict[str, LoRARequest] = {lr.lora_name: lr for lr in loras or []}
        self.created = int(time.time())
        self._last_id = 0

    def resolve(self, model: str) -> LoRARequest | None:
        """The adapter `model` names, or None for the base; 404 for anything else."""
        if model == self.base_name:
            return None
        if model in self.loras:
            return self.loras[model]
        raise APIError(f"The model '{model}' does not exist.", 404, "NotFoundError", "model")

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
