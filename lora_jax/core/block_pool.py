"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-request block tables, and
prefix caching keyed by the adapter. Plain Python, no JAX: the device pool is the runner's.

A block holds `block_size` consecutive token positions of one request. A full block gets a
hash of (its parent's hash, its token ids, the request's cache key: adapter identity and RoPE
scale), so two requests reuse each other's blocks only when every token before and in the block
is the same *and* they run the same adapter weights at the same RoPE scale. A block whose
reference count drops to zero goes to the end of an LRU free list; it keeps its hash (and its
KV) until it is taken again from the front, so a freed prefix can still be hit later.
"""

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

import msgspec

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int], cache_key: Hashable) -> BlockHash:
    """A 128-bit digest of (parent hash, token ids, cache key): collisions are not a concern."""
    payload = msgspec.msgpack.encode([parent or b"", list(tokens), repr(cache_key)])
    return blake2b(payload, digest_size=16).digest()


def hash_blocks(tokens: Sequence[int], block_size: int, cache_key: Hashable,
                parent: BlockHash | None = None) -> list[BlockHash]:
    """The hash of every *full* block of `tokens`, each chained to the one before it."""
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start:start + block_size], cache_key)
        hashes.append(parent)
    return hashes


class NoFreeBlocks(Exception):
    """The pool has fewer free blocks than asked for (the scheduler preempts or waits)."""


@dataclass
class PrefixCacheStats:
    queries: int = 0  # blocks looked up
    hits: int = 0  # of those, found cached
    evictions: int = 0  # cached blocks reused for other content


@dataclass
class BlockPool:
    """`num_blocks` blocks of `block_size` tokens; block ids index the device pool."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self):
        for name in ("num_blocks", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._refs = [0] * self.num_blocks
        self._hash_of: list[BlockHash | None] = [None] * self.num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Free blocks, least recently freed first; a value is unused (OrderedDict as a set).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1), evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise NoFreeBlocks(f"{n} blocks asked for, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of[block]
            if old is not None:
                del self._cached[old]
                self._hash_of[block] = None
                self.stats.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def match_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks for the longest run of leading hashes, each now referenced once
        more (taken off the free list if it was there)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        self.stats.queries += len(hashes)
        self.stats.hits += len(found)
        for block in found:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        return found

    def cache(self, block: int, block_hash: BlockHash) -> None:
        """Mark a full block as holding the content `block_hash` names (first writer wins: a
        second request that computed the same content keeps its own block uncached)."""
        if self.enable_prefix_caching and block_hash not in self._cached \
                and self._hash_of[block] is None:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Pass a request's blocks in order: they are freed
        last first, so the end of a chain is evicted before its start."""
        for block in reversed(blocks):
            if self._refs[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their KV, but are never matched)."""
        for block in self._cached.values():
            self._hash_of[block] = None
        self._cached.clear()


@dataclass
class BlockTable:
    """One request's blocks, and how many of their leading full blocks are hashed."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)
    prefix: list[BlockHash] = field(default_factory=list)  # see computed_prefix


class KVCacheManager:
    """Block tables per request over one BlockPool: find a request's cached prefix, give it
    blocks for new tokens, register its full blocks for reuse, free it."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.tables: dict[str, BlockTable] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.block_size)

    def computed_prefix(self, request_id: str, tokens: Sequence[int],
                        cache_key: Hashable) -> int:
        """Start a request's table from its longest cached prefix; returns the number of
        prompt tokens whose KV is already there. The last token is always recomputed, since
        a step must produce its logits."""
        table = self.tables.setdefault(request_id, BlockTable())
        if table.blocks:
            raise RuntimeError(f"request {request_id} already holds blocks")
        usable = hash_blocks(tokens[:len(tokens) - 1], self.pool.block_size, cache_key)
        table.blocks = self.pool.match_prefix(usable)
        table.hashes = usable[:len(table.blocks)]
        table.prefix = usable
        return len(table.blocks) * self.pool.block_size

    def prefix_hashes(self, request_id: str) -> list[BlockHash]:
        """The hashes of every full block of the tokens computed_prefix was given (all but
        the last token), cached or not."""
        return self.tables[request_id].prefix

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks so that the request's table covers `num_tokens` positions; None (and nothing
        taken) when the pool has too few free blocks."""
        table = self.tables.setdefault(request_id, BlockTable())
        missing = self.blocks_needed(num_tokens) - len(table.blocks)
        if missing <= 0:
            return table.blocks
        if missing > self.pool.num_free:
            return None
        table.blocks += self.pool.allocate(missing)
        return table.blocks

    def cache_full_blocks(self, request_id: str, tokens: Sequence[int],
                          cache_key: Hashable) -> None:
        """Hash and register every full block of `tokens` (the KV of all of them computed)."""
        table = self.tables[request_id]
        size = self.pool.block_size
        parent = table.hashes[-1] if table.hashes else None
        for index in range(len(table.hashes), min(len(tokens) // size, len(table.blocks))):
            parent = hash_block(parent, tokens[index * size:(index + 1) * size], cache_key)
            table.hashes.append(parent)
            self.pool.cache(table.blocks[index], parent)

    def free(self, request_id: str) -> None:
        table = self.tables.pop(request_id, None)
        if table is not None:
            self.pool.free(table.blocks)
