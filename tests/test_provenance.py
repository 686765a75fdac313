"""What made a result (cpd_fast.provenance): the record's fields and types, the git state of the checkout
the package was imported from (never the working directory's), and the record in each step of
``cpd run``'s pipeline.json. A real run's results.json record: tests/test_complete_rerun.py."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cpd_fast
from cpd_fast.pipeline import Pipeline, resolve_config
from cpd_fast.provenance import checkout_root, git_state, provenance

ROOT = Path(__file__).resolve().parent.parent

FIELDS = {
    "package": str, "version": str, "git_commit": (str, type(None)), "git_dirty": (bool, type(None)),
    "torch": str, "triton": (str, type(None)), "python": str, "cpu": str, "threads": int,
    "precision": (str, type(None)), "device": str, "gpu": (str, type(None)),
}  # fmt: skip


def check_record(record: dict) -> None:
    """Every field, of its type (a reader of results.json / pipeline.json relies on them)."""
    assert set(record) == set(FIELDS), sorted(set(record) ^ set(FIELDS))
    for key, kind in FIELDS.items():
        assert isinstance(record[key], kind), (key, record[key])


def git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_the_record_has_every_field_with_its_type():
    record = provenance("cpu", "bf16", threads=3)
    check_record(record)
    assert record["version"] == cpd_fast.__version__ and record["torch"] == torch.__version__
    assert record["python"] == platform.python_version() and record["cpu"]
    assert (record["threads"], record["precision"], record["device"], record["gpu"]) == (
        3,
        "bf16",
        "cpu",
        None,
    )
    assert provenance("cpu", None)["threads"] == torch.get_num_threads()  # the count in force
    json.dumps(record)  # it goes into JSON files as it is


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="the tests run from a git checkout")
def test_the_commit_is_this_checkouts_head(tmp_path, monkeypatch):
    assert checkout_root() == ROOT  # the package under test is this checkout's
    head = git(ROOT, "rev-parse", "HEAD")
    record = provenance("cpu", "fp32")
    assert record["git_commit"] == head and isinstance(record["git_dirty"], bool)
    # found from the package's location, not the working directory: from inside another repository too
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    monkeypatch.chdir(other)
    assert provenance("cpu", "fp32")["git_commit"] == git(ROOT, "rev-parse", "HEAD")


def test_git_state_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "cpd_fast").mkdir(parents=True)
    (repo / "cpd_fast" / "a.py").write_text("x = 1\n")
    (repo / "README").write_text("r\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "c")
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == (head, False)
    (repo / "notes.txt").write_text("n\n")  # untracked outside the sources: a run directory, a note
    (repo / "runs").mkdir()
    (repo / "runs" / "r.json").write_text("{}\n")
    assert git_state(repo) == (head, False)
    (repo / "cpd_fast" / "new.py").write_text("y = 2\n")  # code the commit does not hold
    assert git_state(repo) == (head, True)
    (repo / "cpd_fast" / "new.py").unlink()
    (repo / "README").write_text("changed\n")  # a tracked file differs from the commit
    assert git_state(repo) == (head, True)


def test_git_state_is_none_outside_a_checkouts_top_level(tmp_path):
    assert git_state(tmp_path) == (None, None)  # no repository (an installed wheel)
    repo = tmp_path / "repo"
    (repo / "site" / "cpd_fast").mkdir(parents=True)
    (repo / "f").write_text("f\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "c")
    # a package installed somewhere inside another repository is not attributed to its commit
    assert git_state(repo / "site") == (None, None)


def test_each_pipeline_step_records_what_made_it(tmp_path, monkeypatch):
    """pipeline.json: a step's record holds the provenance (a distillation's: its result's, kept as is)."""
    cfg = resolve_config("quick", overrides={"progress": False})
    pipe = Pipeline(cfg, str(tmp_path), console=SimpleNamespace(print=lambda *a, **k: None))
    made = provenance("cpu", "bf16", threads=7)
    steps = [("fidelity", lambda: {"backend": {}}, []), ("distill:cpd", lambda: {"provenance": made}, [])]
    monkeypatch.setattr(pipe, "steps", lambda: steps)
    pipe.run()
    with open(tmp_path / "pipeline.json") as f:
        recorded = json.load(f)["steps"]
    check_record(recorded["fidelity"]["provenance"])
    assert recorded["fidelity"]["provenance"]["precision"] is None  # it trains no student
    assert recorded["fidelity"]["provenance"]["device"] == cfg.device
    assert recorded["distill:cpd"]["provenance"] == made
