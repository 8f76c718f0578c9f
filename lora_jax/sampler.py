"""Token sampling inside the jitted step: penalties, greedy, temperature, top-k, top-p, min-p,
per-row seeds.

Every row carries its own parameters and its own key (seed folded with the row's output count),
so a seeded request samples the same tokens whatever else shares its batch. Penalties follow
vLLM: repetition (prompt and output tokens: positive logits divided by it, negative ones
multiplied), then frequency (times the output count) and presence (once per output token seen).
Logprobs stay those of the model's raw distribution, as vLLM reports them by default.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, each [B]: the device-side form of SamplingParams."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, <= 0 = disabled
    top_p: jax.Array  # float32 in (0, 1]
    min_p: jax.Array  # float32 in [0, 1]
    seed: jax.Array  # uint32
    counter: jax.Array  # int32, tokens generated so far (folded into the key)
    presence_penalty: jax.Array  # float32, 0 = off
    frequency_penalty: jax.Array  # float32, 0 = off
    repetition_penalty: jax.Array  # float32, 1 = off


class History(NamedTuple):
    """What the sequence in each cache row has seen so far, for the penalties."""

    output_counts: jax.Array  # [rows, V] int32, times each token was generated
    in_prompt: jax.Array  # [rows, V] bool, the token occurs in the prompt


class Sampled(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprob: jax.Array  # [B] float32, log-probability of the sampled token
    top_ids: jax.Array  # [B, K] int32, K = num_logprobs (0 when not asked)
    top_logprobs: jax.Array  # [B, K] float32


def _filter_sorted(sorted_logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """Mask (to -inf) the tail of each row's descending logits per top-k, top-p and min-p."""
    vocab = sorted_logits.shape[-1]
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(p.top_k > 0, p.top_k, vocab)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep = (rank < k) & (before < p.top_p[:, None]) & (probs >= p.min_p[:, None] * probs[:, :1])
    return jnp.where(keep | (rank == 0), sorted_logits, -jnp.inf)


def _draw(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(logits):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(p.seed, p.counter)
        scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]

        def filtered(x):
            order = jnp.argsort(-x, axis=-1)
            picked = jax.vmap(jax.random.categorical)(
                keys, _filter_sorted(jnp.take_along_axis(x, order, axis=-1), p))
            return jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0]

        # Sorting the vocabulary costs more than the rest of sampling: only when a row filters.
        needs_filter = jnp.any((p.top_k > 0) | (p.top_p < 1) | (p.min_p > 0))
        drawn = jax.lax.cond(needs_filter, filtered,
                             lambda x: jax.vmap(jax.random.categorical)(keys, x), scaled)
        return jnp.where(p.temperature == 0, greedy, drawn.astype(jnp.int32))

    # An all-greedy batch (the common serving case) draws no random numbers at all.
    return jax.lax.cond(jnp.all(p.temperature == 0), lambda _: greedy, stochastic, logits)


def penalize(logits: jax.Array, p: SamplingArrays, history: History,
             rows: jax.Array) -> jax.Array:
    """logits [B, V] float32 of the sequences in cache rows [B] -> with each row's repetition,
    frequency and presence penalties."""
    counts = history.output_counts[rows]
    seen = (counts > 0) | history.in_prompt[rows]
    rep = p.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - p.frequency_penalty[:, None] * counts
            - p.presence_penalty[:, None] * (counts > 0))


def sample(logits: jax.Array, params: SamplingArrays, num_logprobs: int = 0,
           history: History | None = None, rows: jax.Array | None = None) -> Sampled:
    """logits [B, V] float32 -> Sampled, drawn after the penalties when the history of the
    batch's cache rows [B] is given; logprobs are of the model's raw distribution."""
    scores = logits
    if history is not None:
        # Most batches use no penalty: then not even the [B, V] history rows are read.
        active = jnp.any((params.presence_penalty != 0) | (params.frequency_penalty != 0)
                         | (params.repetition_penalty != 1))
        scores = jax.lax.cond(active, lambda x: penalize(x, params, history, rows),
                              lambda x: x, logits)
    tokens = _draw(scores, params)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
