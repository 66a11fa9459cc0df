"""Patch embedding with a stride that may differ from the patch size."""

from __future__ import annotations

from timm.layers import to_2tuple
from timm.models import register_notrace_function
from torch import Tensor, nn

__all__ = ["PatchEmbed", "check_image_size"]


@register_notrace_function  # a leaf for torch.fx: the check runs on real sizes in the traced module too
def check_image_size(
    x: Tensor, img_size: tuple[int, int], patch_size: tuple[int, int], strict: bool
) -> Tensor:
    """Return the image ``x`` (B, C, H, W) unchanged, or raise ValueError when its size does not fit.

    ``strict``: H, W must equal ``img_size``; always: H, W must be at least ``patch_size``. Written so
    that TorchScript compiles it and torch.fx keeps it as one call (returning ``x`` keeps it in the graph).
    """
    height, width = x.shape[-2], x.shape[-1]
    if strict and (height != img_size[0] or width != img_size[1]):
        raise ValueError(
            f"input size ({height}, {width}) does not match the model's img_size ({img_size[0]}, "
            f"{img_size[1]}); build the model with dynamic_img_size=True to accept other sizes, or with "
            "img_size=..."
        )
    if height < patch_size[0] or width < patch_size[1]:
        raise ValueError(
            f"input size ({height}, {width}) is smaller than the patch size ({patch_size[0]}, "
            f"{patch_size[1]}); use a larger image"
        )
    return x


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> grid of patch embeddings (B, H', W', D) through one strided convolution.

    Unlike timm's ``PatchEmbed`` the stride is a separate argument: Vim's long-sequence "+" models cut 16x16
    patches every 8 pixels. The grid has ``(H - patch) // stride + 1`` rows (likewise for columns).

    Args:
        img_size: the input size the position embedding is built for.
        patch_size: kernel size of the projection.
        stride: step between patches (default: ``patch_size``, non-overlapping patches).
        in_chans: input channels.
        embed_dim: output channels.
        strict_img_size: reject inputs whose size differs from ``img_size``.
        bias: give the projection a bias.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
        strict_img_size: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride if stride is not None else patch_size)
        self.strict_img_size = strict_img_size
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            stride=self.stride,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Input pixels per output token along each axis (the stride)."""
        return max(self.stride) if as_scalar else self.stride

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Grid size (rows, cols) of the output for an input of ``img_size`` (height, width)."""
        height, width = img_size
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise ValueError(
                f"input size {(height, width)} is smaller than the patch size {self.patch_size}; "
                "use a larger image"
            )
        return (
            (height - self.patch_size[0]) // self.stride[0] + 1,
            (width - self.patch_size[1]) // self.stride[1] + 1,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = check_image_size(x, self.img_size, self.patch_size, self.strict_img_size)
        return self.proj(x).permute(0, 2, 3, 1)
