"""Pieces shared by the Triton scan kernels: direction codes, device helpers, the launch plan.

Everything here imports triton; the package ``__init__`` only imports this module once triton is known to
be importable.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..token_orders import canonical_directions

__all__ = [
    "DIRECTION_CODES",
    "INTERPRETED",
    "Plan",
    "compile_for_arch",
    "direction_codes",
    "load_bc",
    "load_rows",
    "load_step",
    "make_plan",
    "softplus",
    "step_rows",
    "store_rows",
    "token_index",
]


# A direction is two bits: bit 0 walks the H x W grid column-major, bit 1 walks the order back to front.
DIRECTION_CODES = {"row": 0, "col": 1, "row_reversed": 2, "col_reversed": 3}


def direction_codes(directions: Sequence[str], grid_size: tuple[int, int] | None) -> tuple[int, ...]:
    """The kernels' code of each direction name (aliases allowed), checked by
    :func:`~vmamba.kernels.token_orders.canonical_directions`."""
    return tuple(DIRECTION_CODES[name] for name in canonical_directions(directions, grid_size))


@triton.jit
def softplus(x):
    """mamba_ssm's softplus: ``log(1 + exp(x))``, and x itself above 20."""
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def token_index(p, code, L, W, H, HAS_DIRS: tl.constexpr):
    """Storage index of the p-th token of a direction (``code`` from :data:`DIRECTION_CODES`).

    Storage is row-major over an H x W grid (H = 1, W = L for a 1-D sequence). Column-major position
    q = w * H + h holds the token stored at h * W + w; a reversed direction reads position L - 1 - p.
    Positions outside [0, L) give indices that must be masked by the caller.
    """
    if HAS_DIRS:
        q = tl.where((code & 2) != 0, L - 1 - p, p)
        s = tl.where((code & 1) != 0, (q % H) * W + q // H, q)
    else:
        s = p
    return s


@triton.jit
def load_rows(ptr, n_stride, mask, N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MATH: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile from N rows of BLOCK_D values (``ptr`` the row-0 pointers).

    Loaded one row at a time, so that no 2-D access makes the compiler lay the tile out with the N axis
    across threads: the tile keeps the default layout, channels across threads and the N states of a
    channel inside its thread (the rows are inserted at constant indices, which compiles to plain
    register moves).
    """
    rows = tl.arange(0, BLOCK_N)[:, None]
    tile = tl.zeros((BLOCK_N, BLOCK_D), dtype=MATH)
    for n in tl.static_range(BLOCK_N):
        row = tl.load(ptr + n * n_stride, mask=mask & (n < N), other=0.0).to(MATH)
        tile = tl.where(rows == n, row[None, :], tile)
    return tile


@triton.jit
def store_rows(ptr, n_stride, tile, mask, N, BLOCK_N: tl.constexpr):
    """Store a (BLOCK_N, BLOCK_D) tile row by row (the counterpart of :func:`load_rows`)."""
    rows = tl.arange(0, BLOCK_N)[:, None]
    for n in tl.static_range(BLOCK_N):
        row = tl.sum(tl.where(rows == n, tile, -0.0), axis=0)  # picks row n (adding -0.0 is exact)
        tl.store(ptr + n * n_stride, row, mask=mask & (n < N))


@triton.jit
def load_bc(ptr, valid, mask_n, EVEN_N: tl.constexpr, MATH: tl.constexpr):
    """One token's N values of B or C. With N a power of two the mask is the token's alone, which lets
    the compiler load them as whole vectors when they are contiguous."""
    if EVEN_N:
        x = tl.load(ptr, mask=valid, other=0.0)
    else:
        x = tl.load(ptr, mask=mask_n & valid, other=0.0)
    return x.to(MATH)


@triton.jit
def step_rows(
    delta_ptr,
    dtw_ptr,
    batch_offset,
    sd_c,
    k,
    offs_d,
    mask_d,
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MATH: tl.constexpr,
):
    """Where a program reads its channels' raw steps (before bias and softplus), for :func:`load_step`.

    Without a low-rank projection (``RANK`` 0): the (BLOCK_D,) pointers of the channels' rows of delta,
    and a placeholder weight. With one: delta holds the low-rank inputs (batch, K*RANK, L), and the result
    is the (BLOCK_R,) pointers of this direction's RANK rows and the channels' (BLOCK_R, BLOCK_D) rows of
    ``dtw`` (K*C, RANK), the RANK weights of a channel inside its thread (like the N states).
    """
    if RANK > 0:
        rows = delta_ptr + batch_offset + (k * RANK + tl.arange(0, BLOCK_R)) * sd_c
        weights = load_rows(dtw_ptr + offs_d * RANK, 1, mask_d, RANK, BLOCK_R, BLOCK_D, MATH)
    else:
        rows = delta_ptr + batch_offset + offs_d * sd_c
        weights = tl.zeros((1, BLOCK_D), dtype=MATH)
    return rows, weights


@triton.jit
def load_step(
    rows, offset, mask_t, valid, weights, RANK: tl.constexpr, BLOCK_R: tl.constexpr, MATH: tl.constexpr
):
    """The raw steps of a program's channels at one token (``offset`` = token index x token stride): read
    from delta, or (``RANK`` > 0) projected from the token's RANK low-rank inputs, ``sum_r w[r] x[r]``
    (mamba_ssm's ``delta_proj_weight``: the (batch, K*C, L) steps are never stored)."""
    if RANK > 0:
        x = tl.load(rows + offset, mask=(tl.arange(0, BLOCK_R) < RANK) & valid, other=0.0).to(MATH)
        dt = tl.sum(weights * x[:, None], axis=0)
    else:
        dt = tl.load(rows + offset, mask=mask_t, other=0.0).to(MATH)
    return dt


# Triton picks compiled or interpreted kernels when a function is decorated (``@triton.jit`` reads
# TRITON_INTERPRET then, and triton's own library functions such as tl.sum were decorated when triton
# was imported), so the mode is read off a decorated function rather than the environment.
INTERPRETED: bool = type(softplus).__name__ == "InterpretedFunction"

# Tokens per unrolled step and per chunk under the interpreter: small, so that the tests cross several
# step and chunk boundaries. Module attributes, read at each call, so a test can change them.
INTERPRETER_SUB = 4
INTERPRETER_CHUNK = 8
# On a GPU: tokens per unrolled step (forward; the backward keeps that many states per channel in
# registers, so it takes fewer), the shortest chunk worth a chunk-parallel pass, the widest blocks (the
# backward sums dB and dC over its block's channels for every token: one warp needs no shared memory).
GPU_SUB = 8
GPU_BWD_SUB = 4
MIN_CHUNK = 128
MAX_BLOCK_D = 128
MAX_BWD_BLOCK_D = 32
# Programs wanted per streaming multiprocessor before chunks are split off to run in parallel.
PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class Plan:
    """How one scan is launched: channels per program, warps, and how the tokens are cut.

    The tokens are cut into ``n_chunks`` chunks of ``chunk`` tokens (the last may be shorter) that run in
    parallel; each chunk is walked ``sub`` tokens per unrolled step (``bwd_sub`` in the backward, which
    also checkpoints the state that often). Forward and backward of one problem get the same plan (the
    backward reads the forward's chunk-entry states, whatever the blocks of channels).
    """

    block_d: int
    num_warps: int
    sub: int
    bwd_block_d: int
    bwd_warps: int
    bwd_sub: int
    chunk: int
    n_chunks: int


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(per_group: int, widest: int) -> tuple[int, int]:
    """Channels per program (a power of two up to ``widest`` dividing ``per_group``) and its warps."""
    block_d = 1
    while block_d < widest and per_group % (2 * block_d) == 0:
        block_d *= 2
    return block_d, max(1, min(4, block_d // 32))


def make_plan(batch: int, total_channels: int, per_group: int, length: int, device: torch.device) -> Plan:
    """The launch plan: one thread per channel, and chunks in parallel only when batch x channels is short.

    A program holds a block of channels of one direction and one B/C group (the largest power of two up
    to :data:`MAX_BLOCK_D`, :data:`MAX_BWD_BLOCK_D` in the backward, dividing the channels per group),
    with one warp per 32 of them. When there are fewer than :data:`PROGRAMS_PER_SM` forward programs per
    multiprocessor, the sequence is cut into chunks (of at least :data:`MIN_CHUNK` tokens) that run in
    parallel.
    """
    block_d, num_warps = _block(per_group, MAX_BLOCK_D)
    bwd_block_d, bwd_warps = _block(per_group, MAX_BWD_BLOCK_D)
    if INTERPRETED:
        sub = bwd_sub = INTERPRETER_SUB
        chunk = INTERPRETER_CHUNK
    else:
        sub, bwd_sub = GPU_SUB, GPU_BWD_SUB
        programs = batch * (total_channels // block_d)
        wanted = PROGRAMS_PER_SM * _sm_count(device)
        n_chunks = max(1, min(-(-wanted // programs), length // MIN_CHUNK))
        chunk = -(-length // n_chunks)
    step = max(sub, 2 * bwd_sub)  # the backward checkpoints every 2 * bwd_sub tokens; powers of two
    chunk = -(-chunk // step) * step
    return Plan(block_d, num_warps, sub, bwd_block_d, bwd_warps, bwd_sub, chunk, -(-length // chunk))


# Pointer arguments that carry activations in the I/O dtype; every other pointer is fp32 (or the int32
# direction codes).
_ACTIVATION_POINTERS = frozenset(
    ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
    + ("x_ptr",)  # the SSD and conv kernels' input
)


# The kernels' scalar arguments that are floats (every other scalar argument is an integer).
_FLOAT_SCALARS = frozenset(("dout_scale", "dt_min", "dt_max", "eps"))


def compile_for_arch(
    kernel,
    constexprs: dict,
    io: str,
    arch: int = 90,
    num_warps: int = 4,
    unit_strides: Sequence[str] = (),
    divisible: Sequence[str] = (),
    io_pointers: Sequence[str] = (),
):
    """Compile a scan kernel for NVIDIA sm_``arch`` with Triton's bundled ptxas (no GPU or driver needed).

    ``io`` is the activations' Triton dtype name ("bf16", "fp16", "fp32"), taken by the activation pointers
    (``_ACTIVATION_POINTERS`` and ``io_pointers``; other pointers are float32). As Triton's launcher does at
    run time, integer arguments named in ``unit_strides`` are fixed at 1 (for example the channel strides
    of token-major activations) and those in ``divisible`` marked as multiples of 16; pointers are marked
    16-byte aligned. Returns the compiled kernel (``.asm["cubin"]`` holds the binary); used to check
    compilation and count instructions on CPU-only machines.
    """
    constexprs = {**constexprs, **dict.fromkeys(unit_strides, 1)}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in constexprs and (name.endswith("_ptr") or name in divisible)
    }
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "dirs_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{io}" if name in _ACTIVATION_POINTERS or name in io_pointers else "*fp32"
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
