"""Which sequences run in the next step. Plain Python, no JAX, testable alone.

Decodes go first (one token each), then prefill chunks fill the token budget. A step never
holds more distinct adapters than max_loras (pinned adapters count, since they keep a slot),
and a sequence only starts when a KV-cache row is free for it.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    """One generated sequence: its prompt, its outputs so far, and where its cache lives."""

    seq_id: int
    prompt_ids: list[int]
    adapter: int | None  # lora_int_id, None for the base model
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys and values are in the cache row
    row: int | None = None

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + length) of seq; the last chunk also samples a token."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.seq.prompt_ids)


@dataclass(frozen=True)
class Batch:
    decodes: list[Sequence]
    prefills: list[PrefillChunk]

    def seqs(self) -> list[Sequence]:
        return self.decodes + [c.seq for c in self.prefills]

    def adapters(self) -> set[int]:
        return {s.adapter for s in self.seqs() if s.adapter is not None}

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_loras: int, max_num_batched_tokens: int,
                 max_prefill_chunk: int):
        if max_num_batched_tokens <= max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed "
                             f"max_num_seqs ({max_num_seqs}) so prefills can make progress")
        self.max_loras = max_loras
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.pinned: set[int] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[int]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def schedule(self) -> Batch:
        decodes = [s for s in self.running if not s.prefilling]
        budget = self.max_num_batched_tokens - len(decodes)
        prefills = []
        for seq in self.running:
            if seq.prefilling and budget > 0:
                prefills.append(self._chunk(seq, budget))
                budget -= prefills[-1].length
        held = self.adapters_in_use() | self.pinned
        admitted = []
        for seq in self.waiting:
            if budget <= 0 or not self.free_rows:
                break
            if seq.adapter is not None and seq.adapter not in held:
                if len(held) >= self.max_loras:
                    continue  # later requests with a held adapter may still go
                held.add(seq.adapter)
            seq.row = self.free_rows.pop()
            admitted.append(seq)
            prefills.append(self._chunk(seq, budget))
            budget -= prefills[-1].length
        for seq in admitted:
            self.waiting.remove(seq)
            self.running.append(seq)
        return Batch(decodes, prefills)

    def _chunk(self, seq: Sequence, budget: int) -> PrefillChunk:
        length = min(len(seq.prompt_ids) - seq.num_cached, self.max_prefill_chunk, budget)
        return PrefillChunk(seq, seq.num_cached, length)

    def finish(self, seqs: Iterable[Sequence]) -> None:
        """Remove finished sequences and free their cache rows at once."""
        for seq in seqs:
            if seq in self.running:
                self.running.remove(seq)
                self.free_rows.append(seq.row)
            elif seq in self.waiting:
                self.waiting.remove(seq)
