"""``bench/gpu_check.py``, the one command for a GPU machine: its ``--dry-run`` runs every section's code on
the CPU (tiny sizes, the Triton interpreter, no build, the GPU tests only collected) in an interpreter where
the ``[rl]`` extra cannot be imported, as on the device image; and the pieces the dry run cannot reach."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_core_install import ABSENT, env_without

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()


def numbers(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from numbers(item)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_dry_run_without_the_rl_extra(tmp_path):
    out = tmp_path / "out"
    env = {**env_without(tmp_path), "OUT": str(out)}  # $OUT is the default output folder
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert set(ABSENT) <= set(res["meta"]["absent_modules"])  # the device image's condition held
    secs = res["sections"]
    assert list(secs) == list(gc.SECTIONS)
    assert {n: r["status"] for n, r in secs.items()} == {
        "build": "skipped",
        **dict.fromkeys(gc.SECTIONS[1:], "ok"),
    }
    found = list(numbers(res))
    assert len(found) > 100 and all(math.isfinite(x) for x in found)

    t = secs["gpu_tests"]
    assert t["mode"] == "collect-only" and t["collected"] > 0 and not t["needs_rl_stack"]
    assert "tests/test_moe_gpu.py" in t["files"]
    moe = secs["moe"]
    assert moe["peak_bf16_tflops"] > 0 and not moe["errors"] and not moe["skipped"]
    rows = {(r["shape"], r["dtype"], r["method"]): r for r in moe["rows"]}
    for shape, dtype in [("paper", "float32"), ("paper", "bfloat16"), ("mixtral", "bfloat16")]:
        for method in ("loop", "torch", "triton"):  # triton: interpreted
            row = rows[shape, dtype, method]
            assert row["ms"] > 0 and row["tflops"] > 0 and row["pct_peak"] > 0 and row["vs_loop"] > 0
    dpp = secs["dpp"]
    assert dpp["copy_bandwidth_gbs"] > 0 and len(dpp["rows"]) == len(gc.DRY.dpp_sizes)
    assert all(r["same_picks"] and r["bound_s"] > 0 for r in dpp["rows"])
    count = secs["kernel_count"]
    assert count["experts_after"] == count["experts_before"] + gc.DRY.growth
    assert count["triton_vs_torch_rel_err"] < 1e-4 and count["before"]["jit_binaries"] is None  # interpreted
    student = secs["student"]
    assert [(r["student"], r["precision"]) for r in student["rows"]] == [
        (s, p) for s in ("default", "mt25-plus") for p in ("bf16", "fp32")
    ]
    assert all(r["experts"] == 25 and r["ms_per_step"] > 0 for r in student["rows"])

    md = (out / "gpu_check.md").read_text()
    for line in ["# gpu_check (dry run)", "| build | skipped |", "| moe | ok |", "| student | ok |",
                 "## MoE forward + backward", "| mixtral | 32 | 64 | 4 | 64 | bfloat16 | triton |",
                 "## Greedy DPP, C++ (CPU) vs eager PyTorch", "| 1,000 | 20 |", "## Student training step",
                 "| mt25-plus | fp32 | 25 |", "Triton kernels over 3 add_experts (d16 h32"]:  # fmt: skip
        assert line in md, line
    assert "GPU tests (collect-only" in md and "needing the RL stack: none" in md
    assert md in proc.stdout  # printed at the end too


def test_student_configs_are_the_presets():
    from cpd_fast.pipeline.config import resolve_config

    configs = gc.student_configs()
    assert configs["default"] == resolve_config("mt25").distill_config("cpd").student
    assert configs["mt25-plus"] == resolve_config("mt25-plus").distill_config("cpd").student


def test_junit_counts_and_rl_stack_collection_errors(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="" name="tests.test_envs"><error message="collection failure">'
        "E   ModuleNotFoundError: No module named 'gymnasium'</error></testcase>"
        '<testcase classname="" name="tests.test_x"><error message="collection failure">'
        "E   ModuleNotFoundError: No module named 'numpyy'</error></testcase>"
        '<testcase classname="tests.test_dpp" name="test_a"/>'
        '<testcase classname="tests.test_dpp" name="test_b"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_dpp" name="test_c"><skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = gc.parse_junit(xml)
    assert {k: got[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
    }  # fmt: skip
    assert got["needs_rl_stack"] == ["tests.test_envs (gymnasium)"]
    assert got["failures"] == ["tests.test_x: collection failure", "tests.test_dpp::test_b: assert 1 == 2"]
    assert gc.parse_junit(tmp_path / "absent.xml")["passed"] == 0
    killed = "tests/test_dpp.py::test_a PASSED [ 5%]\ntests/test_dpp.py::test_b[x-1] FAILED [ 9%]\n"
    killed += "tests/test_moe_gpu.py::test_c SKIPPED (needs CUDA) [ 14%]\n[gpu_check] killed after 140 s\n"
    got = gc.parse_verbose_log(killed)  # pytest stopped before writing its XML
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["failures"] == ["tests/test_dpp.py::test_b[x-1]: FAILED"]


def test_a_failing_or_overrunning_section_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), budget=60.0)
    check = gc.Check(args)

    def boom(check, rec):
        raise RuntimeError("no device")

    def hang(check, rec):
        time.sleep(30)

    monkeypatch.setitem(gc.CAPS, "kernel_count", 0.1)
    monkeypatch.setattr(gc, "GRACE_S", 0.5)
    gc.run_section(check, "dpp", boom)
    start = time.monotonic()
    gc.run_section(check, "kernel_count", hang)
    assert time.monotonic() - start < 10
    gc.run_section(check, "student", lambda check, rec: rec.update(rows=[]))
    written = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert written["dpp"]["status"] == "error" and written["dpp"]["error"] == "RuntimeError: no device"
    assert "RuntimeError" in written["dpp"]["traceback"]
    assert written["kernel_count"]["status"] == "timeout"
    assert written["student"]["status"] == "ok"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| dpp | error |" in md and "| kernel_count | timeout |" in md and "| student | ok |" in md
    check.t0 -= 60  # the whole budget spent: later sections are skipped, not run
    gc.run_section(check, "moe", boom)
    assert check.results["sections"]["moe"] == {"status": "skipped", "reason": "total time budget spent",
                                                "seconds": 0.0}  # fmt: skip


@pytest.mark.parametrize("plan", [gc.FULL, gc.DRY])
def test_plans_have_every_shape_the_issue_asks_for(plan):
    shapes = gc.moe_shapes(plan)
    assert sum(s[0] == "mixtral" for s in shapes) == 1 and len(shapes) > 1
    if plan is gc.FULL:
        assert ("mixtral", 4096, 14336, 8, 16384, "bfloat16") in shapes
        paper = {(e, n) for _, d, h, e, n, _ in shapes if (d, h) == (256, 1024)}
        assert paper == {(e, n) for e in (5, 25) for n in (4096, 16384, 65536)}
        assert plan.dpp_sizes == ((10_000, 1000), (100_000, 1000), (1_000_000, 1000)) and plan.growth == 20
        assert sum(gc.CAPS.values()) <= 450 and plan.device == "cuda"  # under 8 min with the transfers
