"""A core install (torch, numpy, triton; no extras) has the model: ``MoELayer``, ``greedy_map`` and the
student import and train with every package of the ``[rl]`` extra unimportable, and ``cpd`` says in one
line what to install for the commands that need them.

Each check runs in a fresh interpreter whose ``sitecustomize`` puts ``None`` in ``sys.modules`` for those
packages: importing one fails, ``importlib.util.find_spec`` answers None, as where they are not installed.
(``.ci/run`` also installs the wheel without extras into a clean venv and runs the model there.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cpd_fast.cli import RL_EXTRA

ROOT = Path(__file__).resolve().parent.parent
# the [rl] extra by import name, and the optional ray
ABSENT = (*sorted(RL_EXTRA - {"packaging"}), "ray")


def env_without(tmp_path: Path, modules=ABSENT) -> dict[str, str]:
    """The environment of a Python process in which ``modules`` cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    code = f"import sys\n\nfor _name in {tuple(modules)!r}:\n    sys.modules[_name] = None\n"
    (site / "sitecustomize.py").write_text(code)
    path = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_without(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = env_without(tmp_path)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


MODEL = """
import importlib.util
import sys

import torch

from cpd_fast import MoELayer, greedy_map
from cpd_fast.student import Student, StudentConfig

assert all(importlib.util.find_spec(m) is None for m in ABSENT)  # as if not installed
try:
    import pydantic
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("pydantic imported")
torch.manual_seed(0)
layer = MoELayer(16, 32, 4, top_k=2)
x = torch.randn(64, 16, requires_grad=True)
layer(x).square().mean().backward()
assert x.grad.abs().sum() > 0 and layer.w1.grad.abs().sum() > 0
picks = greedy_map(torch.randn(200, 8), 10, kernel="rbf")
assert len(set(picks.tolist())) == 10
small = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, expert_hidden=32, task_encoder_hidden=32)
for extra in ({}, dict(adapter_rank=2, expert_routing="task", task_conditioning="task")):
    cfg = StudentConfig(**small, **extra)
    s = Student(cfg, num_tasks=2)
    s.add_task()
    obs = torch.randn(6, cfg.history, cfg.obs_dim)
    target = torch.rand(6, cfg.history, cfg.act_dim) * 2 - 1
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = s.losses(obs, target, ids, torch.ones(6, cfg.history, dtype=torch.bool))["total"]
    loss.backward()
    assert torch.isfinite(loss) and s.head[-1].weight.grad is not None
print("loaded:", *sorted(m for m in ABSENT if sys.modules.get(m) is not None))
"""


def test_model_imports_and_trains_without_the_rl_extra(tmp_path):
    out = run_without(tmp_path, "-c", MODEL.replace("ABSENT", repr(ABSENT)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["loaded:"]


CLI = """
import contextlib, io, json

from cpd_fast.cli import main

said = {}
for argv in ARGVS:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    said[" ".join(argv)] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(said))
"""


def test_cpd_says_how_to_install_the_rl_extra(tmp_path):
    out = run_without(tmp_path, "-m", "cpd_fast.cli", "run", "--preset", "quick")  # as `cpd` runs
    assert out.returncode == 2 and out.stdout == "", out.stderr[-3000:]
    line = r"cpd run: needs the pipeline's dependencies, not installed here \(no module '(\w+)'\): "
    said = re.fullmatch(line + re.escape('pip install "cpd_fast[rl]"\n'), out.stderr)
    assert said and said.group(1) in ABSENT, out.stderr
    needing = [["teachers", "train", "--help"], ["distill"], ["report", "x"], ["envs", "check"]]
    argvs = [*needing, ["--help"], ["dpp-demo", "--n", "300", "--k", "10"]]
    run = run_without(tmp_path, "-c", CLI.replace("ARGVS", repr(argvs)))
    assert run.returncode == 0, run.stderr[-3000:]
    said = json.loads(run.stdout)
    for argv in needing:
        code, _, err = said[" ".join(argv)]
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"cpd {argv[0]}: needs the pipeline's dependencies"), err
        assert err.endswith('pip install "cpd_fast[rl]"\n'), err
    code, helped, _ = said["--help"]
    assert code == 0 and 'run       (needs pip install "cpd_fast[rl]")' in helped
    assert said["dpp-demo --n 300 --k 10"][0] == 0, said  # the DPP demo needs only the core install
