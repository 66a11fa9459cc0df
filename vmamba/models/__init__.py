"""vmamba.models."""

from .vim import Vim, VimBlock  # noqa: F401  (registers the vim_* models with timm)
from .vmamba import VMamba, VSSBlock  # noqa: F401  (registers the vmamba_* models with timm)
from .vssd import VSSD, VSSDBlock  # noqa: F401  (registers the vssd_* models with timm)
