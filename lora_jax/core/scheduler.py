"""Which sequences run in the next step, and which KV blocks they write. Plain Python, no JAX.

Every sequence has tokens (prompt, then outputs) and `num_cached`, how many of them have their
KV in the sequence's blocks. A step gives a sequence its next tokens: one for a decode, a chunk
for a prefill (or for a recompute after preemption); a step that reaches the end of the tokens
samples one more. Decodes go first, then running prefills, then waiting sequences are admitted
while the token budget, free rows, free blocks and max_loras allow (pinned adapters count,
since they keep a slot), with at most max_prefill_seqs chunks in a step. A waiting sequence
whose adapter is still loading waits and lets others pass; one refused a slot (all max_loras
held) bars the sequences that arrive after that from taking a slot before it, so a cold
adapter waits only for sequences that were already there (first come, first served). When a running
sequence needs a block and none is free, the most recently admitted sequence not yet scheduled
this step is preempted: its blocks are freed, it keeps its row (its sampling history) and goes
to the front of the queue, and it is recomputed from its tokens later; nothing is admitted in
a step that preempted. A waiting sequence whose next block another sequence computes in the
same step waits one step, and then finds it in the prefix cache.

A step is padded to its token bucket (a power of two), so a big step just past a bucket would
pay for nearly twice its tokens: when the prefill chunks can give up the excess (at most half
the lower bucket, itself at least FILL_FROM tokens), the last chunks are shortened to fill the
lower bucket exactly, and the rest of their tokens go in the next step. Smaller steps are
left alone: there a step's fixed cost outweighs the padding, and a prompt would wait a step.
"""

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from lora_jax.core.block_pool import KVCacheManager
from lora_jax.core.buckets import bucket_below

# The smallest bucket a step is trimmed down to (see fill_bucket).
FILL_FROM = 256


@dataclass(eq=False)
class Sequence:
    """One generated sequence: its prompt, its outputs so far, and where its KV lives.

    The scheduler owns the fields it schedules by (num_cached, num_pending, started, row,
    finished); the engine reports what it dispatched and what it sampled (`Scheduler.dispatched`,
    `Scheduler.sampled`) rather than writing them."""

    seq_id: int
    prompt_ids: list[int]
    adapter: int | None  # lora_int_id, None for the base model
    cache_key: Hashable = None  # prefix-cache key: adapter identity and RoPE scale
    use_prefix_cache: bool = True
    max_output: int | None = None  # outputs it may have (max_tokens, the length left); None: any
    # The engine's record of the request this sequence is output `index` of (the scheduler
    # never reads it): its sampling parameters and adapter travel with the sequence.
    request: Any = None
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys and values are in the sequence's blocks
    row: int | None = None
    num_preemptions: int = 0
    started: bool = False  # scheduled at least once (its row's history belongs to it)
    finished: bool = False  # finished or aborted: a step still in flight drops its token
    # Sampled tokens still on the device (the engine runs a step ahead of the host): they
    # count as tokens, their KV is written by the next step; output_ids gets them later.
    num_pending: int = 0
    arrival: int = -1  # the order it reached the scheduler in
    # The arrival count when it was first refused a slot (all max_loras held): sequences that
    # arrive later never take a slot before it.
    refused_at: int | None = None

    @property
    def key(self) -> str:
        return str(self.seq_id)

    @property
    def tokens(self) -> list[int]:
        """The tokens the host knows (pending ones excluded)."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def at_limit(self) -> bool:
        """Its outputs, pending ones included, reach max_output: nothing more to schedule."""
        return self.max_output is not None and (
            len(self.output_ids) + self.num_pending >= self.max_output)

    @property
    def prefilling(self) -> bool:
        """Prompt tokens, or more than the last token (a recompute), are still to be computed."""
        return self.num_cached < len(self.prompt_ids) or self.num_tokens - self.num_cached > 1


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens [start, start + length) of seq; the chunk that reaches its end samples."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.num_tokens


@dataclass(frozen=True)
class Batch:
    decodes: list[Sequence]
    prefills: list[PrefillChunk]
    preempted: list[Sequence] = field(default_factory=list)

    def seqs(self) -> list[Sequence]:
        return self.decodes + [c.seq for c in self.prefills]

    def adapters(self) -> set[int]:
        return {s.adapter for s in self.seqs() if s.adapter is not None}

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


def fill_bucket(num_decodes: int, prefills: list[PrefillChunk]) -> list[PrefillChunk]:
    """Shorten the last chunks so that the step's tokens fill the bucket below them exactly,
    when they can give up the excess, it is at most half that bucket and that bucket holds at
    least FILL_FROM tokens; else unchanged."""
    total = num_decodes + sum(c.length for c in prefills)
    lower = bucket_below(total)
    excess = total - lower
    if lower < FILL_FROM or excess == 0 or excess > lower // 2:
        return prefills
    if sum(c.length - 1 for c in prefills) < excess:
        return prefills
    trimmed = list(prefills)
    for i in range(len(trimmed) - 1, -1, -1):
        cut = min(excess, trimmed[i].length - 1)
        trimmed[i] = replace(trimmed[i], length=trimmed[i].length - cut)
        excess -= cut
        if not excess:
            break
    return trimmed


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_loras: int, max_num_batched_tokens: int,
                 max_prefill_chunk: int, kv: KVCacheManager, max_prefill_seqs: int = 16,
                 fill_buckets: bool = True):
        if max_num_batched_tokens <= max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed "
                             f"max_num_seqs ({max_num_seqs}) so prefills can make progress")
        self.max_loras = max_loras
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.max_prefill_seqs = max_prefill_seqs
        self.fill_buckets = fill_buckets
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._pinned: set[int] = set()
        self.num_preemptions = 0
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        seq.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        self.waiting.append(seq)

    def waiting_adapters(self) -> list[int]:
        """The adapters of the waiting sequences, in the order they are admitted (distinct)."""
        return list(dict.fromkeys(s.adapter for s in self.waiting if s.adapter is not None))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[int]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def held_adapters(self) -> set[int]:
        """Adapters that keep a slot: those of running sequences, and pinned ones."""
        return self.adapters_in_use() | self._pinned

    def pinned(self) -> set[int]:
        return set(self._pinned)

    def pin(self, lora_id: int) -> None:
        """The adapter keeps its slot (and counts against max_loras) until unpinned."""
        self._pinned.add(lora_id)

    def unpin(self, lora_id: int) -> None:
        self._pinned.discard(lora_id)

    def dispatched(self, batch: Batch) -> dict[int, int]:
        """The batch went to the device: its tokens' KV is being written, and each sequence
        that samples in it (every decode, each chunk that reaches its sequence's end) has one
        more token pending -> seq_id: row in the step of each sequence that samples."""
        sampling: dict[int, int] = {}
        for i, seq in enumerate(batch.decodes):
            seq.num_cached += 1
            seq.num_pending += 1
            sampling[seq.seq_id] = i
        for i, chunk in enumerate(batch.prefills, start=len(batch.decodes)):
            chunk.seq.num_cached += chunk.length
            if chunk.completes_prompt:
                chunk.seq.num_pending += 1
                sampling[chunk.seq.seq_id] = i
        for seq in batch.seqs():
            seq.started = True
        return sampling

    @staticmethod
    def sampled(seq: Sequence, token: int) -> None:
        """One of seq's pending tokens was read from the device."""
        seq.num_pending -= 1
        seq.output_ids.append(token)

    def offer_blocks(self, seq: Sequence) -> None:
        """Offer a running sequence's full blocks whose tokens the host knows to the prefix
        cache (blocks a dispatched step fills are reusable at once: any step that reads them
        runs after it on the device)."""
        if seq.use_prefix_cache and seq in self.running:
            known = min(seq.num_cached, len(seq.tokens))
            self.kv.cache_full_blocks(seq.key, seq.tokens[:known], seq.cache_key)

    def block_table(self, seq: Sequence) -> list[int]:
        return self.kv.tables[seq.key].blocks

    def schedule(self, ready: Callable[[int], bool] | None = None) -> Batch:
        """The next step's batch. ready(adapter): whether a waiting sequence of that adapter
        can start (its weights are loaded); by default every one can."""
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        decodes, prefills, preempted = [], [], []
        for want_decode in (True, False):
            for seq in list(self.running):
                if (seq.seq_id in scheduled or seq.prefilling == want_decode
                        or seq.at_limit):
                    continue
                if not want_decode and len(prefills) >= self.max_prefill_seqs:
                    break
                length = 1 if want_decode else min(
                    seq.num_tokens - seq.num_cached, self.max_prefill_chunk, budget)
                if length <= 0:
                    continue
                if not self._allocate(seq, length, scheduled, preempted):
                    continue
                scheduled.add(seq.seq_id)
                budget -= length
                if want_decode:
                    decodes.append(seq)
                else:
                    prefills.append(PrefillChunk(seq, seq.num_cached, length))
        if not preempted:
            prefills += self._admit(budget, self.max_prefill_seqs - len(prefills), ready)
        if self.fill_buckets:
            prefills = fill_bucket(len(decodes), prefills)
        return Batch(decodes, prefills, preempted)

    def _allocate(self, seq: Sequence, length: int, scheduled: set[int],
                  preempted: list[Sequence]) -> bool:
        """Blocks for seq's next `length` tokens, preempting the latest unscheduled running
        sequences while the pool is short; False if seq itself had to go."""
        while self.kv.allocate(seq.key, seq.num_cached + length) is None:
            victims = [s for s in self.running if s.seq_id not in scheduled]
            victim = victims[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def preempt_all(self) -> None:
        """Every running sequence gives back its blocks and is recomputed later (the device
        pool was lost)."""
        for seq in list(self.running):
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the front and is recomputed later."""
        self.running.remove(seq)
        self.kv.free(seq.key)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _slot_refused(self, seq: Sequence, held: set[int], barrier: int | None,
                      ready: Callable[[int], bool] | None) -> tuple[bool, int | None]:
        """Whether seq's adapter keeps it waiting this step -> (wait, the barrier after it).
        Adapters are served first come, first served: a sequence refused a slot bars every
        sequence that arrived after its refusal from taking one (base-model sequences take
        none and still go), so it gets the first slot its running adapters give back."""
        if seq.adapter is None:
            return False, barrier
        if ready is not None and not ready(seq.adapter):
            return True, barrier  # its adapter is loading: it waits, nobody else does
        if barrier is not None and seq.arrival >= barrier:
            return True, barrier
        if seq.adapter in held or len(held) < self.max_loras:
            return False, barrier
        if seq.refused_at is None:
            seq.refused_at = self._arrivals
        return True, seq.refused_at if barrier is None else min(barrier, seq.refused_at)

    def _admit(self, budget: int, max_chunks: int,
               ready: Callable[[int], bool] | None = None) -> list[PrefillChunk]:
        held = self.held_adapters()
        admitted, chunks = [], []
        computing: set = set()  # hashes of the full blocks this step's chunks compute
        barrier = None  # sequences arrived from here on wait: an earlier one was refused a slot
        for seq in self.waiting:
            if budget <= 0 or len(chunks) >= max_chunks or (
                    seq.row is None and not self.free_rows):
                break
            if seq.num_pending:
                continue  # preempted with tokens still on the device: recomputed once read
            wait, barrier = self._slot_refused(seq, held, barrier, ready)
            if wait:
                continue
            hashes: list = []
            if seq.use_prefix_cache:
                seq.num_cached = self.kv.computed_prefix(seq.key, seq.tokens, seq.cache_key)
                hashes = self.kv.prefix_hashes(seq.key)
                first = seq.num_cached // self.kv.pool.block_size
                if first < len(hashes) and hashes[first] in computing:
                    # Another sequence computes this prefix in this very step: wait one step
                    # and reuse it from the cache rather than compute it twice.
                    self.kv.free(seq.key)
                    seq.num_cached = 0
                    continue
            length = min(seq.num_tokens - seq.num_cached, self.max_prefill_chunk, budget)
            if self.kv.allocate(seq.key, seq.num_cached + length) is None:
                self.kv.free(seq.key)  # give back the prefix it matched; it waits
                seq.num_cached = 0
                break
            if seq.adapter is not None:
                held.add(seq.adapter)
            if seq.row is None:
                seq.row = self.free_rows.pop()
            seq.refused_at = None
            admitted.append(seq)
            chunks.append(PrefillChunk(seq, seq.num_cached, length))
            size = self.kv.pool.block_size
            computing.update(hashes[seq.num_cached // size:(seq.num_cached + length) // size])
            budget -= length
        for seq in admitted:
            self.waiting.remove(seq)
            self.running.append(seq)
        return chunks

    def finish(self, seqs: Iterable[Sequence]) -> None:
        """Remove finished (or aborted) sequences and free their rows and blocks at once."""
        for seq in seqs:
            seq.finished = True
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            else:
                continue
            self.kv.free(seq.key)
            if seq.row is not None:
                self.free_rows.append(seq.row)
                seq.row = None
