"""LLM: vLLM's offline interface over the engine."""

from collections.abc import Sequence as Seq
from typing import Any

import msgspec

from lora_jax.config import EngineConfig
from lora_jax.engine.llm_engine import LLMEngine, parse_prompt
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.outputs import RequestOutput
from lora_jax.progress import progress_bar
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import RequestOutputKind, SamplingParams
from lora_jax.worker.distributed import DONE, STOP

Prompt = str | dict[str, Any]


class LLM:
    """One base model and its adapters. See EngineConfig for every option.

    Errors: a problem with one request (bad prompt, missing or unservable adapter, ...) is
    raised from generate() when a single prompt was given; with a list of prompts, it is reported
    on that request's RequestOutput (`error` set, `outputs` empty) and every other request runs.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, max_num_seqs: int = 256,
                 max_model_len: int | None = None, seed: int = 0, mesh=None,
                 **engine_options: Any):
        """mesh: a jax.sharding.Mesh with a "tp" axis to split the model over (default: one
        made from tensor_parallel_size when that is above 1, else no mesh)."""
        self.engine = LLMEngine(EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, enable_lora=enable_lora,
            max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, seed=seed,
            **engine_options), mesh=mesh)
        self._counter = 0

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for `engine`."""
        return self.engine

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of the prompts. With several processes (num_processes > 1),
        every process calls it; process 0 gets the outputs, the others mirror its device
        calls and get []."""
        core = self.engine.core
        if core.is_follower:  # another process drives: mirror its device calls
            core.follow()
            return []
        try:
            return self._generate(prompts, sampling_params, lora_request, use_tqdm)
        finally:
            core.announce(DONE)  # several processes: the followers' generate returns

    def _generate(self, prompts, sampling_params, lora_request, use_tqdm):
        single = isinstance(prompts, str | dict)
        prompts = [prompts] if single else list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts),
                             "sampling_params", SamplingParams)
        loras = _per_prompt(lora_request, len(prompts), "lora_request", LoRARequest | None)
        outputs: dict[str, RequestOutput] = {}
        order = []
        for prompt, p, lora in zip(prompts, params, loras, strict=True):
            request_id = str(self._counter)
            self._counter += 1
            order.append(request_id)
            text, ids = prompt if isinstance(prompt, str) else None, None
            try:
                text, ids = parse_prompt(prompt)
                if p.output_kind != RequestOutputKind.FINAL_ONLY:  # generate returns finals
                    p = SamplingParams(**{**msgspec.structs.asdict(p),
                                          "output_kind": RequestOutputKind.FINAL_ONLY})
                self.engine.add_request(request_id, prompt, p, lora)
            except (ValueError, FileNotFoundError) as err:
                if single:
                    raise
                outputs[request_id] = RequestOutput(request_id, text, list(ids or []), [], True,
                                                    lora, error=f"{type(err).__name__}: {err}")
        bar = progress_bar(total=len(prompts), desc="generate",
                           disable=not use_tqdm or len(prompts) < 2)
        bar.update(len(outputs))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    outputs[out.request_id] = out
                    bar.update(1)
        bar.close()
        if single and outputs[order[0]].error:
            # An adapter that failed to load in the background raises as it would have here.
            lora = loras[0]
            cause = lora is not None and self.engine.adapters.load_error(lora.lora_int_id)
            raise cause or ValueError(outputs[order[0]].error)
        return [outputs[rid] for rid in order]

    def close(self) -> None:
        """Several processes: every process calls it; process 0 tells the others to stop,
        and they return once it has (no-op with one process)."""
        core = self.engine.core
        if core.is_follower:
            core.follow(until=(STOP,))
        else:
            core.announce(STOP)

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Register an adapter (from its path, or the given in-memory weights, replacing an
        adapter of the same id in place: no recompilation)."""
        self.engine.add_lora(lora_request, adapter)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        return self.engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def pin_lora(self, lora_id: int) -> bool:
        return self.engine.pin_lora(lora_id)

    def get_tokenizer(self):
        return self.engine.get_tokenizer()


def _per_prompt(value, n: int, name: str, kind) -> list:
    """One value for every prompt, or a list with one per prompt, each of type `kind`."""
    values = [value] * n if value is None or isinstance(value, SamplingParams | LoRARequest) \
        else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts; pass one, or one "
                         "per prompt")
    wrong = next((v for v in values if not isinstance(v, kind)), None)
    if wrong is not None:
        raise ValueError(f"{name} entries must be {kind}, got {type(wrong).__name__}")
    return values
