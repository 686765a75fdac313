"""Forward+backward time of MoELayer against named baselines, all measured in the same run.

Methods (each times gate + routing + experts, forward and backward):
  loop           the naive per-expert masked loop (boolean mask per expert over all tokens)
  torch          MoELayer's torch backend (SegmentExperts: one autograd.Function, F.grouped_mm GEMMs)
  segments_loop  the same Function with one torch.mm per expert segment
  autograd       the former torch backend: per-segment GEMMs under plain autograd (quadratic in E)
  grouped_mm     F.grouped_mm under plain autograd (where this torch has it and it runs)
  triton         MoELayer's Triton kernels (CUDA only)

    python bench/bench_moe.py                      # CPU: paper shapes at 4k tokens
    python bench/bench_moe.py --tokens 4096 16384  # more token counts
    python bench/bench_moe.py --device cuda --llm  # GPU: paper shapes + the LLM shape (bf16)
    python bench/bench_moe.py --growth             # CPU, 1 thread: cost against E at fixed tokens

Prints a markdown table: ms per fwd+bwd, achieved TFLOP/s (expert GEMMs only, 3x forward) and
speed-ups over loop and grouped_mm. On CUDA also the measured bf16 matmul peak.

``--growth``: 256 tokens, d_model 128, d_hidden 256, top-2, E in {5, 25, 50, 100} (``--experts``
overrides), the former formulation (``autograd``) and the current one (``torch``) side by side,
rounds interleaved across E and method (3 back-to-back steps each); ms is the best step (robust
to other load on the machine; median in brackets), the ratio is to E = 5 of the same method.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cpd_fast.moe import MoELayer, experts_loop_reference, experts_torch, route


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


def make_step(layer, x, method):
    def step():
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        if method in ("torch", "triton"):
            layer.backend = method
            y = layer(xi)
        elif method in ("segments_loop", "autograd"):
            r = layer.gate.route(xi, layer.top_k)
            y = experts_torch(xi, layer.w1, layer.b1, layer.w2, layer.b2, r, layer.activation, impl=method)
        else:
            r = route(layer.gate(xi), layer.top_k)
            if method == "loop":
                y = experts_loop_reference(
                    xi, layer.w1, layer.b1, layer.w2, layer.b2, r.topk_p, r.topk_e, layer.activation
                )
            else:
                y = experts_torch(
                    xi, layer.w1, layer.b1, layer.w2, layer.b2, r, layer.activation, impl=method
                )
        y.backward(torch.ones_like(y))

    return step


def grouped_mm_works(device, dtype):
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.randn(8, 16, device=device, dtype=dtype)
        b = torch.randn(2, 16, 16, device=device, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([3, 8], device=device, dtype=torch.int32))
        return True
    except RuntimeError:
        return False


def matmul_peak_tflops(device, dtype=torch.bfloat16, n=8192):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device, iters=20, warmup=3)
    return 2 * n**3 / t / 1e12


def growth_sweep(experts, rounds, tokens=256, d=128, h=256, k=2):
    """Cost against E at fixed tokens: ``autograd`` (former) vs ``torch`` (current), interleaved."""
    methods = ["autograd", "torch", "segments_loop"]
    steps = {}
    for E in experts:
        torch.manual_seed(0)
        layer = MoELayer(d, h, E, top_k=k, backend="torch")
        layer.check_finite = False
        x = torch.randn(tokens, d)
        for m in methods:
            steps[E, m] = make_step(layer, x, m)
            steps[E, m]()  # warm-up
    times: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for E in experts:
            for m in methods:
                for _ in range(3):  # back to back, as in a training loop; rounds interleave E and method
                    t = time.perf_counter()
                    steps[E, m]()
                    times[E, m].append(time.perf_counter() - t)
    best = {key: min(v) for key, v in times.items()}
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    threads = torch.get_num_threads()
    print(f"# growth sweep: {tokens} tokens, d_model {d}, d_hidden {h}, top-{k}, {threads} thread(s)")
    print(f"# best (median) of {rounds} interleaved rounds x 3 steps; torch {torch.__version__}")
    head = " | ".join(f"{m} ms | {m} / E={experts[0]}" for m in methods)
    print(f"\n| E | {head} | autograd / torch |")
    print("|---" * (2 + 2 * len(methods)) + "|")
    e0 = experts[0]
    for E in experts:
        cells = " | ".join(
            f"{best[E, m] * 1e3:.1f} ({med[E, m] * 1e3:.1f}) | {best[E, m] / best[e0, m]:.2f}x"
            for m in methods
        )
        print(f"| {E} | {cells} | {best[E, 'autograd'] / best[E, 'torch']:.1f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--experts", type=int, nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--llm", action="store_true", help="also the LLM shape (d 4096, h 14336, E 8, bf16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--growth", action="store_true", help="CPU growth sweep: cost against E at fixed tokens")
    ap.add_argument("--rounds", type=int, default=15, help="--growth: interleaved rounds (best is kept)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads or args.growth:
        torch.set_num_threads(args.threads or 1)
    if args.growth:
        growth_sweep(args.experts or [5, 25, 50, 100], args.rounds)
        return
    args.experts = args.experts or [5, 10, 25]
    cuda = device.type == "cuda"
    tokens = args.tokens or ([4096, 16384, 65536] if cuda else [4096])
    iters = args.iters or (20 if cuda else 3)
    torch.manual_seed(0)

    shapes = [(256, 1024, E, 2, n, torch.float32) for n in tokens for E in args.experts]
    if cuda:
        shapes += [(256, 1024, E, 2, n, torch.bfloat16) for n in tokens for E in args.experts]
    if args.llm:
        shapes.append((4096, 14336, 8, 2, 16384, torch.bfloat16))
    print(f"# bench_moe on {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}")
    if cuda:
        print(f"bf16 matmul peak (8192^3 mm, same run): {matmul_peak_tflops(device):.0f} TFLOP/s")
    cols = "d_model | d_hidden | E | k | tokens | dtype | method | ms fwd+bwd | TFLOP/s | vs loop"
    cols += " | vs grouped_mm"
    print(f"\n| {cols} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d, h, E, k, n, dtype in shapes:
        layer = MoELayer(d, h, E, top_k=k, device=device, dtype=dtype)
        layer.check_finite = False
        x = torch.randn(n, d, device=device, dtype=dtype)
        methods = [] if d >= 4096 else ["loop"]
        methods += ["torch", "segments_loop", "autograd"]
        if grouped_mm_works(device, dtype):
            methods.append("grouped_mm")
        if cuda:
            methods.append("triton")
        flops = 3 * 2 * 2 * n * k * d * h  # two GEMMs per routed row, backward = 2x forward
        res = {}
        for m in methods:
            try:
                res[m] = timeit(make_step(layer, x, m), device, iters)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # report, keep going
                print(f"<!-- {m} failed at {d},{h},{E},{n},{dtype}: {str(err).splitlines()[0]} -->")
        for m, t in res.items():
            vs_loop = f"{res['loop'] / t:.2f}x" if "loop" in res else "-"
            vs_gmm = f"{res['grouped_mm'] / t:.2f}x" if "grouped_mm" in res else "-"
            dt = str(dtype).removeprefix("torch.")
            print(
                f"| {d} | {h} | {E} | {k} | {n} | {dt} | {m} | {t * 1e3:.1f} | {flops / t / 1e12:.3f} "
                f"| {vs_loop} | {vs_gmm} |"
            )


if __name__ == "__main__":
    main()
