"""Pieces shared by the Triton scan kernels: device helpers, direction codes, block-size choices.

Everything here imports triton; the package ``__init__`` only imports this module once triton is known to
be importable.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

__all__ = [
    "DIRECTION_CODES",
    "INTERPRETED",
    "INTERPRETER_CHUNK",
    "backward_configs",
    "compile_for_arch",
    "config_pruner",
    "forward_configs",
    "interpreter_block_d",
    "length_bucket",
    "linear_combine",
    "scan_flags",
    "softplus",
    "state_chunk",
    "token_index",
]


# A direction is two bits: bit 0 walks the H x W grid column-major, bit 1 walks the order back to front.
DIRECTION_CODES = {"row": 0, "col": 1, "row_reversed": 2, "col_reversed": 3}

# Chunk length used by the interpreter: small, so that the tests cross several chunk boundaries.
INTERPRETER_CHUNK = 8


@triton.jit
def linear_combine(a_left, b_left, a_right, b_right):
    """Compose two steps of ``h -> a * h + b`` (left first): the operator of the associative scan."""
    return a_left * a_right, b_left * a_right + b_right


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


# Triton picks compiled or interpreted kernels when a function is decorated (``@triton.jit`` reads
# TRITON_INTERPRET then, and triton's own library functions such as tl.sum were decorated when triton
# was imported), so the mode is read off a decorated function rather than the environment.
INTERPRETED: bool = type(linear_combine).__name__ == "InterpretedFunction"


def length_bucket(length: int) -> int:
    """The autotuning cache's view of L: the next power of two (so nearby lengths share a tuned config)."""
    return triton.next_power_of_2(length)


def state_chunk(length: int) -> int:
    """Tokens per chunk when the forward saves chunk-boundary states for the backward (same in both)."""
    if INTERPRETED:
        return INTERPRETER_CHUNK
    return min(32, max(16, triton.next_power_of_2(length)))


def scan_flags(problem, D, z, delta_bias, delta_softplus: bool) -> dict:
    """The compile-time flags the forward and backward kernels share, for one :class:`ScanProblem` launch."""
    return {
        "BLOCK_N": triton.next_power_of_2(problem.dstate),
        "MATH": problem.math_dtype,
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_BIAS": delta_bias is not None,
        "SOFTPLUS": bool(delta_softplus),
        "HAS_DIRS": problem.has_dirs,
    }


def interpreter_block_d(per_group: int) -> int:
    """Channels per program under the interpreter: the largest power of two <= 4 dividing ``per_group``."""
    block = 4
    while per_group % block:
        block //= 2
    return block


def _configs(chunks: tuple[int | None, ...]) -> list[triton.Config]:
    """Every (BLOCK_D, CHUNK, num_warps) candidate; ``None`` leaves CHUNK to the caller."""
    configs = []
    for chunk in chunks:
        for block_d in (1, 2, 4, 8, 16, 32):
            for warps in (2, 4, 8):
                kwargs = {"BLOCK_D": block_d} if chunk is None else {"BLOCK_D": block_d, "CHUNK": chunk}
                configs.append(triton.Config(kwargs, num_warps=warps))
    return configs


def forward_configs(tune_chunk: bool) -> list[triton.Config]:
    """Forward candidates; the chunk is tuned too unless chunk states are saved (the backward needs it)."""
    return _configs((32, 64) if tune_chunk else (None,))


def backward_configs() -> list[triton.Config]:
    """Backward candidates: the chunk is the forward's :func:`state_chunk`."""
    return _configs((None,))


def config_pruner(per_thread: int, keep: int = 8):
    """An ``early_config_prune`` for :func:`triton.autotune` (it needs ``dpg``, ``BLOCK_N``, ``CHUNK``).

    Keeps the configs whose block of channels divides the channels per group, then the ``keep`` whose
    tiles give each thread closest to ``per_thread`` elements (in log scale): compiling for sm_90 showed
    larger tiles per thread run out of registers (the backward keeps about ten such tiles live).
    """

    def prune(configs, named_args, **kwargs):
        per_group = named_args["dpg"]
        block_n = named_args.get("BLOCK_N", kwargs.get("BLOCK_N"))
        scored = []
        for config in configs:
            block_d = config.kwargs["BLOCK_D"]
            if per_group % block_d:
                continue
            chunk = config.kwargs.get("CHUNK", named_args.get("CHUNK", kwargs.get("CHUNK")))
            # (BLOCK_D, N, CHUNK) tiles plus about as many (BLOCK_D, CHUNK) ones, which dominate when N = 1.
            elements = block_d * (block_n + 1) * chunk / (32 * config.num_warps)
            scored.append((abs(math.log2(elements / per_thread)), -block_d, config))
        scored.sort(key=lambda item: item[:2])
        return [config for *_, config in scored[:keep]]

    return prune


# Pointer arguments that carry activations in the I/O dtype; every other pointer is fp32 (or the int32
# direction codes).
_ACTIVATION_POINTERS = frozenset(
    ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
)


def compile_for_arch(kernel, constexprs: dict, io: str, arch: int = 90, num_warps: int = 4):
    """Compile a scan kernel for NVIDIA sm_``arch`` with Triton's bundled ptxas (no GPU or driver needed).

    ``io`` is the activations' Triton dtype name ("bf16", "fp16", "fp32"). Returns the compiled kernel
    (``.asm["cubin"]`` holds the binary); used to check compilation and register use on CPU-only machines.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "dirs_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{io}" if name in _ACTIVATION_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name == "dout_scale" else "i32"
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return triton.compile(
        ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options
    )
