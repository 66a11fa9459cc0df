"""VSSD backbones for timm: non-causal SSD (NC-SSD) blocks in a four-stage hierarchy, attention in stage 4.

Paper: "VSSD: Vision Mamba with Non-Causal State Space Duality", Yuheng Shi et al., arXiv:2407.18559.
Official code and weights: https://github.com/YuHengsss/VSSD (``classification/models/mamba2.py``,
``mamba_util.py``), weights at https://huggingface.co/YuhengSSS/VSSD.

The released ImageNet-1k models (the ``vssd_*_e300`` configs): a conv stem (stride 4, BatchNorm, a residual
pair of 3x3 convs), then per block ``x + cpe1(x)``, ``x + drop_path(mixer(norm1(x)))``, ``x + cpe2(x)``,
``x + drop_path(mlp(norm2(x)))`` with depthwise 3x3 ``cpe`` convs, the NC-SSD mixer
(:class:`vmamba.layers.NCSSD`) in stages 1-3 and multi-head self-attention in stage 4, and an MBConv-like
downsample (1x1 to 8x, depthwise 3x3 stride 2, 1x1 + BatchNorm) between stages. Stages keep NHWC maps;
NC-SSD and attention take any H x W (no position embedding).

>>> import timm, vmamba
>>> model = timm.create_model("vssd_tiny", num_classes=10)
>>> backbone = timm.create_model("vssd_tiny", features_only=True)  # strides 4/8/16/32, per-stage norms

Official checkpoints (``vssd_*_best*.pth`` training envelopes with ``model``/``model_ema`` and a pickled
config, and mmdet/mmseg files with ``backbone.`` keys and ``outnorm{i}`` stage norms) load with
``pretrained=True, pretrained_cfg_overlay=dict(file=path)`` (``use_ema=True`` in the overlay for the EMA
weights); :func:`checkpoint_filter_fn` converts them and names every key that does not fit.
"""

import logging
import re

import torch
import torch.nn.functional as F
from timm.layers import Attention, ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from vmamba.layers.nc_ssd import NCSSD
from vmamba.models._helpers import fit_hierarchical_state_dict, resolve_pretrained_file, select_state_dict

__all__ = ["VSSD", "VSSDBlock", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


class ConvLayer(nn.Module):
    """Conv2d, then optional BatchNorm and activation (the official ``ConvLayer``; keys ``conv``, ``norm``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd) if norm else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class Stem(nn.Module):
    """Stride-4 stem, NCHW in, NHWC out: 3x3/2 to dim/2, a residual pair of 3x3s, 3x3/2 to 4*dim, 1x1 to dim."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        half = dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, **dd)
        self.conv2 = nn.Sequential(ConvLayer(half, half, 3, **dd), ConvLayer(half, half, 3, act=False, **dd))
        self.conv3 = nn.Sequential(
            ConvLayer(half, dim * 4, 3, stride=2, **dd), ConvLayer(dim * 4, dim, 1, act=False, **dd)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.conv2(x) + x
        return self.conv3(x).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """MBConv-like stride-2 downsample on NHWC maps: 1x1 (dim -> 4*out) + ReLU, depthwise 3x3/2 + ReLU,
    1x1 (-> out) + BatchNorm. Any H, W gives ceil(H/2), ceil(W/2)."""

    def __init__(self, dim: int, out_dim: int, ratio: float = 4.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, bias=True, norm=False, **dd),
            ConvLayer(hidden, hidden, 3, stride=2, groups=hidden, bias=True, norm=False, **dd),
            ConvLayer(hidden, out_dim, 1, bias=True, act=False, **dd),
        )

    def forward(self, x: Tensor) -> Tensor:
        # The 1x1 convolutions run as GEMMs on the NHWC map (PyTorch's CPU convolution takes a slow
        # im2col path for a 1x1 with bias on a channels-last input); the depthwise one on its NCHW view.
        expand, depthwise, project = self.conv[0], self.conv[1], self.conv[2]
        x = expand.act(F.linear(x, expand.conv.weight.flatten(1), expand.conv.bias))
        x = depthwise(x.permute(0, 3, 1, 2))
        x = F.linear(x.permute(0, 2, 3, 1), project.conv.weight.flatten(1), project.conv.bias)
        return project.act(project.norm(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class Attention2d(Attention):
    """timm's multi-head self-attention over the H*W tokens of an NHWC map (qkv without bias)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        return super().forward(x.reshape(batch, height * width, dim)).reshape(batch, height, width, dim)


class VSSDBlock(nn.Module):
    """``x + cpe1(x)``, ``x + drop_path(mixer(norm1(x)))``, ``x + cpe2(x)``, ``x + drop_path(mlp(norm2(x)))``.

    The mixer is NC-SSD (``attention=False``) or multi-head self-attention. NHWC in and out.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: bool = False,
        d_state: int = 64,
        expand: int = 2,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        if attention:
            self.mixer = Attention2d(dim, num_heads, qkv_bias=False, attn_drop=drop, **dd)
        else:
            self.mixer = NCSSD(dim, num_heads, d_state=d_state, expand=expand, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        x = x + self.cpe2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VSSDStage(nn.Module):
    """Optional downsample (stages 2-4) followed by ``depth`` VSSD blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        downsample: bool,
        drop_path: list[float],
        device=None,
        dtype=None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[VSSDBlock(out_dim, drop_path=drop_path[i], **block_kwargs, **dd) for i in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VSSD(nn.Module):
    """VSSD: stem, four stages (NC-SSD blocks, attention blocks where asked), final norm, pooled linear head.

    Args:
        in_chans: input image channels.
        num_classes: classifier classes (0 for no head).
        global_pool: head pooling ('avg', 'max', '' for none...).
        embed_dim: channels of the first stage (doubled at each stage).
        depths: blocks per stage.
        num_heads: NC-SSD / attention heads per stage.
        attention_stages: stages whose blocks use self-attention instead of NC-SSD (official: the last).
        d_state: NC-SSD state size.
        expand: NC-SSD inner width in units of the stage width.
        mlp_ratio: MLP hidden width in units of the block width.
        drop_rate: dropout in the MLPs and attention maps (as the official ``drop``) and before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
        feature_norms: one LayerNorm per stage on the intermediate features (the official dense-prediction
            backbone's ``outnorm{i}``). ``features_only=True`` turns it on.
        img_size: accepted for timm compatibility and recorded; the model takes any H x W at run time.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: tuple[int, ...] = (2, 4, 8, 4),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        attention_stages: tuple[int, ...] = (3,),
        d_state: int = 64,
        expand: int = 2,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        feature_norms: bool = False,
        img_size: int | tuple[int, int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"num_heads {num_heads} must have one entry per stage (depths {depths})")
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = img_size
        self.dims = tuple(dims)
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"

        self.stem = Stem(in_chans, embed_dim, **dd)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))]
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            stages.append(
                VSSDStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    downsample=i > 0,
                    drop_path=dpr[i],
                    num_heads=num_heads[i],
                    attention=i in attention_stages,
                    d_state=d_state,
                    expand=expand,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_norms = nn.ModuleList([nn.LayerNorm(d, **dd) for d in dims]) if feature_norms else None
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC", **dd
        )
        self._init_linear_weights()

    def _init_linear_weights(self) -> None:
        """As the official ``_init_weights``: every Linear trunc-normal(0.02) with zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The SSD's A_log, D and dt_bias, kept free of weight decay as in Mamba-2."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D", ".dt_bias"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm|^feature_norms", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Forward that also returns the outputs of the stages in ``indices`` (strides 4, 8, 16, 32).

        Args:
            indices: the last n stages if an int, all if None, else the stage indices (negatives allowed).
            norm: apply the final norm to the last stage's output (when there are no feature norms).
            stop_early: stop after the last stage asked for.
            output_fmt: 'NCHW' or 'NHWC' (the intermediates; the final features are NHWC).
            intermediates_only: return only the list of intermediates.

        With ``feature_norms`` (the dense-prediction layout), each returned stage output goes through its
        own norm first, as the official backbone's ``outnorm{i}``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                if self.feature_norms is not None:
                    feat = self.feature_norms[idx](x)
                elif norm and idx == last_idx:
                    feat = self.norm(x)
                else:
                    feat = x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        if idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and norm/head/unused feature norms)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if self.feature_norms is not None:
            self.feature_norms = nn.ModuleList(
                [m if i in take_indices else nn.Identity() for i, m in enumerate(self.feature_norms)][
                    : max_index + 1
                ]
            )
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normed last-stage map, NHWC (B, ceil(H/32), ceil(W/32), num_features)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints -> this model

_OFFICIAL_RENAMES = (  # official key -> ours (downsample is handled apart: it moves to the next stage)
    (re.compile(r"^patch_embed\."), "stem."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.to_qkv\."), r"stages.\1.blocks.\2.mixer.qkv."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.to_out\."), r"stages.\1.blocks.\2.mixer.proj."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\."), r"stages.\1.blocks.\2.mixer."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"^head\."), "head.fc."),
    (re.compile(r"^outnorm(\d+)\."), r"feature_norms.\1."),
)
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.*)$")


def _official_to_timm_key(key: str) -> str:
    match = _DOWNSAMPLE.match(key)
    if match:
        return f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    for pattern, replacement in _OFFICIAL_RENAMES:
        new, count = pattern.subn(replacement, key)
        if count:
            return new
    return key


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VSSD) -> dict[str, Tensor]:
    """Convert an official VSSD checkpoint (or one of ours) to this model's keys, checking every key.

    Accepts the classification checkpoints (``model``/``model_ema`` envelopes or bare weights) and the
    dense-prediction ones (mmdet/mmseg ``backbone.`` prefix, whose other modules are dropped, and
    ``outnorm{i}`` stage norms). Parts that one kind of checkpoint lacks by design are taken from the model
    as initialised: the stage norms when a classification checkpoint feeds a ``feature_norms`` model (what
    the official dense-prediction training starts from), and the final norm and head (which the feature
    wrapper removes) when a dense-prediction checkpoint does. Anything else that does not fit raises a
    ``RuntimeError`` naming the keys. Classifier keys are left to timm (dropped when ``num_classes``
    differs); the first conv's input channels to timm's ``in_chans`` adaptation.
    """
    state_dict = select_state_dict(state_dict, source="VSSD checkpoint")
    if any(k.startswith("backbone.") for k in state_dict):
        dropped = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith("backbone.")})
        if dropped:
            _logger.info(f"VSSD checkpoint: keeping the backbone, dropping {dropped}")
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if "stem.conv1.conv.weight" not in state_dict:  # official layout
        state_dict = {_official_to_timm_key(k): v for k, v in state_dict.items()}

    return fit_hierarchical_state_dict(model, state_dict, "VSSD", "stem.conv1.conv.weight")


# ---------------------------------------------------------------------------------------------------
# Registration

_HF = "https://huggingface.co/YuhengSSS/VSSD/blob/main/"


def _cfg(file: str = "", note: str = "", **kwargs) -> dict:
    """Pretrained config. ``file`` names the official release file (metadata: nothing downloads)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        "license": "unknown",  # the official repository has no licence file
        "paper_ids": "arXiv:2407.18559",
        "paper_name": "VSSD: Vision Mamba with Non-Causal State Space Duality",
        "origin_url": _HF + file,
        "notes": (
            f"official release file: {file}",
            "download it and load with pretrained=True, pretrained_cfg_overlay=dict(file=path)" + note,
        ),
        **kwargs,
    }


_EMA = " (add use_ema=True: the file is saved when the EMA weights score best)"

default_cfgs = generate_default_cfgs(
    {
        "vssd_micro.in1k": _cfg("vssd_micro_best.pth"),
        "vssd_tiny.in1k": _cfg("vssd_tiny_best_ema.pth", _EMA),
        "vssd_tiny.in1k_mesa": _cfg("vssd_tiny_e300_with_mesa.pth"),
        "vssd_small.in1k": _cfg("vssd_small_best_ema.pth", _EMA),
        "vssd_small.in1k_mesa": _cfg("vssd_small_e300_with_mesa.pth"),
        "vssd_base.in1k": _cfg("vssd_base_best_ema.pth", _EMA),
        "vssd_base.in1k_mesa": _cfg("vssd_base_e300_with_mesa.pth"),
    }
)


def _create_vssd(variant: str, pretrained: bool = False, **kwargs) -> VSSD:
    resolve_pretrained_file(pretrained, kwargs)
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        ).to_dict()
        if all(cfg.get(k) in (None, "") for k in ("state_dict", "file", "url", "hf_hub_id")):
            notes = " ".join(cfg.get("notes") or ())
            raise RuntimeError(
                f"{variant}: no weights are bundled (nothing downloads). {notes}; origin: {cfg.get('origin_url')}"
            )
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_norms", True)
    feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model_with_cfg(
        VSSD,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=True,
        feature_cfg=feature_cfg,
        **kwargs,
    )


@register_model
def vssd_micro(pretrained: bool = False, **kwargs) -> VSSD:
    """VSSD-Micro: dim 48, depths 2-2-8-4, d_state 48 (13.51M params, 82.5% IN-1k top-1)."""
    model_args = dict(
        embed_dim=48, depths=(2, 2, 8, 4), num_heads=(2, 4, 8, 16), d_state=48, drop_path_rate=0.1
    )
    return _create_vssd("vssd_micro", pretrained, **dict(model_args, **kwargs))


@register_model
def vssd_tiny(pretrained: bool = False, **kwargs) -> VSSD:
    """VSSD-Tiny: dim 64, depths 2-4-8-4 (24.27M params, 83.6% IN-1k top-1; 84.1% with MESA)."""
    model_args = dict(embed_dim=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)
    return _create_vssd("vssd_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def vssd_small(pretrained: bool = False, **kwargs) -> VSSD:
    """VSSD-Small: dim 64, depths 3-4-21-5 (40.08M params, 84.1% IN-1k top-1; 84.5% with MESA)."""
    model_args = dict(embed_dim=64, depths=(3, 4, 21, 5), num_heads=(2, 4, 8, 16), drop_path_rate=0.4)
    return _create_vssd("vssd_small", pretrained, **dict(model_args, **kwargs))


@register_model
def vssd_base(pretrained: bool = False, **kwargs) -> VSSD:
    """VSSD-Base: dim 96, depths 3-4-21-5, heads 3-6-12-24 (88.82M params, 84.7% IN-1k top-1; 85.4% MESA)."""
    model_args = dict(embed_dim=96, depths=(3, 4, 21, 5), num_heads=(3, 6, 12, 24), drop_path_rate=0.6)
    return _create_vssd("vssd_base", pretrained, **dict(model_args, **kwargs))
