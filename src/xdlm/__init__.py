"""xdlm: discrete diffusion language models with the XDLM mixed kernel (arXiv 2602.01362)."""

from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule, make_schedule

__version__ = "0.1.0"
__all__ = ["MixedKernel", "Schedule", "make_schedule", "__version__"]
