"""SS2D: VMamba's 2-D selective-scan mixer, the released ``v05_noz`` forward (channel-first).

For an input grid x (batch, C, H, W):

1. ``in_proj`` (1x1 conv, no bias) to ``d_inner = ssm_ratio * C`` channels, a depthwise 3x3 ``conv2d``
   and SiLU;
2. per direction k (row-major, column-major and both reversed) the projections ``x_proj_weight[k]`` to
   ``(dt, B, C)`` (ranks R, N, N) and ``dt_projs_weight[k]`` from R to ``d_inner``. Both act on one
   position at a time, so they are computed once in storage order for all four directions, each as one
   GEMM (``x_proj`` on the shared input, ``dt_projs`` block-diagonal);
3. one :func:`~vmamba.kernels.multi_direction_selective_scan` call scans the four directions with their own
   ``A = -exp(A_logs)``, ``D = Ds`` and ``delta_bias = dt_projs_bias`` (softplus on delta) and sums them
   back onto the grid (VMamba's cross-merge); how the orders are realised is the kernel library's choice;
4. ``out_norm`` (channel-first LayerNorm) and ``out_proj`` (1x1 conv, no bias).

The parameter names and layouts are the official ones (``x_proj_weight`` (K, R+2N, D),
``dt_projs_weight`` (K, D, R), ``dt_projs_bias`` (K, D), ``A_logs`` (K*D, N), ``Ds`` (K*D)), with the
official "v0" initialisation. ``in_proj``/``out_proj`` are ``nn.Conv2d`` 1x1 (official checkpoints store
them as 2-D Linear weights; the model's checkpoint filter reshapes them); the forward applies their
weights as GEMMs over token-major (B, H, W, channels) activations, which the depthwise conv sees as a
channels-last tensor and the scan as ``.transpose(1, 2)`` views.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from vmamba.kernels import VMAMBA_DIRECTIONS, multi_direction_selective_scan

from .ssm_init import init_a_log_, init_dt_bias_, init_dt_weight_

__all__ = ["SS2D", "cross_scan", "layer_norm_2d"]

#: The official channel-first LayerNorm: an ``nn.LayerNorm`` over channels with the default eps 1e-5.
#: timm's ``LayerNorm2d`` computes the same (permute, layer_norm, permute) but defaults to eps 1e-6.
layer_norm_2d = partial(LayerNorm2d, eps=1e-5)


@torch.jit.ignore
def cross_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    delta_bias: Tensor,
    delta_proj_weight: Tensor,
    height: int,
    width: int,
    backend: str,
) -> Tensor:
    """VMamba's four directions over an (height, width) grid as one scan, summed back onto the grid.

    The mixer's only kernel call, a plain function with positional arguments so that TorchScript can leave
    it to Python. ``delta`` is the low-rank step input of the four directions, projected by
    ``delta_proj_weight`` in the scan.
    """
    return multi_direction_selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D,
        None,
        delta_bias,
        True,
        directions=VMAMBA_DIRECTIONS,
        grid_size=(height, width),
        merge="sum",
        backend=backend,
        delta_proj_weight=delta_proj_weight,
    )


class SS2D(nn.Module):
    """Four-direction 2-D selective scan over a (batch, C, H, W) grid; returns the same shape.

    Args:
        dim: channels in and out (C).
        d_state: SSM state size N (the released v2 models use 1).
        ssm_ratio: ``d_inner = int(ssm_ratio * dim)``.
        dt_rank: rank R of the delta projection; ``"auto"`` is ``ceil(dim / 16)``.
        d_conv: kernel size of the depthwise convolution (``< 2`` means none).
        conv_bias: give the depthwise convolution a bias (False in the released v2 models).
        act_layer: activation after the depthwise convolution.
        norm_layer: channel-first norm applied to the merged scan output (``out_norm``).
        dt_min, dt_max, dt_init_floor, dt_scale: the delta initialisation of Mamba.
        proj_drop: dropout after ``out_proj``.
        scan_backend: selective-scan backend, see :func:`vmamba.kernels.selective_scan`.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        act_layer: type[nn.Module] = nn.SiLU,
        norm_layer: type[nn.Module] | partial = layer_norm_2d,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        proj_drop: float = 0.0,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        k = self.num_directions = len(VMAMBA_DIRECTIONS)
        self.dim = dim
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        d_inner, rank = self.d_inner, self.dt_rank

        self.in_proj = nn.Conv2d(dim, d_inner, 1, bias=False, **dd)
        self.conv2d = (
            nn.Conv2d(
                d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias, **dd
            )
            if d_conv > 1
            else nn.Identity()
        )
        self.act = act_layer()
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner, **dd))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner, **dd))
        # A and D stay float32 whatever the model dtype, as in Mamba.
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state, device=device, dtype=torch.float32))
        self.Ds = nn.Parameter(torch.empty(k * d_inner, device=device, dtype=torch.float32))
        self.out_norm = norm_layer(d_inner, **dd)
        self.out_proj = nn.Conv2d(d_inner, dim, 1, bias=False, **dd)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official "v0" initialisation (Mamba's dt/A/D init, trunc-normal 0.02 projections)."""
        dt_min, dt_max, dt_floor, dt_scale = self._dt_init
        trunc_normal_(self.in_proj.weight, std=0.02)
        trunc_normal_(self.out_proj.weight, std=0.02)
        if isinstance(self.conv2d, nn.Conv2d):
            self.conv2d.reset_parameters()
        # Each direction's x_proj is an nn.Linear(d_inner, R + 2N) with PyTorch's default init.
        bound = 1.0 / math.sqrt(self.d_inner)
        self.x_proj_weight.uniform_(-bound, bound)
        init_dt_weight_(self.dt_projs_weight, self.dt_rank, dt_scale)
        init_dt_bias_(self.dt_projs_bias, dt_min, dt_max, dt_floor)
        init_a_log_(self.A_logs)
        self.Ds.fill_(1.0)
        self.out_norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W), returned in channels-last memory format.

        The activations stay token-major, (B, H*W, channels) as the 1x1 projections (GEMMs) produce them:
        the depthwise conv runs on their channels-last view, the scan reads ``.transpose(1, 2)`` views, and
        the result comes back as a channels-last view of ``out_proj``'s output, so a channels-last input
        goes through without a layout copy outside the scan and ``out_norm``.
        """
        batch, _, height, width = x.shape
        k, r, n, d = self.num_directions, self.dt_rank, self.d_state, self.d_inner
        length = height * width
        h = F.linear(x.permute(0, 2, 3, 1), self.in_proj.weight.flatten(1))  # (B, H, W, d)
        h = self.act(self.conv2d(h.permute(0, 3, 1, 2)))  # channels-last (B, d, H, W)
        xs = h.permute(0, 2, 3, 1).reshape(batch, length, d)  # token-major (a view when channels-last)
        # Per-position projections, all directions at once: (B, L, K, R + 2N).
        x_dbl = F.linear(xs, self.x_proj_weight.flatten(0, 1)).view(batch, length, k, r + 2 * n)
        # Direction k's rank-R step inputs, (B, L, K*R) (small); dt_projs_weight[k] is applied in the scan.
        dts = x_dbl[..., :r].reshape(batch, length, k * r)
        y = cross_scan(
            xs.transpose(1, 2),
            dts.transpose(1, 2),
            -torch.exp(self.A_logs.float()),
            x_dbl[..., r : r + n].permute(0, 2, 3, 1),  # B: (B, K, N, L)
            x_dbl[..., r + n :].permute(0, 2, 3, 1),  # C
            self.Ds.float(),
            self.dt_projs_bias.flatten().float(),
            self.dt_projs_weight.flatten(0, 1),
            height,
            width,
            self.scan_backend,
        )
        y = self.out_norm(y.view(batch, d, height, width)).to(x.dtype)
        y = F.linear(y.permute(0, 2, 3, 1), self.out_proj.weight.flatten(1))  # (B, H, W, C)
        return self.proj_drop(y.permute(0, 3, 1, 2))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
            f"directions={VMAMBA_DIRECTIONS}"
        )
