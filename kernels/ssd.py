"""The public SSD (Mamba-2) scan operators: input checks, backend dispatch, autograd and the custom op.

``ssd_scan`` has the semantics and shapes of mamba_ssm's ``mamba_chunk_scan_combined``;
``bidirectional_ssd_scan`` and ``multi_direction_ssd_scan`` run the same scan over several token orders
in one call (Bi-Mamba2's y = SSD(x) + flip(SSD(flip(x))) + D x, and SS2D's four grid directions).
Everything runs through the ``torch.library`` custom op ``vmamba::ssd_scan`` (a fake implementation and a
registered backward, the op ``vmamba::ssd_scan_backward``), so ``torch.compile`` and ``torch.export`` see
one op; during ONNX export the pure-PyTorch path is called directly and exports as ordinary ops.

This module gives its custom ops explicit schema strings (and does not use postponed annotations), so
they register on every supported torch version.
"""

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .ssd_reference import ssd_multi_direction_reference, ssd_scan_reference
from .ssd_torch import torch_ssd_backward, torch_ssd_forward
from .token_orders import DIRECTIONS, canonical_directions, check_grid

__all__ = [
    "SSD_BACKEND_ENV_VAR",
    "SSD_BACKEND_NAMES",
    "bidirectional_ssd_scan",
    "check_ssd_inputs",
    "multi_direction_ssd_scan",
    "ssd_scan",
]

SSD_BACKEND_ENV_VAR = "VMAMBA_SSD_BACKEND"
SSD_BACKEND_NAMES = ("auto", "reference", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_LIMIT = (0.0, math.inf)


# --- checks --------------------------------------------------------------------------------------------------


def check_ssd_inputs(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, chunk_size: int = 64, name="ssd_scan"
) -> None:
    """Raise ``ValueError`` naming the argument when shapes, dtypes, devices or the chunk size do not fit."""

    def fail(msg: str) -> None:
        raise ValueError(f"{name}: {msg}")

    for arg, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, Tensor):
            fail(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        fail(f"x must be (batch, L, nheads, headdim), got shape {tuple(x.shape)}")
    batch, length, nheads, headdim = x.shape
    if length < 1:
        fail("the sequence length L must be at least 1")
    if dt.shape != (batch, length, nheads):
        fail(f"dt must be (batch, L, nheads) = {(batch, length, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        fail(f"A must be ({nheads},) (one scalar per head), got shape {tuple(A.shape)}")
    for arg, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[:2] != (batch, length):
            fail(
                f"{arg} must be (batch, L, ngroups, dstate) with batch={batch}, L={length}, got {tuple(t.shape)}"
            )
        if nheads % t.shape[2]:
            fail(f"{arg} has {t.shape[2]} groups, which does not divide nheads={nheads}")
    if B.shape != C.shape:
        fail(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if D is not None and (not isinstance(D, Tensor) or D.shape not in ((nheads,), (nheads, headdim))):
        fail(f"D must be ({nheads},) or ({nheads}, {headdim}), got {getattr(D, 'shape', type(D).__name__)}")
    if dt_bias is not None and (not isinstance(dt_bias, Tensor) or dt_bias.shape != (nheads,)):
        fail(f"dt_bias must be ({nheads},), got {getattr(dt_bias, 'shape', type(dt_bias).__name__)}")
    if z is not None and (not isinstance(z, Tensor) or z.shape != x.shape):
        fail(f"z must have x's shape {tuple(x.shape)}, got {getattr(z, 'shape', type(z).__name__)}")
    state_shape = (batch, nheads, headdim, B.shape[3])
    if initial_states is not None and (
        not isinstance(initial_states, Tensor) or initial_states.shape != state_shape
    ):
        got = getattr(initial_states, "shape", type(initial_states).__name__)
        fail(f"initial_states must be (batch, nheads, headdim, dstate) = {state_shape}, got {got}")
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        fail(f"chunk_size must be a power of two >= 16 (64 or 256 are usual), got {chunk_size!r}")
    named = (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias))
    for arg, t in (*named, ("initial_states", initial_states)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            fail(f"{arg} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
        if t is not None and t.device != x.device:
            fail(f"{arg} is on {t.device} but x is on {x.device}; put all inputs on one device")


def _check_limit(dt_limit, name: str) -> tuple[float, float]:
    low, high = (float(v) for v in dt_limit)
    if not 0.0 <= low <= high:
        raise ValueError(f"{name}: dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit!r}")
    return low, high


def _direction_codes(directions: Sequence[str], length: int, grid_size, name: str) -> list[int]:
    """Direction names (``DIRECTIONS`` or the aliases forward/backward) -> their index in ``DIRECTIONS``."""
    if isinstance(directions, str) or len(directions) == 0:
        raise ValueError(f"{name}: directions must be a non-empty sequence of names, got {directions!r}")
    if grid_size is not None and len(grid_size) != 2:
        raise ValueError(f"{name}: grid_size must be (H, W), got {grid_size!r}")
    try:
        canonical = canonical_directions(directions, grid_size)
        check_grid(length, grid_size)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return [DIRECTIONS.index(d) for d in canonical]


# --- backends ------------------------------------------------------------------------------------------------


def requested_ssd_backend(backend: str) -> str:
    """``backend`` checked against :data:`SSD_BACKEND_NAMES`, with ``VMAMBA_SSD_BACKEND`` applied to 'auto'."""
    if backend not in SSD_BACKEND_NAMES:
        raise ValueError(f"unknown SSD backend {backend!r}; expected one of {SSD_BACKEND_NAMES}")
    if backend == "auto":
        backend = os.environ.get(SSD_BACKEND_ENV_VAR, "").strip() or "auto"
        if backend not in SSD_BACKEND_NAMES:
            raise ValueError(
                f"environment variable {SSD_BACKEND_ENV_VAR}={backend!r} is not an SSD backend; "
                f"expected one of {SSD_BACKEND_NAMES}"
            )
    return backend


def _triton_status(device: torch.device) -> str | None:
    """None when the Triton SSD kernels can run on ``device``, else the reason they cannot."""
    from . import triton as triton_backend

    if not triton_backend.is_available(device):
        return triton_backend.unavailable_reason(device)
    return None


def resolve_ssd_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'reference', 'torch' or 'triton': what runs for ``backend`` on tensors of ``device`` and ``dtype``.

    'auto' takes 'triton' for CUDA tensors when triton imports (float64 excepted), else 'torch'; an
    explicitly requested backend that cannot run raises ``ValueError`` saying why.
    """
    backend = requested_ssd_backend(backend)
    if backend == "auto":
        usable = device.type == "cuda" and dtype != torch.float64 and _triton_status(device) is None
        return "triton" if usable else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError(
                "SSD backend 'triton' computes in float32 and does not take float64 inputs; "
                "use backend='torch' or 'reference' for float64"
            )
        reason = _triton_status(device)
        if reason is not None:
            raise ValueError(
                f"SSD backend 'triton' cannot run on {device.type} tensors here: {reason}. "
                "Use backend='auto' or 'torch'."
            )
    return backend


def _names(codes: Sequence[int]) -> list[str]:
    return [DIRECTIONS[c] for c in codes]


def _grid(grid_size: Sequence[int]):
    return tuple(grid_size) if len(grid_size) else None


# --- the custom op -------------------------------------------------------------------------------------------

_ARGS = (
    "Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
    "Tensor? initial_states, bool dt_softplus, float dt_min, float dt_max, int chunk_size, int[] directions, "
    "int[] grid_size, str backend"
)


def _ssd_op_impl(
    x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, directions,
    grid_size, backend,
):  # fmt: skip
    args = (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, (dt_min, dt_max), chunk_size)
    if resolve_ssd_backend(backend, x.device, x.dtype) == "triton":
        from .triton.ssd_fwd import triton_ssd_forward

        out, final = triton_ssd_forward(*args, list(directions), _grid(grid_size))
    else:
        out, final = torch_ssd_forward(*args, _names(directions), _grid(grid_size))
    return out.contiguous(), final.contiguous()


_ssd_op = torch.library.custom_op(
    "vmamba::ssd_scan", _ssd_op_impl, mutates_args=(), schema=f"({_ARGS}) -> (Tensor, Tensor)"
)


@_ssd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, *options):
    directions = options[4]  # after dt_softplus, dt_min, dt_max, chunk_size
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    single = list(directions) == [0]
    final_shape = (x.shape[0], x.shape[2], x.shape[3], B.shape[3]) if single else (0,)
    return x.new_empty(x.shape), x.new_empty(final_shape, dtype=f)


def _ssd_backward_impl(
    dout, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size,
    directions, grid_size, backend,
):  # fmt: skip
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, (dt_min, dt_max), chunk_size)
    if resolve_ssd_backend(backend, x.device, x.dtype) == "triton":
        from .triton.ssd_bwd import triton_ssd_backward

        grads = triton_ssd_backward(dout, dfinal, *inputs, list(directions), _grid(grid_size))
    else:  # autograd through the chunked torch forward, recomputed here
        grads = torch_ssd_backward(dout, dfinal, *inputs, _names(directions), _grid(grid_size))
    # A custom op cannot return None: absent inputs get an empty placeholder, dropped again below.
    return [g.contiguous() if g is not None else x.new_empty(0) for g in grads]


_ssd_backward_op = torch.library.custom_op(
    "vmamba::ssd_scan_backward",
    _ssd_backward_impl,
    mutates_args=(),
    schema=f"(Tensor dout, Tensor? dfinal, {_ARGS}) -> Tensor[]",
)


@_ssd_backward_op.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, *rest):
    return [
        x.new_empty(0) if t is None else torch.empty_like(t)
        for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)
    ]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.options = inputs[9:]


def _backward(ctx, dout, dfinal):
    saved = ctx.saved_tensors
    dfinal = dfinal if dfinal is not None and dfinal.numel() else None
    grads = _ssd_backward_op(dout.contiguous(), dfinal, *saved, *ctx.options)
    grads = [g if t is not None else None for g, t in zip(grads, saved)]
    return (*grads, *([None] * len(ctx.options)))


_ssd_op.register_autograd(_backward, setup_context=_setup_context)


def ssd_as_aten_ops(
    x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, directions,
    grid_size, backend,
):  # fmt: skip
    """``vmamba::ssd_scan`` as ordinary aten ops (the chunked PyTorch path), for exporters that decompose it.

    It is not in torch's global decomposition table: see :mod:`vmamba.kernels.decompositions`.
    """
    args = (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, (dt_min, dt_max), chunk_size)
    return torch_ssd_forward(*args, _names(directions), _grid(grid_size))


# --- public API ----------------------------------------------------------------------------------------------


def _run(tensors: tuple, dt_softplus, dt_limit, chunk_size, codes, grid_size, backend, name):
    """Dispatch one call: the reference outside the op, the torch path under ONNX export, else the op.

    ``tensors`` is (x, dt, A, B, C, D, z, dt_bias, initial_states). Returns (out, final state or None).
    """
    limit = _check_limit(dt_limit, name)
    softplus = bool(dt_softplus)
    requested = requested_ssd_backend(backend)
    x = tensors[0]
    if requested == "reference":
        if codes == [0]:
            return ssd_scan_reference(*tensors[:8], softplus, limit, tensors[8], True)
        directions = _names(codes)
        out = ssd_multi_direction_reference(
            *tensors[:8], softplus, limit, directions=directions, grid_size=grid_size
        )
        return out, None
    if torch.onnx.is_in_onnx_export():
        return torch_ssd_forward(*tensors, softplus, limit, chunk_size, _names(codes), grid_size)
    if not torch.compiler.is_compiling():
        # An unavailable backend fails here, with a clear message.
        resolve_ssd_backend(requested, x.device, x.dtype)
    grid = list(grid_size) if grid_size is not None else []
    return _ssd_op(*tensors, softplus, limit[0], limit[1], chunk_size, codes, grid, requested)


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    chunk_size: int = 64,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    *,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's SSD scan with the semantics of mamba_ssm's ``mamba_chunk_scan_combined``.

    Per batch and head h (group ``g = h // (nheads // ngroups)``), with the step
    ``dt = clamp(softplus(dt + dt_bias), *dt_limit)`` (bias, softplus and limits optional):
    ``S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T`` (S is (headdim, dstate), S_{-1} = initial state or 0),
    ``y_t = S_t C_t + D_h x_t`` and ``out = y * silu(z)`` when z is given.

    Args:
        x: (batch, L, nheads, headdim); any L (it need not be a multiple of ``chunk_size``).
        dt: (batch, L, nheads). A: (nheads,), usually negative (``-exp(A_log)``).
        B, C: (batch, L, ngroups, dstate), ngroups dividing nheads.
        D: (nheads,) or (nheads, headdim), or None. z: (batch, L, nheads, headdim) gate or None.
        dt_bias: (nheads,) or None. dt_softplus: apply softplus to ``dt + dt_bias``.
        chunk_size: chunk length of the chunked algorithm, a power of two >= 16 (the result does not
            depend on it beyond rounding).
        initial_states: (batch, nheads, headdim, dstate) or None.
        return_final_states: also return the state after the last token, (batch, nheads, headdim, dstate).
        dt_limit: (low, high) clamp of the processed step; the default (0, inf) leaves it alone.
        backend: 'auto', 'reference', 'torch' or 'triton' (see ``docs/kernels.md``).

    The math runs in float32 (float64 for float64 inputs); ``out`` has x's dtype and the final state the
    math dtype. Every tensor input gets a gradient.
    """
    check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size)
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    out, final = _run(tensors, dt_softplus, dt_limit, chunk_size, [0], None, backend, "ssd_scan")
    return (out, final) if return_final_states else out


def multi_direction_ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    chunk_size: int = 64,
    *,
    directions: Sequence[str],
    grid_size: tuple[int, int] | None = None,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    backend: str = "auto",
) -> Tensor:
    """The SSD scan over several token orders, all sharing x, dt, A, B and C, summed in storage order.

    ``out = (sum_k restore_k(SSD(reorder_k(x, dt, B, C))) + D x) * silu(z)``: each direction's SSD is
    :func:`ssd_scan` without D and gate (so its own diagonal term ``(C_i . B_i) dt_i x_i`` is counted once
    per direction), and ``D x`` and the gate are applied once to the sum. Directions are names from
    ``vmamba.kernels.DIRECTIONS`` ("row", "col", "row_reversed", "col_reversed"; "forward"/"backward" are
    aliases of the row ones) over tokens stored row-major on an (H, W) grid; the column ones need
    ``grid_size``. Shapes and other arguments as :func:`ssd_scan`; no initial or final states.
    """
    name = "multi_direction_ssd_scan"
    check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, None, chunk_size, name=name)
    codes = _direction_codes(directions, x.shape[1], grid_size, name)
    grid = tuple(grid_size) if grid_size is not None else None
    tensors = (x, dt, A, B, C, D, z, dt_bias, None)
    out, _ = _run(tensors, dt_softplus, dt_limit, chunk_size, codes, grid, backend, name)
    return out


def bidirectional_ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    chunk_size: int = 64,
    *,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    backend: str = "auto",
) -> Tensor:
    """Bi-Mamba2's bidirectional SSD over a 1-D sequence: ``(SSD(x) + flip(SSD(flip(x))) + D x) * silu(z)``.

    Both directions share x, dt, A, B and C; each SSD is without D, so ``D x`` appears once, while the
    diagonal term ``(C_i . B_i) dt_i x_i`` of the SSD is in both directions (counted twice), as in
    Bi-Mamba2's fused kernel. Equal to ``multi_direction_ssd_scan(..., directions=("forward", "backward"))``.
    """
    return multi_direction_ssd_scan(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk_size,
        directions=("row", "row_reversed"), dt_limit=dt_limit, backend=backend,
    )  # fmt: skip
