"""Runs one scheduled step on the device: the ragged batch through one compiled program.

The step is a pure function of (model state, adapter stacks, KV cache, penalty history, batch
arrays): the model is split once with nnx.split and merged inside jit, the KV cache and the
history are donated, and sampling runs in the same program, so the host reads back only token
ids (and logprobs if asked). Programs are compiled ahead of time, one per token bucket, by
`compile_all` (see lora_jax/worker/compilation.py). `dispatch` starts a step and returns at
once; `collect` reads its tokens, so the engine can start the next step first.

A step's program takes named pytrees: `Weights` (model state, adapter stacks), `Cache` (the
donated KV pool and penalty history), the last step's samples (`carry`), and `StepInputs`, the
host arrays of the batch, which is also what process 0 sends the other processes.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.sampling_params import MAX_LOGPROBS
from lora_jax.worker.distributed import STEP, StepChannel
from lora_jax.worker.input_batch import (
    BatchShape,
    RowInput,
    RowSampling,
    ShapeLadder,
    build,
    table_width,
)
from lora_jax.worker.sampler import History, Sampled, SamplingArrays, SamplingMode, mode_of, sample
from lora_jax.worker.warm import warm_batches
from models.kv_cache import init_paged_kv_cache
from models.lora import SITES
from models.ragged import RaggedMeta
from models.sharding import TensorParallel

__all__ = ["RowInput", "RowSampling", "Runner", "Pending", "ProgramKey", "StepInputs", "GREEDY",
           "GENERAL"]

# Two sampling kinds, chosen per step: greedy rows without penalties only, or the general
# sampler (any mix of temperature, filters, seeds, penalties, logit biases and min_tokens holds;
# greedy rows included).
GREEDY = SamplingMode(False, False, False, False, False, False)
GENERAL = SamplingMode()


class ProgramKey(NamedTuple):
    """One compiled program: the token bucket (sampling kinds and logprobs are flags)."""

    tokens: int


class Pending(NamedTuple):
    """A dispatched step: its samples still on the device, and how many rows are real."""

    out: Sampled
    num_rows: int


class Requests(NamedTuple):
    """Per-request arrays of a step, [R] each."""

    row: jax.Array  # history row
    slot: jax.Array  # adapter slot, -1 = base
    rope_scale: jax.Array
    logits_index: jax.Array  # the token whose hidden state samples
    prompt: jax.Array
    fresh: jax.Array
    keeps: jax.Array


class StepInputs(NamedTuple):
    """Everything a step takes from the host (numpy until the call)."""

    tokens: jax.Array  # [T] int32
    src: jax.Array  # [T] int32: -1, or the row of the previous step's sample to take
    meta: RaggedMeta
    requests: Requests
    sampling: SamplingArrays
    general: jax.Array  # bool: some row needs the general sampler (else greedy only)
    want_logprobs: jax.Array  # bool: some request asked for top logprobs
    new_prompts: jax.Array  # bool: some row has prompt tokens or is a sequence's first chunk
    # [len(models.lora.SITES)] bool: the LoRA sites some adapter of the step uses (the others
    # skip their adapter work)
    lora_sites: jax.Array


class Weights(NamedTuple):
    """What a step reads and never changes."""

    state: object  # the model's nnx.State
    stacks: object  # the adapter slots' LoraStacks (None without LoRA)


class Cache(NamedTuple):
    """What a step updates in place (donated): the KV pool and the penalty history."""

    kv: object  # models.kv_cache.PagedKVCache
    history: History


def _step(graphdef, weights: Weights, cache: Cache, carry, inputs: StepInputs, *,
          lora_backend: str | None, attention_backend: str | None, logits_sharding=None,
          mesh=None):
    model = nnx.merge(graphdef, weights.state)
    req, meta, history = inputs.requests, inputs.meta, cache.history
    # A token sampled by the previous step, not yet seen by the host, is read on the device:
    # src indexes that step's sampled tokens (carry), -1 = the host's token.
    src = inputs.src
    tokens = jnp.where(src >= 0, carry[jnp.maximum(src, 0)], inputs.tokens)
    hidden, kv = model.ragged(tokens, meta, cache.kv, weights.stacks, req.slot, req.rope_scale,
                              meta.kv_lens, lora_backend=lora_backend,
                              attention_backend=attention_backend, mesh=mesh,
                              lora_sites=inputs.lora_sites)
    logits = model.logits(hidden[req.logits_index])  # [R, V]: each request's last token
    if logits_sharding is not None:
        # A vocab-split lm_head: each device computes its columns, then the [R, V] rows are
        # gathered for the sampler (not the lm_head gathered for one whole matmul).
        for sharding in logits_sharding:
            logits = jax.lax.with_sharding_constraint(logits, sharding)
    # Only steps with prompt tokens or a sequence's first chunk touch the prompt marks (a
    # false lax.cond is far cheaper than the marks' [R, V] row reset).
    history = jax.lax.cond(inputs.new_prompts,
                           lambda: _see_prompt(history, tokens, meta, req), lambda: history)
    # One program serves every batch: the sampling kind and the top logprobs are lax.conds on
    # flags the host sets per step, so a greedy batch never runs the general sampler's work.
    sampling = inputs.sampling
    out = jax.lax.cond(
        inputs.general, lambda: sample(logits, sampling, 0, history, req.row, GENERAL),
        lambda: sample(logits, sampling, 0, None, None, GREEDY))
    top_ids, top_lp = jax.lax.cond(inputs.want_logprobs, lambda: _top_logprobs(logits),
                                   lambda: (jnp.zeros((logits.shape[0], MAX_LOGPROBS), jnp.int32),
                                            jnp.zeros((logits.shape[0], MAX_LOGPROBS))))
    # Entries that drop their sample (padding, a chunk before the prompt's last) index past
    # the end.
    kept = jnp.where(req.keeps, req.row, history.output_counts.shape[0])
    history = History(history.output_counts.at[kept, out.tokens].add(1, mode="drop"),
                      history.in_prompt)
    carry = jnp.pad(out.tokens, (0, carry.shape[0] - out.tokens.shape[0]))
    return Sampled(out.tokens, out.logprob, top_ids, top_lp), Cache(kv, history), carry


def _top_logprobs(logits):
    top, ids = jax.lax.top_k(logits, MAX_LOGPROBS)
    return ids.astype(jnp.int32), top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _see_prompt(history: History, tokens, meta: RaggedMeta, req: Requests) -> History:
    """A sequence's first chunk makes its row forget the previous sequence; prompt tokens
    are marked seen. Padding and decode tokens change nothing."""
    num_rows = history.output_counts.shape[0]
    # Only the fresh entries' rows are cleared, one row each (a scatter of zeros into every
    # entry's row would build a [R, V] block of zeros first, in each step with a prompt).
    rows = req.row[jnp.argsort(jnp.logical_not(req.fresh), stable=True)]  # the fresh first

    def forget(i, seen):
        return tuple(jax.lax.dynamic_update_slice(x, jnp.zeros((1, x.shape[1]), x.dtype),
                                                  (rows[i], 0)) for x in seen)
    counts, in_prompt = jax.lax.fori_loop(0, jnp.sum(req.fresh), forget,
                                          (history.output_counts, history.in_prompt))
    owner = jnp.minimum(meta.token_req, req.row.shape[0] - 1)
    marked = jnp.where(req.prompt[owner] & (meta.positions >= 0), req.row[owner], num_rows)
    return History(counts, in_prompt.at[marked, tokens].set(True, mode="drop"))


def _place(model, tp: TensorParallel, num_blocks, block_size, dtype, num_rows):
    """The split model's graphdef and state (already in its shards), the KV pool in its
    shards, the history replicated, and the step's shardings (the donated pool and history
    keep theirs, so every step's outputs are the next step's inputs as compiled)."""
    if model.config != tp.config:
        raise ValueError("with tensor parallelism the runner takes the split model; load it "
                         "with models.shard_loading.load_llama_sharded(folder, tp)")
    graphdef, state = nnx.split(model)
    kv = tp.init_kv(num_blocks, block_size, dtype)
    history = _zero_history(num_rows, model.config.vocab_size, tp.replicated)
    out = (tp.replicated, Cache(jax.tree.map(lambda x: x.sharding, kv), tp.replicated),
           tp.replicated)
    return graphdef, state, kv, history, {"out_shardings": out}


def _zero_history(num_rows: int, vocab: int, sharding=None) -> History:
    """Zero output counts and prompt marks, on the default device or placed with `sharding`
    (from the host: with several processes a mesh spans devices of the others)."""
    if sharding is None:
        return History(jnp.zeros((num_rows, vocab), jnp.int32),
                       jnp.zeros((num_rows, vocab), jnp.bool_))
    return jax.device_put(History(np.zeros((num_rows, vocab), np.int32),
                                  np.zeros((num_rows, vocab), np.bool_)), sharding)


class Runner:
    """Owns the model state, the KV pool and the penalty history (output counts and prompt
    marks, [rows, vocab] each: 5 bytes per row and vocabulary entry); `dispatch` starts one
    ragged step through its compiled program and `collect` reads its samples."""

    def __init__(self, model, *, num_rows: int, max_len: int, num_blocks: int,
                 block_size: int, dtype, max_num_batched_tokens: int, max_prefill_seqs: int,
                 lora_backend: str | None = None, attention_backend: str | None = None,
                 tensor_parallel: TensorParallel | None = None):
        self.max_len, self.block_size, self.num_blocks = max_len, block_size, num_blocks
        self.ladder = ShapeLadder(max_num_batched_tokens, num_rows, max_prefill_seqs)
        self.table_pages = table_width(max_len, block_size)
        self.config, self.dtype = model.config, dtype
        self.tensor_parallel = tp = tensor_parallel
        logits_sharding = None
        if tp is None:
            self.graphdef, self.state = nnx.split(model)
            self.kv = init_paged_kv_cache(model.config, num_blocks, block_size, dtype)
            self.history = _zero_history(num_rows, model.config.vocab_size)
            shardings = {}
        else:
            self.graphdef, self.state, self.kv, self.history, shardings = _place(
                model, tp, num_blocks, block_size, dtype, num_rows)
            logits_sharding = (tp.sharding(("rows", "vocab")), tp.replicated)
        self._jit = jax.jit(functools.partial(_step, self.graphdef, lora_backend=lora_backend,
                                              attention_backend=attention_backend,
                                              logits_sharding=logits_sharding,
                                              mesh=None if tp is None else tp.mesh),
                            donate_argnames=("cache",), **shardings)
        # The last step's sampled tokens, padded to max_num_seqs, kept on the device for the
        # next step (see Pending).
        self.carry = jnp.zeros((num_rows,), jnp.int32)
        if tp is not None:
            self.carry = jax.device_put(np.zeros((num_rows,), np.int32), tp.replicated)
        self._programs: dict[ProgramKey, object] = {}
        self.channel: StepChannel | None = None  # set when several processes share the mesh
        self.compiled_at_start = 0

    # Programs ------------------------------------------------------------------------------

    def program_keys(self) -> list[ProgramKey]:
        """Every program the engine can run: one per token bucket."""
        return [ProgramKey(s.tokens) for s in self.ladder.shapes()]

    def compiled_programs(self) -> list[ProgramKey]:
        """The programs compiled so far, in the order they were compiled."""
        return list(self._programs)

    def _inputs(self, shape: BatchShape, rows: list[RowInput], num_logprobs: int = 0,
                lora_sites: np.ndarray | None = None) -> StepInputs:
        batch = build(rows, shape, block_size=self.block_size, num_blocks=self.num_blocks,
                      table_pages=self.table_pages)
        cols = batch.columns
        req = Requests(row=cols["row"], slot=cols["slot"], rope_scale=cols["rope_scale"],
                       logits_index=batch.logits_index, prompt=cols["prompt"],
                       fresh=cols["fresh"], keeps=cols["keeps"])
        sampling = SamplingArrays(**{name: cols[name] for name in SamplingArrays._fields})
        return StepInputs(
            tokens=batch.tokens, src=batch.src, meta=batch.meta, requests=req, sampling=sampling,
            general=np.bool_(mode_of(sampling) != GREEDY),
            want_logprobs=np.bool_(num_logprobs > 0),
            new_prompts=np.bool_(cols["prompt"].any() or cols["fresh"].any()),
            lora_sites=(np.ones(len(SITES), np.bool_) if lora_sites is None
                        else np.asarray(lora_sites, np.bool_)))

    def _run(self, key: "ProgramKey", stacks, inputs: StepInputs) -> Sampled:
        out, (self.kv, self.history), self.carry = self._programs[key](
            Weights(self.state, stacks), Cache(self.kv, self.history), self.carry, inputs)
        return out

    def compile(self, key: ProgramKey, stacks) -> None:
        """Compile one program (a no-op when it exists): lowering needs only shapes, so an
        empty batch of the key's shape stands in for real requests. Thread-safe for distinct
        keys (start-up compiles several at once)."""
        if key in self._programs:
            return
        inputs = self._inputs(self.ladder.shape(key.tokens), [])
        self._programs[key] = self._jit.lower(Weights(self.state, stacks),
                                              Cache(self.kv, self.history), self.carry,
                                              inputs).compile()

    def warm(self, key: ProgramKey, stacks) -> int:
        """Run program `key` once per branch a real step can take (lora_jax/worker/warm.py),
        so no request's step pays for a first run; returns the runs made."""
        shape = self.ladder.shape(key.tokens)
        num_slots = 0 if stacks is None else stacks.num_slots
        batches = warm_batches(shape, num_slots, self.block_size, self.max_len)
        for batch in batches:
            sites = np.full(len(SITES), batch.sites, np.bool_)
            self._run(key, stacks, self._inputs(shape, batch.rows, batch.num_logprobs, sites))
        jax.block_until_ready(self.carry)
        return len(batches)

    def order_programs(self, keys: list[ProgramKey]) -> None:
        """List the compiled programs in `keys`' order (threads finish in any order)."""
        self._programs = {k: self._programs[k] for k in keys if k in self._programs} | {
            k: v for k, v in self._programs.items() if k not in keys}

    # Running -------------------------------------------------------------------------------

    def dispatch(self, rows: list[RowInput], stacks, num_logprobs: int = 0,
                 lora_sites: np.ndarray | None = None) -> Pending:
        """Start one step: sample one token per request (for the last of its tokens). Returns
        at once, with the step running on the device; `collect` waits for its tokens. A row's
        `src` takes its token from the previous step's samples, on the device. lora_sites: the
        LoRA sites the step's adapters use (None: all)."""
        shape = self.ladder.fit(rows)
        inputs = self._inputs(shape, rows, num_logprobs, lora_sites)
        key = ProgramKey(shape.tokens)
        self.compile(key, stacks)
        if self.channel is not None:  # several processes: the others make the same call
            inputs = self.channel.send(STEP, key, inputs)
        return Pending(self._run(key, stacks, inputs), len(rows))

    @staticmethod
    def collect(pending: Pending) -> Sampled:
        """Wait for a dispatched step; its samples as host arrays, one entry per row."""
        return Sampled(*(np.asarray(x)[:pending.num_rows] for x in jax.device_get(pending.out)))

    def recover(self) -> bool:
        """After a failed step: if the donated KV pool or history went with it, start them
        over (zeros, placed as before) and return True; False when they are intact."""
        lost = any(x.is_deleted() for x in (self.kv.k, self.kv.v, *self.history))
        if lost:
            rows, vocab = self.history.output_counts.shape
            tp = self.tensor_parallel
            if tp is None:
                self.kv = init_paged_kv_cache(self.config, self.num_blocks, self.block_size,
                                              self.dtype)
                self.history = _zero_history(rows, vocab)
            else:
                self.kv = tp.init_kv(self.num_blocks, self.block_size, self.dtype)
                self.history = _zero_history(rows, vocab, tp.replicated)
        return lost

    def follow(self, key: tuple[int, ...], stacks) -> None:
        """Another process than 0: run the step process 0 announced with `key`, on its
        arrays (see lora_jax.worker.distributed)."""
        key = ProgramKey(int(key[0]))
        self.compile(key, stacks)
        template = self._inputs(self.ladder.shape(key.tokens), [])
        self._run(key, stacks, self.channel.receive(template))

    def compiled_count(self) -> int:
        """How many programs the runner has compiled."""
        return len(self._programs)
