"""Ragged paged attention: the Pallas kernel (interpret mode here; LORA_JAX_TEST_BACKEND=pallas
runs it on a GPU) against the plain-JAX reference, the reference against a float64 numpy
attention, and the kernel's lowering for CUDA through Triton.

Every batch has padding tokens after the real ones and a padding sequence with junk length and
block table; real sequences' unused block-table entries are out of range on purpose.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kernels import PALLAS_BACKEND, seeded_rng
from jax import export

from pallas_kernels.attention import default_backend, kernel, ragged_paged_attention

TRITON = "__gpu$xla.gpu.triton"
# Relative to the largest output magnitude.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Entries of a block table a sequence does not use: out of range, so an unclamped read fails.
JUNK_PAGE = 1 << 20


@dataclasses.dataclass
class Batch:
    q: jnp.ndarray
    k_pages: jnp.ndarray
    v_pages: jnp.ndarray
    kv_lens: jnp.ndarray
    block_tables: jnp.ndarray
    query_start: jnp.ndarray
    num_seqs: jnp.ndarray

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.block_tables,
                self.query_start, self.num_seqs)

    @property
    def real_tokens(self) -> int:
        return int(self.query_start[int(self.num_seqs[0])])


def ragged_batch(rng, q_lens, kv_lens, *, heads=4, kv_heads=2, dim=32, block_size=16,
                 pad_tokens=3, pad_seqs=1, dtype=jnp.float32) -> Batch:
    """Sequences with q_lens new tokens each and kv_lens cached (new included), their pages
    scattered over a shuffled pool; pad_tokens rows and pad_seqs sequences of padding after
    them (padding sequences hold junk lengths and block tables)."""
    num_real = len(q_lens)
    max_blocks = max(-(-n // block_size) for n in kv_lens) + 1
    needed = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(needed) + 3
    pool = rng.permutation(num_blocks)
    tables = np.full((num_real + pad_seqs, max_blocks), JUNK_PAGE, np.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = pool[used:used + n]
        used += n
    tables[num_real:] = rng.integers(-5, num_blocks + 5, (pad_seqs, max_blocks))
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    starts = np.concatenate([starts, np.full(pad_seqs, starts[-1])]).astype(np.int32)
    lens = np.concatenate([kv_lens, rng.integers(1, 40, pad_seqs)]).astype(np.int32)
    tokens = int(starts[-1]) + pad_tokens

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return Batch(
        q=normal(tokens, heads, dim),
        k_pages=normal(num_blocks, block_size, kv_heads, dim),
        v_pages=normal(num_blocks, block_size, kv_heads, dim),
        kv_lens=jnp.asarray(lens), block_tables=jnp.asarray(tables),
        query_start=jnp.asarray(starts), num_seqs=jnp.asarray([num_real], jnp.int32),
    )


def naive_attention(batch: Batch, sm_scale: float, soft_cap=None, window=None) -> np.ndarray:
    """float64, one sequence and one query at a time, from contiguous copies of each cache."""
    q = np.asarray(jnp.asarray(batch.q, jnp.float32), np.float64)
    k_pages = np.asarray(jnp.asarray(batch.k_pages, jnp.float32), np.float64)
    v_pages = np.asarray(jnp.asarray(batch.v_pages, jnp.float32), np.float64)
    _, block_size, kv_heads, dim = k_pages.shape
    group = q.shape[1] // kv_heads
    out = np.zeros_like(q)
    starts = np.asarray(batch.query_start)
    for i in range(int(batch.num_seqs[0])):
        kv_len = int(batch.kv_lens[i])
        pages = np.asarray(batch.block_tables[i])[: -(-kv_len // block_size)]
        k = k_pages[pages].reshape(-1, kv_heads, dim)[:kv_len]
        v = v_pages[pages].reshape(-1, kv_heads, dim)[:kv_len]
        q_len = starts[i + 1] - starts[i]
        for j in range(q_len):
            position = kv_len - q_len + j
            lo = 0 if window is None else max(position - window + 1, 0)
            for h in range(q.shape[1]):
                scores = k[lo: position + 1, h // group] @ q[starts[i] + j, h] * sm_scale
                if soft_cap is not None:
                    scores = np.tanh(scores / soft_cap) * soft_cap
                weights = np.exp(scores - scores.max())
                out[starts[i] + j, h] = weights @ v[lo: position + 1, h // group] / weights.sum()
    return out


@pytest.fixture
def rng(request):
    return seeded_rng(request)


def _run(batch: Batch, backend: str, **kwargs) -> np.ndarray:
    fn = jax.jit(functools.partial(ragged_paged_attention, backend=backend, **kwargs))
    return np.asarray(jnp.asarray(fn(*batch.args()), jnp.float32), np.float64)


def _assert_matches_reference(batch: Batch, got: np.ndarray, dtype, **kwargs) -> None:
    want = _run(batch, "reference", **kwargs)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale)
    # Padding tokens come out exactly zero.
    assert not np.any(got[batch.real_tokens:])


# (q_lens, kv_lens): decode rows whose caches end on, before and after page boundaries; prefill
# chunks with no cache and with a cached prefix over several pages; both in one batch.
SCENARIOS = {
    "decode": ([1, 1, 1, 1], [1, 16, 17, 45]),
    "prefill": ([9, 20], [9, 55]),
    "mix": ([1, 12, 1, 5], [33, 16, 64, 21]),
}


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kernel_matches_reference_in_float32(scenario, group, rng):
    batch = ragged_batch(rng, *SCENARIOS[scenario], heads=2 * group, kv_heads=2)
    _assert_matches_reference(batch, _run(batch, PALLAS_BACKEND), jnp.float32)


@pytest.mark.parametrize("scenario,group", [("mix", 4), ("decode", 2)])
def test_kernel_matches_reference_in_bfloat16(scenario, group, rng):
    batch = ragged_batch(rng, *SCENARIOS[scenario], heads=2 * group, kv_heads=2,
                         dtype=jnp.bfloat16)
    got = _run(batch, PALLAS_BACKEND)
    _assert_matches_reference(batch, got, jnp.bfloat16)


def test_kernel_with_block_size_32_and_explicit_scale(rng):
    batch = ragged_batch(rng, [1, 30, 3], [70, 40, 3], heads=4, kv_heads=2, block_size=32)
    got = _run(batch, PALLAS_BACKEND, sm_scale=0.3)
    _assert_matches_reference(batch, got, jnp.float32, sm_scale=0.3)


@pytest.mark.parametrize("block_q,pages", [(1, 1), (4, 2), (8, 4)])
def test_query_blocks_and_page_chunks_do_not_change_the_result(block_q, pages, rng):
    # Small query blocks split a prefill chunk over many programs; several pages per chunk
    # read past the last used page of short caches.
    batch = ragged_batch(rng, *SCENARIOS["mix"], heads=4, kv_heads=2)
    fn = jax.jit(functools.partial(
        kernel.ragged_paged_attention, sm_scale=32**-0.5,
        interpret=PALLAS_BACKEND == "pallas_interpret", block_q=block_q, pages=pages))
    got = np.asarray(fn(*batch.args()), np.float64)
    _assert_matches_reference(batch, got, jnp.float32)


def test_batch_of_only_padding_outputs_zeros(rng):
    batch = dataclasses.replace(ragged_batch(rng, [3, 1], [8, 20]),
                                num_seqs=jnp.asarray([0], jnp.int32))
    for backend in (PALLAS_BACKEND, "reference"):
        assert not np.any(_run(batch, backend))


def test_reference_equals_naive_numpy_attention(rng):
    batch = ragged_batch(rng, [1, 6, 3], [20, 6, 35], heads=4, kv_heads=2, dim=8)
    got = _run(batch, "reference")
    np.testing.assert_allclose(got, naive_attention(batch, 8**-0.5), rtol=1e-5, atol=1e-5)
    assert not np.any(got[batch.real_tokens:])


def test_reference_with_window_and_soft_cap_equals_naive_numpy_attention(rng):
    batch = ragged_batch(rng, [1, 6, 3], [20, 6, 35], heads=4, kv_heads=2, dim=8)
    got = _run(batch, "reference", sliding_window=7, soft_cap=2.0)
    np.testing.assert_allclose(got, naive_attention(batch, 8**-0.5, 2.0, 7), rtol=1e-5,
                               atol=1e-5)
    # The window is real: without it the long sequences' outputs differ.
    assert np.abs(got - _run(batch, "reference", soft_cap=2.0)).max() > 1e-2


# Windows shorter than a page, across a page, and longer than every context (= no window);
# chunks of one page, so a query block starts past whole chunks its window never reaches.
@pytest.mark.parametrize("window", [3, 20, 100])
@pytest.mark.parametrize("scenario", ["mix", "prefill"])
def test_windowed_kernel_matches_reference(scenario, window, rng):
    batch = ragged_batch(rng, *SCENARIOS[scenario], heads=4, kv_heads=2)
    got = _run(batch, PALLAS_BACKEND, sliding_window=window, soft_cap=3.0)
    if PALLAS_BACKEND.startswith("pallas"):
        paged = np.asarray(kernel.ragged_paged_attention(
            *batch.args(), sm_scale=32 ** -0.5, interpret=PALLAS_BACKEND == "pallas_interpret",
            pages=1, sliding_window=window, soft_cap=3.0), np.float64)
        np.testing.assert_allclose(paged, got, rtol=0, atol=1e-5 * np.abs(got).max())
    _assert_matches_reference(batch, got, jnp.float32, sliding_window=window, soft_cap=3.0)


def test_default_backend_is_xla_off_gpu():
    assert default_backend() == ("pallas" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("change,message", [
    ({"heads": 6}, "not a multiple"),
    ({"block_size": 12}, "power-of-two block_size"),
])
def test_bad_shapes_are_rejected_with_the_fix(change, message, rng):
    kwargs = {"heads": 4, "kv_heads": 4, **change}
    batch = ragged_batch(rng, [2], [5], **kwargs)
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(*batch.args(), backend="pallas_interpret")


def test_bad_metadata_shape_is_rejected(rng):
    batch = ragged_batch(rng, [2], [5])
    batch = dataclasses.replace(batch, query_start=batch.query_start[:-1])
    with pytest.raises(ValueError, match="query_start must be an integer array of shape"):
        ragged_paged_attention(*batch.args(), backend="reference")


@pytest.mark.parametrize("windowed", [False, True], ids=["full", "windowed"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: d.__name__)
def test_kernel_lowers_for_cuda_through_triton(dtype, windowed):
    # Llama-3-8B: 32 heads over 8 kv heads of 128, pages of 16, a 512-token mixed batch.
    tokens, seqs, max_blocks = 512, 64, 128
    pages = jax.ShapeDtypeStruct((seqs * max_blocks, 16, 8, 128), dtype)

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    # Windowed: Gemma 2's sliding layers (window 4096, soft-cap 50).
    extra = dict(sliding_window=4096, soft_cap=50.0) if windowed else {}
    fn = functools.partial(ragged_paged_attention, backend="pallas", **extra)
    module = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(jax.ShapeDtypeStruct((tokens, 32, 128), dtype), pages, pages, ints(seqs),
      ints(seqs, max_blocks), ints(seqs + 1), ints(1)).mlir_module()
    assert module.count(TRITON) == 1
    assert 'name = "ragged_paged_attention"' in module
    assert "mosaic" not in module.lower()
