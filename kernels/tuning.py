"""Which autotune configurations and which ``tl.dot`` input precision the MoE kernels use.

``tl.dot`` runs bf16 and TF32 inputs on tensor cores and IEEE fp32 on the FMA units; the FMA path holds
its operand slices in registers, so it needs other tiles. Each kernel has one tile list per path
(:class:`Tiles`): its autotuner gets both, keeps the launch's path with ``early_config_prune`` and has
``PREC`` in its key. Under the Triton interpreter (slow per program) there is one configuration.
Every tile of a list compiles for sm_90 and sm_80 without spills and within shared memory
(``kernels/compile_check.py``, ``tests/test_triton_compile.py``; the table is in bench/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def torch_allows_tf32() -> bool:
    """Whether torch's CUDA fp32 matmuls may use TF32, read without raising on any torch version.

    The precision API (``torch.backends.cuda.matmul.fp32_precision``: ``"ieee"``, ``"tf32"``, or
    ``"none"`` when nothing is set; it resolves the global ``torch.backends.fp32_precision``) is read
    first. The legacy ``allow_tf32`` raises on newer torch once the new API has set a value, so it is only
    the fallback (torch without the new API, or ``"none"``), and a raise there counts as IEEE.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except (AttributeError, RuntimeError):  # torch before the precision API
        precision = None
    if precision in ("ieee", "tf32"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except (AttributeError, RuntimeError):
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision matching torch's matmul: TF32 for fp32 only where torch allows it."""
    if dtype == torch.float32 and not torch_allows_tf32():
        return "ieee"
    return "tf32"


Tile = tuple[int, ...]  # (*block sizes in the order of Tiles.names, warps, stages)


@dataclass(frozen=True)
class Tiles:
    """A kernel's autotune tiles per dot path, and the tiles a launch's flags rule out."""

    names: tuple[str, ...]  # the block-size constexprs
    tensor_core: tuple[Tile, ...]  # bf16, and fp32 with TF32 dots
    ieee: tuple[Tile, ...]  # fp32 with IEEE dots
    interpret: tuple[int, ...]  # block sizes of the one interpreter configuration
    skip: dict[tuple[str, object], tuple[Tile, ...]] = field(default_factory=dict)  # (flag, value) -> tiles

    def configs(self, interpret: bool = INTERPRET) -> list[triton.Config]:
        """The autotuner's list: every path's tiles (each once), or the interpreter's one configuration."""
        if interpret:
            return [triton.Config(dict(zip(self.names, self.interpret, strict=True)))]
        tiles = dict.fromkeys(self.tensor_core + self.ieee)  # each once, in order
        return [self._config(tile) for tile in tiles]

    def _config(self, tile: Tile) -> triton.Config:
        blocks = dict(zip(self.names, tile[:-2], strict=True))
        return triton.Config(blocks, num_warps=tile[-2], num_stages=tile[-1])

    def for_launch(self, configs: list[triton.Config], flags: dict) -> list[triton.Config]:
        """The configurations the autotuner may pick for a launch with these constexpr ``flags`` (PREC...)."""
        if len(configs) == 1:  # the interpreter's (the autotuner does not prune a single configuration)
            return list(configs)
        allowed = set(self.ieee if flags["PREC"] == "ieee" else self.tensor_core)
        for (flag, value), tiles in self.skip.items():
            if flags.get(flag) == value:
                allowed -= set(tiles)
        return [c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in allowed]

    def prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """``early_config_prune`` for ``triton.autotune``: ``kwargs`` are the launch's keyword arguments."""
        return self.for_launch(configs, kwargs)
