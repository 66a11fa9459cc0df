"""The public selective-scan operator: input checks, backend dispatch, autograd and the custom op.

``selective_scan`` has the semantics of mamba_ssm's ``selective_scan_fn`` (real A). It runs through
the ``torch.library`` custom op ``vmamba::selective_scan`` (with a fake implementation and a registered
backward, itself the custom op ``vmamba::selective_scan_backward``) so that ``torch.compile`` and
``torch.export`` see one op instead of tracing into the scan's loops. During ONNX export it calls the
pure-PyTorch path directly, which exports as ordinary ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import ScanBackend, register_backend, requested_backend, resolve_backend
from .reference import math_dtype, selective_scan_reference
from .torch_scan import torch_scan_backward, torch_scan_forward

__all__ = ["check_scan_inputs", "selective_scan"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


register_backend(ScanBackend("torch", torch_scan_forward, torch_scan_backward, lambda device: True))


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise ``ValueError`` naming the argument when shapes, dtypes or devices do not fit the scan."""

    def fail(msg: str) -> None:
        raise ValueError(f"selective_scan: {msg}")

    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        fail(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        fail("the sequence length L must be at least 1")
    if delta.shape != u.shape:
        fail(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be (dim, N) = ({dim}, N), got shape {tuple(A.shape)}")
    if A.is_complex():
        fail("complex A is not supported; pass a real (dim, N) tensor")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            if t.shape != (batch, dstate, length):
                fail(f"{name} must be (batch, N, L) = {(batch, dstate, length)}, got {tuple(t.shape)}")
        elif t.dim() == 4:
            if t.shape[0] != batch or t.shape[2:] != (dstate, length):
                fail(
                    f"{name} must be (batch, G, N, L) = ({batch}, G, {dstate}, {length}), got {tuple(t.shape)}"
                )
            if dim % t.shape[1] != 0:
                fail(f"{name} has {t.shape[1]} groups, which does not divide dim={dim}")
        else:
            fail(f"{name} must be (batch, N, L) or (batch, G, N, L), got shape {tuple(t.shape)}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        fail(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != (dim,)):
            fail(f"{name} must be a ({dim},) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if z is not None and (not isinstance(z, Tensor) or z.shape != u.shape):
        fail(f"z must have u's shape {tuple(u.shape)}, got {getattr(z, 'shape', type(z).__name__)}")
    named = [
        ("u", u),
        ("delta", delta),
        ("A", A),
        ("B", B),
        ("C", C),
        ("D", D),
        ("z", z),
        ("delta_bias", delta_bias),
    ]
    for name, t in named:
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            fail(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
        if t is not None and t.device != u.device:
            fail(f"{name} is on {t.device} but u is on {u.device}; put all inputs on one device")


# The schemas are spelled out: torch < 2.8 cannot infer one from this module's string annotations
# (``from __future__ import annotations``), and ``tests/kernels/test_selective_scan.py`` checks them.
SCAN_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, str backend) -> (Tensor, Tensor)"
)
SCAN_BACKWARD_SCHEMA = (
    "(Tensor dout, Tensor? dlast, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? z, Tensor? delta_bias, bool delta_softplus, str backend) -> Tensor[]"
)


@torch.library.custom_op("vmamba::selective_scan", mutates_args=(), schema=SCAN_SCHEMA)
def _scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    impl = resolve_backend(backend, u.device)
    out, last = impl.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return out.contiguous(), last.contiguous()


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=math_dtype(u))


@torch.library.custom_op("vmamba::selective_scan_backward", mutates_args=(), schema=SCAN_BACKWARD_SCHEMA)
def _scan_backward_op(
    dout: Tensor,
    dlast: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    backend: str,
) -> list[Tensor]:
    impl = resolve_backend(backend, u.device)
    grads = impl.backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    # A custom op cannot return None: absent inputs get an empty placeholder, dropped again below.
    return [g.contiguous() if g is not None else u.new_empty(0) for g in grads]


@_scan_backward_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return [
        u.new_empty(0) if t is None else torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias)
    ]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend


def _backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = _scan_backward_op(
        dout.contiguous(), dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.backend
    )
    present = (u, delta, A, B, C, D, z, delta_bias)
    grads = [g if t is not None else None for g, t in zip(grads, present)]
    return (*grads, None, None)


_scan_op.register_autograd(_backward, setup_context=_setup_context)


def scan_as_aten_ops(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """``vmamba::selective_scan`` as ordinary aten ops (the pure-PyTorch path), for exporters that decompose it.

    It is not in torch's global decomposition table: see :mod:`vmamba.kernels.decompositions`.
    """
    return torch_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (Mamba's S6) with mamba_ssm ``selective_scan_fn`` semantics.

    For each batch b and channel d, with ``dt = softplus(delta + delta_bias)`` (softplus and bias optional):
    ``h_t = exp(dt_t * A[d]) * h_{t-1} + dt_t * B_t * u_t``, ``y_t = <C_t, h_t> + D[d] * u_t``, and
    ``out = y * silu(z)`` when z is given.

    Args:
        u, delta: (batch, dim, L).
        A: (dim, N), real.
        B, C: (batch, N, L), or grouped (batch, G, N, L) where channel d uses group d // (dim // G).
        D, delta_bias: (dim,) or None.
        z: (batch, dim, L) gate or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step, (batch, dim, N).
        backend: 'auto', 'reference', 'cpu', 'torch' or 'triton' (see ``docs/kernels.md``).

    Math runs in float32 for float16/bfloat16/float32 inputs (float64 for float64); ``out`` has u's dtype
    and the last state the math dtype. Every tensor input gets a gradient.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    name = requested_backend(backend)
    if name == "reference":
        # The ground truth runs as plain PyTorch: its gradients come from autograd through the loop.
        out, last = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    elif torch.onnx.is_in_onnx_export():
        out, last = torch_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        if not torch.compiler.is_compiling():
            resolve_backend(name, u.device)  # an unavailable backend fails here, with a clear message
        out, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), name)
    return (out, last) if return_last_state else out
