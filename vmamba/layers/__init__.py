"""vmamba.layers."""
from .mamba_mixer import BiMambaMixer  # noqa: F401
from .norm import RMSNorm  # noqa: F401
from .patch_embed import PatchEmbed  # noqa: F401
from .ss2d import SS2D  # noqa: F401
