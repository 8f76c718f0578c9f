"""ragged_paged_attention: attention of a ragged batch of queries over a paged KV cache.

backend:
  "pallas"            the Triton kernel through Pallas (GPU; kernel.py).
  "pallas_interpret"  the same kernel in Pallas interpret mode: any platform, for tests.
  "xla"               the CPU path (for now the reference; a faster plain-XLA form comes next).
  "reference"         plain JAX per-token gather (reference.py): the definition.
None picks "pallas" on GPU and "xla" elsewhere.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.attention import kernel, reference

BACKENDS = ("pallas", "pallas_interpret", "xla", "reference")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _check(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs, pallas: bool):
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, d], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
                         "[num_blocks, block_size, KV, d]")
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, page_dim = k_pages.shape
    if page_dim != dim:
        raise ValueError(f"pages have head_dim {page_dim} but q has {dim}")
    if heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of the pages' {kv_heads} kv heads")
    for name, value in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if value.dtype not in _FLOATS:
            raise ValueError(f"{name} has dtype {value.dtype}; expected float32, bfloat16 or "
                             "float16")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) differ")
    if kv_lens.ndim != 1:
        raise ValueError(f"kv_lens must be [S] (one length per sequence), got shape "
                         f"{kv_lens.shape}")
    num_seqs_total = kv_lens.shape[0]
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, MB], got shape {block_tables.shape}")
    shapes = (("kv_lens", kv_lens, (num_seqs_total,)),
              ("block_tables", block_tables, (num_seqs_total, block_tables.shape[1])),
              ("query_start", query_start, (num_seqs_total + 1,)), ("num_seqs", num_seqs, (1,)))
    for name, value, shape in shapes:
        if value.shape != shape or not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array of shape {shape} (S = "
                             f"{num_seqs_total} sequences), got {value.dtype} {value.shape}")
    if pallas and not (_power_of_two(block_size) and _power_of_two(dim)):
        raise ValueError(f"the Pallas backends need a power-of-two block_size and head_dim, got "
                         f"{block_size} and {dim}: use backend='xla'")


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs,
                           *, sm_scale=None, backend=None, soft_cap=None,
                           sliding_window=None) -> jax.Array:
    """q [T, H, d] (tokens of all sequences flattened; sequence i owns rows
    query_start[i]:query_start[i+1]); k_pages, v_pages [num_blocks, block_size, KV, d] (one
    layer of the paged pool, H % KV == 0, GQA); kv_lens [S] int32: tokens in sequence i's cache
    INCLUDING this step's new ones (already written to the pages); block_tables [S, MB] int32;
    query_start [S + 1] int32, non-decreasing; num_seqs [1] int32 (sequences >= num_seqs are
    padding). Query j of sequence i sits at position kv_lens[i] - q_len_i + j and attends to
    cache positions <= that (causal inside the chunk, the whole cached prefix before it).
    Rows past query_start[num_seqs] (padding) output zeros. -> [T, H, d] in q's dtype;
    scores and softmax in float32. sm_scale defaults to d ** -0.5. soft_cap (Gemma 2): scores
    become tanh(scores / soft_cap) * soft_cap. sliding_window: a query at position p sees only
    positions p - sliding_window < k <= p (chunks wholly outside are not read)."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    _check(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs,
           backend.startswith("pallas"))
    sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    for name, value in (("soft_cap", soft_cap), ("sliding_window", sliding_window)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive or None, got {value!r}")
    args = (q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs)
    extra = dict(soft_cap=None if soft_cap is None else float(soft_cap),
                 sliding_window=None if sliding_window is None else int(sliding_window))
    if backend.startswith("pallas"):
        return kernel.ragged_paged_attention(*args, sm_scale=sm_scale, **extra,
                                             interpret=backend == "pallas_interpret")
    return reference.ragged_paged_attention(*args, sm_scale=sm_scale, **extra)
