"""The block pool and prefix cache: plain Python, no JAX."""

import subprocess
import sys

import pytest

from lora_jax.core.block_pool import BlockPool, KVCacheManager, NoFreeBlocks, hash_blocks

BASE = ("base", 1.0)
SQL_V1 = (("sql", 1, 0), 1.0)


def manager(num_blocks=8, block_size=4, enable_prefix_caching=True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))


def run_request(m: KVCacheManager, rid: str, tokens: list[int], key) -> tuple[int, list[int]]:
    """What the engine does for a prompt: match the prefix, allocate, compute, register."""
    hit = m.computed_prefix(rid, tokens, key)
    blocks = m.allocate(rid, len(tokens))
    m.cache_full_blocks(rid, tokens, key)
    return hit, list(blocks)


def test_block_hashes_chain_over_full_blocks_only():
    tokens = list(range(10))
    hashes = hash_blocks(tokens, 4, BASE)
    assert len(hashes) == 2
    assert hashes == hash_blocks(tokens[:8], 4, BASE)
    # The second block's hash depends on the first block's tokens, not only its own.
    assert hash_blocks([9, 9, 9, 9] + tokens[4:8], 4, BASE)[1] != hashes[1]


def test_a_second_request_with_the_same_prefix_and_adapter_reuses_its_blocks():
    m = manager()
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    hit, first = run_request(m, "a", prompt, SQL_V1)
    assert hit == 0
    hit, second = run_request(m, "b", prompt[:12] + [7, 8], SQL_V1)
    assert hit == 12 and second[:3] == first[:3] and second[3] != first[3]
    assert m.pool.stats.hits == 3


def test_no_hit_across_adapters_nor_for_the_base_model_nor_after_an_in_place_reload():
    m = manager(num_blocks=16)
    prompt = list(range(9))
    run_request(m, "a", prompt, SQL_V1)
    for rid, key in (("base", BASE), ("other", (("chat", 2, 0), 1.0)),
                     ("reloaded", (("sql", 1, 1), 1.0)), ("long", (("sql", 1, 0), 2.0))):
        hit, _ = run_request(m, rid, prompt, key)
        assert hit == 0, key


def test_the_last_prompt_token_is_always_computed():
    m = manager()
    prompt = list(range(8))  # exactly two full blocks
    run_request(m, "a", prompt, BASE)
    hit, _ = run_request(m, "b", prompt, BASE)
    assert hit == 4  # the second block holds the last token, whose logits the step needs


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    m = manager(num_blocks=4, block_size=2)
    run_request(m, "a", [1, 2, 3, 4, 5], BASE)  # 3 blocks, 2 full
    m.free("a")
    assert m.pool.num_free == 4
    hit, _ = run_request(m, "b", [1, 2, 3, 4, 6], BASE)
    assert hit == 4
    m.free("b")
    # Taking every block evicts the cached ones; the prefix is gone afterwards.
    assert m.allocate("c", 8) is not None
    m.free("c")
    assert m.pool.stats.evictions == 2
    hit, _ = run_request(m, "d", [1, 2, 3, 4, 7], BASE)
    assert hit == 0


def test_a_request_freed_tail_first_loses_its_tail_before_its_head():
    m = manager(num_blocks=3, block_size=2)
    run_request(m, "a", [1, 2, 3, 4, 5], BASE)  # blocks [1, 2] and [3, 4] cached, then [5]
    m.free("a")
    m.allocate("y", 4)  # two blocks: the uncached one and the chain's tail
    m.free("y")
    hit, _ = run_request(m, "b", [1, 2, 3, 4, 9], BASE)
    assert hit == 2, "the head of the chain must outlive its tail"


def test_allocation_fails_cleanly_when_the_pool_is_short():
    m = manager(num_blocks=2, block_size=4)
    assert m.allocate("a", 8) is not None
    assert m.allocate("b", 1) is None
    assert m.pool.num_free == 0
    with pytest.raises(NoFreeBlocks, match="1 blocks asked for, 0 free"):
        m.pool.allocate(1)
    m.free("a")
    assert m.allocate("b", 1) is not None


def test_prefix_caching_off_never_hits():
    m = manager(enable_prefix_caching=False)
    run_request(m, "a", list(range(9)), BASE)
    hit, _ = run_request(m, "b", list(range(9)), BASE)
    assert hit == 0 and m.pool.stats.queries == 0


def test_shared_blocks_are_freed_only_when_every_holder_is_done():
    m = manager(num_blocks=4, block_size=2)
    run_request(m, "a", [1, 2, 3], BASE)
    run_request(m, "b", [1, 2, 4], BASE)  # shares block [1, 2]
    m.free("a")
    assert m.pool.num_used == 2  # b's two blocks, one of them shared with a
    m.free("b")
    assert m.pool.num_used == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        m.pool.free([0])


def test_bad_pool_sizes_are_refused():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        BlockPool(4, 0)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        BlockPool(True, 16)


def test_the_core_imports_no_jax():
    code = ("import sys, lora_jax.core.block_pool, lora_jax.core.scheduler; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
