import subprocess
import sys

import pytest

from lora_jax.core.block_pool import BlockPool, KVCacheManager
from lora_jax.core.scheduler import PrefillChunk, Scheduler, Sequence, fill_bucket


def _seq(i, prompt_len=4, adapter=None):
    # Prompts differ from one sequence to the next (equal ones would share a prefix).
    return Sequence(i, list(range(100 * i, 100 * i + prompt_len)), adapter)


def _sched(num_blocks=64, block_size=4, **kw):
    # These tests count tokens against the budget; filling token buckets has its own tests.
    opts = dict(max_num_seqs=4, max_loras=2, max_num_batched_tokens=16, max_prefill_chunk=8,
                fill_buckets=False)
    kv = KVCacheManager(BlockPool(num_blocks, block_size))
    return Scheduler(**(opts | kw), kv=kv)


def _decode_all(sched, batch):
    """Pretend the batch ran: prefills cache their chunk, finished prompts get a first token."""
    sampling = sched.dispatched(batch)
    for seq in batch.seqs():
        if seq.seq_id in sampling:
            sched.sampled(seq, 0)


def test_a_step_never_holds_more_distinct_adapters_than_max_loras():
    sched = _sched(max_num_seqs=8, max_num_batched_tokens=64)
    for i, adapter in enumerate([1, 2, 3, 1, None, 3]):
        sched.add(_seq(i, adapter=adapter))
    batch = sched.schedule()
    assert batch.adapters() == {1, 2}
    assert sorted(c.seq.seq_id for c in batch.prefills) == [0, 1, 3, 4]  # 3 waits for a slot
    _decode_all(sched, batch)
    sched.finish([s for s in sched.running if s.adapter == 2])
    batch = sched.schedule()
    assert batch.adapters() == {1, 3} and {c.seq.seq_id for c in batch.prefills} == {2, 5}


def test_pinned_adapters_count_against_max_loras():
    sched = _sched()
    sched.pin(9)
    sched.add(_seq(0, adapter=1))
    sched.add(_seq(1, adapter=2))
    assert [c.seq.seq_id for c in sched.schedule().prefills] == [0]


def test_decodes_come_first_and_prefills_fill_the_token_budget_in_chunks():
    sched = _sched(max_num_batched_tokens=10, max_prefill_chunk=8)
    sched.add(_seq(0, prompt_len=3))
    _decode_all(sched, sched.schedule())
    sched.add(_seq(1, prompt_len=20))
    batch = sched.schedule()
    assert [s.seq_id for s in batch.decodes] == [0]
    assert [(c.start, c.length) for c in batch.prefills] == [(0, 8)]
    _decode_all(sched, batch)
    chunk = sched.schedule().prefills[0]
    assert (chunk.start, chunk.length, chunk.completes_prompt) == (8, 8, False)


def test_sequences_wait_for_a_free_cache_row_and_get_it_back_when_finished():
    sched = _sched(max_num_seqs=2, max_num_batched_tokens=32)
    seqs = [_seq(i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert len(batch.prefills) == 2 and seqs[2] in sched.waiting
    _decode_all(sched, batch)
    row = seqs[0].row
    sched.finish([seqs[0]])
    assert [c.seq for c in sched.schedule().prefills] == [seqs[2]]
    assert seqs[2].row == row


def test_budget_must_leave_room_for_prefill():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _sched(max_num_seqs=16, max_num_batched_tokens=16)


def test_scheduler_imports_no_jax():
    code = "import sys, lora_jax.core.scheduler; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_sequence_short_of_blocks_preempts_the_latest_admitted_which_keeps_its_row():
    sched = _sched(num_blocks=4, block_size=4, max_num_batched_tokens=32, max_prefill_chunk=16)
    first, second = _seq(0, prompt_len=8), _seq(1, prompt_len=8)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()  # both prompts: 2 blocks each, the pool is full
    assert [c.seq for c in batch.prefills] == [first, second]
    _decode_all(sched, batch)  # 8 cached, one output each: the next decode needs block 3
    batch = sched.schedule()
    assert batch.decodes == [first] and batch.preempted == [second]
    assert second.num_cached == 0 and second.row is not None and sched.waiting[0] is second
    assert sched.kv.pool.num_free == 1  # first holds 3 blocks; second gave back both
    _decode_all(sched, batch)
    sched.finish([first])
    batch = sched.schedule()  # second comes back: prompt and its output recomputed at once
    (chunk,) = batch.prefills
    assert chunk.seq is second and (chunk.start, chunk.length) == (0, 9)
    assert chunk.completes_prompt


def test_a_preempting_step_admits_nothing_new():
    sched = _sched(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    seqs = [_seq(i, prompt_len=8) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    _decode_all(sched, sched.schedule())  # 0 and 1 run; 2 waits for blocks
    batch = sched.schedule()
    assert batch.preempted == [seqs[1]] and not batch.prefills
    assert list(sched.waiting) == [seqs[1], seqs[2]]


def _chunks(*lengths):
    return [PrefillChunk(_seq(i, prompt_len=n), 0, n) for i, n in enumerate(lengths)]


def test_a_step_just_past_a_bucket_gives_its_last_chunks_tokens_to_the_next_step():
    # 16 decodes + 16 chunks of 64 = 1040 tokens would run padded to 2048; 1024 fill 1024.
    trimmed = fill_bucket(16, _chunks(*[64] * 16))
    assert 16 + sum(c.length for c in trimmed) == 1024
    assert [c.length for c in trimmed] == [64] * 15 + [48]
    # The excess comes from the last chunks first, each keeping at least one token.
    assert [c.length for c in fill_bucket(0, _chunks(200, 60, 30))] == [200, 55, 1]


def test_steps_on_a_bucket_or_far_past_one_are_left_alone():
    for decodes, lengths in [(0, [256, 256]), (4, [508]), (0, [200, 200]), (3, [2])]:
        chunks = _chunks(*lengths)
        assert fill_bucket(decodes, chunks) == chunks
    # 270 decodes + 2 short chunks (14 tokens past 256) cannot give up enough: unchanged.
    chunks = _chunks(2, 2)
    assert fill_bucket(270, chunks) == chunks
    # Below FILL_FROM a step is never trimmed: its fixed cost outweighs the padding.
    chunks = _chunks(100, 100)
    assert fill_bucket(0, chunks) == chunks


def test_the_scheduler_fills_the_bucket_and_the_rest_follows_next_step():
    sched = _sched(num_blocks=128, max_num_seqs=8, max_num_batched_tokens=512,
                   max_prefill_chunk=512, fill_buckets=True)
    for i in range(3):
        sched.add(_seq(i, prompt_len=120))
    batch = sched.schedule()  # 360 tokens -> 256
    assert [(c.seq.seq_id, c.start, c.length) for c in batch.prefills] == [
        (0, 0, 120), (1, 0, 120), (2, 0, 16)]
    _decode_all(sched, batch)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.decodes] == [0, 1]
    assert [(c.seq.seq_id, c.start, c.length) for c in batch.prefills] == [(2, 16, 104)]


def test_a_prefix_computed_in_this_step_is_reused_next_step_not_computed_twice():
    sched = _sched(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                   max_prefill_chunk=16)
    shared = list(range(12))
    seqs = [Sequence(i, shared + [50 + i, 60 + i], None) for i in range(3)]
    other = Sequence(3, list(range(200, 214)), None)
    for seq in seqs + [other]:
        sched.add(seq)
    batch = sched.schedule()
    # The later sharers wait: the first computes the 3 shared blocks; an unrelated prompt goes.
    assert [c.seq.seq_id for c in batch.prefills] == [0, 3]
    _decode_all(sched, batch)
    for chunk in batch.prefills:
        sched.kv.cache_full_blocks(chunk.seq.key, chunk.seq.tokens[:chunk.seq.num_cached],
                                   chunk.seq.cache_key)
    batch = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in batch.prefills] == [(1, 12, 2), (2, 12, 2)]
    # Another adapter's request never waits for (nor shares) the base model's blocks.
    sched2 = _sched(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                    max_prefill_chunk=16)
    a, b = Sequence(0, shared + [1], None), Sequence(1, shared + [1], 7, cache_key="adapter 7")
    sched2.add(a)
    sched2.add(b)
    assert [c.seq.seq_id for c in sched2.schedule().prefills] == [0, 1]


def test_a_waiting_sequence_with_tokens_still_on_the_device_is_not_admitted():
    sched = _sched()
    held, other = _seq(0), _seq(1)
    held.num_pending = 1  # preempted while its last sample was in flight
    sched.add(held)
    sched.add(other)
    batch = sched.schedule()
    assert [c.seq for c in batch.prefills] == [other]
    _decode_all(sched, batch)
    held.output_ids.append(7)  # the engine read it
    held.num_pending = 0
    batch = sched.schedule()
    assert batch.decodes == [other] and [c.seq for c in batch.prefills] == [held]


def test_a_sequence_whose_pending_tokens_reach_its_limit_is_not_scheduled_again():
    sched = _sched()
    seq = Sequence(0, [1, 2, 3], None, max_output=2)
    sched.add(seq)
    _decode_all(sched, sched.schedule())  # prompt done, first output known
    seq.num_cached, seq.num_pending = 4, 1  # its second output is still on the device
    assert seq.at_limit and not sched.schedule()
    seq.output_ids.append(9)  # read: the engine finishes it on length
    seq.num_pending = 0
    assert seq.at_limit and len(seq.output_ids) == seq.max_output


def test_the_scheduler_accounts_for_what_was_dispatched_and_what_was_sampled():
    sched = _sched(max_num_batched_tokens=16, max_prefill_chunk=4)
    long, short = _seq(0, prompt_len=6), _seq(1, prompt_len=3)
    sched.add(long)
    sched.add(short)
    batch = sched.schedule()
    assert [(c.seq, c.start, c.length) for c in batch.prefills] == [(long, 0, 4), (short, 0, 3)]
    # Only the chunk that completes its prompt samples; its row in the step is its position.
    assert sched.dispatched(batch) == {short.seq_id: 1}
    assert (long.num_cached, long.num_pending, long.started) == (4, 0, True)
    assert (short.num_cached, short.num_pending, short.num_tokens) == (3, 1, 4)
    batch = sched.schedule()  # the pending token counts: short decodes it on the device
    assert batch.decodes == [short] and [(c.seq, c.start) for c in batch.prefills] == [(long, 4)]
    sched.sampled(short, 42)
    assert short.output_ids == [42] and short.num_pending == 0 and short.num_tokens == 4


def test_finished_sequences_are_marked_and_give_back_their_row_and_blocks():
    sched = _sched()
    seq = _seq(0)
    sched.add(seq)
    _decode_all(sched, sched.schedule())
    used = sched.kv.pool.num_used
    sched.finish([seq])
    assert seq.finished and seq.row is None and not sched.has_unfinished()
    assert sched.kv.pool.num_used < used


def test_unpinned_adapters_stop_counting_against_max_loras():
    sched = _sched(max_loras=1)
    sched.pin(9)
    sched.add(_seq(0, adapter=1))
    assert not sched.schedule() and sched.held_adapters() == {9}
    sched.unpin(9)
    assert [c.seq.seq_id for c in sched.schedule().prefills] == [0]


def _run_step(sched):
    """Schedule and pretend the step ran -> the ids of the sequences admitted in it."""
    batch = sched.schedule()
    _decode_all(sched, batch)
    return {c.seq.seq_id for c in batch.prefills if c.start == 0}


def test_a_sequence_refused_a_slot_goes_before_every_sequence_that_arrived_after_it():
    # One slot; hot adapter 1 gets a new request during every step, each with two outputs.
    sched = _sched(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    for i in (0, 1):
        seq = _seq(i, adapter=1)
        seq.max_output = 2
        sched.add(seq)
    assert _run_step(sched) == {0, 1}
    cold = _seq(2, adapter=2)
    cold.max_output = 2
    sched.add(cold)
    admitted_at, later_hot = {}, []
    for step in range(1, 8):
        for seq_id in _run_step(sched):
            admitted_at[seq_id] = step
        new = _seq(10 + step, adapter=1)
        new.max_output = 2
        later_hot.append(new)
        sched.add(new)
        sched.finish([s for s in sched.running if s.at_limit])
    # The bound: the cold sequence waits only for the sequences there before it (0 and 1,
    # done after step 1); the hot ones that arrived after it was refused wait for it.
    assert admitted_at[cold.seq_id] == 2
    assert all(admitted_at.get(s.seq_id, 99) > 2 for s in later_hot)
    assert admitted_at[later_hot[0].seq_id] == 4  # the slot is back once cold is done


def test_base_model_sequences_pass_a_sequence_waiting_for_a_slot():
    sched = _sched(max_loras=1, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(_seq(0, adapter=1))
    _run_step(sched)
    sched.add(_seq(1, adapter=2))  # refused: the one slot is held
    sched.add(_seq(2, adapter=None))  # takes no slot
    sched.add(_seq(3, adapter=1))  # queued before seq 1 was first refused: it goes
    assert _run_step(sched) == {2, 3}
    sched.add(_seq(4, adapter=1))  # arrived after the refusal: waits for seq 1
    assert _run_step(sched) == set()


def test_a_sequence_whose_adapter_is_loading_waits_and_lets_the_others_pass():
    sched = _sched(max_loras=2, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(_seq(0, adapter=5))
    sched.add(_seq(1, adapter=1))
    batch = sched.schedule(ready=lambda adapter: adapter != 5)
    assert [c.seq.seq_id for c in batch.prefills] == [1]
    _decode_all(sched, batch)
    batch = sched.schedule(ready=lambda adapter: True)
    assert [c.seq.seq_id for c in batch.prefills] == [0]
