"""Vim's bidirectional Mamba mixer ("bimamba v2") on top of the multi-direction selective scan."""

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmamba.kernels import (
    VIM_DIRECTIONS,
    bidirectional_causal_conv1d,
    is_eager_cpu_inference,
    multi_direction_selective_scan,
)
from vmamba.kernels.backends import resolve_backend
from vmamba.kernels.cpu import cpu_vim_mixer

from .recompute import recompute_in_backward
from .ssm_init import init_a_log_, init_dt_bias_, init_dt_weight_

__all__ = ["BiMambaMixer", "bidirectional_scan", "share_mixer_buffers"]


class _SharedBuffers(threading.local):
    """This thread's mixer output buffers by name, shared by the mixers while :func:`share_mixer_buffers` is
    on."""

    def __init__(self) -> None:
        self.shared = False
        self.tensors: dict[str, Tensor] = {}


_BUFFERS = _SharedBuffers()


@torch.jit.ignore
def share_mixer_buffers(shared: bool) -> None:
    """Turn on (for one pass over a model's blocks) or off the sharing of the mixers' large intermediate
    outputs in CPU inference: each mixer's in_proj output and convolution output, both (B, L, 2E), go into
    one buffer each per thread instead of fresh tensors. Turning it off frees the buffers.

    Both are dead once the mixer's scan has run, and fresh ones per layer cost page faults and cache misses:
    glibc hands the freed megabytes back to the system at the end of a block and the next block faults them
    in again. At Vim-Ti 512, 1 thread: the convolution took 1.8-2.7 ms per call against 0.9 ms reused, and
    sharing the in_proj output as well took vim_tiny from 3,500-13,000 to 600-2,500 page faults a forward
    (``docs/benchmarks.md``, CPU inference round 5). The buffers never leave a mixer's forward, so sharing
    them is invisible to callers.
    """
    _BUFFERS.shared = shared
    _BUFFERS.tensors = {}


@torch.jit.ignore
def _shared_buffer(name: str, x: Tensor, weight: Tensor, channels: int) -> Tensor | None:
    """This thread's buffer ``name`` for a (B, L, channels) output computed from x (B, L, ...) and weight,
    or None (sharing off, or not eager float32 CPU inference)."""
    if not _BUFFERS.shared or not is_eager_cpu_inference(x, weight):
        return None
    shape = (x.shape[0], x.shape[1], channels)
    buffer = _BUFFERS.tensors.get(name)
    if buffer is None or tuple(buffer.shape) != shape:
        buffer = _BUFFERS.tensors[name] = torch.empty(shape, dtype=x.dtype)
    return buffer


@torch.jit.ignore
def _gemm_input(x: Tensor, weight: Tensor) -> Tensor:
    """x in the dtype of the GEMM weight it meets, except under autocast: autocast casts for the GEMM, and an
    input already in autocast's dtype then stays the very tensor the GEMM saves for its backward (which a
    Vim block's :func:`~.recompute.recompute_in_backward` of its norm output relies on)."""
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def _is_plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` without forward hooks (its own or global): one whose output may be computed
    from its parameters without calling it."""
    hooks = nn.modules.module
    return (
        type(module) is nn.Linear
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
    )


@torch.jit.ignore
def bidirectional_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor,
    delta_proj_weight: Tensor,
    backend: str,
) -> Tensor:
    """Vim's two directions (forward, backward) as one scan, averaged: the mixer's only kernel call.

    ``delta`` is the low-rank step input of both directions, projected by ``delta_proj_weight`` in the scan.

    A plain function with positional arguments so that TorchScript can leave it to Python.
    """
    return multi_direction_selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus=True,
        directions=VIM_DIRECTIONS,
        merge="mean",
        backend=backend,
        delta_proj_weight=delta_proj_weight,
    )


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer of Vim (arXiv 2401.09417), the official "bimamba v2": (B, L, D) -> (B, L, D).

    ``in_proj`` and ``out_proj`` are shared; each direction has its own depthwise causal ``conv1d``,
    ``x_proj``, ``dt_proj``, ``A_log`` and ``D`` (the backward ones carry the official ``_b`` suffix, so
    official checkpoints load by name). The backward direction reads the sequence back to front; both are
    gated by the same ``z`` and their outputs are averaged before ``out_proj``. Both directions run as the
    two groups of one :func:`vmamba.kernels.multi_direction_selective_scan` call, which computes in float32.

    Initialisation follows the official model: ``A_log = log(1..N)``, ``D = 1``, the forward ``dt_proj.bias``
    the inverse softplus of log-uniform steps in [dt_min, dt_max] and ``dt_proj.weight`` uniform in
    +-dt_rank**-0.5. The official code then zeroes every Linear bias not flagged ``_no_reinit``, which
    includes ``dt_proj_b.bias``: the backward steps start at softplus(0) = 0.69 and ``dt_proj_b.weight``
    keeps PyTorch's default init. That is the default here (``symmetric_dt_init=False``);
    ``symmetric_dt_init=True`` initialises the backward ``dt_proj_b`` like the forward one.

    Args:
        dim: model width D.
        d_state: SSM state size N.
        d_conv: depthwise convolution width.
        expand: inner width E = expand * D.
        dt_rank: rank of the step-size projection, ``"auto"`` = ceil(D / 16).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        conv_bias: give the convolutions a bias.
        bias: give in_proj and out_proj a bias.
        symmetric_dt_init: initialise the backward step-size projection like the forward one.
        scan_backend: selective-scan backend (``"auto"`` picks the best for the device).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        symmetric_dt_init: bool = False,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.symmetric_dt_init = symmetric_dt_init
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias, **dd)
        # Forward direction (official names).
        self.conv1d = self._make_conv(conv_bias, dd)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **dd)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        # Backward direction.
        self.conv1d_b = self._make_conv(conv_bias, dd)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **dd)
        self.A_b_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D_b = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))

        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias, **dd)
        self.reset_ssm_parameters()

    def _make_conv(self, conv_bias: bool, dd: dict) -> nn.Conv1d:
        return nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=conv_bias,
            **dd,
        )

    def reset_ssm_parameters(self) -> None:
        """(Re)initialise the SSM parameters (A, D, step-size projections) as the official model does."""
        with torch.no_grad():
            init_a_log_(self.A_log)
            init_a_log_(self.A_b_log)
            self.D.fill_(1.0)
            self.D_b.fill_(1.0)
            init_dt_weight_(self.dt_proj.weight, self.dt_rank)
            init_dt_bias_(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
            if self.symmetric_dt_init:
                init_dt_weight_(self.dt_proj_b.weight, self.dt_rank)
                init_dt_bias_(self.dt_proj_b.bias, self.dt_min, self.dt_max, self.dt_init_floor)
            else:
                self.dt_proj_b.reset_parameters()  # PyTorch default weight, as left by the official code
                self.dt_proj_b.bias.zero_()  # zeroed by the official model-level init

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states (B, L, D) -> (B, L, D).

        Activations stay token-major, (B, L, channels) as the GEMMs produce them, and reach the scan as
        ``.transpose(1, 2)`` views; both directions share every step: one convolution, one batched x_proj
        GEMM, one scan (with dt_proj inside). Only the small per-direction parameters are
        stacked on each call (the official checkpoint layout keeps them apart; a stacked view of parameters
        kept back to back measured slower than the stacks, 6.4 against 3.1 us). In float32 CPU inference all
        of that between in_proj and out_proj is one call of the C++ library (:meth:`_mix_in_one_call`).
        """
        e = self.d_inner
        hidden_states = _gemm_input(hidden_states, self.in_proj.weight)
        xz = self._in_proj_shared(hidden_states)
        if xz is None:
            xz = self.in_proj(hidden_states)  # (B, L, 2E)
        x, z = xz[..., :e], xz[..., e:]
        u = _shared_buffer("conv", x, self.conv1d.weight, 2 * e)
        y = self._mix_in_one_call(x, z, u)
        if y is None:
            # Both directions' causal conv + SiLU: (B, L, 2E), the backward block anti-causal in storage order.
            u = self._conv(x, u)
            y = self._project_and_scan(u, x, z).transpose(1, 2)
        return self.out_proj(y)

    @torch.jit.ignore  # scripted models call it in Python, like the kernels it calls
    def _mix_in_one_call(self, x: Tensor, z: Tensor, u: Tensor | None) -> Tensor | None:
        """What :meth:`_conv` and :meth:`_project_and_scan` compute, (B, L, E) token-major, in one call of the
        C++ library (:func:`vmamba.kernels.cpu.cpu_vim_mixer`), for float32 CPU inference where the scan
        backend resolves to ``"cpu"``; None elsewhere (gradients recorded, tracing, other dtypes or backends).

        One call instead of about 40 PyTorch ops a block (the parameter stacks, the views, the batched x_proj
        GEMM, two scan calls): at 224 px a Vim block's fixed cost is most of its time.
        """
        if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dtype != torch.float32:
            return None  # the cheap exits first (CUDA, autocast, tracing proxies)
        directions = [
            (self.conv1d, self.x_proj, self.A_log, self.D, self.dt_proj),
            (self.conv1d_b, self.x_proj_b, self.A_b_log, self.D_b, self.dt_proj_b),
        ]
        params = [
            (conv.weight, conv.bias, x_proj.weight, a_log, d, dt_proj.bias, dt_proj.weight)
            for conv, x_proj, a_log, d, dt_proj in directions
        ]
        tensors = [t for group in params for t in group if t is not None]
        if not (
            is_eager_cpu_inference(x, z, *tensors)
            and x.stride(-1) == 1
            and z.stride(-1) == 1
            and all(t.is_contiguous() for t in tensors)
            and self.x_proj.bias is None
            and self.x_proj_b.bias is None
            and resolve_backend(self.scan_backend, x.device).name == "cpu"
        ):
            return None
        return cpu_vim_mixer(x, z, params, u)

    @torch.jit.ignore  # reads the module's hooks, in Python (a scripted in_proj is never taken)
    def _in_proj_shared(self, hidden_states: Tensor) -> Tensor | None:
        """``in_proj(hidden_states)`` computed into the shared buffer while :func:`share_mixer_buffers` is on
        (CPU inference), or None: sharing off, or in_proj not a plain hook-free Linear (it is then called as a
        module)."""
        linear = self.in_proj
        if not _is_plain_linear(linear):
            return None
        out = _shared_buffer("in_proj", hidden_states, linear.weight, linear.out_features)
        if out is None:
            return None
        rows, flat = hidden_states.reshape(-1, hidden_states.shape[-1]), out.view(-1, out.shape[-1])
        if linear.bias is None:
            torch.mm(rows, linear.weight.t(), out=flat)
        else:
            torch.addmm(linear.bias, rows, linear.weight.t(), out=flat)
        return out

    @torch.jit.ignore  # scripted models call it in Python, like the kernels it calls
    def _project_and_scan(self, u: Tensor, x: Tensor, z: Tensor) -> Tensor:
        """Both directions' x_proj and scan of the convolution output u (B, L, 2E) -> y (B, E, L), a view of
        a token-major tensor.

        When a gradient is recorded, u is not kept for the backward: the GEMM and the scan save a recipe,
        and the backward recomputes u from x by the convolution (:func:`~.recompute.recompute_in_backward`,
        as mamba_ssm's ``checkpoint_lvl=1``): one (B, L, 2E) activation less per block for one more
        convolution.
        """
        batch, length, _ = u.shape
        e, r, n = self.d_inner, self.dt_rank, self.d_state
        # Both directions' x_proj weights as one (2, E, P) operand, padded with zero columns from R + 2N up to
        # P, a multiple of 16 (44 -> 48 for Vim-Ti: MKL's GEMM is 1.2x faster with the wider output).
        weight = torch.stack([self.x_proj.weight, self.x_proj_b.weight])
        weight = F.pad(weight, (0, 0, 0, -weight.shape[1] % 16)).transpose(1, 2)
        with recompute_in_backward(u, lambda: self._conv(x, None)):
            # x_proj of both directions as one batched GEMM: (2, B*L, E) @ (2, E, P) -> (2, B*L, P).
            x_dbl = torch.bmm(u.view(batch * length, 2, e).transpose(0, 1), weight)
            x_dbl = x_dbl.view(2, batch, length, weight.shape[-1])
            # The low-rank step inputs side by side, (B, L, 2R) (small); dt_proj is applied in the scan.
            dts = x_dbl[..., :r].permute(1, 2, 0, 3).reshape(batch, length, 2 * r)
            return bidirectional_scan(
                u.transpose(1, 2),
                dts.transpose(1, 2),
                -torch.exp(torch.cat([self.A_log, self.A_b_log]).float()),
                x_dbl[..., r : r + n].permute(1, 0, 3, 2),  # B: (B, 2, N, L), one group per direction
                x_dbl[..., r + n : r + 2 * n].permute(1, 0, 3, 2),  # C
                torch.cat([self.D, self.D_b]).float(),
                z.transpose(1, 2),  # shared gate, in storage order, applied in the scan's epilogue
                torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
                torch.cat([self.dt_proj.weight, self.dt_proj_b.weight]),
                self.scan_backend,
            )

    def _conv(self, x: Tensor, out: Tensor | None) -> Tensor:
        """Both directions' causal convolution + SiLU of x (B, L, E) -> (B, L, 2E), into ``out`` if given."""
        return bidirectional_causal_conv1d(
            x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias, True, out
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, symmetric_dt_init={self.symmetric_dt_init}"
        )
