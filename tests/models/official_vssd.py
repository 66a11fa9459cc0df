"""An independent re-implementation of the official VSSD forward, for fidelity tests.

Written directly against the official state-dict layout of ``VMAMBA2`` / ``Backbone_VMAMBA2``
(YuHengsss/VSSD ``classification/models/mamba2.py``, ``mamba_util.py``): ``patch_embed.conv1``,
``patch_embed.conv2.{0,1}``, ``patch_embed.conv3.{0,1}`` (``conv``, ``norm`` = BatchNorm),
``layers.{i}.blocks.{j}.{cpe1,norm1,attn,cpe2,norm2,mlp.fc1,mlp.fc2}`` with the Mamba2 mixer keys
``attn.{in_proj,conv2d,dt_bias,A_log,D,norm,out_proj}`` or the attention keys ``attn.{to_qkv,to_out}``,
``layers.{i}.downsample.conv.{0,1,2}`` (``conv``, and ``norm`` on the last), ``norm``, ``head`` and
``outnorm{i}``. The token layout is the official (B, L, C) sequence; the NC-SSD step follows
``non_casual_linear_attn`` (``dA = -(dt * -exp(A_log))``, ``K^T (V dA)``, ``Q KV + V D``) and attention is
written out with an explicit softmax. It shares no code with ``vmamba.models`` or ``vmamba.kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class OfficialConfig:
    """The factory arguments of an official ``VMAMBA2`` that decide its shapes (one group, expand 2)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    d_state: int = 64
    attn_stages: tuple[int, ...] = (3,)
    num_classes: int = 1000
    in_chans: int = 3


TINY = OfficialConfig(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), d_state=8)
VSSD_MICRO = OfficialConfig(embed_dim=48, depths=(2, 2, 8, 4), num_heads=(2, 4, 8, 16), d_state=48)


class CfgNode(dict):
    """Stands for the yacs ``CfgNode`` the official training script saves as ``checkpoint['config']``.

    Loading a checkpoint must never run this class's code: unpickling it raises.
    """

    def __setstate__(self, state):
        raise AssertionError("the pickled training config was unpickled")


# ---------------------------------------------------------------------------------------------------
# Forward (token layout (B, L, C) as the official code)


def _conv_layer(x: Tensor, sd: dict[str, Tensor], p: str, stride: int = 1, groups: int = 1, act: bool = True):
    """Official ``ConvLayer``: conv (padding k//2), BatchNorm in eval mode if present, ReLU if ``act``."""
    weight = sd[p + "conv.weight"]
    x = F.conv2d(x, weight, sd.get(p + "conv.bias"), stride, weight.shape[-1] // 2, groups=groups)
    if p + "norm.weight" in sd:
        x = (x - sd[p + "norm.running_mean"][:, None, None]) / torch.sqrt(
            sd[p + "norm.running_var"][:, None, None] + 1e-5
        )
        x = x * sd[p + "norm.weight"][:, None, None] + sd[p + "norm.bias"][:, None, None]
    return F.relu(x) if act else x


def _ln(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], 1e-5)


def _dwconv_tokens(x: Tensor, weight: Tensor, bias: Tensor, height: int, width: int) -> Tensor:
    """Depthwise conv of a (B, L, C) sequence seen as an H x W map."""
    batch, _, dim = x.shape
    img = x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    return F.conv2d(img, weight, bias, padding=weight.shape[-1] // 2, groups=dim).flatten(2).transpose(1, 2)


def mamba2_mixer(
    x: Tensor, sd: dict[str, Tensor], p: str, num_heads: int, d_state: int, height: int, width: int
):
    """Official ``Mamba2.forward`` with ``linear_attn_duality=True``, ``ssd_positve_dA=True``, one group."""
    batch, length, dim = x.shape
    d_inner = 2 * dim
    headdim = d_inner // num_heads
    zxbcdt = x @ sd[p + "in_proj.weight"].T
    A = -torch.exp(sd[p + "A_log"])
    z = zxbcdt[..., :d_inner]
    xbc = zxbcdt[..., d_inner : 2 * d_inner + 2 * d_state]
    dt = F.softplus(zxbcdt[..., 2 * d_inner + 2 * d_state :] + sd[p + "dt_bias"])
    xbc = F.silu(_dwconv_tokens(xbc, sd[p + "conv2d.weight"], sd[p + "conv2d.bias"], height, width))
    xs, B, C = xbc[..., :d_inner], xbc[..., d_inner : d_inner + d_state], xbc[..., d_inner + d_state :]

    V = xs.reshape(batch, length, num_heads, headdim).permute(0, 2, 1, 3)  # (B, H, L, P)
    dA = -(dt.permute(0, 2, 1)[..., None] * A[None, :, None, None])  # positive weights
    KV = torch.einsum("bln,bhlp->bhnp", B, V * dA)
    y = torch.einsum("bln,bhnp->bhlp", C, KV) + V * sd[p + "D"][None, :, None, None]
    y = y.permute(0, 2, 1, 3).reshape(batch, length, d_inner)
    y = _ln(y, sd, p + "norm.") * z
    return y @ sd[p + "out_proj.weight"].T


def standard_attention(x: Tensor, sd: dict[str, Tensor], p: str, num_heads: int) -> Tensor:
    """Official ``StandardAttention``: qkv without bias, softmax(q k^T / sqrt(d)) v, ``to_out`` with bias."""
    batch, length, dim = x.shape
    q, k, v = (x @ sd[p + "to_qkv.weight"].T).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, num_heads, -1).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, length, dim)
    return out @ sd[p + "to_out.weight"].T + sd[p + "to_out.bias"]


def _block(
    x: Tensor, sd: dict[str, Tensor], p: str, cfg: OfficialConfig, stage: int, height: int, width: int
):
    x = x + _dwconv_tokens(x, sd[p + "cpe1.weight"], sd[p + "cpe1.bias"], height, width)
    h = _ln(x, sd, p + "norm1.")
    if stage in cfg.attn_stages:
        h = standard_attention(h, sd, p + "attn.", cfg.num_heads[stage])
    else:
        h = mamba2_mixer(h, sd, p + "attn.", cfg.num_heads[stage], cfg.d_state, height, width)
    x = x + h
    x = x + _dwconv_tokens(x, sd[p + "cpe2.weight"], sd[p + "cpe2.bias"], height, width)
    h = F.gelu(_ln(x, sd, p + "norm2.") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def _trunk(x: Tensor, sd: dict[str, Tensor], cfg: OfficialConfig) -> tuple[Tensor, list[Tensor]]:
    """Stem and the four layers; returns the last tokens and each layer's pre-downsample (B, C, H, W) map."""
    x = _conv_layer(x, sd, "patch_embed.conv1.", stride=2)
    x = _conv_layer(_conv_layer(x, sd, "patch_embed.conv2.0."), sd, "patch_embed.conv2.1.", act=False) + x
    x = _conv_layer(x, sd, "patch_embed.conv3.0.", stride=2)
    x = _conv_layer(x, sd, "patch_embed.conv3.1.", act=False)
    height, width = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    stage_outputs = []
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            x = _block(x, sd, f"layers.{i}.blocks.{j}.", cfg, i, height, width)
        img = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        stage_outputs.append(img)
        if i < len(cfg.depths) - 1:
            p = f"layers.{i}.downsample.conv."
            hidden = sd[p + "1.conv.weight"].shape[0]
            img = _conv_layer(img, sd, p + "0.")
            img = _conv_layer(img, sd, p + "1.", stride=2, groups=hidden)
            img = _conv_layer(img, sd, p + "2.", act=False)
            height, width = img.shape[-2:]
            x = img.flatten(2).transpose(1, 2)
    return x, stage_outputs


@torch.no_grad()
def official_logits(sd: dict[str, Tensor], x: Tensor, cfg: OfficialConfig) -> Tensor:
    """``VMAMBA2.forward``: trunk, final LayerNorm, average over tokens, linear head."""
    x, _ = _trunk(x, sd, cfg)
    x = _ln(x, sd, "norm.").mean(dim=1)
    return x @ sd["head.weight"].T + sd["head.bias"]


@torch.no_grad()
def official_backbone_features(sd: dict[str, Tensor], x: Tensor, cfg: OfficialConfig) -> list[Tensor]:
    """``Backbone_VMAMBA2.forward`` with out_indices (0, 1, 2, 3): ``outnorm{i}`` of each pre-downsample map."""
    _, stage_outputs = _trunk(x, sd, cfg)
    return [
        _ln(o.permute(0, 2, 3, 1), sd, f"outnorm{i}.").permute(0, 3, 1, 2)
        for i, o in enumerate(stage_outputs)
    ]


# ---------------------------------------------------------------------------------------------------
# Random official checkpoints


def random_official_state_dict(
    cfg: OfficialConfig, seed: int = 0, classifier: bool = True, outnorms: bool = False
) -> dict[str, Tensor]:
    """A random state dict with every key and shape of the official model (weights of realistic scale).

    ``classifier`` adds ``norm``/``head`` (a classification checkpoint); ``outnorms`` adds ``outnorm{i}``
    (a dense-prediction backbone checkpoint). BatchNorms carry non-trivial running statistics.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def norm(prefix: str, dim: int) -> None:
        sd[prefix + "weight"] = rand(dim, std=0.1, mean=1.0)
        sd[prefix + "bias"] = rand(dim, std=0.1)

    def conv_layer(
        prefix: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool = False, bn: bool = True
    ):
        sd[prefix + "conv.weight"] = rand(cout, cin // groups, k, k, std=(cin // groups * k * k) ** -0.5)
        if bias:
            sd[prefix + "conv.bias"] = rand(cout, std=0.05)
        if bn:
            norm(prefix + "norm.", cout)
            sd[prefix + "norm.running_mean"] = rand(cout, std=0.1)
            sd[prefix + "norm.running_var"] = rand(cout, std=0.1, mean=1.0).abs()
            sd[prefix + "norm.num_batches_tracked"] = torch.tensor(1000)

    def linear(prefix: str, cin: int, cout: int, bias: bool = True) -> None:
        sd[prefix + "weight"] = rand(cout, cin, std=cin**-0.5)
        if bias:
            sd[prefix + "bias"] = rand(cout, std=0.02)

    sd: dict[str, Tensor] = {}
    e = cfg.embed_dim
    conv_layer("patch_embed.conv1.", cfg.in_chans, e // 2, 3)
    conv_layer("patch_embed.conv2.0.", e // 2, e // 2, 3)
    conv_layer("patch_embed.conv2.1.", e // 2, e // 2, 3)
    conv_layer("patch_embed.conv3.0.", e // 2, 4 * e, 3)
    conv_layer("patch_embed.conv3.1.", 4 * e, e, 1)
    n = cfg.d_state
    dims = [e * 2**i for i in range(len(cfg.depths))]
    for i, (dim, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads)):
        d_inner = 2 * dim
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for cpe in ("cpe1.", "cpe2."):
                sd[p + cpe + "weight"] = rand(dim, 1, 3, 3, std=0.2)
                sd[p + cpe + "bias"] = rand(dim, std=0.05)
            norm(p + "norm1.", dim)
            if i in cfg.attn_stages:
                linear(p + "attn.to_qkv.", dim, 3 * dim, bias=False)
                linear(p + "attn.to_out.", dim, dim)
            else:
                linear(p + "attn.in_proj.", dim, 2 * d_inner + 2 * n + heads, bias=False)
                sd[p + "attn.conv2d.weight"] = rand(d_inner + 2 * n, 1, 3, 3, std=0.3)
                sd[p + "attn.conv2d.bias"] = rand(d_inner + 2 * n, std=0.1)
                sd[p + "attn.dt_bias"] = rand(heads, std=0.5, mean=-3.0)
                sd[p + "attn.A_log"] = torch.log(torch.rand(heads, generator=g) * 15 + 1)
                sd[p + "attn.D"] = rand(heads, std=0.3, mean=1.0)
                norm(p + "attn.norm.", d_inner)
                linear(p + "attn.out_proj.", d_inner, dim, bias=False)
            norm(p + "norm2.", dim)
            linear(p + "mlp.fc1.", dim, 4 * dim)
            linear(p + "mlp.fc2.", 4 * dim, dim)
        if i < len(dims) - 1:
            p, hidden = f"layers.{i}.downsample.conv.", 8 * dim
            conv_layer(p + "0.", dim, hidden, 1, bias=True, bn=False)
            conv_layer(p + "1.", hidden, hidden, 3, groups=hidden, bias=True, bn=False)
            conv_layer(p + "2.", hidden, 2 * dim, 1, bias=True)
    if classifier:
        norm("norm.", dims[-1])
        sd["head.weight"] = rand(cfg.num_classes, dims[-1], std=0.5)
        sd["head.bias"] = rand(cfg.num_classes, std=0.1)
    if outnorms:
        for i, dim in enumerate(dims):
            norm(f"outnorm{i}.", dim)
    return sd


def as_mmseg_checkpoint(backbone_sd: dict[str, Tensor], seed: int = 0) -> dict:
    """An mmseg UperNet checkpoint envelope: ``backbone.`` keys plus decoder heads and ``meta``."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {"backbone." + k: v for k, v in backbone_sd.items()}
    state_dict["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1, generator=g)
    state_dict["decode_head.conv_seg.bias"] = torch.randn(150, generator=g)
    state_dict["auxiliary_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1, generator=g)
    return {"meta": {"iter": 160000}, "state_dict": state_dict}
