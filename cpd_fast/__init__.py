"""cpd_fast: continual policy distillation from distributed RL teachers (arXiv 2601.22475)."""

from cpd_fast._ext import load as _load_extension

__version__ = "0.1.0"

_load_extension()  # registers torch.ops.cpd_fast.*

from cpd_fast.dpp import greedy_map, greedy_map_from_kernel  # noqa: E402
from cpd_fast.moe import MoELayer  # noqa: E402

__all__ = ["MoELayer", "__version__", "greedy_map", "greedy_map_from_kernel"]
