"""Non-causal SSD (NC-SSD), the token mixer of VSSD: a global, order-free state shared by every token.

Paper: "VSSD: Vision Mamba with Non-Causal State Space Duality", Yuheng Shi et al., arXiv:2407.18559.

Mamba-2's SSD has one scalar decay per head, ``h_t = exp(dt_t * A) h_{t-1} + dt_t B_t x_t^T``. VSSD drops
the decay of the previous state and keeps the per-token weight of each token's own contribution, so every
token reads the same state. Per batch element and head ``h`` (x: (L, P), B, C: (L, N) of the head's group)::

    w_j = dt_j * exp(A_log_h)                     (positive: VSSD's SSD_POSITIVE_DA)
    H   = sum_j w_j * B_j x_j^T                   (N x P)
    y_i = C_i^T H + D_h * x_i

There is no mask, no decay, no chunking and no normalising denominator, and the sum runs over the whole
sequence, so the result does not depend on the token order. It is computed as two batched matmuls
(``B^T (w x)`` then ``C H``), all heads of a group in one product. Being plain differentiable torch ops, it
needs no custom operator: autograd, ``torch.compile`` and ONNX export trace straight through it.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["non_causal_ssd", "non_causal_ssd_reference"]


def _check_inputs(
    x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor | None
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(
            f"dt must be (batch, seqlen, nheads) = {(batch, seqlen, nheads)}, got {tuple(dt.shape)}"
        )
    if A_log.shape != (nheads,):
        raise ValueError(f"A_log must be (nheads,) = ({nheads},), got {tuple(A_log.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[:2] != (batch, seqlen):
            raise ValueError(
                f"{name} must be (batch, seqlen, ngroups, dstate) with batch, seqlen = {(batch, seqlen)}, "
                f"got {tuple(t.shape)}"
            )
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    if nheads % B.shape[2]:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({B.shape[2]})")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(
            f"D must be (nheads,) or (nheads, headdim) = {(nheads, headdim)}, got {tuple(D.shape)}"
        )
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads,) = ({nheads},), got {tuple(dt_bias.shape)}")


def _token_weights(dt: Tensor, A_log: Tensor, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    """w = dt * exp(A_log) in float32 (or float64), after the optional bias and softplus."""
    dtype = torch.promote_types(dt.dtype, torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt * torch.exp(A_log.to(dtype))


def non_causal_ssd(
    x: Tensor,
    dt: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """VSSD's non-causal SSD: ``y_i = C_i^T (sum_j dt_j exp(A_log) B_j x_j^T) + D x_i`` per head.

    Args:
        x: (batch, seqlen, nheads, headdim) values.
        dt: (batch, seqlen, nheads) step sizes (after softplus, unless ``dt_softplus``).
        A_log: (nheads,) log of the per-head scale; each token is weighted by ``dt * exp(A_log)``.
        B: (batch, seqlen, ngroups, dstate) keys; heads are split into ``ngroups`` contiguous blocks
            (head ``h`` uses group ``h // (nheads // ngroups)``, as Mamba-2).
        C: (batch, seqlen, ngroups, dstate) queries.
        D: optional skip, (nheads,) or (nheads, headdim).
        dt_bias: optional (nheads,) added to ``dt`` first.
        dt_softplus: apply softplus to ``dt`` (after the bias).

    Returns:
        (batch, seqlen, nheads, headdim) in ``x``'s dtype. The token weights are formed in float32; the
        two matmuls run in ``x``'s dtype (accumulating in float32 on the usual backends).
    """
    _check_inputs(x, dt, A_log, B, C, D, dt_bias)
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    w = _token_weights(dt, A_log, dt_bias, dt_softplus)  # (b, L, h)
    xw = (x * w.unsqueeze(-1)).to(x.dtype)
    # (b, g, L, heads_per_group * headdim): the heads of a group share B and C, so one matmul serves them.
    xw = xw.reshape(batch, seqlen, ngroups, (nheads // ngroups) * headdim).transpose(1, 2)
    keys = B.to(x.dtype).transpose(1, 2)  # (b, g, L, n)
    queries = C.to(x.dtype).transpose(1, 2)
    state = keys.transpose(-2, -1) @ xw  # (b, g, n, heads_per_group * headdim)
    y = (queries @ state).transpose(1, 2).reshape(batch, seqlen, nheads, headdim)
    if D is not None:
        skip = D.to(x.dtype)
        y = y + x * (skip.unsqueeze(-1) if skip.dim() == 1 else skip)
    return y


def non_causal_ssd_reference(
    x: Tensor,
    dt: Tensor,
    A_log: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """The definition, head by head in float64 with explicit sums (slow; for tests). Same arguments."""
    _check_inputs(x, dt, A_log, B, C, D, dt_bias)
    nheads, ngroups = x.shape[2], B.shape[2]
    x64, dt64, B64, C64 = x.double(), dt.double(), B.double(), C.double()
    if dt_bias is not None:
        dt64 = dt64 + dt_bias.double()
    if dt_softplus:
        dt64 = F.softplus(dt64)
    out = torch.empty_like(x64)
    for h in range(nheads):
        g = h // (nheads // ngroups)
        w = dt64[:, :, h] * torch.exp(A_log[h].double())  # (b, L)
        state = torch.einsum("bj,bjn,bjp->bnp", w, B64[:, :, g], x64[:, :, h])
        y = torch.einsum("bin,bnp->bip", C64[:, :, g], state)
        if D is not None:
            y = y + D[h].double() * x64[:, :, h]
        out[:, :, h] = y
    return out
