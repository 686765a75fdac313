"""The MoE Triton kernels compile for real GPU targets on a CPU machine, without spills, within shared memory.

Every configuration the autotuner may pick on a GPU (per launch: its dot precision path and its mode, see
``kernels/tuning.py``) is compiled for sm_90 and sm_80 by Triton's own pipeline and bundled ptxas
(``cpd_fast.kernels.compile_check``) and read back from the cubin. A spill or shared memory over the
target's per-block limit is fixed in the kernel's tile list, never here. Compiling takes seconds per
kernel (bench/README.md has the times), so the compiles run in one process per CPU core and use Triton's
cache: a kernel compiled before, with the same source, options and Triton, is read back, not recompiled.

Also here: the dot precision read from torch's TF32 settings (new and legacy API), which must never raise.
"""

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import cache

import pytest
import torch

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from cpd_fast.kernels import compile_check, moe_grouped, moe_wgrad, tuning

MISSING = compile_check.missing_tools()
needs_tools = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile GPU kernels here: {MISSING}")
TARGETS = {t.name: t for t in compile_check.TARGETS}
KERNELS = {moe_grouped._grouped_rows_kernel: moe_grouped.TILES, moe_wgrad._wgrad_kernel: moe_wgrad.TILES}


@cache
def compiled(target: str) -> dict[str, list[compile_check.Resources]] | Exception:
    """Every launch x autotune config x dtype path for ``target``, compiled once per test session (a
    compile error too: each test of the target reports it without compiling again)."""
    try:
        rows = compile_check.check_all(targets=(TARGETS[target],), jobs=os.cpu_count() or 1, fresh=False)
    except Exception as exc:
        return exc
    out: dict[str, list] = {}
    for row in rows:
        out.setdefault(row.launch, []).append(row)
    return out


@needs_tools
@pytest.mark.parametrize("launch", [launch.name for launch in compile_check.launches()])
@pytest.mark.parametrize("target", list(TARGETS))
def test_autotune_configs_compile_without_spills_within_shared_memory(target, launch):
    result = compiled(target)
    if isinstance(result, Exception):
        raise result
    rows = result[launch]
    spec = next(x for x in compile_check.launches() if x.name == launch)
    assert len(rows) == sum(len(spec.configs(dtype)) for dtype in compile_check.DTYPES)
    assert {r.dtype for r in rows} == set(compile_check.DTYPES)
    problems = [p for r in rows for p in r.problems()]
    assert not problems, "\n".join(problems)


def test_problems_name_spills_shared_memory_and_disagreeing_readers():
    ok = dict(registers=128, stack=0, spill_stores=0, spill_loads=0)
    row = compile_check.Resources(
        "fwd1", TARGETS["sm_80"], "bf16", "64x64x64 w4 s3", 128, 0, 0, 0, 65536, ok, None, None, 1.0
    )
    assert row.problems() == []
    assert row.smem == 65536
    assert "spills" in replace(row, stack=8, ptxas={**ok, "stack": 8, "spill_stores": 8}).problems()[0]
    assert "spills" in replace(row, stack=8, ptxas=None).problems()[0]  # a cached kernel: its stack frame
    assert "shared memory" in replace(row, smem_dynamic=166912, smem_static=1).problems()[0]
    assert "ptxas reports" in replace(row, registers=130).problems()[0]
    assert "Triton reports" in replace(row, triton_regs=128, triton_spills=4).problems()[0]
    assert replace(row, triton_regs=128, triton_spills=0).problems() == []  # on a GPU: agreeing


def test_every_launch_and_path_has_configs_and_every_config_a_path():
    for launch in compile_check.launches():
        every = launch.tiles.configs(interpret=False)
        used = set()
        for dtype in compile_check.DTYPES:
            chosen = launch.configs(dtype)
            assert chosen, (launch.name, dtype)
            used |= {compile_check.config_label(c) for c in chosen}
        assert used <= {compile_check.config_label(c) for c in every}
    for tiles in KERNELS.values():
        assert {len(t) for t in tiles.tensor_core + tiles.ieee} == {len(tiles.names) + 2}
        assert len(tiles.configs(interpret=True)) == 1  # the interpreter's one configuration


def test_autotuners_prune_by_launch_and_key_on_precision():
    """The kernels' autotuners use the same pruning the compile check enumerates, and retune per precision."""
    for kernel, tiles in KERNELS.items():
        assert kernel.early_config_prune == tiles.prune
        assert "PREC" in kernel.keys
    configs = moe_grouped.TILES.configs(interpret=False)
    bwd_h = moe_grouped.TILES.prune(configs, {}, MODE=moe_grouped.BWD_H, PREC="tf32")
    fwd1 = moe_grouped.TILES.prune(configs, {}, MODE=moe_grouped.FWD1, PREC="tf32")
    ieee = moe_grouped.TILES.prune(configs, {}, MODE=moe_grouped.FWD1, PREC="ieee")
    labels = lambda configs: set(map(compile_check.config_label, configs))
    assert labels(bwd_h) < labels(fwd1)  # BWD_H's heavier epilogue rules tiles out
    assert not labels(ieee) & labels(fwd1)


@needs_tools  # the interpreter has no binder
@pytest.mark.parametrize("dtype", list(compile_check.DTYPES))
def test_specialisation_matches_triton_launch_binder(dtype):
    """compile_check's (signature, constexprs, attrs) equal what Triton's binder makes of real arguments."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "i32": torch.int32, "u8": torch.uint8}
    element = compile_check.DTYPES[dtype][0]
    for launch in compile_check.launches():
        fn = launch.kernel.fn
        config = launch.configs(dtype)[0]
        args = []
        for p in fn.params:
            if p.is_constexpr:
                continue
            if p.name.endswith("_ptr"):
                kind = launch.pointers.get(p.name, "i32")
                args.append(torch.empty(64, dtype=torch_dtype[element if kind == "act" else kind]))
            else:
                args.append(launch.ints[p.name])
        kwargs = {**launch.flags, "PREC": compile_check.DTYPES[dtype][1], **config.kwargs}
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        ours_sig, ours_const, ours_attrs = compile_check.specialise(launch, dtype)
        ours_const = {(fn.arg_names.index(k),): v for k, v in {**ours_const, **config.kwargs}.items()}
        assert signature == ours_sig, launch.name
        assert constexprs == ours_const, launch.name
        assert {k: v for k, v in attrs.items() if v} == ours_attrs, launch.name


# ------------------------------------------------------------------ dot precision from torch's settings


class _Matmul:
    """A stand-in for ``torch.backends.cuda.matmul`` with either API, the legacy one possibly raising."""

    def __init__(self, fp32_precision=None, allow_tf32=None, legacy_raises=False):
        self._new, self._old, self._raises = fp32_precision, allow_tf32, legacy_raises

    def __getattr__(self, name):
        if name == "fp32_precision" and self._new is not None:
            return self._new
        if name == "allow_tf32" and self._old is not None:
            if self._raises:
                raise RuntimeError("you have used mix of the legacy and new APIs to set the TF32 status")
            return self._old
        raise AttributeError(name)


@pytest.mark.parametrize(
    "matmul, tf32",
    [
        (_Matmul("tf32", False, legacy_raises=True), True),  # new API set: the legacy read would raise
        (_Matmul("ieee", True, legacy_raises=True), False),
        (_Matmul("none", True), True),  # nothing set through the new API: the legacy flag decides
        (_Matmul("none", False), False),
        (_Matmul("none", True, legacy_raises=True), False),  # both unreadable: IEEE, no raise
        (_Matmul(None, True), True),  # torch before the new API
        (_Matmul(None, False), False),
        (_Matmul(None, None), False),
    ],
)
def test_dot_precision_reads_new_api_then_legacy_without_raising(monkeypatch, matmul, tf32):
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    assert tuning.torch_allows_tf32() is tf32
    assert tuning.dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
    assert tuning.dot_precision(torch.bfloat16) == "tf32"  # not fp32: tensor cores, PREC unused


def test_dot_precision_with_this_torch_in_every_setting():
    """The real torch, each setting in a fresh process (they are global), the mixed one included."""
    script = textwrap.dedent(
        """
        import sys, torch
        from cpd_fast.kernels.tuning import dot_precision
        m = torch.backends.cuda.matmul
        setting = sys.argv[1]
        if setting == "legacy-on":
            m.allow_tf32 = True
        elif setting == "new-tf32":
            m.fp32_precision = "tf32"
        elif setting == "global-tf32":
            torch.backends.fp32_precision = "tf32"
        elif setting == "legacy-then-new-ieee":
            m.allow_tf32 = True
            m.fp32_precision = "ieee"
        print(dot_precision(torch.float32))
        """
    )
    has_new = hasattr(torch.backends, "fp32_precision")
    cases = {"default": "ieee", "legacy-on": "tf32"}
    if has_new:
        cases |= {"new-tf32": "tf32", "global-tf32": "tf32", "legacy-then-new-ieee": "ieee"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for setting, expected in cases.items():
        proc = subprocess.run(
            [sys.executable, "-c", script, setting], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.stdout.strip().splitlines()[-1:] == [expected], (
            setting,
            proc.stdout,
            proc.stderr[-2000:],
        )
