"""The official hustvl/Vim forward pass, re-implemented for fidelity tests.

Written step by step from the official semantics (``VisionMamba`` with ``bimamba_type="v2"``,
``if_divide_out=True``, middle class token, RMSNorm, ``residual_in_fp32``), directly against the
official state-dict layout (``layers.{i}.mixer.A_b_log``, ``norm_f.weight``, ...). It shares no code with
``vmamba.models.vim`` or ``vmamba.layers``: the two directions are two separate scans with the plain
sequential ``selective_scan_reference``, the backward one on the flipped ``xz``, as in the official code.
It also builds random official-layout state dicts and official checkpoint files.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vmamba.kernels import selective_scan_reference


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """mamba_ssm's RMSNorm reference: float32 statistics, weight only."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def mamba_inner_no_out_proj(
    xz: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor,
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    A: Tensor,
    D: Tensor,
    dt_bias: Tensor,
) -> Tensor:
    """One direction of the official block: (B, 2E, L) xz -> (B, E, L) gated scan output."""
    length = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    d_inner, d_state = A.shape
    # Causal depthwise conv: pad both sides by k-1 (nn.Conv1d(padding=k-1)), keep the first L outputs.
    x = F.conv1d(x, conv_weight, conv_bias, padding=conv_weight.shape[-1] - 1, groups=d_inner)[..., :length]
    x = F.silu(x)
    x_dbl = x.transpose(1, 2).reshape(-1, d_inner) @ x_proj_weight.t()  # ((B L), R + 2N)
    dt_rank = dt_proj_weight.shape[1]
    dt = x_dbl[:, :dt_rank]
    B = x_dbl[:, dt_rank : dt_rank + d_state]
    C = x_dbl[:, -d_state:]
    batch = xz.shape[0]
    delta = (dt @ dt_proj_weight.t()).reshape(batch, length, d_inner).transpose(1, 2)
    B = B.reshape(batch, length, d_state).transpose(1, 2)
    C = C.reshape(batch, length, d_state).transpose(1, 2)
    return selective_scan_reference(x, delta, A, B, C, D, z, dt_bias, delta_softplus=True)


def official_mixer(hidden: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    """The official bimamba-v2 ``Mamba.forward`` (fast path) for the mixer whose keys start with ``p``."""
    xz = (hidden @ sd[p + "in_proj.weight"].t()).transpose(1, 2)  # (B, 2E, L)
    out = mamba_inner_no_out_proj(
        xz,
        sd[p + "conv1d.weight"],
        sd[p + "conv1d.bias"],
        sd[p + "x_proj.weight"],
        sd[p + "dt_proj.weight"],
        -torch.exp(sd[p + "A_log"].float()),
        sd[p + "D"].float(),
        sd[p + "dt_proj.bias"].float(),
    )
    out_b = mamba_inner_no_out_proj(
        xz.flip([-1]),
        sd[p + "conv1d_b.weight"],
        sd[p + "conv1d_b.bias"],
        sd[p + "x_proj_b.weight"],
        sd[p + "dt_proj_b.weight"],
        -torch.exp(sd[p + "A_b_log"].float()),
        sd[p + "D_b"].float(),
        sd[p + "dt_proj_b.bias"].float(),
    )
    y = (out + out_b.flip([-1])).transpose(1, 2) / 2
    return y @ sd[p + "out_proj.weight"].t()


def official_embed(sd: dict[str, Tensor], images: Tensor, stride: int) -> tuple[Tensor, int]:
    """Patch embedding, middle class token and position embedding; returns (tokens, class-token index)."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)  # (B, M, D), row-major patches
    batch, num_patches, _ = x.shape
    token_position = num_patches // 2
    cls = sd["cls_token"].expand(batch, -1, -1)
    x = torch.cat([x[:, :token_position], cls, x[:, token_position:]], dim=1)
    return x + sd["pos_embed"], token_position


def official_forward(sd: dict[str, Tensor], images: Tensor, stride: int, eps: float = 1e-5) -> Tensor:
    """Logits of the official ``VisionMamba`` with weights ``sd`` (eval mode, no drop path)."""
    hidden, token_position = official_embed(sd, images, stride)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual = None
    for i in range(depth):
        # Block: Add -> Norm -> Mixer, the residual kept in float32.
        residual = hidden if residual is None else residual + hidden
        residual = residual.float()
        normed = rms_norm(residual, sd[f"layers.{i}.norm.weight"], eps)
        hidden = official_mixer(normed, sd, f"layers.{i}.mixer.")
    final = rms_norm(residual + hidden, sd["norm_f.weight"], eps)
    return final[:, token_position] @ sd["head.weight"].t() + sd["head.bias"]


def random_official_state_dict(
    embed_dim: int,
    depth: int,
    img_size: int,
    patch_size: int,
    stride: int,
    num_classes: int,
    d_state: int = 16,
    d_conv: int = 4,
    in_chans: int = 3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A random state dict in the official layout, with values of realistic scale (not the init)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    def rand(*shape: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    d_inner = 2 * embed_dim
    dt_rank = math.ceil(embed_dim / 16)
    grid = (img_size - patch_size) // stride + 1
    sd: dict[str, Tensor] = {
        "cls_token": randn(1, 1, embed_dim, std=0.5),
        "pos_embed": randn(1, grid * grid + 1, embed_dim, std=0.5),
        "patch_embed.proj.weight": randn(embed_dim, in_chans, patch_size, patch_size, std=0.1),
        "patch_embed.proj.bias": randn(embed_dim, std=0.1),
        "head.weight": randn(num_classes, embed_dim, std=0.2),
        "head.bias": randn(num_classes, std=0.1),
        "norm_f.weight": rand(embed_dim, low=0.5, high=1.5),
    }
    for i in range(depth):
        p = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = rand(embed_dim, low=0.5, high=1.5)
        sd[p + "in_proj.weight"] = randn(2 * d_inner, embed_dim, std=embed_dim**-0.5)
        for s in ("", "_b"):
            sd[p + f"conv1d{s}.weight"] = randn(d_inner, 1, d_conv, std=0.5)
            sd[p + f"conv1d{s}.bias"] = randn(d_inner, std=0.1)
            sd[p + f"x_proj{s}.weight"] = randn(dt_rank + 2 * d_state, d_inner, std=d_inner**-0.5)
            sd[p + f"dt_proj{s}.weight"] = randn(d_inner, dt_rank, std=dt_rank**-0.5)
            sd[p + f"dt_proj{s}.bias"] = rand(d_inner, low=-5.0, high=0.5)
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, d_state)
            sd[p + ("A_log" if not s else "A_b_log")] = a_log + randn(d_inner, d_state, std=0.2)
            sd[p + f"D{s}"] = rand(d_inner, low=0.5, high=1.5)
        sd[p + "out_proj.weight"] = randn(embed_dim, d_inner, std=d_inner**-0.5)
    return sd


def save_official_checkpoint(
    path, model_sd: dict[str, Tensor], ema_sd: dict[str, Tensor] | None = None
) -> None:
    """Write a file shaped like the official ``vim/main.py`` checkpoints, pickled ``args`` included."""
    args = argparse.Namespace(model="vim_tiny_patch16_224_bimambav2", drop_path=0.0, input_size=224)
    torch.save(
        {
            "model": model_sd,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 299,
            "model_ema": ema_sd,
            "args": args,
        },
        path,
    )
