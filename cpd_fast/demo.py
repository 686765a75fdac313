"""``cpd dpp-demo``: replay selection on synthetic trajectory features, checked and timed."""

from __future__ import annotations

import time

import torch

from cpd_fast.dpp import greedy_map, greedy_map_reference


def synthetic_windows(n: int, dim: int, seed: int) -> torch.Tensor:
    """Features of n state windows from a few smooth random trajectories (clustered, redundant)."""
    g = torch.Generator().manual_seed(seed)
    n_traj = max(1, n // 500)
    t = torch.linspace(0, 1, n // n_traj + 1)[: n // n_traj + 1]
    freq = torch.randn(n_traj, 1, dim, generator=g) * 3
    phase = torch.rand(n_traj, 1, dim, generator=g) * 6.28
    walk = torch.sin(freq * t[None, :, None] + phase)
    x = walk.reshape(-1, dim)[:n]
    return x + 0.05 * torch.randn(x.shape, generator=g)


def dpp_demo(n: int, k: int, dim: int, seed: int) -> None:
    x = synthetic_windows(n, dim, seed)
    k = min(k, x.shape[0])
    print(f"greedy DPP replay selection: N={x.shape[0]} windows, D={dim}, k={k}, rbf kernel, float32")
    rows = []
    for method in ("greedy", "lazy"):
        start = time.perf_counter()
        idx, gains = greedy_map(x, k, kernel="rbf", method=method, return_gains=True)
        rows.append((f"compiled {method}", time.perf_counter() - start, idx, gains))
    start = time.perf_counter()
    ref_idx, ref_gains = greedy_map_reference(x, k, kernel="rbf")
    rows.append(("plain-PyTorch reference", time.perf_counter() - start, ref_idx, ref_gains))

    print(f"{'implementation':<32}{'seconds':>10}{'picked':>8}{'log det':>12}{'same picks as ref':>20}")
    for name, secs, idx, gains in rows:
        same = torch.equal(idx, ref_idx)
        print(f"{name:<32}{secs:>10.3f}{len(idx):>8}{float(gains.sum()):>12.2f}{same!s:>20}")
    g = torch.Generator().manual_seed(seed + 1)
    random_logdets = []
    for _ in range(20):
        pick = torch.randperm(x.shape[0], generator=g)[: len(ref_idx)]
        sub = torch.exp(-torch.cdist(x[pick].double(), x[pick].double()).square() / dim)
        random_logdets.append(float(torch.linalg.slogdet(sub)[1]))
    print(f"log det of 20 random subsets of the same size: best {max(random_logdets):.2f}")
    first = ref_gains[: max(1, len(ref_gains) // 10)]
    print(
        f"diversity curve (log gain per pick): first {float(first[0]):.3f}, "
        f"after 10% {float(ref_gains[len(first) - 1]):.3f}, last {float(ref_gains[-1]):.3f}"
    )
