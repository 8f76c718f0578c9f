"""Token sampling inside the jitted step: penalties, greedy, temperature, top-k, top-p, min-p,
per-row seeds.

Every row carries its own parameters and its own key (seed folded with the row's output count),
so a seeded request samples the same tokens whatever else shares its batch. Penalties follow
vLLM: repetition (prompt and output tokens: positive logits divided by it, negative ones
multiplied), then frequency (times the output count) and presence (once per output token seen).
Filters follow vLLM's order on the temperature-scaled logits: min-p on the full distribution,
then top-k, then top-p on what top-k kept, renormalized. Before all of these, as in vLLM, each
row's logit bias is added and, while min_tokens is not reached, its EOS and stop ids are set to
-inf. Logprobs stay those of the model's raw distribution, as vLLM reports them by default.

No sort of the vocabulary anywhere: on XLA:CPU sorting [32, 32000] costs several whole decode
steps of the bench model (the README's design measurements). Top-k and top-p become per-row
thresholds found by bisection over the floats' order-preserving integer bits (32 halvings find
the exact value), and the draw is one uniform per row through a two-level inverse CDF (block
sums, then one block's cumsum), not V Gumbel variates and an argmax.
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
    # logit_bias and min_tokens (None: no row has any). Pads are no-ops (see input_batch).
    hold: jax.Array | None = None  # bool: held_ids cannot be sampled this step
    bias_ids: jax.Array | None = None  # [B, MAX_LOGIT_BIAS] int32
    bias: jax.Array | None = None  # [B, MAX_LOGIT_BIAS] float32, added to the logits
    held_ids: jax.Array | None = None  # [B, MAX_HELD_TOKEN_IDS] int32, -1 = none


class History(NamedTuple):
    """What the sequence in each cache row has seen so far, for the penalties."""

    output_counts: jax.Array  # [rows, V] int32, times each token was generated
    in_prompt: jax.Array  # [rows, V] bool, the token occurs in the prompt


class SamplingMode(NamedTuple):
    """Which sampling work a batch needs (static: one compiled program per mode used).

    Decided on the host from the batch's SamplingArrays (see `mode_of`), so a batch that needs
    no random draw, no penalty or no top-k/top-p/min-p filter runs none of that code: a
    traced lax.cond would still copy the [B, V] logits in and out of its branches.
    """

    random: bool = True  # some row has temperature > 0
    top_k: bool = True  # some sampled row uses top-k
    top_p: bool = True  # some sampled row uses top-p
    min_p: bool = True  # some sampled row uses min-p
    penalties: bool = True  # some row has a presence, frequency or repetition penalty
    adjust: bool = True  # some row has a logit bias or holds tokens off (min_tokens)


def mode_of(p: SamplingArrays) -> SamplingMode:
    """The SamplingMode of host (numpy) sampling arrays (filters on greedy rows change
    nothing, so they ask for nothing)."""
    hot = p.temperature > 0
    penalties = (p.presence_penalty != 0) | (p.frequency_penalty != 0) | (
        p.repetition_penalty != 1)
    adjust = (p.bias is not None and bool((p.bias != 0).any())) or (
        p.hold is not None and bool(p.hold.any()))
    return SamplingMode(bool(hot.any()), bool((hot & (p.top_k > 0)).any()),
                        bool((hot & (p.top_p < 1)).any()), bool((hot & (p.min_p > 0)).any()),
                        bool(penalties.any()), adjust)


EVERYTHING = SamplingMode()


def first_argmax(x: jax.Array) -> jax.Array:
    """x [B, V] -> [B] int32, the first index of each row's maximum (as jnp.argmax).

    A max, then a min over the matching indices: two plain reductions that XLA:CPU vectorizes,
    faster than argmax's (value, index) reduction over a 32000-entry vocabulary.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    # A NaN matches itself here, so a row holding one gives its first NaN (as argmax does),
    # never the out-of-vocabulary index V.
    return jnp.min(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


class Sampled(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprob: jax.Array  # [B] float32, log-probability of the sampled token
    top_ids: jax.Array  # [B, K] int32, K = num_logprobs (0 when not asked)
    top_logprobs: jax.Array  # [B, K] float32


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (negative floats' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _largest_threshold(keys: jax.Array, holds) -> jax.Array:
    """keys [B, V] int32 (_sortable); holds(t [B]) -> [B] bool, true at each row's smallest key
    and monotone (false above some t) -> [B] the largest key t where holds(t)."""

    def halve(_, bounds):
        lo, hi = bounds  # holds(lo) is true; the answer lies in [lo, hi]
        # The midpoint rounded up, in uint32 so that a span above 2**31 cannot overflow.
        span = hi.astype(jnp.uint32) - lo.astype(jnp.uint32)
        mid = (lo.astype(jnp.uint32) + span - span // 2).astype(jnp.int32)
        ok = (hi > lo) & holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)

    bounds = (jnp.min(keys, axis=-1), jnp.max(keys, axis=-1))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def _filter(scaled: jax.Array, p: SamplingArrays, mode: SamplingMode) -> jax.Array:
    """Temperature-scaled logits [B, V] -> the same with every filtered-out token at -inf."""
    masked = scaled
    if mode.min_p:  # p_i >= min_p * p_max, on the full distribution
        probs = jax.nn.softmax(scaled, axis=-1)
        keep = probs >= p.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        masked = jnp.where(keep, masked, -jnp.inf)
    keys = _sortable(masked)
    if mode.top_k:  # every token at or above the k-th largest value (ties all kept)
        k = jnp.where(p.top_k > 0, p.top_k, scaled.shape[-1])
        t = _largest_threshold(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k)
        masked = jnp.where(keys >= t[:, None], masked, -jnp.inf)
    if mode.top_p:  # the highest tokens that hold top_p of what is left, renormalized
        probs = jax.nn.softmax(masked, axis=-1)

        def enough(t):
            return jnp.sum(jnp.where(keys >= t[:, None], probs, 0.0), axis=-1) >= p.top_p

        t = _largest_threshold(keys, enough)
        keep = (keys >= t[:, None]) | (p.top_p[:, None] >= 1)
        masked = jnp.where(keep, masked, -jnp.inf)
    return masked


_CDF_BLOCK = 128


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """probs [B, V] >= 0, u [B] in [0, 1) -> [B] int32: the first token whose cumulative mass
    passes u * total. Block sums pick the block, one block's cumsum the token; a token of zero
    probability is never returned."""
    rows, vocab = probs.shape
    blocks = -(-vocab // _CDF_BLOCK)
    p = jnp.pad(probs, ((0, 0), (0, blocks * _CDF_BLOCK - vocab)))
    p = p.reshape(rows, blocks, _CDF_BLOCK)
    mass = jnp.sum(p, axis=-1)
    cdf = jnp.cumsum(mass, axis=-1)
    target = u * cdf[:, -1]
    block = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), _last_positive(mass))
    before = jnp.take_along_axis(cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0]
    before = jnp.where(block > 0, before, 0.0)
    inner = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]
    inner_cdf = before[:, None] + jnp.cumsum(inner, axis=-1)
    index = jnp.minimum(jnp.sum(inner_cdf <= target[:, None], axis=-1), _last_positive(inner))
    return (block * _CDF_BLOCK + index).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    """x [B, N] >= 0 -> [B] int32, the last index holding a positive value (0 if none)."""
    return x.shape[-1] - 1 - first_argmax((x[:, ::-1] > 0).astype(jnp.int32))


def _draw(logits: jax.Array, p: SamplingArrays, mode: SamplingMode) -> jax.Array:
    greedy = first_argmax(logits)
    if not mode.random:  # the common serving case: no random numbers at all
        return greedy
    u = jax.vmap(lambda s, c: jax.random.uniform(jax.random.fold_in(jax.random.key(s), c)))(
        p.seed, p.counter)
    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    if mode.top_k or mode.top_p or mode.min_p:
        scaled = _filter(scaled, p, mode)
    drawn = _inverse_cdf(jax.nn.softmax(scaled, axis=-1), u)
    return jnp.where(p.temperature == 0, greedy, drawn)


def adjust(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """logits [B, V] -> with each row's logit bias added, then its held ids (EOS and stop
    ids while min_tokens is not reached) at -inf, as vLLM applies them before penalties."""
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]
    if p.bias_ids is not None:
        logits = logits.at[rows, p.bias_ids].add(p.bias, mode="drop")
    if p.held_ids is not None:
        # A row not held, and a pad, point past the vocabulary: dropped.
        held = jnp.where(p.hold[:, None] & (p.held_ids >= 0), p.held_ids, logits.shape[-1])
        logits = logits.at[rows, held].set(-jnp.inf, mode="drop")
    return logits


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
           history: History | None = None, rows: jax.Array | None = None,
           mode: SamplingMode = EVERYTHING) -> Sampled:
    """logits [B, V] float32 -> Sampled, drawn after the logit biases and min_tokens holds,
    then the penalties when the history of the batch's cache rows [B] is given; logprobs are
    of the model's raw distribution. `mode` (static) may leave out work no row needs; the
    default does everything, correct for any batch."""
    scores = logits
    if mode.adjust:
        scores = adjust(scores, params)
    if history is not None and mode.penalties:
        scores = penalize(scores, params, history, rows)
    tokens = _draw(scores, params, mode)
    # log p(token) = logit - logsumexp: no [B, V] log-softmax unless top logprobs are asked.
    lse = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    if num_logprobs:
        top_logits, top_ids = jax.lax.top_k(logits, num_logprobs)
        top_lp = top_logits - lse[:, None]
    else:
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
        top_lp = jnp.zeros((logits.shape[0], 0), jnp.float32)
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
