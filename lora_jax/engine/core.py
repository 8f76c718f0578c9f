"""EngineCore: the step loop over the scheduler, the adapter slots and the runner.

`step` = schedule -> dispatch -> collect -> process. With async_scheduling (the default) the
host runs one step ahead of its results: the next batch is scheduled and dispatched while the
device still computes the previous one, whose tokens are read (stop checks, text, outputs)
only afterwards. A decode whose last token is still on the device takes it there. A sequence
that turns out to have stopped drops what the next step computed for it, so no output changes.
"""

from dataclasses import dataclass

from lora_jax.config import EngineConfig
from lora_jax.core.block_pool import BlockPool, KVCacheManager
from lora_jax.core.scheduler import Batch, Scheduler, Sequence
from lora_jax.engine.failures import fail_loads, fail_requests, fail_unschedulable
from lora_jax.engine.input_processor import NewRequest
from lora_jax.engine.output_processor import OutputProcessor
from lora_jax.engine.setup import load_model, lora_backend_for, pool_blocks
from lora_jax.lora.manager import AdapterManager
from lora_jax.lora.slots import AdapterSlots
from lora_jax.outputs import EngineStats, RequestOutput
from lora_jax.sampling_params import MAX_LOGPROBS
from lora_jax.worker.compilation import CompileReport, compile_all, enable_persistent_cache
from lora_jax.worker.distributed import DONE, FILL, STEP, STOP, StepChannel
from lora_jax.worker.runner import Pending, RowInput, Runner

# With nothing to run but loads under way, a step waits this long for one (then returns, so
# callers between steps, such as AsyncLLM's commands, are not kept waiting).
LOAD_POLL_SECONDS = 0.05


@dataclass
class InFlight:
    """A dispatched step: its batch, its samples on the device, and the row of each sequence
    that samples in it (seq_id -> row)."""

    batch: Batch
    pending: Pending
    rows: dict[int, int]


class EngineCore:
    """Holds the model, the KV cache, the adapters and the scheduler; `step` runs one batch."""

    def __init__(self, config: EngineConfig, *, mesh=None):
        self.config = config
        distributed = config.distributed()
        if distributed is not None:
            distributed.initialize()  # before the model touches a device
        loaded = load_model(config, mesh)  # with tensor parallelism: read into its shards
        self.model_path, self.tokenizer = loaded.path, loaded.tokenizer
        self.model_config, self.max_model_len = mc, max_len = loaded.config, loaded.max_model_len
        dtype = loaded.model.dtype
        self.num_kv_blocks = pool_blocks(config, mc, dtype, max_len)
        self.kv = KVCacheManager(BlockPool(self.num_kv_blocks, config.block_size,
                                           config.enable_prefix_caching))
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk,
            max_prefill_seqs=config.max_prefill_seqs, kv=self.kv)
        tp, lora_backend = loaded.tensor_parallel, lora_backend_for(config, loaded.tensor_parallel)
        slots = (AdapterSlots(mc, config.max_loras, config.max_lora_rank, dtype,
                              tensor_parallel=tp) if config.enable_lora else None)
        self.runner = Runner(loaded.model, num_rows=config.max_num_seqs, max_len=max_len,
                             num_blocks=self.num_kv_blocks, block_size=config.block_size,
                             dtype=dtype, max_num_batched_tokens=config.max_num_batched_tokens,
                             max_prefill_seqs=config.max_prefill_seqs, lora_backend=lora_backend,
                             attention_backend=config.attention_backend, tensor_parallel=tp)
        self.channel = StepChannel() if distributed is not None else None
        self.runner.channel = self.channel
        if slots is not None:
            slots.channel = self.channel
        self.adapters = AdapterManager(
            mc, slots=slots, scheduler=self.scheduler, max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, served=config.model, served_path=loaded.path,
            max_cpu_loras=config.max_cpu_loras or max(config.max_loras, 8),
            max_cpu_lora_bytes=config.max_cpu_lora_bytes)
        self.outputs = OutputProcessor(loaded.tokenizer, loaded.eos_ids)
        self._inflight: InFlight | None = None  # the dispatched step not yet read
        self._next_seq = 0
        self.compile_report: CompileReport | None = None
        cache_dir = enable_persistent_cache(config.cache_dir())
        if config.should_compile_on_start():
            self.compile_report = compile_all(self.runner, self.adapters.stacks, slots,
                                              cache_dir=cache_dir)
        self.memory = loaded.memory.started()

    # Several processes --------------------------------------------------------------------

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
                self.runner.follow(values, self.adapters.stacks)
            elif kind == FILL:
                self.adapters.slots.follow(values[0])
            elif kind in until:
                return kind

    def announce(self, kind: int) -> None:
        """Process 0 of several: tell the followers a generate ended (DONE) or to stop (STOP)."""
        if self.channel is not None and self.channel.leader:
            self.channel.send(kind)

    # Facts ---------------------------------------------------------------------------------

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
                "cache_dir": None if report is None else report.cache_dir,
                "warm_runs": None if report is None else report.warm_runs,
                "warm_seconds": None if report is None else round(report.warm_seconds, 2)}

    @property
    def kv_cache_bytes(self) -> int:
        """What the device pool holds: k and v of every layer, block and position."""
        return int(self.runner.kv.k.nbytes + self.runner.kv.v.nbytes)

    def stats(self) -> EngineStats:
        pool, sched = self.kv.pool, self.scheduler
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            kv_blocks_used=pool.num_used, kv_blocks_total=pool.num_blocks,
            prefix_cache_queries=pool.stats.queries, prefix_cache_hits=pool.stats.hits,
            num_preemptions=sched.num_preemptions,
            running_adapters=sorted({s.adapter for s in sched.running} - {None}),
            waiting_adapters=sorted({s.adapter for s in sched.waiting} - {None}),
            max_loras=self.config.max_loras, adapter_slot_loads=self.adapters.num_loads,
            memory=self.memory.stats(),
            **self.adapters.stats(list(sched.waiting)))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay with their sequences)."""
        self.kv.pool.reset_prefix_cache()

    # Requests -----------------------------------------------------------------------------

    def has_request(self, request_id: str) -> bool:
        return request_id in self.outputs.states

    def add_request(self, new: NewRequest) -> None:
        """Queue a validated request (see InputProcessor) as its n sequences."""
        seqs = []
        for i in range(new.params.n):
            seqs.append(Sequence(
                self._next_seq, new.prompt_ids,
                new.lora_request and new.lora_request.lora_int_id, cache_key=new.cache_key,
                max_output=new.max_output, request=new, index=i,
                # Repetition marks the whole prompt as seen: it computes it all.
                use_prefix_cache=new.params.repetition_penalty == 1.0))
            self._next_seq += 1
        self.outputs.add(new, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        """Requests wait, run, or have tokens still on the device (aborted ones do not count:
        an in-flight step whose requests all ended is read and dropped by the next step)."""
        flight = self._inflight
        return self.scheduler.has_unfinished() or (flight is not None and any(
            not s.finished for s in flight.batch.seqs()))

    def abort_request(self, request_ids) -> None:
        """Stop requests now (unknown or finished ids are ignored): their cache rows and the
        adapter slots they held are free for the next step, and they report nothing more."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            state = self.outputs.pop(request_id)
            if state is not None:
                self.scheduler.finish(state.seqs)

    # The step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return what it reports: each request in its output kind (finished
        requests always, running ones for CUMULATIVE and DELTA)."""
        # Adapter loads run in the background: keep the finished ones, start the next ones,
        # and fail the requests of those that could not load.
        outputs = fail_loads(self.outputs, self.scheduler,
                             self.adapters.update(self.scheduler.waiting_adapters()))
        batch = self.scheduler.schedule(ready=self.adapters.ready)
        if not batch and self._inflight is None:
            if self.adapters.loading():  # all that waits, waits for a load
                self.adapters.wait_for_load(LOAD_POLL_SECONDS)
                return outputs
            return outputs + fail_unschedulable(self.outputs, self.scheduler)
        dispatched = self._dispatch(batch, outputs) if batch else None
        if self._inflight is not None:
            outputs += self._process(self._inflight)
        self._inflight = dispatched
        if not self.config.async_scheduling and dispatched is not None:
            self._inflight = None
            outputs += self._process(dispatched)
        return outputs

    def _dispatch(self, batch: Batch, outputs: list[RequestOutput]) -> InFlight | None:
        """Start the batch on the device and tell the scheduler (None if it failed: its
        requests' errors go to outputs)."""
        sites = self.adapters.activate(batch)
        previous = self._inflight.rows if self._inflight is not None else {}
        wanted = any(s.request.params.logprobs is not None for s in batch.seqs())
        try:
            # One static size (0 or MAX_LOGPROBS) keeps the count of compiled programs small.
            pending = self.runner.dispatch(self._rows(batch, previous), self.adapters.stacks,
                                           MAX_LOGPROBS if wanted else 0, sites)
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the engine
            outputs += self._fail_step(batch, err)
            return None
        sampling = self.scheduler.dispatched(batch)
        for seq in batch.seqs():
            self.scheduler.offer_blocks(seq)
        return InFlight(batch, pending, sampling)

    def _rows(self, batch: Batch, previous: dict[int, int]) -> list[RowInput]:
        """One ragged step: decodes first, then prefill chunks (a recompute is a chunk too).
        A decode whose token is the in-flight step's sample takes it on the device (src)."""
        rows = []
        for seq in batch.decodes:
            if seq.num_cached < len(seq.tokens):
                rows.append(self._row(seq, [seq.tokens[seq.num_cached]], seq.num_cached))
            else:
                rows.append(self._row(seq, [0], seq.num_cached, src=previous[seq.seq_id]))
        rows += [self._row(c.seq, c.seq.tokens[c.start:c.start + c.length], c.start,
                           prompt=not c.seq.output_ids, keeps=c.completes_prompt)
                 for c in batch.prefills]
        return rows

    def _row(self, seq: Sequence, tokens: list[int], start: int, *, prompt: bool = False,
             keeps: bool = True, src: int = -1) -> RowInput:
        new: NewRequest = seq.request
        return RowInput(tokens=tokens, start=start, row=seq.row,
                        block_table=self.scheduler.block_table(seq),
                        sampling=new.rows[seq.index],
                        counter=len(seq.output_ids) + seq.num_pending,
                        slot=self.adapters.slot_of(seq.adapter), rope_scale=new.rope_scale,
                        prompt=prompt, fresh=not seq.started, keeps=keeps, src=src)

    def _process(self, flight: InFlight) -> list[RequestOutput]:
        """Read a dispatched step's tokens and report them. Sequences that ended since it was
        dispatched (a stop seen in the step before, an abort) drop theirs."""
        try:
            out = self.runner.collect(flight.pending)
        except Exception as err:  # noqa: BLE001 - as in _dispatch
            # Its blocks were offered for reuse at dispatch; the failure may have left them
            # unwritten.
            self.kv.pool.reset_prefix_cache()
            return self._fail_step(flight.batch, err)
        samples = []
        for seq in flight.batch.seqs():
            if seq.finished:
                continue
            i = flight.rows.get(seq.seq_id)
            if i is not None:
                self.scheduler.sampled(seq, int(out.tokens[i]))
                samples.append((seq, i))
            self.scheduler.offer_blocks(seq)
        outputs, done = self.outputs.process(samples, out)
        self.scheduler.finish(done)
        return outputs

    def _fail_step(self, batch: Batch, err: Exception) -> list[RequestOutput]:
        """The step's requests end with the error on their outputs. If the device state was
        lost with it (the donated KV pool), the pool starts over empty: cached prefixes are
        forgotten and every other running sequence is recomputed from its tokens."""
        ended = fail_requests(self.outputs, self.scheduler, batch.seqs(),
                              f"the step running this request failed: {type(err).__name__}: "
                              f"{err}")
        if self.runner.recover():
            self.kv.pool.reset_prefix_cache()
            self.scheduler.preempt_all()
        return ended
