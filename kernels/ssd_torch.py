"""The pure-PyTorch SSD scan: Mamba-2's chunked algorithm as batched matmuls (CPU backend, export path).

The sequence is padded to a multiple of the chunk length Q with zero step sizes (a padded token neither
decays nor drives the state, so the final state is exact) and cut into chunks. With ``cs`` the running sum
of ``dt * A`` inside a chunk:

1. intra-chunk (the "attention" form): ``y_i += sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j``;
2. chunk states: ``S_c = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T``, each chunk from a zero state;
3. state passing: ``H_c = exp(cs_last of chunk c-1) H_{c-1} + S_{c-1}``, from the initial state, a short
   loop over the chunks (49 at L = 3136, Q = 64);
4. inter-chunk: ``y_i += exp(cs_i) H_c C_i``.

C.B^T is computed once per group and shared by the group's heads. Math runs in float32 (float64 for
float64 inputs). Gradients come from autograd through these ops; :func:`torch_ssd_backward` packages
that for the custom op's registered backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ssd_reference import process_dt
from .token_orders import from_direction_order, to_direction_order

__all__ = ["chunked_ssd", "skip_and_gate", "torch_ssd_backward", "torch_ssd_forward"]


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segment_decay(cs: Tensor) -> Tensor:
    """cs (..., Q) -> (..., Q, Q) with ``exp(cs_i - cs_j)`` for j <= i and 0 above the diagonal."""
    q = cs.shape[-1]
    causal = torch.ones(q, q, dtype=torch.bool, device=cs.device).tril()
    diff = cs[..., :, None] - cs[..., None, :]
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def chunked_ssd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_states: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The SSD recurrence without D and gate, by chunks.

    x (b, L, h, p); dt (b, L, h), already processed (bias, softplus, limits); A (h,); B, C (b, L, g, n);
    initial_states (b, h, p, n) or None. Returns y (b, L, h, p) and the final state (b, h, p, n), both in
    the math dtype.
    """
    f = _math_dtype(x)
    batch, length, nheads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    per_group = nheads // groups
    q = chunk_size
    pad = (-length) % q
    nchunks = (length + pad) // q

    def chunks(t: Tensor) -> Tensor:  # (b, L, ...) -> (b, c, Q, ...), zero-padded
        t = t.to(f)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nchunks, q, *t.shape[2:])

    xc = chunks(x).unflatten(3, (groups, per_group))  # (b, c, Q, g, r, p)
    dtc = chunks(dt).unflatten(3, (groups, per_group)).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    Bc, Cc = chunks(B), chunks(C)  # (b, c, Q, g, n)
    cs = torch.cumsum(dtc * A.to(f).view(groups, per_group, 1), dim=-1)  # (b, c, g, r, Q)

    # 1. intra-chunk: (C_i . B_j) exp(cs_i - cs_j) dt_j, a (Q, Q) matrix per chunk and head.
    cb = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)
    mix = cb[:, :, :, None] * _segment_decay(cs) * dtc[..., None, :]  # (b, c, g, r, Q, Q)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", mix, xc)

    # 2. each chunk's end state from zero.
    weight = torch.exp(cs[..., -1:] - cs) * dtc  # (b, c, g, r, Q)
    states = torch.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", weight, xc, Bc)

    # 3. state passing: the state entering each chunk.
    if initial_states is None:
        carry = xc.new_zeros(batch, groups, per_group, headdim, dstate)
    else:
        carry = initial_states.to(f).reshape(batch, groups, per_group, headdim, dstate)
    chunk_decay = torch.exp(cs[..., -1])  # (b, c, g, r)
    entering = []
    for c in range(nchunks):
        entering.append(carry)
        carry = chunk_decay[:, c, :, :, None, None] * carry + states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, g, r, p, n)

    # 4. inter-chunk: the entering state read out by C, decayed to each position.
    decay_in = torch.exp(cs).permute(0, 1, 4, 2, 3)[..., None]  # (b, c, Q, g, r, 1)
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", Cc, entering) * decay_in
    y = y.reshape(batch, nchunks * q, nheads, headdim)[:, :length]
    return y, carry.reshape(batch, nheads, headdim, dstate)


def skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """``(y + D x) * silu(z)`` in y's dtype; D is (h,) or (h, p), z (b, L, h, p); either may be None."""
    if D is not None:
        Df = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _permutations(directions: Sequence[str], length: int, grid_size, device) -> list[tuple[Tensor, Tensor]]:
    """(perm, inverse) index pairs per direction: ``t[:, perm]`` reorders, ``y[:, inverse]`` restores.

    Built from ``arange`` by tensor ops (not ``torch.tensor`` of a list), so that the function also runs as
    a decomposition inside ``run_decompositions``, which needs a functional graph.
    """
    positions = torch.arange(length, device=device)
    return [
        (to_direction_order(positions, d, grid_size), from_direction_order(positions, d, grid_size))
        for d in directions
    ]


def torch_ssd_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_states: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    chunk_size: int,
    directions: Sequence[str] = ("row",),
    grid_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSD scan over one or more directions (canonical names), D and gate applied once.

    Returns ``out`` in x's dtype and, for the single direction ``("row",)``, the final state
    (b, h, p, n) in the math dtype (an empty tensor otherwise). Several directions are folded into the
    batch of one chunked call.
    """
    f = _math_dtype(x)
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)
    if tuple(directions) == ("row",):
        y, final = chunked_ssd(x, dtp, A, B, C, chunk_size, initial_states)
    else:
        batch = x.shape[0]
        pairs = _permutations(directions, x.shape[1], grid_size, x.device)
        fold = [torch.cat([t[:, perm] for perm, _ in pairs]) for t in (x, dtp, B, C)]
        ys, _ = chunked_ssd(fold[0], fold[1], A, fold[2], fold[3], chunk_size, None)
        y = sum(ys[i * batch : (i + 1) * batch, inverse] for i, (_, inverse) in enumerate(pairs))
        final = x.new_empty(0, dtype=f)
    out = skip_and_gate(y, x, D, z).to(x.dtype)
    return out, final


def autograd_backward(
    forward: Callable[..., tuple[Tensor, Tensor]], dout: Tensor, dfinal: Tensor | None, inputs: Sequence
) -> list[Tensor]:
    """Gradients of ``forward(*inputs) -> (out, final)`` for its tensor inputs, by recomputing it.

    Uses ``torch.func.vjp``, which works inside a custom op's implementation (where ordinary autograd
    recording is switched off by the dispatcher).
    """
    slots = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]

    def run(*tensors):
        args = list(inputs)
        for i, t in zip(slots, tensors):
            args[i] = t
        return forward(*args)

    (out, final), pullback = torch.func.vjp(run, *[inputs[i] for i in slots])
    dfinal = torch.zeros_like(final) if dfinal is None else dfinal.to(final.dtype)
    return list(pullback((dout.to(out.dtype), dfinal)))


def torch_ssd_backward(dout: Tensor, dfinal: Tensor | None, *inputs) -> list[Tensor | None]:
    """Gradients of :func:`torch_ssd_forward` for its tensor inputs (x, dt, A, B, C, D, z, dt_bias,
    initial_states; None for absent ones), by autograd through the chunked forward."""
    grads = iter(autograd_backward(torch_ssd_forward, dout, dfinal, inputs))
    return [next(grads) if isinstance(t, Tensor) else None for t in inputs[:9]]
