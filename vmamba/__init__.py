"""vmamba: Vision Mamba (Vim, VMamba) classification and segmentation on timm, Lightning and fused scans.

Importing ``vmamba`` registers its models with timm, so ``timm.create_model("vim_tiny_patch16_224")``
works afterwards.
"""

__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the models with timm)
