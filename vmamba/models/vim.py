"""Vision Mamba (Vim): bidirectional Mamba over a sequence of patches, as timm models.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
Zhu et al., ICML 2024 (arXiv 2401.09417). Official code and weights: https://github.com/hustvl/Vim.

The architecture is the official one (the "bimambav2 ... midclstok div2" variants): a strided patch
embedding, a class token inserted in the middle of the patch sequence, a learned absolute position
embedding, ``depth`` pre-norm blocks ``x + mixer(rmsnorm(x))`` with the residual stream kept in float32,
a final RMSNorm, and a linear head on the class token. The mixer is :class:`vmamba.layers.BiMambaMixer`.

Differences from the official code, all without effect on the outputs of the official weights:

- timm names: ``layers.{i}`` -> ``blocks.{i}`` and ``norm_f`` -> ``norm`` (:func:`checkpoint_filter_fn`
  converts official checkpoints);
- any input size at run time with ``dynamic_img_size=True``; the position embedding is resampled around
  its middle class-token entry (the official resampling treats entry 0 as the class token, which shifts
  the grid by one for middle-class-token checkpoints);
- stochastic depth: the official code keeps the rate of mixer i's output in layer i+1 (``[0] + dpr``)
  and applies the last rate before the final norm. Per mixer output that is exactly the linear schedule
  ``dpr[i]``, which is what the blocks here apply;
- ``drop_rate`` is timm's classifier dropout; the official ``drop_rate`` (dropout after the position
  embedding) is ``pos_drop_rate``. Both default to 0, as in every official recipe.
"""

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor, nn

from vmamba.kernels import bidirectional_causal_conv1d
from vmamba.layers.mamba_mixer import BiMambaMixer, bidirectional_scan, share_mixer_buffers
from vmamba.layers.norm import RMSNorm, add_rms_norm, rms_norm
from vmamba.layers.patch_embed import PatchEmbed
from vmamba.layers.recompute import recompute_in_backward

from ._helpers import check_state_dict_fits, resolve_pretrained_file, select_state_dict

__all__ = [
    "Vim",
    "VimBlock",
    "checkpoint_filter_fn",
    "default_out_indices",
    "insert_middle_token",
    "resample_pos_embed",
    "take_middle_token",
]

_GLOBAL_POOLS = ("", "token", "avg", "max")

# torch.fx leaves: the mixer's conv and scan check their sizes (and the scan picks a backend) at run time,
# so each stays one call.
register_notrace_function(bidirectional_causal_conv1d)
register_notrace_function(bidirectional_scan)
# Leaves too: they read dtype/device attributes, which torch.fx before 2.6 cannot pass on as arguments.
register_notrace_function(rms_norm)
register_notrace_function(add_rms_norm)  # picks a kernel at run time


@register_notrace_function  # reads x.dtype: a leaf for torch.fx (torch < 2.6 cannot trace dtype arithmetic)
def to_residual_dtype(x: Tensor) -> Tensor:
    """``x`` in (at least) float32: the residual stream is kept there, as the official residual_in_fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@register_notrace_function  # compares sizes in Python: a leaf for torch.fx ...
@torch.jit.ignore  # ... and a Python call for TorchScript, which then passes every argument positionally
def resample_pos_embed(
    pos_embed: Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a Vim position embedding (1, M + 1, D), class-token entry at index M // 2, to a new grid.

    The class-token entry is taken out of the middle, the M patch entries are resampled as an
    ``old_size`` grid to ``new_size``, and the class-token entry goes back at the new middle. With
    ``num_prefix_tokens=0`` the embedding is a plain (1, M, D) grid.
    """
    old_size, new_size = tuple(old_size), tuple(new_size)
    if num_prefix_tokens not in (0, 1):
        raise ValueError(f"Vim has at most one class token, got num_prefix_tokens={num_prefix_tokens}")
    if pos_embed.shape[1] != old_size[0] * old_size[1] + num_prefix_tokens:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} entries but a {old_size} grid with {num_prefix_tokens} "
            f"class token needs {old_size[0] * old_size[1] + num_prefix_tokens}"
        )
    if old_size == new_size:
        return pos_embed
    cls_pos, grid = take_middle_token(pos_embed) if num_prefix_tokens else (None, pos_embed)
    grid = resample_abs_pos_embed(
        grid, new_size, old_size, num_prefix_tokens=0, interpolation=interpolation, antialias=antialias
    )
    return insert_middle_token(grid, cls_pos) if num_prefix_tokens else grid


def insert_middle_token(x: Tensor, token: Tensor) -> Tensor:
    """Insert ``token`` (B, 1, D) into the patch sequence ``x`` (B, M, D) at index M // 2 (Vim's class token)."""
    middle = x.shape[1] // 2
    return torch.cat([x[:, :middle], token, x[:, middle:]], dim=1)


def take_middle_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`insert_middle_token`: (B, M + 1, D) -> (token (B, 1, D), patches (B, M, D))."""
    middle = (x.shape[1] - 1) // 2
    return x[:, middle : middle + 1], torch.cat([x[:, :middle], x[:, middle + 1 :]], dim=1)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks ``features_only`` returns by default: four evenly spaced ones, e.g. (5, 11, 17, 23) at depth 24."""
    return tuple(sorted({math.ceil(depth * (k + 1) / 4) - 1 for k in range(4)}))


class VimBlock(nn.Module):
    """Pre-norm residual block ``x + drop_path(mixer(norm(x)))``.

    The official block is written "add -> norm -> mixer" so that the add fuses with the norm; chained over
    the layers it computes the same thing. ``x`` is the float32 residual stream.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        symmetric_dt_init: bool = False,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = BiMambaMixer(
            dim,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            symmetric_dt_init=symmetric_dt_init,
            scan_backend=scan_backend,
            device=device,
            dtype=dtype,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(self.norm(x), x)

    def forward_fused(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The official "add -> norm -> mixer" form: (mixer output of the block before, residual stream
        before that add) -> the same pair after this block. ``residual + hidden`` is then this block's
        ``forward`` output; the add runs fused with this block's norm (:func:`vmamba.kernels.add_rms_norm`)."""
        normed, residual = self.norm.forward_add(hidden, residual)
        return self.mix(normed, residual), residual

    def mix(self, normed: Tensor, source: Tensor) -> Tensor:
        """``drop_path(mixer(normed))`` for ``normed = norm(source)``. In eager training the mixer's in_proj
        keeps a recipe instead of ``normed`` (the norm keeps ``source`` anyway): the backward recomputes the
        norm, one (B, L, D) activation less per block (:func:`~vmamba.layers.recompute.recompute_in_backward`).
        """
        if torch.jit.is_scripting():
            return self.drop_path(self.mixer(normed))
        return self._mix_recomputing_norm(normed, source)

    @torch.jit.ignore
    def _mix_recomputing_norm(self, normed: Tensor, source: Tensor) -> Tensor:
        dtype = None
        if isinstance(normed, Tensor) and torch.is_autocast_enabled(normed.device.type):
            # The GEMM saves autocast's cast of its input, not the input: the cast is made here instead.
            dtype = torch.get_autocast_dtype(normed.device.type)
            normed = normed.to(dtype)

        def recompute() -> Tensor:
            out = self.norm(source)
            return out if dtype is None else out.to(dtype)

        with recompute_in_backward(normed, recompute):
            return self.drop_path(self.mixer(normed))


class Vim(nn.Module):
    """Vision Mamba (Vim) classifier / backbone.

    Compiles with ``torch.jit.script`` and traces with ``torch.fx`` through timm's helpers
    (``timm.models.get_notrace_functions``): the mixers' scan, the input-size check and the
    position-embedding resampling are leaves.

    ``forward_features`` returns all tokens (B, M + 1, D) after the final norm, the class token at index
    M // 2; ``forward_head`` pools (the class token by default) and classifies.

    Args:
        img_size: input size the position embedding is built for.
        patch_size: patch (kernel) size.
        stride: step between patches (default ``patch_size``; 8 for the "+" models).
        in_chans: input channels.
        num_classes: classes of the head (0 for none).
        global_pool: ``"token"`` (the middle class token, default), ``"avg"`` or ``"max"`` over the patch
            tokens, or ``""`` (no pooling).
        embed_dim: model width D.
        depth: number of blocks.
        d_state, d_conv, expand, dt_rank: mixer sizes (see :class:`vmamba.layers.BiMambaMixer`).
        norm_eps: RMSNorm epsilon.
        class_token: insert a class token in the middle of the sequence (the official models do).
        dynamic_img_size: accept any input size, resampling the position embedding per forward.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after the position embedding (the official ``drop_rate``).
        drop_path_rate: stochastic depth, linear from 0 to this over the blocks.
        symmetric_dt_init: initialise the backward step-size bias like the forward one (the official
            init leaves it at zero).
        scan_backend: selective-scan backend for every mixer (``"auto"`` picks per device).
    """

    __constants__ = ["dynamic_img_size"]  # TorchScript then compiles only the branch taken

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        norm_eps: float = 1e-5,
        class_token: bool = True,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        symmetric_dt_init: bool = False,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        global_pool = ("token" if class_token else "avg") if global_pool is None else global_pool
        self._check_pool(global_pool, class_token)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.cls_token_position = "middle"
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            stride=stride,
            in_chans=in_chans,
            embed_dim=embed_dim,
            strict_img_size=not dynamic_img_size,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                VimBlock(
                    embed_dim,
                    d_state=d_state,
                    d_conv=d_conv,
                    expand=expand,
                    dt_rank=dt_rank,
                    norm_eps=norm_eps,
                    drop_path=dpr[i],
                    symmetric_dt_init=symmetric_dt_init,
                    scan_backend=scan_backend,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @staticmethod
    def _check_pool(global_pool: str, class_token: bool) -> None:
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use 'avg' or 'max' without one")

    def init_weights(self) -> None:
        """The official initialisation (the mixers initialise their own SSM parameters).

        trunc_normal(0.02) for the position embedding, class token and head; LeCun normal for the patch
        projection; zero biases; each ``out_proj.weight`` Kaiming-uniform scaled by 1 / sqrt(depth).
        """
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        depth = len(self.blocks)
        for block in self.blocks:
            weight = block.mixer.out_proj.weight
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            with torch.no_grad():
                weight.div_(math.sqrt(depth))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters to train without weight decay: embeddings and every mixer's A_log / D (both directions)."""
        names = {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())
        for i in range(len(self.blocks)):
            names |= {f"blocks.{i}.mixer.{p}" for p in ("A_log", "A_b_log", "D", "D_b")}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth (stem, each block, final norm), for layer-wise learning-rate decay."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (``num_classes=0`` removes it) and optionally the pooling."""
        if global_pool is not None:
            self._check_pool(global_pool, self.cls_token is not None)
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.pos_embed.device
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        )

    def _embed(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) -> token sequence (B, M (+1), D): patches, middle class token, positions."""
        x = self.patch_embed(x)
        batch, height, width, dim = x.shape
        pos_embed = self.pos_embed
        if self.dynamic_img_size:  # resample_pos_embed returns pos_embed itself when the grid is the same
            grid = self.patch_embed.grid_size
            pos_embed = resample_pos_embed(
                pos_embed, (height, width), grid, self.num_prefix_tokens, "bicubic", True
            )
        x = to_residual_dtype(x.reshape(batch, height * width, dim))
        if self.cls_token is not None:
            x = insert_middle_token(x, self.cls_token.expand(batch, -1, -1).to(x.dtype))
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> all tokens after the final norm, (B, M + 1, D) with the class token at index M // 2."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self._run_blocks(x)
        return self.norm(x)

    def _run_blocks(self, x: Tensor) -> Tensor:
        """``self.blocks(x)`` with each block's residual add fused into the next block's norm (and, in CPU
        inference, the mixers' in_proj and convolution outputs in shared buffers:
        :func:`~vmamba.layers.share_mixer_buffers`)."""
        hidden: Tensor | None = None
        residual = x
        share_mixer_buffers(True)
        for block in self.blocks:
            if hidden is None:
                hidden = block.mix(block.norm(x), x)
            else:
                hidden, residual = block.forward_fused(hidden, residual)
        share_mixer_buffers(False)
        return x if hidden is None else residual + hidden

    def _split_tokens(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(B, L, D) tokens -> (class token (B, 1, D) or None, patch tokens (B, M, D))."""
        if self.cls_token is None:
            return None, x
        return take_middle_token(x)

    def pool(self, x: Tensor) -> Tensor:
        """Tokens (B, L, D) -> (B, D) by ``global_pool`` (tokens unchanged for ``''``)."""
        if self.global_pool == "token":
            return x[:, (x.shape[1] - 1) // 2]
        if self.global_pool in ("avg", "max"):
            _, patches = self._split_tokens(x)
            return patches.mean(dim=1) if self.global_pool == "avg" else patches.amax(dim=1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits (or the pooled features with ``pre_logits=True``)."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs (the residual stream) along the forward pass, class token removed.

        Args:
            x: image (B, C, H, W).
            indices: blocks to return: the last n if an int, all if None, or explicit (negative allowed).
            return_prefix_tokens: return (spatial, class token (B, 1, D)) pairs.
            norm: apply the final norm to each returned output.
            stop_early: stop after the last requested block (the final features are then not computed).
            output_fmt: ``"NCHW"`` maps (B, D, H', W') or ``"NLC"`` sequences (B, M, D).
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final features as forward_features, intermediates)``, or the intermediates alone.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        grid = self.patch_embed.dynamic_feat_size((height, width))

        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        outputs = []
        for y in intermediates:
            prefix, spatial = self._split_tokens(y)
            if output_fmt == "NCHW":
                spatial = spatial.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            outputs.append((spatial, prefix) if return_prefix_tokens and prefix is not None else spatial)
        if intermediates_only:
            return outputs
        return self.norm(x), outputs

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _square_grid(num_patches: int, key: str) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise RuntimeError(
            f"{key} has {num_patches} patch positions, which is not a square grid; cannot tell its "
            "(height, width) to resample it. Build the model with the checkpoint's img_size."
        )
    return side, side


def checkpoint_filter_fn(state_dict: dict[str, Any], model: Vim) -> dict[str, Tensor]:
    """Convert an official hustvl/Vim checkpoint (or one of ours) to ``model``'s keys and sizes.

    Accepts the official ``{'model': ..., 'model_ema': ..., 'args': ...}`` envelope (the ``model`` weights
    are used), a Lightning checkpoint of our tasks, or a plain state dict. Renames ``layers.`` -> ``blocks.``
    and ``norm_f.`` -> ``norm.``, resamples the position embedding around its middle class-token entry when
    the grid differs, and drops the class token for ``class_token=False`` models. Raises a RuntimeError
    naming every missing, unexpected or mis-shaped key (the head and the input channels of the patch
    projection are left for timm to adapt).
    """
    state_dict = select_state_dict(state_dict, source="Vim checkpoint")
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.", "blocks.", key)
        key = re.sub(r"^norm_f\.", "norm.", key)
        out[key] = value

    if "pos_embed" in out:
        pos_embed = out["pos_embed"]
        prefix = 1 if "cls_token" in out else 0
        if prefix and model.cls_token is None:
            _, pos_embed = take_middle_token(pos_embed)
            del out["cls_token"]
            prefix = 0
        num_patches = pos_embed.shape[1] - prefix
        if num_patches != model.patch_embed.num_patches:
            old_size = _square_grid(num_patches, "pos_embed")
            pos_embed = resample_pos_embed(pos_embed, model.patch_embed.grid_size, old_size, prefix)
        out["pos_embed"] = pos_embed

    _check_converted(model, out)
    return out


def _check_converted(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Raise naming the keys that do not fit, except what timm adapts after the filter.

    timm drops the classifier when ``num_classes`` differs from the checkpoint's and re-weights the patch
    projection for another ``in_chans``; both are checked by the final strict load instead.
    """
    own = model.state_dict()
    checked = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    checked.update({k: v for k, v in own.items() if k.startswith("head.")})
    key = "patch_embed.proj.weight"
    if key in checked and key in own:
        theirs, ours = checked[key].shape, own[key].shape
        if theirs[0] == ours[0] and theirs[2:] == ours[2:]:
            checked[key] = own[key]
    check_state_dict_fits(model, checked, source="Vim checkpoint (after conversion)")


def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> Vim:
    resolve_pretrained_file(pretrained, kwargs, variant)
    out_indices = kwargs.pop("out_indices", default_out_indices(kwargs.get("depth", 24)))
    feature_cfg = dict(out_indices=out_indices, feature_cls="getter")
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    if "feature_cls" in kwargs:
        feature_cfg["feature_cls"] = kwargs.pop("feature_cls")
    if kwargs.get("features_only") and feature_cfg["feature_cls"] == "fx":
        raise ValueError(
            "Vim has no fx feature extraction: a traced graph yields token sequences with the class token, "
            "not feature maps. Use the default feature_cls ('getter'), which returns NCHW maps"
        )
    return build_model_with_cfg(
        Vim,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=True,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2401.09417",
        "paper_name": "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
        "origin_url": "https://github.com/hustvl/Vim",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-tiny-midclstok",
            hf_hub_filename="vim_t_midclstok_76p1acc.pth",
            notes=("ImageNet-1k top-1 76.1 (official README)",),
        ),
        "vim_tiny_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-tiny-midclstok",
            hf_hub_filename="vim_t+_midclstok_ft_78p3acc.pth",
            notes=("ImageNet-1k top-1 78.3 (official README, Vim-tiny+)",),
        ),
        "vim_small_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-small-midclstok",
            hf_hub_filename="vim_s_midclstok_80p5acc.pth",
            notes=("ImageNet-1k top-1 80.5 (official README)",),
        ),
        "vim_small_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-small-midclstok",
            hf_hub_filename="vim_s+_midclstok_ft_81p6acc.pth",
            notes=("ImageNet-1k top-1 81.6 (official README, Vim-small+)",),
        ),
        "vim_base_patch16_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-base-midclstok",
            hf_hub_filename="vim_b_midclstok_81p9acc.pth",
            notes=("ImageNet-1k top-1 81.9 (official README)",),
        ),
    }
)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti (7.15M parameters): width 192, 196 patches + class token at 224x224."""
    model_args = dict(patch_size=16, stride=16, embed_dim=192, depth=24, d_state=16)
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti+ (7.25M): 16x16 patches every 8 pixels, 729 patches + class token at 224x224."""
    model_args = dict(patch_size=16, stride=8, embed_dim=192, depth=24, d_state=16)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S (25.8M): width 384."""
    model_args = dict(patch_size=16, stride=16, embed_dim=384, depth=24, d_state=16)
    return _create_vim("vim_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S+ (26.0M): width 384, stride 8."""
    model_args = dict(patch_size=16, stride=8, embed_dim=384, depth=24, d_state=16)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-B (97.6M): width 768."""
    model_args = dict(patch_size=16, stride=16, embed_dim=768, depth=24, d_state=16)
    return _create_vim("vim_base_patch16_224", pretrained, **dict(model_args, **kwargs))
