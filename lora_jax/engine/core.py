"""The engine: requests in, continuous batching over adapters, finished outputs out."""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_jax.config import EngineConfig
from lora_jax.core.block_pool import BlockPool, KVCacheManager
from lora_jax.core.scheduler import Batch, Scheduler, Sequence
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.lora.registry import AdapterRegistry
from lora_jax.lora.slots import AdapterSlots
from lora_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams
from lora_jax.tokenizer import TextStream, TextTokenizer
from lora_jax.worker.compilation import CompileReport, compile_all, enable_persistent_cache
from lora_jax.worker.distributed import DONE, FILL, STEP, STOP, StepChannel
from lora_jax.worker.memory import LoadMemory
from lora_jax.worker.mesh import tensor_parallel_for
from lora_jax.worker.runner import Pending, RowInput, Runner
from models import load_llama
from models.kv_cache import kv_bytes_per_token
from models.shard_loading import load_llama_sharded

# The CPU default pool: what max_num_seqs full-length sequences need, at most this.
DEFAULT_KV_CACHE_BYTES = 4 << 30


def resolve_model_path(model: str) -> Path:
    """A local Hugging Face model folder, else a Hub id fetched with huggingface_hub."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=[
            "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"]))
    except Exception as err:  # offline, not found, invalid id, gated
        raise FileNotFoundError(f"model {model!r} is not a local folder, and fetching it as a "
                                f"Hub repo id failed: {type(err).__name__}: {err}") from err


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    adapter: LoRAAdapter | None
    rope_scale: float
    seeds: list[int]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    seqs: list[Sequence] = field(default_factory=list)
    completions: list[CompletionOutput] = field(default_factory=list)
    streams: dict[int, TextStream] = field(default_factory=dict)  # incremental text per output
    sent: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # DELTA: reported

    def finished(self) -> bool:
        return all(c.finished() for c in self.completions)

    def _text(self, comp: CompletionOutput, tokenizer: TextTokenizer | None) -> str:
        """The output's text so far. While it runs with stop strings, the last characters
        that could still begin one are held back, so no text reported is ever taken back."""
        if tokenizer is None or isinstance(comp.stop_reason, str):
            return comp.text  # none, or already cut at the stop string
        stream = self.streams.get(comp.index)
        text = stream.text if stream is not None else tokenizer.decode(comp.token_ids)
        if comp.finished():
            comp.text = text
        elif self.params.stop_strings:
            text = text[:max(0, len(text) - max(map(len, self.params.stop_strings)) + 1)]
        return text

    def output(self, tokenizer: TextTokenizer | None) -> RequestOutput | None:
        """This step's report in the request's output kind (None: nothing to report)."""
        kind, finished = self.params.output_kind, self.finished()
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = []
        for comp in self.completions:
            text = self._text(comp, tokenizer)
            if kind == RequestOutputKind.DELTA:
                tokens, chars, reported_end = self.sent.get(comp.index, (0, 0, False))
                if reported_end or (len(comp.token_ids) == tokens and not comp.finished()):
                    continue
                self.sent[comp.index] = (len(comp.token_ids), len(text), comp.finished())
                logprobs = None if comp.logprobs is None else comp.logprobs[tokens:]
                outputs.append(CompletionOutput(
                    comp.index, text[chars:], comp.token_ids[tokens:], comp.cumulative_logprob,
                    logprobs, comp.finish_reason, comp.stop_reason))
            elif not finished:  # CUMULATIVE: a snapshot that later steps do not change
                outputs.append(CompletionOutput(
                    comp.index, text, list(comp.token_ids), comp.cumulative_logprob,
                    None if comp.logprobs is None else list(comp.logprobs), comp.finish_reason,
                    comp.stop_reason))
            else:
                outputs.append(comp)
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs,
                             finished=finished, lora_request=self.lora_request,
                             metrics=self.metrics)


@dataclass
class _InFlight:
    """A dispatched step: its batch, its samples on the device, and the row of each sequence
    that samples in it (seq_id -> row)."""

    batch: Batch
    pending: Pending
    rows: dict[int, int]


class Engine:
    """Holds the model, the KV cache, the adapter slots and the scheduler; `step` runs one batch."""

    def __init__(self, config: EngineConfig, *, mesh=None):
        self.config = config
        distributed = config.distributed()
        if distributed is not None:
            distributed.initialize()  # before the model touches a device
        self.model_path = resolve_model_path(config.model)
        tp = tensor_parallel_for(self.model_path, config.tensor_parallel_size, mesh)
        memory = LoadMemory()
        # With tensor parallelism each weight is read into its shards: no whole copy anywhere.
        self.model = (load_llama(self.model_path, dtype=config.dtype) if tp is None else
                      load_llama_sharded(self.model_path, tp, dtype=config.dtype))
        memory.loaded()
        # The checkpoint's config (a split model's own repeats kv heads for its shards).
        self.model_config = mc = self.model.config if tp is None else tp.base_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        tok_path = Path(config.tokenizer) if config.tokenizer else self.model_path
        self.tokenizer = (TextTokenizer(tok_path, mc.bos_token_id)
                          if config.tokenizer or (tok_path / "tokenizer.json").is_file() else None)
        self.eos_ids = {mc.eos_token_id} if isinstance(mc.eos_token_id, int) else set(
            mc.eos_token_id or ())
        dtype = self.model.dtype
        self.num_kv_blocks = self._pool_blocks(config, dtype)
        self.kv = KVCacheManager(BlockPool(self.num_kv_blocks, config.block_size,
                                           config.enable_prefix_caching))
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk,
            max_prefill_seqs=config.max_prefill_seqs, kv=self.kv)
        self.slots = (AdapterSlots(mc, config.max_loras, config.max_lora_rank, dtype,
                                   tensor_parallel=tp)
                      if config.enable_lora else None)
        self.runner = Runner(self.model, num_rows=config.max_num_seqs, max_len=self.max_model_len,
                             num_blocks=self.num_kv_blocks, block_size=config.block_size,
                             dtype=dtype, max_num_batched_tokens=config.max_num_batched_tokens,
                             max_prefill_seqs=config.max_prefill_seqs,
                             lora_backend=config.lora_backend,
                             attention_backend=config.attention_backend, tensor_parallel=tp)
        self.channel = None
        if distributed is not None:
            self.channel = StepChannel()
            self.runner.channel = self.channel
            if self.slots is not None:
                self.slots.channel = self.channel
        self.adapters = AdapterRegistry(
            mc, max_lora_rank=config.max_lora_rank, served=config.model,
            served_path=self.model_path,
            capacity=config.max_cpu_loras or max(config.max_loras, 8))
        self._owner: dict[int, tuple[_Request, int]] = {}
        self._inflight: _InFlight | None = None  # the dispatched step not yet read
        self._requests: dict[str, _Request] = {}
        self._next_seq = 0
        self._rng = np.random.default_rng(config.seed)
        self._adapter_versions: dict[int, tuple[LoRAAdapter, int]] = {}
        self.compile_report: CompileReport | None = None
        cache_dir = enable_persistent_cache(config.cache_dir())
        if config.should_compile_on_start():
            self.compile_report = compile_all(self.runner, self._stacks(), self.slots,
                                              cache_dir=cache_dir)
        self.memory = memory.started()

    @property
    def is_follower(self) -> bool:
        """A process other than 0 of several: it mirrors process 0's device calls (`follow`)
        and schedules nothing itself."""
        return self.channel is not None and not self.channel.leader

    def follow(self, until=(DONE, STOP)) -> int:
        """A follower: make each device call process 0 announces, until one of `until` (the
        end of a generate, shutdown) comes; returns that kind."""
        while True:
            kind, values = self.channel.receive_header()
            if kind == STEP:
                self.runner.follow(values, self._stacks())
            elif kind == FILL:
                self.slots.follow(values[0])
            elif kind in until:
                return kind

    def announce(self, kind: int) -> None:
        """Process 0 of several: tell the followers a generate ended (DONE) or to stop (STOP)."""
        if self.channel is not None and self.channel.leader:
            self.channel.send(kind)

    def compile_stats(self) -> dict:
        """Programs compiled at start-up and since (0 after start-up is the goal), seconds,
        and persistent-cache hits."""
        report = self.compile_report
        total = self.runner.compiled_count()
        return {"programs": total,
                "programs_at_start": self.runner.compiled_at_start,
                "compiled_after_start": total - self.runner.compiled_at_start,
                "start_seconds": None if report is None else round(report.seconds, 2),
                "cache_hits": None if report is None else report.cache_hits,
                "cache_dir": None if report is None else report.cache_dir}

    def _pool_blocks(self, config: EngineConfig, dtype) -> int:
        """The pool's size: num_kv_blocks, or kv_cache_memory_bytes over one block's bytes,
        or by default what max_num_seqs full-length sequences need, up to 4 GiB."""
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_bytes_per_token(self.model_config, dtype) * config.block_size
        wanted = config.kv_cache_memory_bytes or min(
            DEFAULT_KV_CACHE_BYTES, config.max_num_seqs * self.max_model_len * per_block
            // config.block_size)
        blocks = wanted // per_block
        if blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={wanted} is below one KV block of "
                             f"{per_block} bytes (block_size {config.block_size}); give more")
        return int(blocks)

    @property
    def kv_cache_bytes(self) -> int:
        """What the device pool holds: k and v of every layer, block and position."""
        return int(self.runner.kv.k.nbytes + self.runner.kv.v.nbytes)

    def stats(self) -> dict:
        """Counters for metrics: requests, KV blocks, prefix-cache hits, preemptions, the
        adapters (lora_int_ids) of running and waiting sequences, adapter slot loads."""
        pool = self.kv.pool
        return {"num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_used": pool.num_used, "kv_blocks_total": pool.num_blocks,
                "prefix_cache_queries": pool.stats.queries,
                "prefix_cache_hits": pool.stats.hits,
                "num_preemptions": self.scheduler.num_preemptions,
                "running_adapters": sorted({s.adapter for s in self.scheduler.running} - {None}),
                "waiting_adapters": sorted({s.adapter for s in self.scheduler.waiting} - {None}),
                "max_loras": self.config.max_loras,
                "adapter_slot_loads": self.slots.num_loads if self.slots is not None else 0,
                **self.memory.stats()}

    def _adapter_identity(self, lora_id: int, adapter: LoRAAdapter) -> tuple[int, int]:
        """(id, version): the version changes whenever new weights take the id, so KV cached
        under old weights is never reused."""
        known = self._adapter_versions.get(lora_id)
        if known is None or known[0] is not adapter:
            version = 1 + max((v for _, v in self._adapter_versions.values()), default=0)
            self._adapter_versions[lora_id] = known = (adapter, version)
        return lora_id, known[1]

    # Adapters -----------------------------------------------------------------------------

    def _require_lora(self, req: LoRARequest) -> None:
        if self.slots is None:
            raise ValueError(f"adapter {req.lora_name!r} was requested but LoRA is off; "
                             "create the LLM with enable_lora=True")

    def add_lora(self, req: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Load (or take the given in-memory) adapter into the CPU registry; reuse it when
        known. New weights under an id already in a slot replace it there, compiling nothing."""
        self._require_lora(req)
        adapter, replaced = self.adapters.register(req, adapter)
        if replaced:
            self.slots.reload(req.lora_int_id, adapter)
        self.adapters.trim(protected=set(self.slots.loaded()) | self.scheduler.pinned)
        return adapter

    def reload_lora(self, req: LoRARequest) -> LoRAAdapter:
        """Load req's adapter from its path again under its id (vLLM's load_inplace): new
        weights replace the old in the CPU registry and in its slot, compiling nothing; cached
        prefixes of the old weights are never reused."""
        self._require_lora(req)
        adapter = self.adapters.reload(req)
        self.slots.reload(req.lora_int_id, adapter)
        return adapter

    def remove_lora(self, lora_id: int) -> bool:
        if lora_id in self.scheduler.adapters_in_use():
            raise ValueError(f"adapter {lora_id} is used by running requests; remove it later")
        self.scheduler.pinned.discard(lora_id)
        if self.slots is not None:
            self.slots.evict(lora_id)
        return self.adapters.remove(lora_id)

    def list_loras(self) -> set[int]:
        return self.adapters.ids()

    def pin_lora(self, lora_id: int) -> bool:
        if lora_id not in self.adapters or self.slots is None:
            raise ValueError(f"adapter {lora_id} is not loaded; add_lora it first")
        held = self.scheduler.adapters_in_use() | self.scheduler.pinned
        if lora_id not in held and len(held) >= self.config.max_loras:
            raise ValueError(f"cannot pin adapter {lora_id}: all {self.config.max_loras} "
                             "slots are held by pinned or running adapters")
        self.slots.activate({lora_id: self.adapters.adapter(lora_id)}, keep=held)
        self.scheduler.pinned.add(lora_id)
        return True

    # Requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int] | None,
                    params: SamplingParams, lora_request: LoRARequest | None = None) -> None:
        """Validate and queue one request; ValueError / FileNotFoundError say what is wrong."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
        params.validate()
        if prompt_ids is None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer.json in the model folder (or "
                                 "tokenizer=...); or pass {'prompt_token_ids': [...]}")
            prompt_ids = self.tokenizer.encode(prompt)
        not_ints = [t for t in prompt_ids
                    if isinstance(t, bool) or not isinstance(t, int | np.integer)]
        if not_ints:  # int() would silently truncate 6.5 to 6
            raise ValueError(f"request {request_id}: prompt_token_ids must be integers, got "
                             f"{not_ints[:5]!r}")
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token ids {bad[:5]} are outside the "
                             f"vocabulary [0, {vocab})")
        rope_scale, max_len = 1.0, self.max_model_len
        adapter = self.add_lora(lora_request) if lora_request is not None else None
        if lora_request is not None and lora_request.long_lora_max_len:
            long_len = lora_request.long_lora_max_len
            if long_len > self.max_model_len:
                raise ValueError(f"adapter {lora_request.lora_name!r} has long_lora_max_len "
                                 f"{long_len} above max_model_len {self.max_model_len}; "
                                 "create the LLM with a larger max_model_len")
            base_len = self.model_config.max_position_embeddings
            rope_scale, max_len = float(max(1, math.ceil(long_len / base_len))), long_len
        if len(prompt_ids) >= max_len:
            raise ValueError(f"request {request_id}: prompt of {len(prompt_ids)} tokens leaves "
                             f"no room to generate within max_model_len {max_len}")
        needed = min(len(prompt_ids) + params.max_tokens, max_len)
        pool_tokens = self.num_kv_blocks * self.config.block_size
        if needed > pool_tokens:
            raise ValueError(f"request {request_id}: prompt ({len(prompt_ids)} tokens) + "
                             f"max_tokens ({params.max_tokens}) needs {needed} tokens of KV "
                             f"cache, but the whole pool holds {pool_tokens} ({self.num_kv_blocks}"
                             f" blocks of {self.config.block_size}); lower max_tokens or give "
                             "a larger kv_cache_memory_bytes")
        seeds = [(params.seed + i) % 2**32 if params.seed is not None
                 else int(self._rng.integers(2**32)) for i in range(params.n)]
        req = _Request(request_id, prompt, prompt_ids, params, lora_request, adapter, rope_scale,
                       seeds)
        self._requests[request_id] = req
        identity = (None if adapter is None
                    else self._adapter_identity(lora_request.lora_int_id, adapter))
        for i in range(params.n):
            seq = Sequence(self._next_seq, prompt_ids, lora_request and lora_request.lora_int_id,
                           cache_key=(identity, rope_scale),
                           max_output=min(params.max_tokens, max_len - len(prompt_ids)),
                           # Repetition marks the whole prompt as seen: it computes it all.
                           use_prefix_cache=params.repetition_penalty == 1.0)
            self._next_seq += 1
            self._owner[seq.seq_id] = (req, i)
            req.seqs.append(seq)
            req.completions.append(CompletionOutput(
                i, "", seq.output_ids, 0.0, [] if params.logprobs is not None else None))
            self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        """Requests wait, run, or have tokens still on the device (aborted ones do not count:
        an in-flight step whose requests all ended is read and dropped by the next step)."""
        flight = self._inflight
        return self.scheduler.has_unfinished() or (flight is not None and any(
            s.seq_id in self._owner for s in flight.batch.seqs()))

    def abort_request(self, request_ids) -> None:
        """Stop requests now (unknown or finished ids are ignored): their cache rows and the
        adapter slots they held are free for the next step, and they report nothing more."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            req = self._requests.pop(request_id, None)
            if req is None:
                continue
            self.scheduler.finish(req.seqs)
            for seq in req.seqs:
                self._owner.pop(seq.seq_id, None)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return what it reports: each request in its output kind (finished
        requests always, running ones for CUMULATIVE and DELTA).

        With async_scheduling (the default) the host runs one step ahead of its results: the
        next batch is scheduled and dispatched while the device still computes the previous
        one, whose tokens are read (stop checks, text, outputs) only afterwards. A decode
        whose last token is still on the device takes it there. A sequence that turns out to
        have stopped drops what the next step computed for it, so no output changes."""
        batch = self.scheduler.schedule()
        if not batch and self._inflight is None:
            return self._fail_unschedulable()
        outputs: list[RequestOutput] = []
        dispatched = self._dispatch(batch, outputs) if batch else None
        if self._inflight is not None:
            outputs += self._process(self._inflight)
        self._inflight = dispatched
        if not self.config.async_scheduling and dispatched is not None:
            self._inflight = None
            outputs += self._process(dispatched)
        return outputs

    def _dispatch(self, batch: Batch, outputs: list[RequestOutput]) -> _InFlight | None:
        """Start the batch on the device and account for its tokens (None if it failed: its
        requests' errors go to outputs)."""
        if self.slots is not None:
            needed = {s.adapter: self._owner[s.seq_id][0].adapter for s in batch.seqs()
                      if s.adapter is not None}
            held = self.scheduler.adapters_in_use() | self.scheduler.pinned
            self.slots.activate(needed, keep=held)
        previous = self._inflight.rows if self._inflight is not None else {}
        # One ragged step: decodes first, then prefill chunks (a recompute is a chunk too).
        rows = []
        for seq in batch.decodes:
            if seq.num_cached < len(seq.tokens):
                rows.append(self._row(seq, [seq.tokens[seq.num_cached]], seq.num_cached))
            else:  # its token is the in-flight step's sample, still on the device
                rows.append(self._row(seq, [0], seq.num_cached, src=previous[seq.seq_id]))
        rows += [self._row(c.seq, c.seq.tokens[c.start:c.start + c.length], c.start,
                           prompt=not c.seq.output_ids, keeps=c.completes_prompt)
                 for c in batch.prefills]
        try:
            pending = self.runner.dispatch(rows, self._stacks(), self._num_logprobs(batch.seqs()))
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the engine
            outputs += self._fail_step(batch, err)
            return None
        sampled: dict[int, int] = {}
        for i, seq in enumerate(batch.decodes):
            seq.num_cached += 1
            seq.num_pending += 1
            sampled[seq.seq_id] = i
        for i, chunk in enumerate(batch.prefills, start=len(batch.decodes)):
            chunk.seq.num_cached += chunk.length
            if chunk.completes_prompt:
                chunk.seq.num_pending += 1
                sampled[chunk.seq.seq_id] = i
        for seq in batch.seqs():
            seq.started = True
            # Blocks this step fills are reusable at once: any step that reads them runs
            # after this one on the device.
            self._cache_blocks(seq)
        return _InFlight(batch, pending, sampled)

    def _process(self, flight: _InFlight) -> list[RequestOutput]:
        """Read a dispatched step's tokens and report them. Sequences that ended since it was
        dispatched (a stop seen in the step before, an abort) drop theirs."""
        try:
            out = self.runner.collect(flight.pending)
        except Exception as err:  # noqa: BLE001 - as in _dispatch
            # Its blocks were offered for reuse at dispatch; the failure may have left them
            # unwritten.
            self.kv.pool.reset_prefix_cache()
            return self._fail_step(flight.batch, err)
        self._touched: dict[str, _Request] = {}
        done: list[Sequence] = []
        for seq in flight.batch.seqs():
            if seq.seq_id not in self._owner:
                continue
            if seq.seq_id in flight.rows:
                seq.num_pending -= 1
                self._append(seq, flight.rows[seq.seq_id], out, done)
            self._cache_blocks(seq)
        return self._finish(done)

    def _cache_blocks(self, seq: Sequence) -> None:
        """Offer a running sequence's full blocks whose tokens the host knows for reuse."""
        if seq.use_prefix_cache and seq in self.scheduler.running:
            known = min(seq.num_cached, len(seq.tokens))
            self.kv.cache_full_blocks(seq.key, seq.tokens[:known], seq.cache_key)

    def _stacks(self):
        return self.slots.stacks if self.slots is not None else None

    def _num_logprobs(self, seqs: list[Sequence]) -> int:
        # One static size (0 or MAX_LOGPROBS) keeps the count of compiled programs small.
        wanted = any(self._owner[s.seq_id][0].params.logprobs is not None for s in seqs)
        return MAX_LOGPROBS if wanted else 0

    def _row(self, seq: Sequence, tokens: list[int], start: int, *, prompt: bool = False,
             keeps: bool = True, src: int = -1) -> RowInput:
        req, i = self._owner[seq.seq_id]
        p = req.params
        slot = self.slots.slot_of(seq.adapter) if seq.adapter is not None else -1
        return RowInput(tokens, start, seq.row, self.scheduler.block_table(seq), slot,
                        req.rope_scale, p.temperature, p.top_k, p.top_p, p.min_p, req.seeds[i],
                        len(seq.output_ids) + seq.num_pending, p.presence_penalty,
                        p.frequency_penalty, p.repetition_penalty, prompt, not seq.started,
                        keeps, src)

    def _append(self, seq: Sequence, i: int, out, done: list[Sequence]) -> None:
        req, index = self._owner[seq.seq_id]
        comp, p = req.completions[index], req.params
        token = int(out.tokens[i])
        seq.output_ids.append(token)
        self._touched[req.request_id] = req
        stream, piece = None, ""
        if self.tokenizer is not None and (
                p.stop_strings or p.output_kind != RequestOutputKind.FINAL_ONLY):
            stream = req.streams.setdefault(index, self.tokenizer.stream())
            piece = stream.add(token)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.perf_counter()
        comp.cumulative_logprob += float(out.logprob[i])
        if comp.logprobs is not None:
            k = p.logprobs
            entry = {int(t): float(lp) for t, lp in zip(out.top_ids[i][:k],
                                                        out.top_logprobs[i][:k], strict=True)}
            entry[token] = float(out.logprob[i])
            comp.logprobs.append(entry)
        if token in self.eos_ids and not p.ignore_eos:
            comp.finish_reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            comp.finish_reason, comp.stop_reason = "stop", token
        elif p.stop_strings and stream is not None and self._hit_stop_string(
                comp, p, stream, piece):
            comp.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_output:
            comp.finish_reason = "length"
        if comp.finish_reason is not None:
            done.append(seq)

    @staticmethod
    def _hit_stop_string(comp: CompletionOutput, p: SamplingParams, stream: TextStream,
                         piece: str) -> bool:
        """After one more token's text: a stop string can only end in the new text, so only
        the tail that could hold it is searched (never the whole output per token)."""
        if not piece:
            return False
        text = stream.text
        tail = max(0, len(text) - len(piece) - max(map(len, p.stop_strings)) + 1)
        hits = [(at, s) for s in p.stop_strings if (at := text.find(s, tail)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        comp.text, comp.stop_reason = text[:at], stop
        return True

    def _finish(self, done: list[Sequence]) -> list[RequestOutput]:
        self.scheduler.finish(done)
        for seq in done:
            req, _ = self._owner.pop(seq.seq_id)
            if req.finished() and req.metrics.finished_time is None:
                req.metrics.finished_time = time.perf_counter()
                self._requests.pop(req.request_id, None)
        outputs = [req.output(self.tokenizer) for req in self._touched.values()]
        return [out for out in outputs if out is not None]

    def _fail_step(self, batch, err: Exception) -> list[RequestOutput]:
        """The step's requests end with the error on their outputs. If the device state was
        lost with it (the donated KV pool), the pool starts over empty: cached prefixes are
        forgotten and every other running sequence is recomputed from its tokens."""
        failed: dict[str, _Request] = {}
        for seq in batch.seqs():
            req = self._owner[seq.seq_id][0]
            failed[req.request_id] = req
        seqs = [s for req in failed.values() for s in req.seqs]
        self.scheduler.finish(seqs)
        for seq in seqs:
            self._owner.pop(seq.seq_id, None)
        if self.runner.recover():
            self.kv.pool.reset_prefix_cache()
            for seq in list(self.scheduler.running):
                self.scheduler.preempt(seq)
        message = f"the step running this request failed: {type(err).__name__}: {err}"
        outputs = []
        for req in failed.values():
            self._requests.pop(req.request_id, None)
            outputs.append(RequestOutput(req.request_id, req.prompt, req.prompt_ids, [], True,
                                         req.lora_request, error=message))
        return outputs

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """Nothing runs and nothing can start: the waiting adapters can never get a slot."""
        failed = []
        for seq in list(self.scheduler.waiting):
            req, _ = self._owner.pop(seq.seq_id)
            self._requests.pop(req.request_id, None)
            if req not in failed:
                failed.append(req)
        self.scheduler.finish([s for r in failed for s in r.seqs])
        outputs = []
        for req in failed:
            out = RequestOutput(req.request_id, req.prompt, req.prompt_ids, [], True,
                                req.lora_request, error=f"adapter {req.lora_request.lora_name!r}"
                                " can never get a slot: all max_loras slots are pinned")
            outputs.append(out)
        return outputs
