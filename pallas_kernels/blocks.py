"""Block sizes, Triton launch parameters and the in-kernel matmul shared by the Pallas kernels.

Every tile is a power of two that divides the axis it tiles (Triton tensors must be powers of two,
and the Triton lowering issues unmasked loads, so a block may never run past its array).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Triton's tensor-core dot needs every dimension >= 16; smaller tiles use multiply-and-reduce.
MIN_DOT = 16
# Bytes of tile data (operands, accumulator, the tile being updated) one thread may hold. Triton
# keeps a program's tiles in registers, so this decides registers per thread and hence occupancy:
# scripts/gpu_compile_check.py shows kernels at this budget compile without spills at or under
# 128 of the 255 registers (at least 16 warps per SM on Hopper). Above it, tiles shrink first,
# then the warps double (the same tile spread over twice the threads).
THREAD_TILE_BYTES = 512
WARPS = 4
MAX_WARPS = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Overrides for the tiles the kernels would pick from the shapes; None keeps the choice.

    block_t: tokens per grouped block, the size every adapter's run of tokens is padded to.
    block_k: tile of the contracted feature axis D_in (shrink).
    block_n: tile of the output feature axis D_out (expand).
    """

    block_t: int | None = None
    block_k: int | None = None
    block_n: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            power_of_two = isinstance(value, int) and value >= 1 and not value & (value - 1)
            if value is not None and not power_of_two:
                raise ValueError(f"BlockSizes.{field.name}={value!r} must be a power of two")


def pow2_divisor(dim: int, cap: int) -> int:
    """Largest power of two that divides dim and is at most cap."""
    low_bit = dim & -dim
    return min(low_bit, 1 << (cap.bit_length() - 1))


def tile(dim: int, cap: int, override: int | None, name: str) -> int:
    """The block along an axis of size dim: the override if it divides dim, else the largest fit."""
    if override is None:
        return pow2_divisor(dim, cap)
    if dim % override:
        raise ValueError(f"BlockSizes.{name}={override} does not divide the axis of size {dim}")
    return override


def fit_block(
    dim: int, cap: int, override: int | None, name: str, footprint, floor: int = MIN_DOT
) -> tuple[int, int]:
    """(block, num_warps) along an axis of size dim, from the register budget.

    footprint(block) is the bytes of tiles a program holds at that block size (it depends on the
    dtypes and the rank, so float32 gets half the tile of bfloat16). The block is the largest
    power of two that divides dim, is at most cap and fits THREAD_TILE_BYTES per thread at WARPS
    warps, but not below floor (tensor-core tiles); num_warps grows until the tile fits.
    """
    block = tile(dim, cap, override, name)
    if override is None:
        while block > floor and footprint(block) > THREAD_TILE_BYTES * 32 * WARPS:
            block //= 2
    return block, warps_for(footprint(block))


def warps_for(tile_bytes: int) -> int:
    """Fewest warps (from WARPS up to MAX_WARPS) whose threads hold tile_bytes in budget."""
    warps = WARPS
    while warps < MAX_WARPS and tile_bytes > THREAD_TILE_BYTES * 32 * warps:
        warps *= 2
    return warps


def dot_bytes(m: int, k: int, n: int, itemsize: int) -> int:
    """Extra bytes of matmul_f32 on [m, k] @ [k, n] operands of itemsize bytes.

    Multiply-and-reduce (a dimension under MIN_DOT) makes a float32 [m, k, n] temporary. A 16-bit
    dot runs on the tensor cores from shared memory: nothing extra. A float32 dot at IEEE
    precision has no tensor cores; Triton's FMA dot holds operand slices in registers, which the
    compile check measures at about three more copies of the operands and the product.
    """
    if min(m, k, n) < MIN_DOT:
        return 4 * m * k * n
    return 3 * 4 * (m * k + k * n + m * n) if itemsize == 4 else 0


def check_rank(rank: int) -> None:
    """Expand loads the whole rank as one Triton tensor, so it must be a power of two."""
    if rank & (rank - 1):
        raise ValueError(
            f"the Pallas backends need a power-of-two rank per slice, got {rank}: "
            "pad the adapter stacks to max_lora_rank"
        )


def group_block_t(tokens: int, num_slots: int, override: int | None) -> int:
    """Tokens per grouped block: big enough for tensor cores, small enough that padding is cheap."""
    if override is not None:
        return override
    per_slot = max(tokens // max(num_slots, 1), 1)
    return max(MIN_DOT, min(64, 1 << (per_slot.bit_length() - 1)))


def compiler_params(num_warps: int = 4, num_stages: int = 1) -> plgpu.CompilerParams:
    """Triton parameters; passing them is what selects Triton over Mosaic GPU on JAX 0.10."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def matmul_f32(p: jax.Array, q: jax.Array) -> jax.Array:
    """p [M, K] @ q [K, N] -> [M, N] float32 inside a kernel.

    Tensor cores when every dimension reaches Triton's minimum, else a broadcast multiply and
    reduction (still a single Triton op tree, exact enough in float32).
    """
    if min(*p.shape, q.shape[1]) >= MIN_DOT:
        if p.dtype != q.dtype:
            p = p.astype(q.dtype)
        # Triton lowers a DEFAULT-precision float32 dot to TF32 (10-bit mantissa); HIGHEST keeps
        # IEEE float32 and changes nothing for 16-bit inputs.
        return jnp.dot(p, q, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    prod = p.astype(jnp.float32)[:, :, None] * q.astype(jnp.float32)[None, :, :]
    return jnp.sum(prod, axis=1)


def launch(
    kernel, *, name: str, grid, operands, in_specs, out_spec, out_shape: jax.ShapeDtypeStruct,
    interpret: bool, alias: int | None = None, poison: bool = False, num_stages: int = 1,
    num_warps: int = WARPS,
) -> jax.Array:
    """pl.pallas_call with the Triton parameters always set (see compiler_params).

    name: the pallas_call's name, which GPU profiles and the compile check show.

    alias: index of the operand whose buffer becomes the output (expand writes into y).
    poison: alias a NaN-filled buffer onto the output instead, so that an element the kernel
    never writes shows up in a test; the kernel does not see that extra operand.
    """
    if poison:
        operands = (*operands, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs = (*in_specs, out_spec)
        alias = len(operands) - 1
        kernel = _without_poison_input(kernel)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=out_spec,
        out_shape=out_shape,
        input_output_aliases={} if alias is None else {alias: 0},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


def _without_poison_input(kernel):
    """The kernel, called with every ref but the aliased poison buffer (second to last)."""

    def wrapped(*refs):
        kernel(*refs[:-2], refs[-1])

    return wrapped


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
