"""A finished distillation asked for again: its stored result comes back and no file is written (a driver
script re-run over a grid once grew a finished point's wall time by the re-run's seconds). And what a
finished run records: the provenance of the code and machine that made it, and the settings that did not
act (config.json's ``inactive_settings``, results.json's ``extra["inactive_settings"]``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_provenance import check_record

from cpd_fast.distill import DistillConfig, run_distill
from cpd_fast.metrics import RunResult
from cpd_fast.pipeline.parallel import distill_method
from cpd_fast.student import StudentConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, expert_hidden=16, task_encoder_hidden=16,
            task_embed_dim=8, history=4, expert_routing="task")  # fmt: skip


def tiny_config(**kw) -> DistillConfig:
    """Two stages of one task each, a few steps, one evaluation goal: seconds of work."""
    base = dict(
        tasks=["reach-v3", "drawer-close-v3"], tasks_per_stage=1, method="finetune", episodes_per_task=1,
        collect_envs=1, max_episode_steps=40, steps_per_stage=4, batch_size=8, warmup_steps=1, eval_goals=1,
        eval_envs=1, eval_max_steps=40, eval_modes=("inferred",), progress=False, tensorboard=False,
        threads=1, eval_workers=0, student=StudentConfig(**TINY),
    )  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    threads, cfg = torch.get_num_threads(), tiny_config()
    run_dir = tmp_path_factory.mktemp("rerun") / "run"
    yield cfg, run_dir, run_distill(cfg, run_dir)
    torch.set_num_threads(threads)  # the run set its own count


def file_states(run_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file of the run, its lock included: (inode, mtime in ns, bytes). An atomic rewrite changes
    the inode even within the file system's timestamp granularity; an in-place write the rest."""
    out = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        st = path.stat()
        out[str(path.relative_to(run_dir))] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out


def test_a_finished_run_asked_again_writes_nothing(finished):
    cfg, run_dir, _ = finished
    before = file_states(run_dir)
    assert {"results.json", "timing.json", "config.json", "progress.json"} <= set(before)
    again = run_distill(cfg, run_dir)
    assert file_states(run_dir) == before  # byte for byte, not even rewritten with the same bytes
    stored = RunResult.load(run_dir)
    assert again.to_json() == stored.to_json() and again.wall_time_s == stored.wall_time_s
    # runtime-only keys may differ (threads, progress, evaluation workers): the run is still finished
    assert (
        run_distill(cfg.replace(threads=2, eval_workers=1, progress=True), run_dir).to_json()
        == stored.to_json()
    )
    # the pipeline's step function returns it too, with what made it
    record = distill_method(cfg.to_dict(), str(run_dir))
    assert record["provenance"] == stored.extra["provenance"]
    assert file_states(run_dir) == before


def test_another_config_is_still_refused(finished):
    cfg, run_dir, _ = finished
    with pytest.raises(ValueError, match=r"different config \(lr: "):
        run_distill(cfg.replace(lr=1e-2), run_dir)


def test_results_record_what_made_them(finished):
    cfg, run_dir, _ = finished
    with open(run_dir / "results.json") as f:
        extra = json.load(f)["extra"]
    record = extra["provenance"]
    check_record(record)
    assert (record["threads"], record["precision"], record["device"]) == (cfg.threads, "fp32", "cpu")
    assert extra["earlier_provenance"] == []  # made in one go
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert record["git_commit"] == head.stdout.strip()


def test_settings_that_did_not_act_are_marked_inactive(finished):
    """Task-routed experts: the gate's top-k and load-balancing weight did nothing. Their values stay (the
    run is rebuilt and resumed from them), listed beside them as inactive."""
    cfg, run_dir, _ = finished
    assert cfg.inactive() == ["student.top_k", "student.aux_loss_weight"]
    with open(run_dir / "config.json") as f:
        saved = json.load(f)
    assert saved["inactive_settings"] == cfg.inactive() and saved["student"]["top_k"] == 2
    assert DistillConfig.from_dict(saved) == cfg  # read back as the values alone
    assert RunResult.load(run_dir).extra["inactive_settings"] == cfg.inactive()


def test_a_resumed_run_keeps_the_earlier_provenance(finished, tmp_path):
    """A run resumed by other code records both: the latest maker and the earlier ones."""
    cfg, run_dir, _ = finished
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in ("config.json", "progress.json", "teacher_success.json", "timing.json", "results.json"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    for sub in ("checkpoints", "datasets", "eval"):
        os.symlink(run_dir / sub, copy / sub)
    results = json.loads((copy / "results.json").read_text())
    old = {**results["extra"]["provenance"], "git_commit": "0" * 40, "version": "0.0.1"}
    results["extra"]["provenance"] = old
    results["extra"]["complete"] = False  # as if killed before its end: the run resumes, trains nothing
    (copy / "results.json").write_text(json.dumps(results))
    resumed = run_distill(cfg, copy)
    assert resumed.extra["earlier_provenance"] == [old]
    assert resumed.extra["provenance"]["version"] != "0.0.1"
