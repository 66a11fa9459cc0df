"""NC-SSD, VSSD's token mixer: Mamba-2's projections around a non-causal SSD over the whole image."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmamba.kernels import non_causal_ssd
from vmamba.layers.ssm_init import init_dt_bias_

__all__ = ["NCSSD"]


class NCSSD(nn.Module):
    """VSSD's mixer (the official ``Mamba2`` module with ``linear_attn_duality=True``), on NHWC maps.

    ``in_proj`` gives z, xBC and dt (Mamba-2's order); xBC goes through a depthwise k x k conv on the
    H x W map (non-causal, "same" padding) and SiLU and splits into x (values), B (keys) and C (queries);
    ``dt = softplus(dt + dt_bias)``; :func:`vmamba.kernels.non_causal_ssd` mixes all tokens with one state
    per head; then ``LayerNorm(y) * z`` (no activation on z, unlike Mamba-2's gated RMSNorm) and ``out_proj``.
    One group (B and C shared by all heads), as every released VSSD.

    Args:
        dim: input and output channels.
        num_heads: SSD heads; ``head_dim = expand * dim // num_heads``.
        d_state: state size N (the key/query width).
        expand: inner width in units of ``dim``.
        d_conv: kernel size of the depthwise conv.
        conv_bias, bias: biases of the conv and of the in/out projections.
        A_init_range: ``exp(A_log)`` is initialised uniformly in this range.
        dt_min, dt_max, dt_init_floor: ``softplus(dt_bias)`` is initialised log-uniformly in [dt_min, dt_max].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        d_state: int = 64,
        expand: int = 2,
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.d_inner = int(expand * dim)
        if self.d_inner % num_heads:
            raise ValueError(f"expand * dim ({self.d_inner}) must be a multiple of num_heads ({num_heads})")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.num_heads = num_heads
        self.head_dim = self.d_inner // num_heads
        self.d_state = d_state
        conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + conv_dim + num_heads, bias=bias, **dd)
        self.conv2d = nn.Conv2d(
            conv_dim, conv_dim, d_conv, padding=(d_conv - 1) // 2, groups=conv_dim, bias=conv_bias, **dd
        )
        self.dt_bias = nn.Parameter(
            init_dt_bias_(torch.empty(num_heads, **dd), dt_min, dt_max, dt_init_floor)
        )
        a = torch.empty(num_heads, device=device, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(a).to(dtype))
        self.D = nn.Parameter(torch.ones(num_heads, **dd))
        self.norm = nn.LayerNorm(self.d_inner, **dd)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        batch, height, width, _ = x.shape
        length = height * width
        z, xbc, dt = torch.split(
            self.in_proj(x), [self.d_inner, self.d_inner + 2 * self.d_state, self.num_heads], -1
        )
        xbc = F.silu(self.conv2d(xbc.permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(batch, length, -1)
        values, keys, queries = torch.split(xbc, [self.d_inner, self.d_state, self.d_state], dim=-1)
        y = non_causal_ssd(
            values.reshape(batch, length, self.num_heads, self.head_dim),
            dt.reshape(batch, length, self.num_heads),
            self.A_log,
            keys.unsqueeze(2),
            queries.unsqueeze(2),
            self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        y = self.norm(y.reshape(batch, height, width, self.d_inner)) * z
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, d_state={self.d_state}"
