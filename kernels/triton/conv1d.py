"""Vim's two causal depthwise convolutions (+ SiLU) as Triton kernels: forward and backward.

The op of :func:`vmamba.kernels.bidirectional_causal_conv1d` on CUDA tensors: x (batch, L, C) token-major
(unit channel stride, any batch and token strides, e.g. a slice of ``in_proj``'s output), taps (2, k, C)
and bias (2, C) in float32, out (batch, L, 2C) token-major in x's dtype, with

    out[b, t, c]     = act(bias[0, c] + sum_j taps[0, j, c] x[b, t - (k - 1) + j, c])   (causal)
    out[b, t, C + c] = act(bias[1, c] + sum_j taps[1, j, c] x[b, t + (k - 1) - j, c])   (causal over the
                                                                                       reversed sequence)

One program computes a (BLOCK_T tokens, BLOCK_C channels) tile of both directions from k shifted loads of
x, in float32, and writes both halves of the output: one read of x and one write, against PyTorch's
grouped convolution, the layout copy and the separate SiLU. The backward recomputes the pre-activations
(nothing but x is saved), writes the gradient at the pre-activations once, then a second kernel applies
the transposed convolution for dx; the weight and bias gradients are summed per tile and reduced in
PyTorch.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..conv1d import BidirectionalConv1dFunction

__all__ = ["triton_bidirectional_conv1d"]

BLOCK_T = 16
BLOCK_C = 128
NUM_WARPS = 4


@triton.jit
def _tile(C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch, token-block index, tokens, channels and channel mask (grid: tokens, channels,
    batch)."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, pid_t, t, c, c < C


@triton.jit
def _shifted(x_ptr, t, c, cmask, L, sxl, shift):
    """x[t + shift, c] for a tile of tokens t and channels c, in float32 (0 outside [0, L))."""
    s = t + shift
    mask = ((s >= 0) & (s < L))[:, None] & cmask[None, :]
    return tl.load(x_ptr + s[:, None].to(tl.int64) * sxl + c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_activations(
    x_ptr, w_ptr, b_ptr, t, c, cmask, L, C, sxl,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Both directions' convolutions (plus bias) at a (tokens, channels) tile, before the activation."""
    acc_f = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(KW):
        w_f = tl.load(w_ptr + j * C + c, mask=cmask, other=0.0)
        w_b = tl.load(w_ptr + (KW + j) * C + c, mask=cmask, other=0.0)
        acc_f += _shifted(x_ptr, t, c, cmask, L, sxl, j - (KW - 1)) * w_f[None, :]
        acc_b += _shifted(x_ptr, t, c, cmask, L, sxl, (KW - 1) - j) * w_b[None, :]
    if HAS_BIAS:
        acc_f += tl.load(b_ptr + c, mask=cmask, other=0.0)[None, :]
        acc_b += tl.load(b_ptr + C + c, mask=cmask, other=0.0)[None, :]
    return acc_f, acc_b


@triton.jit
def _bidir_conv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    L,
    C,
    sxb,
    sxl,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, pid_t, t, c, cmask = _tile(C, BLOCK_T, BLOCK_C)
    x_ptr += b.to(tl.int64) * sxb
    acc_f, acc_b = _pre_activations(
        x_ptr, w_ptr, b_ptr, t, c, cmask, L, C, sxl, KW, HAS_BIAS, BLOCK_T, BLOCK_C
    )
    if SILU:
        acc_f = acc_f * tl.sigmoid(acc_f)
        acc_b = acc_b * tl.sigmoid(acc_b)
    rows = (b.to(tl.int64) * L + t) * (2 * C)
    mask = (t < L)[:, None] & cmask[None, :]
    out = out_ptr + rows[:, None] + c[None, :]
    tl.store(out, acc_f.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + C, acc_b.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bidir_conv_bwd_grad_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    dout_ptr,
    g_ptr,
    dw_part_ptr,
    db_part_ptr,
    L,
    C,
    sxb,
    sxl,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """g = dout * act'(pre-activation), stored (batch, L, 2C) in float32, and this tile's sums for the
    weight and bias gradients: dw_part[tile, d, j, c] = sum_t g_d[t, c] x[t + shift_d(j), c]."""
    b, pid_t, t, c, cmask = _tile(C, BLOCK_T, BLOCK_C)
    tmask = t < L
    mask = tmask[:, None] & cmask[None, :]
    x_ptr += b.to(tl.int64) * sxb
    rows = (b.to(tl.int64) * L + t) * (2 * C)
    d_f = tl.load(dout_ptr + rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    d_b = tl.load(dout_ptr + rows[:, None] + C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        a_f, a_b = _pre_activations(
            x_ptr, w_ptr, b_ptr, t, c, cmask, L, C, sxl, KW, HAS_BIAS, BLOCK_T, BLOCK_C
        )
        s_f = tl.sigmoid(a_f)
        s_b = tl.sigmoid(a_b)
        d_f = d_f * s_f * (1.0 + a_f * (1.0 - s_f))
        d_b = d_b * s_b * (1.0 + a_b * (1.0 - s_b))
    d_f = tl.where(mask, d_f, 0.0)
    d_b = tl.where(mask, d_b, 0.0)
    tl.store(g_ptr + rows[:, None] + c[None, :], d_f, mask=mask)
    tl.store(g_ptr + rows[:, None] + C + c[None, :], d_b, mask=mask)
    tile = b * tl.num_programs(0) + pid_t
    for j in tl.static_range(KW):
        dw_f = tl.sum(d_f * _shifted(x_ptr, t, c, cmask, L, sxl, j - (KW - 1)), axis=0)
        dw_b = tl.sum(d_b * _shifted(x_ptr, t, c, cmask, L, sxl, (KW - 1) - j), axis=0)
        tl.store(dw_part_ptr + (tile * 2 * KW + j) * C + c, dw_f, mask=cmask)
        tl.store(dw_part_ptr + (tile * 2 * KW + KW + j) * C + c, dw_b, mask=cmask)
    if HAS_BIAS:
        tl.store(db_part_ptr + tile * 2 * C + c, tl.sum(d_f, axis=0), mask=cmask)
        tl.store(db_part_ptr + tile * 2 * C + C + c, tl.sum(d_b, axis=0), mask=cmask)


@triton.jit
def _bidir_conv_bwd_dx_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    L,
    C,
    KW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx[s, c] = sum_j taps[0, j, c] g_f[s + (k-1) - j, c] + taps[1, j, c] g_b[s - (k-1) + j, c]."""
    b, _, s, c, cmask = _tile(C, BLOCK_T, BLOCK_C)
    g_ptr += b.to(tl.int64) * L * 2 * C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(KW):
        w_f = tl.load(w_ptr + j * C + c, mask=cmask, other=0.0)
        w_b = tl.load(w_ptr + (KW + j) * C + c, mask=cmask, other=0.0)
        acc += _shifted(g_ptr, s, c, cmask, L, 2 * C, (KW - 1) - j) * w_f[None, :]
        acc += _shifted(g_ptr + C, s, c, cmask, L, 2 * C, j - (KW - 1)) * w_b[None, :]
    mask = (s < L)[:, None] & cmask[None, :]
    dx = dx_ptr + (b.to(tl.int64) * L + s)[:, None] * C + c[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, length: int, channels: int) -> tuple[int, int, int]:
    return (triton.cdiv(length, BLOCK_T), triton.cdiv(channels, BLOCK_C), batch)


def _forward(x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    batch, length, channels = x.shape
    out = torch.empty((batch, length, 2 * channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _bidir_conv_fwd_kernel[_grid(batch, length, channels)](
        x, taps, taps if bias is None else bias, out, length, channels, x.stride(0), x.stride(1),
        KW=taps.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _backward(
    dout: Tensor, x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    batch, length, channels = x.shape
    k = taps.shape[1]
    dout = dout.contiguous()
    grid = _grid(batch, length, channels)
    tiles = grid[0] * grid[2]
    g = torch.empty((batch, length, 2 * channels), dtype=torch.float32, device=x.device)
    dw_part = torch.empty((tiles, 2, k, channels), dtype=torch.float32, device=x.device)
    db_part = torch.empty((tiles, 2, channels), dtype=torch.float32, device=x.device)
    dx = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx.zero_(), torch.zeros_like(taps), None if bias is None else torch.zeros_like(bias)
    _bidir_conv_bwd_grad_kernel[grid](
        x, taps, taps if bias is None else bias, dout, g, dw_part, db_part, length, channels,
        x.stride(0), x.stride(1), KW=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip
    _bidir_conv_bwd_dx_kernel[grid](
        g, taps, dx, length, channels, KW=k, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS
    )
    return dx, dw_part.sum(0), None if bias is None else db_part.sum(0)


def triton_bidirectional_conv1d(x: Tensor, taps: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """The op on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), differentiable.

    Args:
        x: (batch, L, C); copied only if its channel stride is not 1.
        taps: (2, k, C), tap j of the forward (0) and backward (1) kernels; made float32.
        bias: (2, C) or None; made float32.
        silu: apply SiLU.

    Returns:
        (batch, L, 2C) contiguous, in x's dtype (computed in float32).
    """
    if x.stride(2) != 1:
        x = x.contiguous()
    taps = taps.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    return BidirectionalConv1dFunction.apply(x, taps, bias, silu, (_forward, _backward))
