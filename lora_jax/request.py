"""LoRARequest: which adapter a request runs with. Imports no JAX, so clients can use it alone."""

import msgspec


class LoRARequest(msgspec.Struct, omit_defaults=True, frozen=False):
    """Names an adapter for a request, as vLLM's LoRARequest does.

    lora_name: unique name of the adapter; two requests are equal when their names are.
    lora_int_id: a positive integer id, unique per adapter.
    lora_path: a local folder in PEFT format, or a Hugging Face Hub repo id.
    long_lora_max_len: context length the adapter was trained for, when above the base model's.
    base_model_name: the model the adapter was trained on; checked against the served model.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    long_lora_max_len: int | None = None
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise ValueError(f"lora_int_id must be an int, got {self.lora_int_id!r}")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not isinstance(self.lora_path, str) or not self.lora_path.strip():
            raise ValueError(
                f"lora_path must name a local PEFT folder or a Hub repo id, got {self.lora_path!r} "
                f"(adapter {self.lora_name!r})"
            )
        max_len = self.long_lora_max_len
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or max_len < 1):
            raise ValueError(f"long_lora_max_len must be a positive int or None, got {max_len!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
