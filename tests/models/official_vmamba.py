"""An independent re-implementation of the official VMamba v2 forward, for fidelity tests.

Written directly against the official state-dict layout (``patch_embed.{0,2,5,7}``,
``layers.{i}.blocks.{j}.{norm,op,norm2,mlp}``, ``layers.{i}.downsample.{1,3}``, ``classifier.{norm,head}``,
``outnorm{i}``; SS2D ``op.in_proj``, ``op.conv2d``, ``op.x_proj_weight`` (K, R+2N, D),
``op.dt_projs_weight`` (K, D, R), ``op.dt_projs_bias`` (K, D), ``op.A_logs`` (K*D, N), ``op.Ds`` (K*D),
``op.out_norm``, ``op.out_proj``), following the ``v05_noz`` semantics step by step with plain torch ops:
an explicit cross-scan (stack of flatten / transpose / flips), einsum projections, the sequential
``selective_scan_reference`` and an explicit cross-merge. It shares no code with ``vmamba.models``.

Also here: random official-layout state dicts, layout variants the official code also loads (legacy key
names, grouped ``x_proj``/``dt_projs`` Linears, mmseg ``backbone.`` wrapping) and a stand-in for the yacs
config object that the official training script pickles beside the weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vmamba.kernels import selective_scan_reference

K = 4  # scan directions


@dataclass
class OfficialConfig:
    """The factory arguments of an official v2 model that decide its shapes."""

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    ssm_ratio: float = 1.0
    d_state: int = 1
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_chans: int = 3


TINY = OfficialConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))
TINY_S1L8 = OfficialConfig(dims=(96, 192, 384, 768), depths=(2, 2, 8, 2))


class CfgNode(dict):
    """Stands for the yacs ``CfgNode`` the official training script saves as ``checkpoint['config']``.

    Loading a checkpoint must never run this class's code: unpickling it raises.
    """

    def __setstate__(self, state):
        raise AssertionError("the pickled training config was unpickled")


# ---------------------------------------------------------------------------------------------------
# Forward


def _ln2d(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    """Channel-first LayerNorm (eps 1e-5): permute to NHWC, layer_norm over C, permute back."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[prefix + "weight"], sd[prefix + "bias"], 1e-5)
    return y.permute(0, 3, 1, 2)


def _linear2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A Linear applied to every pixel of an NCHW map (the weight is stored 2-D)."""
    return F.conv2d(x, weight[:, :, None, None], bias)


def cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, L): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, L) -> (B, D, L) in row-major order: undo each route, then sum."""
    batch, _, dim, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    cols = cols.view(batch, dim, width, height).transpose(2, 3).flatten(2)
    return rows + cols


def ss2d_v05_noz(x: Tensor, sd: dict[str, Tensor], p: str, d_state: int) -> Tensor:
    """The official SS2D forward for forward_type ``v05_noz`` (no z gate), channel-first."""
    batch, _, height, width = x.shape
    x = _linear2d(x, sd[p + "in_proj.weight"])
    dim = x.shape[1]
    x = F.conv2d(x, sd[p + "conv2d.weight"], sd.get(p + "conv2d.bias"), padding=1, groups=dim)
    x = F.silu(x)

    xs = cross_scan(x)  # (B, K, D, L)
    x_proj_weight = sd[p + "x_proj_weight"]  # (K, R+2N, D)
    rank = x_proj_weight.shape[1] - 2 * d_state
    x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs, x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    dts = torch.einsum("b k r l, k d r -> b k d l", dts, sd[p + "dt_projs_weight"])

    length = height * width
    ys = selective_scan_reference(
        xs.reshape(batch, K * dim, length),
        dts.reshape(batch, K * dim, length),
        -torch.exp(sd[p + "A_logs"].float()),
        bs.contiguous(),  # (B, K, N, L): direction k's B is shared by its D channels
        cs.contiguous(),
        sd[p + "Ds"].float(),
        None,
        sd[p + "dt_projs_bias"].reshape(-1).float(),
        True,
    ).view(batch, K, dim, length)
    y = cross_merge(ys, height, width).view(batch, dim, height, width)
    y = _ln2d(y, sd, p + "out_norm.")
    return _linear2d(y, sd[p + "out_proj.weight"])


def _trunk(x: Tensor, sd: dict[str, Tensor], cfg: OfficialConfig) -> tuple[Tensor, list[Tensor]]:
    """Patch embed and the four layers; returns the last map and each layer's pre-downsample output."""
    x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
    x = F.gelu(_ln2d(x, sd, "patch_embed.2."))
    x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
    x = _ln2d(x, sd, "patch_embed.7.")
    stage_outputs = []
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + ss2d_v05_noz(_ln2d(x, sd, p + "norm."), sd, p + "op.", cfg.d_state)
            h = _linear2d(_ln2d(x, sd, p + "norm2."), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
            x = x + _linear2d(F.gelu(h), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        stage_outputs.append(x)
        if i < len(cfg.depths) - 1:
            p = f"layers.{i}.downsample."
            x = F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2, padding=1)
            x = _ln2d(x, sd, p + "3.")
    return x, stage_outputs


@torch.no_grad()
def official_logits(sd: dict[str, Tensor], x: Tensor, cfg: OfficialConfig) -> Tensor:
    """``VSSM.forward``: trunk, classifier norm, global average pool, linear head."""
    x, _ = _trunk(x, sd, cfg)
    x = _ln2d(x, sd, "classifier.norm.").mean(dim=(2, 3))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


@torch.no_grad()
def official_backbone_features(sd: dict[str, Tensor], x: Tensor, cfg: OfficialConfig) -> list[Tensor]:
    """``Backbone_VSSM.forward`` with out_indices (0, 1, 2, 3): ``outnorm{i}`` of each pre-downsample map."""
    _, stage_outputs = _trunk(x, sd, cfg)
    return [_ln2d(o, sd, f"outnorm{i}.") for i, o in enumerate(stage_outputs)]


# ---------------------------------------------------------------------------------------------------
# Random official checkpoints


def random_official_state_dict(
    cfg: OfficialConfig, seed: int = 0, classifier: bool = True, outnorms: bool = False
) -> dict[str, Tensor]:
    """A random state dict with every key and shape of the official model (weights of realistic scale).

    ``classifier`` adds ``classifier.norm``/``classifier.head`` (a classification checkpoint);
    ``outnorms`` adds ``outnorm{i}`` (a dense-prediction backbone checkpoint).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def norm(prefix: str, dim: int) -> None:
        sd[prefix + "weight"] = rand(dim, std=0.1, mean=1.0)
        sd[prefix + "bias"] = rand(dim, std=0.1)

    sd: dict[str, Tensor] = {}
    c0 = cfg.dims[0]
    sd["patch_embed.0.weight"] = rand(c0 // 2, cfg.in_chans, 3, 3, std=0.2)
    sd["patch_embed.0.bias"] = rand(c0 // 2, std=0.1)
    norm("patch_embed.2.", c0 // 2)
    sd["patch_embed.5.weight"] = rand(c0, c0 // 2, 3, 3, std=0.1)
    sd["patch_embed.5.bias"] = rand(c0, std=0.1)
    norm("patch_embed.7.", c0)
    n = cfg.d_state
    for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
        d_inner = int(cfg.ssm_ratio * dim)
        rank = math.ceil(dim / 16)
        hidden = int(dim * cfg.mlp_ratio)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            norm(p + "norm.", dim)
            sd[p + "op.in_proj.weight"] = rand(d_inner, dim, std=dim**-0.5)
            sd[p + "op.conv2d.weight"] = rand(d_inner, 1, 3, 3, std=0.3)
            sd[p + "op.x_proj_weight"] = rand(K, rank + 2 * n, d_inner, std=d_inner**-0.5)
            sd[p + "op.dt_projs_weight"] = rand(K, d_inner, rank, std=rank**-0.5)
            sd[p + "op.dt_projs_bias"] = rand(K, d_inner, std=0.5, mean=-3.0)
            a = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(K * d_inner, 1)
            sd[p + "op.A_logs"] = a + rand(K * d_inner, n, std=0.5)
            sd[p + "op.Ds"] = rand(K * d_inner, std=0.3, mean=1.0)
            norm(p + "op.out_norm.", d_inner)
            sd[p + "op.out_proj.weight"] = rand(dim, d_inner, std=d_inner**-0.5)
            norm(p + "norm2.", dim)
            sd[p + "mlp.fc1.weight"] = rand(hidden, dim, std=dim**-0.5)
            sd[p + "mlp.fc1.bias"] = rand(hidden, std=0.02)
            sd[p + "mlp.fc2.weight"] = rand(dim, hidden, std=hidden**-0.5)
            sd[p + "mlp.fc2.bias"] = rand(dim, std=0.02)
        if i < len(cfg.dims) - 1:
            out = cfg.dims[i + 1]
            sd[f"layers.{i}.downsample.1.weight"] = rand(out, dim, 3, 3, std=(9 * dim) ** -0.5)
            sd[f"layers.{i}.downsample.1.bias"] = rand(out, std=0.02)
            norm(f"layers.{i}.downsample.3.", out)
    if classifier:
        norm("classifier.norm.", cfg.dims[-1])
        sd["classifier.head.weight"] = rand(cfg.num_classes, cfg.dims[-1], std=0.5)
        sd["classifier.head.bias"] = rand(cfg.num_classes, std=0.1)
    if outnorms:
        for i, dim in enumerate(cfg.dims):
            norm(f"outnorm{i}.", dim)
    return sd


def to_legacy_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The key names of the older training code that ``VSSM._load_from_state_dict`` renames."""
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^patch_embed\.0\.", "patch_embed.proj.", key)
        key = re.sub(r"^patch_embed\.2\.", "patch_embed.norm.", key)
        key = re.sub(r"^(layers\.\d+\.blocks\.\d+)\.norm\.", r"\1.ln_1.", key)
        key = re.sub(r"^(layers\.\d+\.blocks\.\d+)\.op\.", r"\1.self_attention.", key)
        key = re.sub(r"^classifier\.", "", key)
        out[key] = value
    return out


def to_grouped_projection_layout(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The root ``vmamba.py`` layout: x_proj/dt_projs as grouped Linears ``op.x_proj.weight``
    (K*(R+2N), D) and ``op.dt_projs.weight`` (K*D, R)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("op.x_proj_weight"):
            out[key.replace("x_proj_weight", "x_proj.weight")] = value.reshape(-1, value.shape[-1])
        elif key.endswith("op.dt_projs_weight"):
            out[key.replace("dt_projs_weight", "dt_projs.weight")] = value.reshape(-1, value.shape[-1])
        else:
            out[key] = value
    return out


def as_mmseg_checkpoint(backbone_sd: dict[str, Tensor], seed: int = 0) -> dict:
    """An mmseg UperNet checkpoint envelope: ``backbone.`` keys plus decoder heads and ``meta``."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {"backbone." + k: v for k, v in backbone_sd.items()}
    state_dict["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1, generator=g)
    state_dict["decode_head.conv_seg.bias"] = torch.randn(150, generator=g)
    state_dict["auxiliary_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1, generator=g)
    return {"meta": {"iter": 160000}, "state_dict": state_dict}
