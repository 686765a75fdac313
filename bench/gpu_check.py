"""One command for a GPU machine: build, GPU tests, MoE and DPP benches, recompiles on growth, student steps.

    python bench/gpu_check.py --out $OUT     # on a CUDA machine, from the repository root (< 8 min, H100)
    python bench/gpu_check.py --dry-run      # anywhere: CPU, tiny sizes, Triton interpreter, no build/tests

Needs torch (and Triton for the MoE kernels), nothing of the RL stack: neither gymnasium, Meta-World,
envpool, Minari nor pydantic. Sections, each timed and capped; one that fails is recorded and the rest
still run, and the results are written after every section:

* ``build``: ``python setup.py build_ext --inplace`` with ``TORCH_CUDA_ARCH_LIST`` set to the GPU's
  architecture (unless set); the repository's ``kernels/`` is then mapped to ``cpd_fast.kernels`` as
  ``setup.py`` does for an install.
* ``gpu_tests``: ``pytest -m gpu`` over the test files with a ``gpu`` mark; a file that cannot be collected
  for a missing RL-stack module is counted apart (``needs_rl_stack``), not as a failure.
* ``moe``: forward + backward of the MoE layer at paper scale (d 256, h 1024, E 5 and 25, top-2, 4k-64k
  tokens, bf16 and fp32) and at the Mixtral shape (d 4096, h 14336, E 8, top-2, 16k tokens, bf16): the
  Triton backend against the per-expert loop, the torch backend and ``F.grouped_mm`` where it runs
  (``bench/bench_moe.py``'s methods), TFLOP/s of the expert GEMMs and their share of a bf16 dense-matmul
  peak measured in the same call.
* ``dpp``: the CUDA greedy DPP against the same algorithm in eager PyTorch on the GPU (N 10k/100k/1M,
  k 1000, rbf, D 64) and the bound: the bytes it reads over the copy bandwidth measured in the same call.
* ``kernel_count``: compiled Triton kernels (the JIT caches of ``cpd_fast.kernels``) before and after 20
  ``add_experts``, each followed by a forward + backward: growth must not compile anything.
* ``student``: one distillation training step (``Student.losses``, backward, fused AdamW) of the default
  student and of the mt25-plus student, grown to MT25's 25 experts, on a synthetic MT25-shaped batch
  (256 windows of 8 x 39 observations, 4 actions), float32 and bf16 autocast. The configs are built as
  ``StudentConfig`` directly: the preset path (``cpd_fast.pipeline``, ``DistillConfig``) needs pydantic;
  ``tests/test_gpu_check.py`` checks they equal what the presets resolve to.

Writes ``gpu_check.json``, ``gpu_check.md``, ``build.log`` and ``pytest.log`` under ``--out`` (default
``$OUT``, else ``runs/gpu_check``). ``--dry-run`` runs every section's code on the CPU with tiny sizes and
the Triton interpreter, skips the build and only collects the GPU tests (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("build", "gpu_tests", "moe", "dpp", "kernel_count", "student")
# seconds each section may take at most (its rows stop early; a hard stop GRACE_S after): 445 in all
CAPS = {"build": 120, "gpu_tests": 140, "moe": 95, "dpp": 40, "kernel_count": 20, "student": 30}
GRACE_S = 20
# the pipeline's dependencies (the [rl] extra): none of them is needed here, and the device image lacks most
RL_STACK = ("gymnasium", "metaworld", "envpool", "minari", "pydantic", "h5py", "tensorboard", "matplotlib")
RL_STACK += ("yaml", "rich", "tqdm", "mujoco", "ray")
MT25 = {"tasks": 25, "obs_dim": 39, "act_dim": 4, "history": 8}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and repetitions: the full check on a GPU, or the dry run's tiny ones on the CPU."""

    device: str
    peak_n: int  # n of the n x n x n bf16 matmul timed as the peak
    moe_paper: tuple  # ((d, h), experts, tokens, dtype names)
    moe_llm: tuple  # (d, h, E, tokens, dtype name)
    moe_iters: int
    llm_iters: int
    warmup: int  # untimed calls before each timing (the first one autotunes)
    copy_bytes: int  # of the tensor copied to measure the copy bandwidth
    dpp_sizes: tuple  # (N, k) pairs
    dpp_repeats: int
    count_shape: tuple  # (d, h, E, tokens)
    growth: int  # add_experts calls
    student_batch: int
    student_iters: int


FULL = Plan(
    device="cuda",
    peak_n=8192,
    moe_paper=((256, 1024), (5, 25), (4096, 16384, 65536), ("bfloat16", "float32")),
    moe_llm=(4096, 14336, 8, 16384, "bfloat16"),
    moe_iters=10,
    llm_iters=3,
    warmup=2,
    copy_bytes=1 << 30,
    dpp_sizes=((10_000, 1000), (100_000, 1000), (1_000_000, 1000)),
    dpp_repeats=3,
    count_shape=(256, 1024, 5, 4096),
    growth=20,
    student_batch=256,
    student_iters=10,
)
DRY = dataclasses.replace(
    FULL,
    device="cpu",
    peak_n=256,
    moe_paper=((32, 64), (2,), (64,), ("float32", "bfloat16")),
    moe_llm=(32, 64, 4, 64, "bfloat16"),
    moe_iters=1,
    llm_iters=1,
    warmup=1,
    copy_bytes=1 << 24,
    dpp_sizes=((300, 10), (1000, 20)),
    dpp_repeats=2,
    count_shape=(16, 32, 3, 32),
    growth=3,
    student_batch=8,
    student_iters=2,
)


class SectionTimeout(BaseException):
    """Raised by the alarm at a section's hard limit (a BaseException: row-level handlers let it through)."""


class Check:
    """The run: plan, output folder, time budget, the results so far (written after every section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry_run, self.plan = args.dry_run, DRY if args.dry_run else FULL
        self.out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0, self.budget = time.monotonic(), args.budget
        self.deadline = self.t0 + args.budget
        self.results: dict = {
            "meta": {
                "argv": sys.argv[1:],
                "dry_run": self.dry_run,
                "budget_s": args.budget,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            },
            "sections": {},
        }

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        """Seconds left to the current section (its cap or the total budget, whichever ends first)."""
        return self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        return self.left() < reserve

    def write(self) -> None:
        self.results["meta"]["wall_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(markdown(self.results))


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(check: Check, name: str, fn) -> None:
    rec: dict = {"status": "ok"}
    check.results["sections"][name] = rec
    start = time.monotonic()
    total_end = check.t0 + check.budget
    if total_end - start < 5:
        rec.update(status="skipped", reason="total time budget spent")
    else:
        check.deadline = min(start + CAPS[name], total_end)
        check.log(f"== {name} (up to {check.deadline - start:.0f} s)")
        try:
            with hard_limit(check.deadline - start + GRACE_S):
                fn(check, rec)
        except SectionTimeout:
            rec.update(status="timeout", error=f"stopped at its hard limit ({CAPS[name]} s + {GRACE_S} s)")
        except Exception as err:  # recorded; the other sections still run
            rec.update(
                status="error",
                error=f"{type(err).__name__}: {err}"[:2000],
                traceback=traceback.format_exc()[-4000:],
            )
        finally:
            check.deadline = total_end
    rec["seconds"] = round(time.monotonic() - start, 2)
    check.log(
        f"   {name}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['error']})" if "error" in rec else "")
    )
    check.write()


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """Run ``cmd`` in the repository root with its output in ``log``; its exit status (124 on timeout)."""
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1)
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return 124


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny dry-run figures stay non-zero)."""
    return float(f"{x:.{digits}g}")


def tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


# ----------------------------------------------------------------------------- build and package


def section_build(check: Check, rec: dict) -> None:
    import torch

    if check.dry_run:
        rec.update(status="skipped", reason="dry run")
        return
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "{}.{}".format(*torch.cuda.get_device_capability())
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    start = time.monotonic()
    rc = run_logged(
        [sys.executable, "setup.py", "build_ext", "--inplace"], check.out / "build.log", check.left(), env
    )
    rec.update(command=f"TORCH_CUDA_ARCH_LIST={arch} python setup.py build_ext --inplace", exit_code=rc,
               build_s=round(time.monotonic() - start, 1))  # fmt: skip
    if rc != 0:
        rec.update(status="error", error=f"build exited {rc}", log_tail=tail(check.out / "build.log"))
        return
    probe = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from cpd_fast import _ext; "
    probe += "print(_ext.has_cuda_kernels())"
    said = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    rec["extension_has_cuda"] = said.stdout.strip() == "True"
    if not rec["extension_has_cuda"]:
        rec.update(
            status="error", error=f"built without its CUDA kernels: {said.stdout[-200:]}{said.stderr[-300:]}"
        )


def use_source_tree() -> dict:
    """Import ``cpd_fast`` from this repository, with ``kernels/`` as ``cpd_fast.kernels`` (setup.py's
    ``package_dir``) when it is imported from the source tree rather than installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import cpd_fast
    from cpd_fast import _ext

    info = {
        "cpd_fast": os.path.dirname(cpd_fast.__file__),
        "extension": _ext.load().__file__,
        "extension_has_cuda": _ext.has_cuda_kernels(),
    }
    if (
        Path(cpd_fast.__file__).resolve().parent == ROOT / "cpd_fast"
        and "cpd_fast.kernels" not in sys.modules
    ):
        spec = importlib.util.spec_from_file_location(
            "cpd_fast.kernels",
            ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["cpd_fast.kernels"] = module
        spec.loader.exec_module(module)
        cpd_fast.kernels = module
    kernels = sys.modules.get("cpd_fast.kernels")
    info["kernels"] = os.path.dirname(kernels.__file__) if kernels else None
    return info


def pytest_child(args: list[str]) -> int:
    """``gpu_check.py --pytest-child -- ARGS``: pytest on this source tree (see :func:`use_source_tree`)."""
    use_source_tree()
    import pytest

    return pytest.main(args)


# ----------------------------------------------------------------------------- GPU tests


def gpu_test_files() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )


def parse_junit(path: Path) -> dict:
    """Counts from pytest's JUnit XML; collection failures for a missing RL-stack module counted apart."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "needs_rl_stack": []}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}".strip(":")
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        if not kinds:
            out["passed"] += 1
            continue
        node = case.find(kinds[0])
        text = f"{node.get('message', '')}\n{node.text or ''}"
        missing = re.search(r"No module named '([\w.]+)'", text)
        if kinds[0] == "error" and missing and missing.group(1).split(".")[0] in RL_STACK:
            out["needs_rl_stack"].append(f"{name} ({missing.group(1)})")
        elif kinds[0] == "skipped":
            out["skipped"] += 1
        else:
            out["failed" if kinds[0] == "failure" else "errors"] += 1
            out["failures"].append(f"{name}: {node.get('message', '')[:300]}")
    return out


def parse_verbose_log(log: str) -> dict:
    """Counts from ``pytest -v``'s lines, for a run stopped before it wrote its JUnit XML."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "needs_rl_stack": []}
    for name, outcome in re.findall(
        r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, re.M
    ):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(
            outcome, "skipped"
        )
        out[key] += 1
        if key in ("failed", "errors"):
            out["failures"].append(f"{name}: {outcome}")
    return out


def section_gpu_tests(check: Check, rec: dict) -> None:
    files = gpu_test_files()
    junit = check.out / "pytest-junit.xml"
    junit.unlink(missing_ok=True)
    args = "-m gpu -v -p no:cacheprovider -p no:hypothesispytest --continue-on-collection-errors".split()
    args += [f"--junitxml={junit}", *files]
    if check.dry_run:
        args.insert(0, "--collect-only")
    rc = run_logged(
        [sys.executable, __file__, "--pytest-child", "--", *args], check.out / "pytest.log", check.left()
    )
    log = tail(check.out / "pytest.log", 1_000_000)
    counts = parse_junit(junit) if junit.exists() else parse_verbose_log(log)  # no XML: pytest was killed
    rec.update(files=files, mode="collect-only" if check.dry_run else "run", exit_code=rc, **counts)
    junit.unlink(missing_ok=True)
    if check.dry_run:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", log)
        rec["collected"] = int(m.group(1)) if m else 0
    ok = rc == 0 and not rec["failures"] and (rec["passed"] or rec.get("collected"))
    if not ok:
        counts = ", ".join(f"{rec[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        rec.update(status="failed" if rc in (0, 1) else "error", error=f"pytest exit {rc}: {counts}",
                   log_tail=log[-3000:])  # fmt: skip


# ----------------------------------------------------------------------------- MoE


def moe_shapes(plan: Plan) -> list[tuple]:
    (d, h), experts, tokens, dtypes = plan.moe_paper
    shapes = [("paper", d, h, e, n, dt) for dt in dtypes for n in tokens for e in experts]
    d, h, e, n, dt = plan.moe_llm
    # the Mixtral shape goes third: after bf16 4k/16k of the paper, before the fp32 and 64k rows
    shapes.insert(min(4, len(shapes)), ("mixtral", d, h, e, n, dt))
    return shapes


def section_moe(check: Check, rec: dict) -> None:
    import bench_moe  # sibling script: make_step, timeit, grouped_mm_works, matmul_peak_tflops
    import torch
    import torch.nn.functional as F

    device = torch.device(check.plan.device)
    peak = bench_moe.matmul_peak_tflops(device, n=check.plan.peak_n)
    rec.update(
        peak_bf16_tflops=sig(peak),
        peak_matmul=f"bf16 {check.plan.peak_n}^3 mm",
        has_F_grouped_mm=hasattr(F, "grouped_mm"),
        has_torch_grouped_mm=hasattr(torch, "_grouped_mm"),
        rows=[],
        skipped=[],
        errors=[],
    )
    check.log(f"   bf16 matmul peak {peak:.1f} TFLOP/s")
    for shape in moe_shapes(check.plan):
        if check.out_of_time(reserve=5):
            rec["skipped"].append("{} d{} h{} E{} n{} {}".format(*shape))
            continue
        moe_rows(check, rec, shape, peak, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rec["skipped"]:
        rec["note"] = f"{len(rec['skipped'])} shapes skipped: time budget"


def moe_rows(check: Check, rec: dict, shape: tuple, peak: float, device) -> None:
    import bench_moe
    import torch

    from cpd_fast.moe import MoELayer

    label, d, h, E, n, dtname = shape
    dtype, k = getattr(torch, dtname), 2
    torch.manual_seed(0)
    layer = MoELayer(d, h, E, top_k=k, device=device, dtype=dtype)
    layer.check_finite = False
    x = torch.randn(n, d, device=device, dtype=dtype)
    methods = [
        "loop",
        "torch",
        *(["grouped_mm"] if bench_moe.grouped_mm_works(device, dtype) else []),
        "triton",
    ]
    iters = check.plan.llm_iters if label == "mixtral" else check.plan.moe_iters
    times = {}
    for m in methods:
        try:
            times[m] = bench_moe.timeit(bench_moe.make_step(layer, x, m), device, iters, check.plan.warmup)
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:  # recorded, the others still run
            rec["errors"].append(f"{label} E{E} n{n} {dtname} {m}: {str(err).splitlines()[0][:300]}")
    flops = 3 * 2 * 2 * n * k * d * h  # two GEMMs per routed row; backward = 2x forward
    for m, t in times.items():
        row = {
            "shape": label,
            "d": d,
            "h": h,
            "E": E,
            "k": k,
            "tokens": n,
            "dtype": dtname,
            "method": m,
            "ms": sig(t * 1e3),
            "tflops": sig(flops / t / 1e12),
            "pct_peak": sig(100 * flops / t / 1e12 / peak, 3),
        }
        for base in ("loop", "torch", "grouped_mm"):
            row[f"vs_{base}"] = sig(times[base] / t, 3) if base in times else None
        rec["rows"].append(row)
    cells = " ".join(f"{m} {t * 1e3:.2f}" for m, t in times.items())
    check.log(f"   {label} d{d} h{h} E{E} n{n} {dtname}: ms {cells}")


# ----------------------------------------------------------------------------- DPP


def best_time(fn, device, repeats: int, warm=None) -> float:
    """Fastest of ``repeats`` calls after ``warm`` (default: one call of ``fn``), synchronised."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    (warm or fn)()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def section_dpp(check: Check, rec: dict) -> None:
    import bench_dpp  # sibling script: D, copy_bandwidth, factor_bytes

    dev = check.plan.device
    bw = bench_dpp.copy_bandwidth(dev, check.plan.copy_bytes)
    rec.update(
        copy_bandwidth_gbs=sig(bw / 1e9),
        kernel="rbf",
        D=bench_dpp.D,
        dtype="float32",
        compiled="CUDA" if dev == "cuda" else "C++ (CPU)",
        rows=[],
        skipped=[],
    )
    check.log(f"   copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for n, k in check.plan.dpp_sizes:
        if check.out_of_time(reserve=3):
            rec["skipped"].append(f"N {n} k {k}")
            continue
        rec["rows"].append(dpp_row(check, n, k, bw))


def dpp_row(check: Check, n: int, k: int, bw: float) -> dict:
    import bench_dpp
    import torch

    from cpd_fast.dpp import greedy_map, greedy_map_reference

    dev = check.plan.device
    x = torch.randn(n, bench_dpp.D, device=dev, generator=torch.Generator(dev).manual_seed(n))
    got: dict = {}
    repeats = check.plan.dpp_repeats if n < 10**6 else 2
    fast = best_time(lambda: got.update(fast=greedy_map(x, k, kernel="rbf")), dev, repeats)
    warm = lambda: greedy_map_reference(x[: min(n, 2048)], 8, kernel="rbf")  # the eager ops, small
    eager = best_time(lambda: got.update(eager=greedy_map_reference(x, k, kernel="rbf")[0]), dev, 1, warm)
    bound = bench_dpp.factor_bytes(n, k, 4) / bw
    check.log(f"   N {n} k {k}: eager {eager:.3f} s, compiled {fast:.4f} s, bound {bound:.4f} s")
    return {
        "N": n,
        "k": k,
        "eager_s": sig(eager),
        "compiled_s": sig(fast),
        "speedup": sig(eager / fast, 3),
        "bound_s": sig(bound),
        "compiled_over_bound": sig(fast / bound, 3),
        "same_picks": torch.equal(got["fast"].cpu(), got["eager"].cpu()),  # float32 near-ties may differ
    }


# ----------------------------------------------------------------------------- recompiles on growth


def compiled_kernels() -> dict:
    """Compiled binaries in the JIT caches of every Triton kernel of ``cpd_fast.kernels`` (None under the
    interpreter, which compiles nothing), and the autotuners' cached configs (one per tuning key)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface

    jits, tuners = {}, {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("cpd_fast.kernels.") or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, Autotuner):
                tuners[id(obj)] = obj
            fn = obj
            while not isinstance(fn, JITFunction) and isinstance(getattr(fn, "fn", None), KernelInterface):
                fn = fn.fn  # through autotuners and heuristics to the JIT function
            if isinstance(fn, JITFunction):
                jits[id(fn)] = fn
    tuned = sum(len(t.cache) for t in tuners.values())
    if not jits:  # the interpreter's functions are no JITFunction
        return {"jit_binaries": None, "autotune_keys": tuned}
    jit = sum(len(c[0]) for f in jits.values() for c in getattr(f, "device_caches", {}).values())
    return {"jit_binaries": jit, "autotune_keys": tuned}


def section_kernel_count(check: Check, rec: dict) -> None:
    import torch

    from cpd_fast.moe import MoELayer

    d, h, E, n = check.plan.count_shape
    dev = check.plan.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = MoELayer(d, h, E, top_k=2, backend="triton", device=dev, dtype=dtype)
    x = torch.randn(n, d, device=dev, dtype=dtype)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x.requires_grad_()).float().square().mean().backward()

    step()
    before = compiled_kernels()
    for _ in range(check.plan.growth):
        layer.add_experts(1, gate_bias=0.0)  # no cold start: the new experts get tokens at once
        step()
    after = compiled_kernels()
    used = int((layer.tokens_per_expert > 0).sum())
    with torch.no_grad():
        y = layer(x)
        layer.backend = "torch"
        ref = layer(x)
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
    rec.update(
        shape=f"d{d} h{h} top-2 {n} tokens {str(dtype)[6:]}",
        experts_before=E,
        experts_after=layer.num_experts,
        experts_with_tokens=used,
        add_experts_calls=check.plan.growth,
        before=before,
        after=after,
        triton_vs_torch_rel_err=err,
        grew=None if before["jit_binaries"] is None else after["jit_binaries"] != before["jit_binaries"],
    )
    rec["summary"] = (
        f"Triton kernels over {check.plan.growth} add_experts ({rec['shape']}, E {E} -> {layer.num_experts}):"
        f" compiled binaries {before['jit_binaries']} -> {after['jit_binaries']}, autotuned keys "
        f"{before['autotune_keys']} -> {after['autotune_keys']}."
    )
    if before["jit_binaries"] is None:
        rec["note"] = "Triton interpreter: nothing is compiled, so no count (the growth steps ran)"
    elif rec["grew"]:
        rec.update(status="failed", error=f"growth compiled kernels: {before} -> {after}")
    check.log(f"   {rec['summary']} Triton vs torch after growth: rel err {err:.1e}")


# ----------------------------------------------------------------------------- student


def student_configs() -> dict:
    """The default student (``DistillConfig().student``) and the mt25-plus preset's, without pydantic."""
    from cpd_fast.student import StudentConfig

    default = StudentConfig(
        d_model=128, n_heads=4, n_layers=2, d_ff=256, expert_hidden=256, task_encoder_hidden=128
    )
    plus = dataclasses.replace(default, adapter_rank=8, expert_routing="task", task_conditioning="task")
    return {"default": default, "mt25-plus": plus}


def student_step(cfg, device: str, batch: int):
    """A training step of ``cfg``'s student grown to MT25's 25 tasks, on a random MT25-shaped batch."""
    import torch

    from cpd_fast.student import Student

    torch.manual_seed(0)
    s = Student(cfg, num_tasks=5)
    while s.num_tasks < MT25["tasks"]:
        s.add_task()
    s = s.to(device).train()
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(batch, cfg.history, cfg.obs_dim, generator=g).to(device)
    target = (torch.rand(batch, cfg.history, cfg.act_dim, generator=g) * 2 - 1).to(device)
    ids = torch.randint(s.num_tasks, (batch,), generator=g).to(device)
    mask = torch.ones(batch, cfg.history, dtype=torch.bool, device=device)
    params = [p for p in s.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    s.moe.attach(opt)

    def step(bf16: bool) -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = s.losses(obs, target, ids, mask)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return s, step


def section_student(check: Check, rec: dict) -> None:
    import torch

    dev, batch, iters = check.plan.device, check.plan.student_batch, check.plan.student_iters
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rec.update(
        batch=batch,
        tasks=MT25["tasks"],
        config_source="StudentConfig built directly (the preset "
        "path needs pydantic); equal to the presets' (tests/test_gpu_check.py)",
        rows=[],
    )
    for name, cfg in student_configs().items():
        s, step = student_step(cfg, dev, batch)
        for prec in ("bf16", "fp32"):
            if check.out_of_time(reserve=2):
                rec.setdefault("skipped", []).append(f"{name} {prec}")
                continue
            loss = step(prec == "bf16")  # warm-up (Triton autotuning on a new shape)
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                loss = step(prec == "bf16")
            sync()
            ms = (time.perf_counter() - start) / iters * 1e3
            rec["rows"].append(
                {
                    "student": name,
                    "precision": prec,
                    "experts": s.num_experts,
                    "params": sum(p.numel() for p in s.parameters()),
                    "ms_per_step": sig(ms),
                    "windows_per_s": round(batch / ms * 1e3),
                    "loss": sig(loss.item(), 5),
                }
            )
            check.log(f"   {name} {prec}: {ms:.1f} ms/step, loss {loss.item():.4f}")
    if any(not math.isfinite(r["loss"]) for r in rec["rows"]):
        rec.update(status="failed", error="a non-finite loss")


# ----------------------------------------------------------------------------- report


MOE_COLS = "shape, d, h, E, tokens, dtype, method, ms, TFLOP/s=tflops, % peak=pct_peak, vs loop=vs_loop, "
MOE_COLS += "vs torch=vs_torch, vs grouped_mm=vs_grouped_mm"
DPP_COLS = "N, k, eager s=eager_s, compiled s=compiled_s, speed-up=speedup, bound s=bound_s, "
DPP_COLS += "compiled / bound=compiled_over_bound, same picks=same_picks"
STUDENT_COLS = "student, precision, experts, ms/step=ms_per_step, windows/s=windows_per_s, loss"


def _table(rows: list[dict], spec: str) -> list[str]:
    """A markdown table; ``spec`` lists its columns as ``header=key`` (or ``key``), comma-separated."""
    cols = [(c.split("=")[0], c.split("=")[-1]) for c in spec.split(", ")]

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(cell(r.get(k)) for _, k in cols) + " |" for r in rows]


def _summary(results: dict) -> list[str]:
    meta, secs = results["meta"], results["sections"]
    out = [f"# gpu_check{' (dry run)' if meta.get('dry_run') else ''}", ""]
    out += [f"{meta.get('device', '?')}; torch {meta.get('torch')}, Triton {meta.get('triton')}, "]
    out[-1] += f"Python {meta.get('python')}; {meta.get('wall_s')} s of a {meta.get('budget_s')} s budget"
    out += ["", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name in SECTIONS:
        r = secs.get(name, {"status": "not run"})
        note = str(r.get("error") or r.get("reason") or r.get("note") or "").split("\n")[0]
        out.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {note} |")
    b, t = secs.get("build", {}), secs.get("gpu_tests", {})
    if "build_s" in b:
        out += ["", f"Build: `{b['command']}` {b['build_s']} s, exit {b['exit_code']}."]
    if "exit_code" in t:
        counts = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
        counts += f", {t['collected']} collected" if "collected" in t else ""
        out += ["", f"GPU tests ({t['mode']}, {', '.join(t['files'])}, exit {t['exit_code']}): {counts}; "]
        out[-1] += f"needing the RL stack: {', '.join(t['needs_rl_stack']) or 'none'}."
    return out


def markdown(results: dict) -> str:
    secs = results["sections"]
    out = _summary(results)
    m, p, c, s = (secs.get(name, {}) for name in ("moe", "dpp", "kernel_count", "student"))
    if m.get("rows"):
        out += ["", f"## MoE forward + backward (bf16 matmul peak {m['peak_bf16_tflops']} TFLOP/s)", ""]
        out += _table(m["rows"], MOE_COLS)
    if p.get("rows"):
        out += ["", f"## Greedy DPP, {p['compiled']} vs eager PyTorch "]
        out[-1] += f"(copy bandwidth {p['copy_bandwidth_gbs']} GB/s, read + write)"
        out += ["", *_table(p["rows"], DPP_COLS)]
    if "summary" in c:
        out += ["", c["summary"]]
    if s.get("rows"):
        out += ["", f"## Student training step ({s['batch']} windows, {s['tasks']} tasks)", ""]
        out += _table(s["rows"], STUDENT_COLS)
    return "\n".join(out) + "\n"


def describe_machine(check: Check) -> None:
    import torch

    meta = check.results["meta"]
    meta.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        absent_modules=[m for m in RL_STACK if importlib.util.find_spec(m) is None],
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if check.plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(
            device=props.name,
            capability="{}.{}".format(*torch.cuda.get_device_capability()),
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        meta["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pytest-child"]:
        return pytest_child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder (default: $OUT, else runs/gpu_check)")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter, no build/tests"
    )
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default 450)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    check = Check(args)
    import torch

    if args.dry_run:  # tiny ops: threads only contend (CI's 2 cores run other jobs beside)
        torch.set_num_threads(1)

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to exercise it on the CPU)", file=sys.stderr)
        return 2
    describe_machine(check)
    check.log(f"gpu_check on {check.results['meta']['device']} -> {check.out}")
    fns = {
        "build": section_build,
        "gpu_tests": section_gpu_tests,
        "moe": section_moe,
        "dpp": section_dpp,
        "kernel_count": section_kernel_count,
        "student": section_student,
    }
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if name not in ("build", "gpu_tests") and "package" not in check.results["meta"]:
            try:
                check.results["meta"]["package"] = use_source_tree()
            except Exception as err:  # the sections that import it record the error themselves
                check.results["meta"]["package"] = {"error": f"{type(err).__name__}: {err}"}
        run_section(check, name, fns[name])
    bad = [n for n, r in check.results["sections"].items() if r["status"] not in ("ok", "skipped")]
    check.log(f"done: {json.dumps({n: r['status'] for n, r in check.results['sections'].items()})}")
    print(markdown(check.results))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
