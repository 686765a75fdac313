"""Compile the MoE Triton kernels for GPU targets on a machine without a GPU, and read their resources.

``triton.compile`` runs the whole pipeline (Triton IR, PTX, ptxas, cubin) for a ``GPUTarget`` wherever
Triton's bundled ptxas runs. :func:`launches` lists the kernel launches the experts make (as
``TritonExperts`` issues them: forward FWD1/FWD2, input gradient BWD_H/BWD_X, weight gradients dW2/dW1);
each is compiled for every configuration of its kernel's GPU autotune list, for each dtype path (fp32
with IEEE dots, the default, or TF32 dots where torch allows TF32; bf16) and target (sm_90, sm_80).
Arguments are specialised as Triton's launch binder does for model widths that are multiples of 16:
ints equal to 1 become constants, other specialised ints that are multiples of 16, and every pointer,
carry the divisibility hint, so the code is the code a GPU launch compiles.

Three readers, cross-checked: ptxas's own report (Triton's ptxas call, its log captured: registers,
stack frame, spill stores and loads), ``cuobjdump --dump-resource-usage`` on the cubin (registers,
stack, static shared memory, local memory), and Triton's metadata (the dynamic shared memory a launch
requests; ``n_regs``/``n_spills`` are filled when a driver loads the kernel, so only on a GPU).

``python bench/triton_resources.py`` prints the table (see bench/README.md);
tests/test_triton_compile.py fails on a compile error, a spill or shared memory over the limit.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from . import moe_grouped, moe_wgrad
from .moe_grouped import ACTIVATIONS, BWD_H, BWD_X, FWD1, FWD2
from .tuning import INTERPRET, Tiles


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_limit: int  # bytes of shared memory one block may use (the opt-in maximum)


TARGETS = (Target("sm_90", 90, 232448), Target("sm_80", 80, 166912))

# dtype path -> (element type of activations and weights, tl.dot input precision: tuning.dot_precision's)
DTYPES = {"fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32"), "bf16": ("bf16", "tf32")}


@dataclass(frozen=True)
class Launch:
    """One way the experts launch a kernel: its flags, pointer element types and int arguments.

    ``pointers`` maps the pointers the launch reads or writes to an element type (``"act"``: the dtype
    path's); the others are placeholders (the wrapper passes the int32 ``offs`` there). ``ints`` are the
    launch's int arguments for the model shape.
    """

    name: str
    kernel: Any  # the autotuned kernel (``triton.runtime.Autotuner``)
    tiles: Tiles
    pointers: dict[str, str]
    ints: dict[str, int]
    flags: dict[str, Any] = field(default_factory=dict)

    def configs(self, dtype: str) -> list[triton.Config]:
        """The configurations the autotuner may pick on a GPU for this launch in dtype path ``dtype``."""
        return self.tiles.for_launch(
            self.tiles.configs(interpret=False), {**self.flags, "PREC": DTYPES[dtype][1]}
        )


def launches(d_model: int = 256, d_hidden: int = 1024, experts: int = 8, rows: int = 4096) -> list[Launch]:
    """The six launches of one MoE layer's forward and backward, for model width d and expert hidden h."""
    d, h = d_model, d_hidden
    rows_kernel, wgrad_kernel = moe_grouped._grouped_rows_kernel, moe_wgrad._wgrad_kernel
    act = "act"

    def rows_launch(name, mode, gather, bias, pointers, k, n, s_bk, s_bn):
        ints = dict(E=experts, M=rows, K=k, N=n, stride_am=k, stride_be=d * h, stride_bk=s_bk, stride_bn=s_bn)
        flags = dict(MODE=mode, ACT=ACTIVATIONS["gelu"], GATHER_A=gather, HAS_BIAS=bias)
        pointers = {"a_ptr": act, "b_ptr": act, "out_ptr": act, "offs_ptr": "i32", **pointers}
        return Launch(name, rows_kernel, moe_grouped.TILES, pointers, ints, flags)

    def wgrad_launch(name, p, q, pointers, gather_a, scale_a, gather_b):
        ints = dict(E=experts, P=p, Q=q, stride_a=p, stride_b=q)
        flags = dict(GATHER_A=gather_a, SCALE_A=scale_a, GATHER_B=gather_b, HAS_BIAS=True)
        pointers = {"a_ptr": act, "b_ptr": act, "dw_ptr": act, "db_ptr": act, "frozen_ptr": "u8",
                    "offs_ptr": "i32", **pointers}  # fmt: skip
        return Launch(name, wgrad_kernel, moe_wgrad.TILES, pointers, ints, flags)

    fwd1 = {"a_idx_ptr": "i32", "bias_ptr": act, "out2_ptr": act}
    fwd2 = {"bias_ptr": act, "p_ptr": act, "out_row_ptr": "i32"}
    bwd_h = {"a_idx_ptr": "i32", "p_ptr": act, "z_ptr": act, "h_ptr": act, "dp_ptr": "fp32"}
    return [
        # forward: x[tok] @ w1[e].T (+b1, act) and H @ w2[e].T (+b2, gate weight, scatter)
        rows_launch("fwd1", FWD1, True, True, fwd1, d, h, 1, d),
        rows_launch("fwd2", FWD2, False, True, fwd2, h, d, 1, h),
        # input gradient: dY[tok] @ w2[e] (dZ, gate gradient), then dZ @ w1[e] scattered
        rows_launch("bwd_h", BWD_H, True, False, bwd_h, d, h, h, 1),
        rows_launch("bwd_x", BWD_X, False, False, {"out_row_ptr": "i32"}, h, d, d, 1),
        # weight gradients: dW2 = (p dY[tok]).T H, dW1 = dZ.T x[tok]
        wgrad_launch("wgrad2", d, h, {"a_idx_ptr": "i32", "scale_ptr": act}, True, True, False),
        wgrad_launch("wgrad1", h, d, {"b_idx_ptr": "i32"}, False, False, True),
    ]


def specialise(launch: Launch, dtype: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as Triton's binder derives them at launch."""
    element, precision = DTYPES[dtype]
    fn = launch.kernel.fn
    signature, constexprs, attrs = {}, {"PREC": precision, **launch.flags}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = launch.pointers.get(name, "i32")
            signature[name] = "*" + (element if kind == "act" else kind)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            value = launch.ints[name]
            if not param.do_not_specialize and value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if not param.do_not_specialize and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel uses per thread (registers, spills in bytes) and per block (shared)."""

    launch: str
    target: Target
    dtype: str
    config: str
    registers: int  # cuobjdump's reading of the cubin
    stack: int
    local: int
    smem_static: int  # the cubin's own shared memory
    smem_dynamic: int  # Triton's metadata: what the launch requests
    ptxas: (
        dict[str, int] | None
    )  # ptxas's report (registers, stack, spill_stores, spill_loads); None if cached
    triton_regs: int | None  # Triton's metadata (driver-filled: None without a GPU)
    triton_spills: int | None
    seconds: float

    @property
    def smem(self) -> int:
        return self.smem_dynamic + self.smem_static

    def problems(self) -> list[str]:
        """Why this configuration must not be in the autotune list (empty when it may be)."""
        where = f"{self.launch} {self.target.name} {self.dtype} {self.config}"
        out = []
        spills = self.ptxas and (self.ptxas["spill_stores"], self.ptxas["spill_loads"])
        if self.stack or self.local or (spills and any(spills)):
            out.append(f"{where}: spills ({self.stack} B stack frame, ptxas: {spills} B stored/loaded)")
        if self.smem > self.target.smem_limit:
            out.append(f"{where}: {self.smem} B shared memory > {self.target.smem_limit} B per block")
        if self.ptxas and (self.ptxas["registers"], self.ptxas["stack"]) != (self.registers, self.stack):
            cubin = f"{self.registers} registers, {self.stack} B stack"
            out.append(f"{where}: ptxas reports {self.ptxas}, the cubin {cubin}")
        if (self.triton_regs, self.triton_spills) not in ((None, None), (self.registers, 0)):
            out.append(f"{where}: Triton reports {self.triton_regs} registers, {self.triton_spills} spills")
        return out


def config_label(config: triton.Config) -> str:
    """``128x128x64 w8 s3``: the tile sizes in kernel order, warps, pipeline stages."""
    tiles = "x".join(str(v) for v in config.kwargs.values())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def compile_one(
    launch: Launch, config: triton.Config, dtype: str, target: Target, fresh: bool = True
) -> Resources:
    """Compile ``launch`` with ``config`` for ``target`` and read its resources; raises on a compile error.

    ``fresh``: compile even where Triton's cache has the kernel, so that ptxas runs and reports spill bytes
    (otherwise a cached kernel's spills are read from its cubin's stack frame alone).
    """
    signature, constexprs, attrs = specialise(launch, dtype)
    source = ASTSource(launch.kernel.fn, signature, {**constexprs, **config.kwargs}, attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, num_ctas=config.num_ctas)
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    name, log, start = launch.kernel.fn.__name__, io.StringIO(), time.perf_counter()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = fresh
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(source, target=GPUTarget("cuda", target.capability, 32), options=options)
    except Exception as exc:  # name the combination: Triton's message names only the source line
        raise RuntimeError(
            f"{launch.name} {target.name} {dtype} {config_label(config)} does not compile"
        ) from exc
    seconds = time.perf_counter() - start
    cubin = cubin_usage(kernel.asm["cubin"], name)
    ptxas = ptxas_report(log.getvalue(), name) if fresh or log.getvalue() else None
    return Resources(
        launch.name, target, dtype, config_label(config), cubin["REG"], cubin["STACK"], cubin["LOCAL"],
        cubin["SHARED"], kernel.metadata.shared, ptxas,
        getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None), seconds,
    )  # fmt: skip


def ptxas_report(log: str, name: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from ptxas's ``-v`` log of one kernel."""
    block = log.split(f"Function properties for {name}", 1)[-1]
    registers = re.search(r"Used (\d+) registers", block)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    if name not in log or not (registers and frame):
        raise RuntimeError(f"no ptxas report for {name} in the captured log: {log[-2000:]!r}")
    stack, stores, loads = (int(v) for v in frame.groups())
    return dict(registers=int(registers.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


def cubin_usage(cubin: bytes, name: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of one kernel: REG, STACK, SHARED, LOCAL (bytes but REG)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    line = out.split(f"Function {name}:", 1)[-1]
    usage = {key: re.search(rf"\b{key}:(\d+)", line) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    if not all(usage.values()):
        raise RuntimeError(f"cuobjdump printed no resource usage for {name}: {out[-2000:]!r}")
    return {key: int(m.group(1)) for key, m in usage.items()}


def missing_tools() -> str | None:
    """Why the kernels cannot be compiled here (None if they can): the interpreter, or no ptxas/cuobjdump."""
    if INTERPRET:
        return "TRITON_INTERPRET=1: the kernels are interpreted functions, nothing to compile"
    try:  # Triton raises "Cannot find <tool>" when neither its bundled copy nor TRITON_*_PATH exists
        tools = [get_ptxas(target.capability).path for target in TARGETS] + [knobs.nvidia.cuobjdump.path]
    except RuntimeError as exc:
        return f"Triton's CUDA tools are absent: {exc}"
    return None if all(tools) else "Triton's CUDA tools are absent"


def _job(
    launch_name: str, tile_index: int, dtype: str, target: Target, shape: dict, fresh: bool
) -> Resources:
    launch = next(x for x in launches(**shape) if x.name == launch_name)
    return compile_one(launch, launch.configs(dtype)[tile_index], dtype, target, fresh)


def check_all(
    names: tuple[str, ...] | None = None,
    dtypes: tuple[str, ...] = tuple(DTYPES),
    targets: tuple[Target, ...] = TARGETS,
    jobs: int = 1,
    fresh: bool = True,
    **shape: int,
) -> list[Resources]:
    """Every launch (or those in ``names``) x its configs x dtype path x target, compiled in ``jobs``
    processes; resources in that order. Raises on the first compile error."""
    work = [
        (launch.name, i, dtype, target, shape, fresh)
        for launch in launches(**shape)
        if names is None or launch.name in names
        for target in targets
        for dtype in dtypes
        for i in range(len(launch.configs(dtype)))
    ]
    if jobs <= 1:
        return [_job(*args) for args in work]
    # spawn: a forked child would inherit Triton's and torch's threads mid-state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_job, *zip(*work, strict=True)))
