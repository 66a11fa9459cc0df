"""VMamba (VSSM v2) backbones for timm: four-direction SS2D blocks in a four-stage hierarchy.

Paper: "VMamba: Visual State Space Model", Yue Liu et al., arXiv:2401.10166 (NeurIPS 2024).
Official code and weights: https://github.com/MzeroMiko/VMamba (MIT licence).

These are the released v2 models: patch embed v2 (two 3x3 stride-2 convs), downsample v3 (3x3 stride-2
conv + norm), channel-first LayerNorm (eps 1e-5), SS2D with the ``v05_noz`` forward (see
:class:`vmamba.layers.SS2D`), GELU MLP of ratio 4, ``d_state=1``. Every layer keeps the NCHW layout.

>>> import timm, vmamba
>>> model = timm.create_model("vmamba_tiny_s1l8", num_classes=10)
>>> backbone = timm.create_model("vmamba_tiny_s1l8", features_only=True)  # strides 4/8/16/32

Official checkpoints (classification ``{'model', 'model_ema', ...}`` files and the mmseg/mmdet
dense-prediction files with ``backbone.`` keys and ``outnorm{i}`` stage norms) load with
``pretrained=True, pretrained_cfg_overlay=dict(file=path)`` (``use_ema=True`` in the overlay for the EMA
weights); :func:`checkpoint_filter_fn` converts them and names every key that does not fit.
"""

import logging
import math
import re

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from vmamba.layers.ss2d import SS2D, cross_scan, layer_norm_2d
from vmamba.models._helpers import fit_hierarchical_state_dict, resolve_pretrained_file, select_state_dict

__all__ = ["VMamba", "VSSBlock", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

# A torch.fx leaf: the mixer's scan checks its sizes and picks a backend at run time, so it stays one call.
register_notrace_function(cross_scan)


class Stem(nn.Module):
    """Patch embed v2: conv 3x3/2 to dim/2, norm, GELU, conv 3x3/2 to dim, norm (stride 4 in all)."""

    def __init__(self, in_chans: int, dim: int, norm_layer=layer_norm_2d, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = norm_layer(dim // 2, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, **dd)
        self.norm2 = norm_layer(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Downsample v3: conv 3x3 stride 2 (padding 1, so any H, W gives ceil(H/2), ceil(W/2)), then norm."""

    def __init__(self, dim: int, out_dim: int, norm_layer=layer_norm_2d, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class VSSBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(SS2D(norm1(x)))``, then ``x + drop_path(MLP(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer=layer_norm_2d,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = SS2D(
            dim,
            d_state=d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=dt_rank,
            d_conv=ssm_conv,
            conv_bias=ssm_conv_bias,
            norm_layer=norm_layer,
            scan_backend=scan_backend,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim, **dd)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, use_conv=True, **dd)
            # The official MLP is made of Linear layers: trunc-normal(0.02) weights, zero biases.
            for fc in (self.mlp.fc1, self.mlp.fc2):
                trunc_normal_(fc.weight, std=0.02)
                nn.init.zeros_(fc.bias)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.norm2 = self.mlp = self.drop_path2 = None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> the same shape, in channels-last memory format.

        The block works on channels-last tensors (a no-op after the first block of a stage): the channel
        LayerNorms then normalise contiguous rows with no permute copy, and the 1x1 projections are plain
        GEMMs over tokens.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path2(self._mlp(self.norm2(x)))
        return x

    def _mlp(self, x: Tensor) -> Tensor:
        """timm's ``Mlp`` (1x1 convs, no norm) on a channels-last x, its convs as GEMMs over the tokens."""
        mlp = self.mlp
        assert mlp is not None
        h = F.linear(x.permute(0, 2, 3, 1), mlp.fc1.weight.flatten(1), mlp.fc1.bias)
        h = F.linear(mlp.drop1(mlp.act(h)), mlp.fc2.weight.flatten(1), mlp.fc2.bias)
        return mlp.drop2(h).permute(0, 3, 1, 2)


class VMambaStage(nn.Module):
    """Optional downsample (stages 1-3) followed by ``depth`` VSS blocks."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        downsample: bool,
        drop_path: list[float],
        norm_layer=layer_norm_2d,
        device=None,
        dtype=None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                VSSBlock(out_dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs, **dd)
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VMamba(nn.Module):
    """VMamba v2 (VSSM): stem, four stages of VSS blocks, final norm and a pooled linear head.

    Args:
        in_chans: input image channels.
        num_classes: classifier classes (0 for no head).
        global_pool: head pooling ('avg', 'max', '' for none...).
        depths: blocks per stage.
        dims: channels of the first stage (doubled at each stage) or one per stage.
        d_state, ssm_ratio, dt_rank, ssm_conv, ssm_conv_bias: SS2D settings.
        mlp_ratio: hidden width of the MLP in units of the block width (0 for no MLP).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
        feature_norms: add one channel-first norm per stage applied to the intermediate features
            (the official dense-prediction backbone's ``outnorm{i}``). ``features_only=True`` turns it on.
        scan_backend: selective-scan backend ('auto' picks the fastest available one).
        img_size: accepted for timm compatibility and recorded; the model takes any H x W at run time.

    Compiles with ``torch.jit.script`` and traces with ``torch.fx`` through timm's helpers (the scan is a
    leaf). ``features_only=True, feature_cfg=dict(feature_cls="fx")`` takes the stage outputs from the
    traced graph; the stage norms of the default feature wrapper are not part of ``forward``, so that
    mode has none (it returns what ``forward_intermediates`` returns without ``feature_norms``).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 9, 2),
        dims: int | tuple[int, ...] = 96,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        feature_norms: bool = False,
        scan_backend: str = "auto",
        img_size: int | tuple[int, int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(depths)
        if isinstance(dims, int):
            dims = tuple(dims * 2**i for i in range(num_stages))
        if len(dims) != num_stages:
            raise ValueError(f"dims {dims} must have one entry per stage (depths {depths})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = img_size
        self.dims = tuple(dims)
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate

        self.stem = Stem(in_chans, dims[0], **dd)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))]
        block_kwargs = dict(
            d_state=d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=dt_rank,
            ssm_conv=ssm_conv,
            ssm_conv_bias=ssm_conv_bias,
            mlp_ratio=mlp_ratio,
            scan_backend=scan_backend,
        )
        self.stages = nn.Sequential(
            *[
                VMambaStage(dims[max(i - 1, 0)], dims[i], depths[i], i > 0, dpr[i], **block_kwargs, **dd)
                for i in range(num_stages)
            ]
        )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(num_stages)
        ]
        self.feature_norms = nn.ModuleList([layer_norm_2d(d, **dd) for d in dims]) if feature_norms else None
        self.norm = layer_norm_2d(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd
        )
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The SSM's A (log) and D parameters, kept free of weight decay as in Mamba."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_logs", ".Ds"))}

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
            output_fmt: 'NCHW' or 'NHWC'.
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
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feat)
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
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints -> this model

_LEGACY_RENAMES = (  # what the official VSSM._load_from_state_dict renames (older training code)
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.ln_1\."), r"\1.norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.self_attention\."), r"\1.op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)
_OFFICIAL_RENAMES = (  # official key -> ours (downsample is handled apart: it moves to the next stage)
    (re.compile(r"^patch_embed\.0\."), "stem.conv1."),
    (re.compile(r"^patch_embed\.2\."), "stem.norm1."),
    (re.compile(r"^patch_embed\.5\."), "stem.conv2."),
    (re.compile(r"^patch_embed\.7\."), "stem.norm2."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.norm\."), r"stages.\1.blocks.\2.norm1."),
    (
        re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.op\.x_proj\.weight$"),
        r"stages.\1.blocks.\2.mixer.x_proj_weight",
    ),
    (
        re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.op\.dt_projs\.weight$"),
        r"stages.\1.blocks.\2.mixer.dt_projs_weight",
    ),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.op\."), r"stages.\1.blocks.\2.mixer."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"^classifier\.norm\."), "norm."),
    (re.compile(r"^classifier\.head\."), "head.fc."),
    (re.compile(r"^outnorm(\d+)\."), r"feature_norms.\1."),
)
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.([13])\.(.*)$")
# Weights the official code stores 2-D (Linear2d, grouped Linear) and applies as 1x1/grouped convs.
_RESHAPED = re.compile(r"(in_proj\.weight|out_proj\.weight|fc[12]\.weight|x_proj_weight|dt_projs_weight)$")


def _official_to_timm_key(key: str) -> str:
    match = _DOWNSAMPLE.match(key)
    if match:
        part = {"1": "conv", "3": "norm"}[match.group(2)]
        return f"stages.{int(match.group(1)) + 1}.downsample.{part}.{match.group(3)}"
    for pattern, replacement in _OFFICIAL_RENAMES:
        new, count = pattern.subn(replacement, key)
        if count:
            return new
    return key


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VMamba) -> dict[str, Tensor]:
    """Convert an official VMamba checkpoint (or one of ours) to this model's keys, checking every key.

    Accepts the classification checkpoints (``model``/``state_dict`` envelopes or bare weights; legacy key
    names; ``x_proj_weight``/``dt_projs_weight`` stacks or the grouped ``x_proj``/``dt_projs`` Linears) and
    the dense-prediction ones (mmseg/mmdet ``backbone.`` prefix, whose other modules are dropped, and
    ``outnorm{i}`` stage norms). Parts that one kind of checkpoint lacks by design are taken from the
    model as initialised: the stage norms when a classification checkpoint feeds a ``feature_norms``
    model (what the official dense-prediction training starts from), and the final norm and head (which
    the feature wrapper removes) when a dense-prediction checkpoint does. Anything else that does not fit
    raises a ``RuntimeError`` naming the keys. Classifier keys are left to timm (dropped when
    ``num_classes`` differs); the first conv's input channels to timm's ``in_chans`` adaptation.
    """
    state_dict = select_state_dict(state_dict, source="VMamba checkpoint")
    if any(k.startswith("backbone.") for k in state_dict):
        dropped = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith("backbone.")})
        if dropped:
            _logger.info(f"VMamba checkpoint: keeping the backbone, dropping {dropped}")
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}

    if "stem.conv1.weight" not in state_dict:  # official layout
        out = {}
        for key, value in state_dict.items():
            for pattern, replacement in _LEGACY_RENAMES:
                key = pattern.sub(replacement, key)
            out[_official_to_timm_key(key)] = value
        state_dict = out

    expected = model.state_dict()
    for key, value in state_dict.items():
        target = expected.get(key)
        if (
            target is not None
            and _RESHAPED.search(key)
            and value.shape != target.shape
            and value.numel() == target.numel()
        ):
            state_dict[key] = value.reshape(target.shape)

    return fit_hierarchical_state_dict(model, state_dict, "VMamba", "stem.conv1.weight")


# ---------------------------------------------------------------------------------------------------
# Registration

_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"


def _cfg(file: str = "", release: str = "%23v2cls", **kwargs) -> dict:
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
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2401.10166",
        "paper_name": "VMamba: Visual State Space Model",
        "origin_url": f"{_RELEASES}{release}/{file}" if file else "https://github.com/MzeroMiko/VMamba",
        "notes": (
            f"official release file: {file}",
            "download it and load with pretrained=True, pretrained_cfg_overlay=dict(file=path)",
        )
        if file
        else (),
        **kwargs,
    }


def _dense_cfg(file: str, release: str, result: str, input_size: tuple[int, int, int]) -> dict:
    """An official mmseg/mmdet checkpoint: its ``backbone.`` weights and stage norms, no classifier.

    Load with ``features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path)``.
    """
    pool_size = (math.ceil(input_size[1] / 32), math.ceil(input_size[2] / 32))
    cfg = _cfg(file, release, num_classes=0, input_size=input_size, pool_size=pool_size, crop_pct=1.0)
    cfg["notes"] = (result, *cfg["notes"], "a backbone for dense prediction: load it with features_only=True")
    return cfg


_ADE20K = dict(release="%23v2seg", input_size=(3, 512, 512))
_COCO = dict(release="%23v2det", input_size=(3, 800, 1333))
_UPERNET = "upernet_vssm_4xb4-160k_ade20k-512x512_"
_MASK_RCNN = "mask_rcnn_vssm_fpn_coco_"

default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny_s1l8.in1k": _cfg("vssm1_tiny_0230s_ckpt_epoch_264.pth"),
        "vmamba_small_s1l20.in1k": _cfg("vssm1_small_0229s_ckpt_epoch_240.pth"),
        "vmamba_base_s1l20.in1k": _cfg("vssm1_base_0229s_ckpt_epoch_225.pth"),
        "vmamba_tiny_s2l5.in1k": _cfg("vssm_tiny_0230_ckpt_epoch_262.pth"),
        "vmamba_small_s2l15.in1k": _cfg("vssm_small_0229_ckpt_epoch_222.pth"),
        "vmamba_base_s2l15.in1k": _cfg("vssm_base_0229_ckpt_epoch_237.pth"),
        # Dense-prediction backbones (official README, assets/performance.md): UperNet 160k on ADE20K
        # at 512x512, mIoU single-/multi-scale; Mask R-CNN with FPN on COCO, box / mask AP.
        "vmamba_tiny_s1l8.ade20k_upernet": _dense_cfg(
            _UPERNET + "tiny_s_iter_160000.pth", result="ADE20K UperNet 160k mIoU 47.9 / 48.8 (MS)", **_ADE20K
        ),
        "vmamba_tiny_s2l5.ade20k_upernet": _dense_cfg(
            _UPERNET + "tiny_iter_160000.pth", result="ADE20K UperNet 160k mIoU 48.3 / 48.6 (MS)", **_ADE20K
        ),
        "vmamba_tiny_s2l5.coco_maskrcnn_1x": _dense_cfg(
            _MASK_RCNN + "tiny_epoch_12.pth", result="COCO Mask R-CNN 1x box AP 47.4, mask AP 42.7", **_COCO
        ),
        "vmamba_tiny_s2l5.coco_maskrcnn_3x": _dense_cfg(
            _MASK_RCNN + "tiny_ms_3x_epoch_36.pth",
            result="COCO Mask R-CNN 3x (multi-scale) box AP 48.9, mask AP 43.7",
            **_COCO,
        ),
        "vmamba_small_s2l15.ade20k_upernet": _dense_cfg(
            _UPERNET + "small_iter_144000.pth", result="ADE20K UperNet 160k mIoU 50.6 / 51.2 (MS)", **_ADE20K
        ),
        "vmamba_base_s2l15.ade20k_upernet": _dense_cfg(
            _UPERNET + "base_iter_160000.pth", result="ADE20K UperNet 160k mIoU 51.0 / 51.6 (MS)", **_ADE20K
        ),
        "vmamba_tiny_s1l8.coco_maskrcnn_1x": _dense_cfg(
            _MASK_RCNN + "tiny_s_epoch_12.pth", result="COCO Mask R-CNN 1x box AP 47.3, mask AP 42.7", **_COCO
        ),
        "vmamba_tiny_s1l8.coco_maskrcnn_3x": _dense_cfg(
            _MASK_RCNN + "tiny_ms_3x_s_epoch_31.pth",
            result="COCO Mask R-CNN 3x (multi-scale) box AP 48.8, mask AP 43.7",
            **_COCO,
        ),
        "vmamba_small_s2l15.coco_maskrcnn_1x": _dense_cfg(
            _MASK_RCNN + "small_epoch_11.pth", result="COCO Mask R-CNN 1x box AP 48.7, mask AP 43.7", **_COCO
        ),
        "vmamba_small_s2l15.coco_maskrcnn_3x": _dense_cfg(
            _MASK_RCNN + "small_ms_3x_epoch_32.pth",
            result="COCO Mask R-CNN 3x (multi-scale) box AP 49.9, mask AP 44.2",
            **_COCO,
        ),
        "vmamba_base_s2l15.coco_maskrcnn_1x": _dense_cfg(
            _MASK_RCNN + "base_epoch_11.pth", result="COCO Mask R-CNN 1x box AP 49.2, mask AP 44.1", **_COCO
        ),
        "vmamba_base_s2l15.coco_maskrcnn_1x_bs8": _dense_cfg(
            _MASK_RCNN + "base_epoch_12_bs8.pth",
            result="COCO Mask R-CNN 1x (batch 8) box AP 49.2, mask AP 43.9",
            **_COCO,
        ),
    }
)


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    resolve_pretrained_file(pretrained, kwargs, variant)
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
    feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    if "feature_cls" in kwargs:
        feature_cfg["feature_cls"] = kwargs.pop("feature_cls")
    if kwargs.get("features_only"):
        # The stage norms are applied by forward_intermediates (the default wrapper); a graph traced
        # from forward (feature_cls="fx") holds only the stage outputs.
        traced = feature_cfg["feature_cls"] == "fx"
        if traced and kwargs.get("feature_norms"):
            raise ValueError(
                "feature_norms (the dense-prediction stage norms) are not part of forward, so the fx "
                "feature wrapper cannot return them; use the default feature_cls ('getter')"
            )
        kwargs.setdefault("feature_norms", not traced)
    return build_model_with_cfg(
        VMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=True,
        feature_cfg=feature_cfg,
        **kwargs,
    )


_V2 = dict(d_state=1, dt_rank="auto", ssm_conv=3, ssm_conv_bias=False, mlp_ratio=4.0)


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T [s1l8]: depths 2-2-8-2, dims 96, ssm_ratio 1 (30.2M params, 82.6% IN-1k top-1)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2, **_V2)
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small_s1l20(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S [s1l20]: depths 2-2-20-2, dims 96, ssm_ratio 1 (49.0M params, 83.3%)."""
    model_args = dict(depths=(2, 2, 20, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.3, **_V2)
    return _create_vmamba("vmamba_small_s1l20", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base_s1l20(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B [s1l20]: depths 2-2-20-2, dims 128, ssm_ratio 1 (86.6M params, 83.8%)."""
    model_args = dict(depths=(2, 2, 20, 2), dims=128, ssm_ratio=1.0, drop_path_rate=0.5, **_V2)
    return _create_vmamba("vmamba_base_s1l20", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T [s2l5]: depths 2-2-5-2, dims 96, ssm_ratio 2 (30.7M params, 82.5%)."""
    model_args = dict(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2, **_V2)
    return _create_vmamba("vmamba_tiny_s2l5", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S [s2l15]: depths 2-2-15-2, dims 96, ssm_ratio 2 (50.1M params, 83.6%)."""
    model_args = dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3, **_V2)
    return _create_vmamba("vmamba_small_s2l15", pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B [s2l15]: depths 2-2-15-2, dims 128, ssm_ratio 2 (88.6M params, 83.9%)."""
    model_args = dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6, **_V2)
    return _create_vmamba("vmamba_base_s2l15", pretrained, **dict(model_args, **kwargs))
