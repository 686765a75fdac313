"""Greedy DPP MAP benchmark: compiled C++ (plain and lazy greedy) against a numpy reference on
CPU, and the CUDA op against the same algorithm in eager PyTorch on the GPU when one is present.

Every ratio compares implementations timed in the same run on the same inputs (rbf kernel,
full rank, D = 64). Bandwidth figures count the bytes of the Cholesky factor the plain greedy
reads (it streams the N x t factor once per pick: N k (k - 1) / 2 values in all) plus the
features it reads per pick, against the copy bandwidth measured in the same run.

    python bench/bench_dpp.py                 # CPU table (about 2 minutes on 2 cores)
    python bench/bench_dpp.py --gpu           # + CUDA rows (needs a GPU)
    python bench/bench_dpp.py --quick         # smoke run with tiny sizes
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from functools import partial

import numpy as np
import torch

from cpd_fast import dpp
from cpd_fast.dpp import greedy_map, greedy_map_reference

D = 64


def numpy_greedy(x: np.ndarray, k: int, eps: float = 1e-10) -> list[int]:
    """Baseline: Chen et al. greedy MAP written with vectorised numpy (float64, rbf, gamma 1/D)."""
    n, d = x.shape
    gamma = 1.0 / d
    cis = np.zeros((k, n))
    d2 = np.ones(n)
    j = int(np.argmax(d2))
    picks = [j]
    while len(picks) < k:
        t = len(picks) - 1
        e = (np.exp(-gamma * ((x - x[j]) ** 2).sum(1)) - cis[:t, j] @ cis[:t]) / math.sqrt(d2[j])
        cis[t] = e
        d2 -= e * e
        d2[picks] = -np.inf
        j = int(np.argmax(d2))
        if d2[j] < eps:
            break
        picks.append(j)
    return picks


def best_time(fn, repeats: int, budget_s: float = 1.0) -> float:
    """Fastest of at least `repeats` runs, repeating short calls until `budget_s` is spent."""
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or (spent < budget_s and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times)


def cuda_time(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def copy():
        dst.copy_(src)
        sync()

    copy()
    return 2 * nbytes / best_time(copy, 5)


def factor_bytes(n: int, k: int, itemsize: int) -> int:
    return itemsize * (n * k * (k - 1) // 2 + n * D * k)


def cpu_rows(sizes, repeats: int):
    bw = copy_bandwidth("cpu")
    print(
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s (read + write)"
    )
    print("GB/s = Cholesky-factor + feature bytes streamed by C++ f32 greedy / its time; factors that")
    print("fit in the last-level cache stream faster than DRAM.")
    head = (
        f"{'N':>7} {'k':>5} | {'numpy f64':>10} {'greedy f64':>10} {'greedy f32':>10} {'lazy f32':>9} | "
        f"speed-up over numpy: {'greedy f64':>10} {'greedy f32':>10} {'lazy f32':>8} {'default':>7} | "
        f"{'GB/s':>5}"
    )
    print(head)
    print("-" * len(head))
    for n, k in sizes:
        g = torch.Generator().manual_seed(n + k)
        x64 = torch.randn(n, D, generator=g, dtype=torch.float64)
        x32 = x64.float()
        ref = numpy_greedy(x64.numpy(), k)
        assert greedy_map(x64, k, kernel="rbf", method="greedy").tolist() == ref, "C++ f64 != numpy"
        reps = repeats if n * k <= 10_000_000 else 1
        t_np = best_time(partial(numpy_greedy, x64.numpy(), k), reps)
        t64 = best_time(partial(greedy_map, x64, k, kernel="rbf", method="greedy"), reps)
        t32 = best_time(partial(greedy_map, x32, k, kernel="rbf", method="greedy"), reps)
        tlazy = best_time(partial(greedy_map, x32, k, kernel="rbf", method="lazy"), reps)
        t_auto = tlazy if dpp._uses_lazy_by_default(n, k, 4) else t32  # what method="auto" runs
        gbs = factor_bytes(n, k, 4) / t32 / 1e9
        print(
            f"{n:>7} {k:>5} | {ms(t_np):>10} {ms(t64):>10} {ms(t32):>10} {ms(tlazy):>9} | "
            f"{'':>20} {t_np / t64:>9.1f}x {t_np / t32:>9.1f}x "
            f"{t_np / tlazy:>7.1f}x {t_np / t_auto:>6.1f}x | "
            f"{gbs:>5.0f}"
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def gpu_rows(sizes, repeats: int):
    bw = copy_bandwidth("cuda")
    print(
        f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    head = (
        f"{'N':>8} {'k':>5} | {'eager torch f32':>15} {'CUDA f32':>9} {'speed-up':>8} | "
        f"{'bound':>9} {'time/bound':>10}"
    )
    print(head)
    print("-" * len(head))
    for n, k in sizes:
        x = torch.randn(n, D, device="cuda")
        t_cuda = cuda_time(partial(greedy_map, x, k, kernel="rbf"), repeats)
        if n * k <= 10_000 * 1000:
            t_eager = cuda_time(partial(greedy_map_reference, x, k, kernel="rbf"), 1)
            eager, ratio = f"{t_eager:>14.3f}s", f"{t_eager / t_cuda:>7.1f}x"
        else:
            eager, ratio = f"{'-':>15}", f"{'-':>8}"
        bound = factor_bytes(n, k, 4) / bw
        print(f"{n:>8} {k:>5} | {eager} {t_cuda:>8.3f}s {ratio} | {bound:>8.3f}s {t_cuda / bound:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA rows")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        cpu_rows([(500, 20), (2000, 50)], 1)
        if args.gpu:
            gpu_rows([(2000, 50)], 1)
        return
    cpu_rows([(1000, 100), (10_000, 100), (10_000, 1000), (50_000, 100), (50_000, 1000)], args.repeats)
    if args.gpu:
        gpu_rows([(10_000, 1000), (100_000, 1000), (1_000_000, 1000)], args.repeats)


if __name__ == "__main__":
    main()
