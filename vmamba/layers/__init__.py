"""vmamba.layers."""

from .mamba_mixer import BiMambaMixer, share_mixer_buffers  # noqa: F401
from .nc_ssd import NCSSD  # noqa: F401
from .norm import RMSNorm, add_rms_norm, rms_norm  # noqa: F401
from .patch_embed import PatchEmbed  # noqa: F401
from .ss2d import SS2D  # noqa: F401
from .ssm_init import init_a_log_, init_dt_bias_, init_dt_weight_  # noqa: F401
