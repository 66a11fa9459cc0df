"""Pure-PyTorch chunked selective scan: runs on any device and exports (torch.export, ONNX).

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is split into chunks of about sqrt(L) steps. A first pass
scans every chunk from a zero state at once (a loop over the chunk length, vectorised over chunks) and a
second carries the state across chunk boundaries (a loop over the chunks): about 2*sqrt(L) Python steps
instead of L, with no division by decays (stable for any chunk length). The forward then rescans each
chunk from its true start and reads y out step by step, never storing the states; the backward, written
by hand, recomputes all states from the inputs (nothing of size (batch, dim, L, N) is kept between
forward and backward) and runs the adjoint recurrence with the same chunked scan over the reversed
sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import math_dtype

__all__ = ["chunked_linear_scan", "torch_scan_backward", "torch_scan_forward"]


def chunked_linear_scan(a: Tensor, b: Tensor, chunk: int | None = None) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (h_{-1} = 0) along dim -2 of (..., L, N) tensors."""
    length = a.shape[-2]
    chunk = chunk or max(1, math.isqrt(length - 1) + 1)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    shape = a.shape[:-2] + (n_chunks, chunk, a.shape[-1])
    a, b = a.reshape(shape), b.reshape(shape)

    # Pass 1: every chunk from a zero state, with the running product of decays inside the chunk.
    local, decay = [], []
    h = torch.zeros_like(b[..., 0, :])
    p = torch.ones_like(a[..., 0, :])
    for t in range(chunk):
        h = a[..., t, :] * h + b[..., t, :]
        p = p * a[..., t, :]
        local.append(h)
        decay.append(p)
    local_t = torch.stack(local, dim=-2)
    decay_t = torch.stack(decay, dim=-2)

    # Pass 2: the state entering each chunk.
    starts = []
    carry = torch.zeros_like(local_t[..., 0, 0, :])
    for c in range(n_chunks):
        starts.append(carry)
        carry = decay_t[..., c, -1, :] * carry + local_t[..., c, -1, :]
    start_t = torch.stack(starts, dim=-2)

    h_all = local_t + decay_t * start_t[..., None, :]
    h_all = h_all.reshape(a.shape[:-3] + (n_chunks * chunk, a.shape[-1]))
    return h_all[..., :length, :]


def _step_sizes(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, f: torch.dtype):
    """(delta + delta_bias, dt): the step size before and after the optional softplus, in dtype f."""
    dt_raw = delta.to(f)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(f)[:, None]
    return dt_raw, F.softplus(dt_raw) if delta_softplus else dt_raw


def _prepare(u, delta, A, B, delta_bias, delta_softplus):
    """Grouped views in the math dtype: dt (b, G, H, L), decay and drive (b, G, H, L, N)."""
    f = math_dtype(u)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    heads = dim // groups
    dt_raw, dt = _step_sizes(delta, delta_bias, delta_softplus, f)
    dt = dt.reshape(batch, groups, heads, length)
    uf = u.to(f).reshape(batch, groups, heads, length)
    Af = A.to(f).reshape(groups, heads, 1, dstate)
    Bt = B.to(f).transpose(-1, -2)[:, :, None]  # (b, G, 1, L, N)
    decay = torch.exp(dt[..., None] * Af)
    drive = (dt * uf)[..., None] * Bt
    return dt_raw, dt, uf, Af, Bt, decay, drive


def _scan_readout(dt: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """``y_t = <C_t, h_t>`` and the last state of ``h_t = exp(dt_t A) h_{t-1} + du_t B_t``, in chunks.

    dt, du: (b, G, H, L); A: (G, H, N); B, C: (b, G, N, L). Works like :func:`chunked_linear_scan` but
    never stores the states: pass 1 scans every chunk from zero keeping only its end state, pass 2
    carries the states across chunks, pass 3 rescans every chunk from its true start and reads out y.
    Each step touches (b, G, H, chunks, N) values, a sqrt(L)-th of the full state history.
    """
    length, dstate = dt.shape[-1], A.shape[-1]
    chunk = max(1, math.isqrt(length - 1) + 1)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # dt = 0 and du = 0 leave the state unchanged
        dt, du, B, C = (F.pad(t, (0, pad)) for t in (dt, du, B, C))
    dt, du = dt.unflatten(-1, (n_chunks, chunk)), du.unflatten(-1, (n_chunks, chunk))
    Bc = B.unflatten(-1, (n_chunks, chunk)).permute(0, 1, 3, 4, 2)[:, :, None]  # (b, G, 1, chunks, T, N)
    Cc = C.unflatten(-1, (n_chunks, chunk)).permute(0, 1, 3, 4, 2)[:, :, None]
    Ae = A[:, :, None, :]  # (G, H, 1, N)

    def step(h: Tensor, t: int) -> Tensor:
        return torch.exp(dt[..., t, None] * Ae) * h + du[..., t, None] * Bc[..., t, :]

    # zeros_like, not new_zeros(shape): torch 2.5's ONNX exporter cannot build zeros of a symbolic shape.
    h = torch.zeros_like(dt[..., :1]).expand(dt.shape[:-1] + (dstate,))
    for t in range(chunk):
        h = step(h, t)
    chunk_decay = torch.exp(dt.sum(-1)[..., None] * Ae)
    starts, carry = [], torch.zeros_like(h[..., 0, :])
    for c in range(n_chunks):
        starts.append(carry)
        carry = chunk_decay[..., c, :] * carry + h[..., c, :]
    h = torch.stack(starts, dim=-2)
    ys = []
    for t in range(chunk):
        h = step(h, t)
        ys.append((h * Cc[..., t, :]).sum(-1))
    return torch.stack(ys, dim=-1).flatten(-2)[..., :length], carry


def torch_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """Forward of the chunked scan. B, C grouped (batch, G, N, L). Returns (out in u.dtype, last state)."""
    f = math_dtype(u)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    _, dt = _step_sizes(delta, delta_bias, delta_softplus, f)
    uf = u.to(f)
    grouped = (batch, groups, dim // groups, length)
    y, last = _scan_readout(
        dt.reshape(grouped), (dt * uf).reshape(grouped), A.to(f).reshape(groups, -1, dstate), B.to(f), C.to(f)
    )
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(u.dtype), last.reshape(batch, dim, dstate)


def torch_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of the scan, recomputing the states."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    heads = dim // groups
    dt_raw, dt, uf, Af, Bt, decay, drive = _prepare(u, delta, A, B, delta_bias, delta_softplus)
    f = dt.dtype
    h = chunked_linear_scan(decay, drive)
    Ct = C.to(f).transpose(-1, -2)[:, :, None]
    y = (h * Ct).sum(-1)  # (b, G, H, L)
    if D is not None:
        y = y + uf * D.to(f).reshape(groups, heads, 1)

    dy = dout.to(f).reshape(batch, groups, heads, length)
    dz = None
    if z is not None:
        zf = z.to(f).reshape(batch, groups, heads, length)
        sig = torch.sigmoid(zf)
        dz = (dy * y * sig * (1 + zf * (1 - sig))).reshape(batch, dim, length).to(z.dtype)
        dy = dy * zf * sig
    dD = None
    du = torch.zeros_like(uf)
    if D is not None:
        dD = (dy * uf).sum((0, 3)).reshape(dim).to(D.dtype)
        du = dy * D.to(f).reshape(groups, heads, 1)
    dC = torch.einsum("bghl,bghln->bgnl", dy, h)

    # Adjoint recurrence g_t = e_t + a_{t+1} g_{t+1}, run as a forward scan over the reversed sequence.
    e = dy[..., None] * Ct
    if dlast is not None:
        e[..., -1, :] += dlast.to(f).reshape(batch, groups, heads, dstate)
    a_rev = torch.cat([torch.ones_like(decay[..., :1, :]), decay.flip(-2)[..., :-1, :]], dim=-2)
    g = chunked_linear_scan(a_rev, e.flip(-2)).flip(-2)

    h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
    dlog_decay = g * h_prev * decay  # gradient w.r.t. dt * A
    ddt = (dlog_decay * Af).sum(-1) + (g * Bt).sum(-1) * uf
    dA = (dlog_decay * dt[..., None]).sum((0, 3)).reshape(dim, dstate).to(A.dtype)
    du = du + (g * Bt).sum(-1) * dt
    dB = torch.einsum("bghln,bghl->bgnl", g, dt * uf).to(B.dtype)
    ddt = ddt.reshape(batch, dim, length)
    if delta_softplus:
        ddt = ddt * torch.sigmoid(dt_raw)
    ddelta_bias = ddt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    du = du.reshape(batch, dim, length).to(u.dtype)
    return du, ddt.to(delta.dtype), dA, dB, dC.to(C.dtype), dD, dz, ddelta_bias
