"""The shipped teacher zoo: every teacher loads and acts bit for bit as recorded; a bad zoo is one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from cpd_fast.cli import main
from cpd_fast.data import load_teacher_data
from cpd_fast.errors import UserError
from cpd_fast.evaluation import official_goals
from cpd_fast.tasks import MT25, MT50
from cpd_fast.teachers.base import make_teacher
from cpd_fast.teachers.gate import teacher_specs
from cpd_fast.teachers.records import evaluate_teacher, load_teachers_json
from cpd_fast.teachers.zoo import (
    add_behaviour,
    measure_fresh_goals,
    shipped_zoos,
    zoo_dir,
    zoo_records,
    zoo_teacher,
)

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "zoo_reference.npz")


def cpd(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_the_zoo_is_shipped_and_complete_in_its_record():
    assert "metaworld-v3" in shipped_zoos()
    path, records = zoo_records("metaworld-v3")
    assert records, path
    assert set(MT25) <= set(records)  # every MT25 task has a teacher

    for task, rec in records.items():
        assert task in MT50 and rec.source == "zoo" and rec.used and rec.protocol == "official"
        assert rec.algorithm in ("ppo", "ppo+demos") and rec.env_steps > 0
        assert rec.success_rate >= 0.9 or rec.history[-1].get("scripted_success") is not None
        assert rec.history[-1]["command"].startswith("cpd teachers train --tasks " + task)
        assert os.path.isfile(os.path.join(os.path.dirname(path), rec.path + ".sha256"))


def test_every_shipped_teacher_matches_its_reference_actions_bit_for_bit():
    ref = np.load(REFERENCE)
    _, records = zoo_records("metaworld-v3")
    tasks = sorted(t for t, r in records.items() if r.used)
    have = sorted({k.split("/")[0] for k in ref.files})
    assert tasks == have, "regenerate with: python tests/data/make_zoo_reference.py"
    for task in tasks:
        teacher = make_teacher("zoo", task)  # the default zoo is metaworld-v3
        out = teacher.action_mean(ref[f"{task}/obs"])
        assert out.dtype == np.float32 and out.shape == (32, 4)
        np.testing.assert_array_equal(out, ref[f"{task}/action"], err_msg=task)
        assert np.abs(out).max() <= 1.0


def test_zoo_file_holds_the_actor_only():
    path, records = zoo_records("metaworld-v3")
    task, rec = next(iter(records.items()))
    payload = torch.load(os.path.join(os.path.dirname(path), rec.path), weights_only=True)
    assert payload["format"] == "cpd_fast.ppo_actor/1" and payload["task"] == task
    assert not any(k.startswith("critic.") for k in payload["state_dict"]) and "optimizer" not in payload
    assert "obs_norm.mean" in payload["state_dict"]


def test_teacher_specs_from_the_zoo_name_the_zoo():
    _, records = zoo_records("metaworld-v3")
    task = next(iter(records))
    spec = teacher_specs("zoo", [task])[task]
    assert spec.source == "zoo" and spec.path == "metaworld-v3" and spec.goals == 50
    assert spec.name(task) == f"zoo:metaworld-v3/{task}" and spec.success == records[task].success_rate
    assert teacher_specs("zoo:metaworld-v3", [task])[task] == spec
    assert teacher_specs("zoo:mt25", [task])[task] == spec  # the zoo's former name resolves to it


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small_zoo(tmp_path):
    """A copy of one shipped teacher as its own zoo directory."""
    path, records = zoo_records("metaworld-v3")
    task, rec = next(iter(records.items()))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name in (rec.path, rec.path + ".sha256"):
        shutil.copy(os.path.join(os.path.dirname(path), name), zoo / name)
    doc = json.load(open(path))
    doc["teachers"] = {task: doc["teachers"][task]}
    json.dump(doc, open(zoo / "teachers.json", "w"))
    return zoo, task, zoo / rec.path


def test_unknown_zoo_and_missing_task(small_zoo, capsys):
    zoo, task, _ = small_zoo
    with pytest.raises(UserError, match=r"no teacher zoo 'nosuch'.*shipped: .*metaworld-v3"):
        zoo_dir("nosuch")
    other = "push-wall-v3"
    with pytest.raises(
        UserError, match=rf"has no teacher for {other} \(it has: {task}\).*cpd teachers train"
    ):
        zoo_teacher(other, str(zoo))
    with pytest.raises(UserError, match=rf"has no teacher for {other}"):
        teacher_specs(f"zoo:{zoo}", [task, other])
    assert zoo_teacher(task, str(zoo)).task == task  # the directory form works
    assert cpd(["teachers", "eval", "--zoo", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no teacher zoo 'nosuch'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_zoo_file_is_one_line_naming_it(small_zoo, damage, capsys):
    zoo, task, file = small_zoo
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    with pytest.raises(ValueError, match=rf"{file}.*(damaged|truncated, corrupt).*reinstall cpd_fast"):
        zoo_teacher(task, str(zoo))
    assert cpd(["teachers", "eval", "--zoo", str(zoo), "--goals", "1"]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and len(err.strip().splitlines()) == 1


def test_zoo_file_missing(small_zoo):
    zoo, task, file = small_zoo
    os.remove(file)
    with pytest.raises(UserError, match=rf"zoo teacher file {file} is missing"):
        zoo_teacher(task, str(zoo))


def test_zoo_policy_of_other_dimensions(small_zoo):
    from cpd_fast.runio import save_torch_atomic

    zoo, task, file = small_zoo
    payload = torch.load(file, weights_only=True)
    state = dict(payload["state_dict"])
    for k in ("obs_norm.mean", "obs_norm.var"):
        state[k] = state[k][:12]
    state["actor.0.weight"] = state["actor.0.weight"][:, :12]
    save_torch_atomic({**payload, "state_dict": state}, file)  # a valid file, of a 12-dim environment
    with pytest.raises(ValueError, match=rf"{file}.*takes 12-dim observations but Meta-World v3 tasks"):
        zoo_teacher(task, str(zoo))


def test_run_with_a_zoo_gap_is_refused_before_anything_is_written(small_zoo, tmp_path, capsys):
    zoo, _, _ = small_zoo
    out = tmp_path / "run"
    argv = ["run", "--preset", "quick", "--teachers", "zoo", "--set", f"zoo={zoo}", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert cpd([*argv, "--set", "gate.on_fail=retrain"]) == 2  # retrain cannot fill a zoo's gap
    err = capsys.readouterr().err.strip().splitlines()
    assert "has no teacher for" in err[-1] and "gate.on_fail=retrain cannot train a zoo" in err[-1]
    assert not out.exists()


def test_mt25_run_from_the_zoo_reaches_distillation_without_training(tmp_path):
    """`cpd run --preset mt25 --teachers zoo`, shrunk to two zoo tasks in two stages and a few steps."""
    _, records = zoo_records("metaworld-v3")
    tasks = [t for t, r in records.items() if r.used][:2]
    out = tmp_path / "run"
    tiny = ["distill.steps_per_stage=2", "distill.episodes_per_task=1", "distill.eval_goals=1",
            "distill.eval_envs=1", "distill.batch_size=8", "fidelity.episodes=0", "methods=[cpd]",
            f"tasks=[{', '.join(tasks)}]", "tasks_per_stage=1"]  # fmt: skip
    argv = ["run", "--preset", "mt25", "--teachers", "zoo", "--out", str(out), "--no-progress"]
    for item in tiny:
        argv += ["--set", item]
    assert cpd(argv) == 0
    gate = json.load(open(out / "teachers.json"))
    assert {t: r["source"] for t, r in gate["teachers"].items()} == dict.fromkeys(tasks, "zoo")
    assert not (out / "teachers").exists()  # nothing was trained
    manifest = json.load(open(out / "datasets" / f"{tasks[0]}.collected.json"))
    assert manifest["spec"]["teacher"] == f"zoo:metaworld-v3/{tasks[0]}"
    assert (out / "methods" / "cpd" / "results.json").is_file()


def test_a_behaviour_acts_for_another_task(small_zoo):
    """add_behaviour: the small zoo's reach teacher acts for pick-place (its record points at reach's file,
    success measured on pick-place); the teacher a run gets for pick-place computes reach's actions."""
    zoo, task, _ = small_zoo
    assert task == "reach-v3"
    rec = add_behaviour(zoo, "pick-place-v3", task, why="test", eval_goals=2, eval_envs=2)
    assert (rec.task, rec.acts_as, rec.path, rec.protocol) == (
        "pick-place-v3",
        task,
        "reach-v3.pt",
        "official-subset",
    )
    assert rec.success_rate is not None and rec.history[0]["why"] == "test"
    assert load_teachers_json(zoo)["pick-place-v3"] == rec  # round trip
    doc = json.load(open(zoo / "teachers.json"))
    assert doc["teachers"]["pick-place-v3"]["acts_as"] == task
    assert "acts_as" not in doc["teachers"][task]  # a teacher of its own writes no acts_as
    obs = np.random.default_rng(0).standard_normal((4, 39)).astype(np.float32)
    np.testing.assert_array_equal(
        zoo_teacher("pick-place-v3", zoo).action_mean(obs), zoo_teacher(task, zoo).action_mean(obs)
    )
    with pytest.raises(UserError, match="no teacher of its own for pick-place-v3"):
        add_behaviour(zoo, "push-v3", "pick-place-v3", why="a behaviour of a behaviour", eval_goals=2)


def test_fresh_goals_are_measured_on_other_goal_sets_and_recorded(small_zoo, capsys):
    """`cpd teachers eval --zoo Z --goal-seeds ... --record`: success on goal sets the teacher was not
    selected on, stored as its record's fresh_goals with the measured file's checksum; the official set
    is refused."""
    zoo, task, file = small_zoo
    before = load_teachers_json(zoo)[task]
    fresh = measure_fresh_goals(zoo, task, (1, 2), eval_goals=3, eval_envs=3, record=False)
    assert load_teachers_json(zoo)[task] == before  # not recorded
    assert fresh["goal_seeds"] == [1, 2] and fresh["goals"] == 6 and len(fresh["success_rates"]) == 2
    assert fresh["success_rate"] == pytest.approx(sum(fresh["success_rates"]) / 2, abs=1e-4)
    direct = evaluate_teacher(zoo_teacher(task, zoo), task, num_goals=3, num_envs=3, goal_seed=2)
    assert fresh["success_rates"][1] == direct["success_rate"]
    assert official_goals(task, 1)[0] != official_goals(task, 0)[0]  # another goal set

    assert cpd(["teachers", "eval", "--zoo", str(zoo), "--goal-seeds", "1", "2", "--goals", "3",
                "--num-envs", "3", "--record"]) == 0  # fmt: skip
    rec = load_teachers_json(zoo)[task]
    assert {k: rec.fresh_goals[k] for k in ("goal_seeds", "success_rates")} == {
        k: fresh[k] for k in ("goal_seeds", "success_rates")
    }
    assert rec.fresh_goals["sha256"] == open(f"{file}.sha256").read().split()[0]
    capsys.readouterr()
    for argv, why in [
        (["--zoo", str(zoo), "--goal-seeds", "0", "1", "--record"], "not 0"),
        (["--zoo", str(zoo), "--goal-seeds", "1", "1"], "distinct"),
        (["--zoo", str(zoo), "--record"], "add --goal-seeds"),
        (["--task", task, "--goal-seeds", "1"], "add --zoo"),
    ]:
        assert cpd(["teachers", "eval", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert load_teachers_json(zoo)[task] == rec  # nothing refused was written


def test_collect_from_a_zoo_records_and_verifies_a_datasets_manifest(small_zoo, tmp_path, capsys):
    """`cpd teachers collect --zoo Z --manifest M`: a Minari dataset per task, entered in the manifest with
    its size and content digest; collected again elsewhere it is verified identical; a manifest entry that
    disagrees is one line naming both digests; a task the zoo lacks names the training command."""
    zoo, task, _ = small_zoo
    manifest = tmp_path / "datasets.json"
    argv = ["teachers", "collect", "--zoo", str(zoo), "--tasks", task, "--episodes", "2", "--num-envs", "2",
            "--max-episode-steps", "20", "--manifest", str(manifest)]  # fmt: skip
    assert cpd([*argv, "--run-dir", str(tmp_path / "a")]) == 0
    entry = json.load(open(manifest))["datasets"][task]
    assert entry["teacher"] == f"zoo:{zoo}/{task}" and (entry["episodes"], entry["steps"]) == (2, 40)
    assert entry["bytes"] > 0 and len(entry["content_sha256"]) == 64
    assert "added" in capsys.readouterr().out
    data = load_teacher_data([task], tmp_path / "a" / "datasets")  # what the digest covers, loaded back
    assert len(data) == 40 and data.tasks == [task]

    assert cpd([*argv, "--run-dir", str(tmp_path / "b")]) == 0  # regenerated elsewhere: the same data
    assert "verified" in capsys.readouterr().out
    assert json.load(open(manifest))["datasets"][task] == entry

    doc = json.load(open(manifest))
    doc["datasets"][task]["content_sha256"] = "0" * 64
    json.dump(doc, open(manifest, "w"))
    assert cpd([*argv, "--run-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from" in err[0] and "000000000000" in err[0]

    argv[argv.index(task)] = "push-wall-v3"
    assert cpd([*argv, "--run-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no teacher for push-wall-v3" in err[0] and "cpd teachers train" in err[0]


def test_the_committed_zoo_table_is_the_zoos_record():
    """bench/zoo_table.md (quoted in docs/teachers.md) is what `python bench/zoo_table.py` makes of the
    shipped teachers.json: a teacher added or re-measured without regenerating it fails here."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "zoo_table.py"), "--out", "-"],
                         capture_output=True, text=True, check=True, cwd=root, env=env).stdout  # fmt: skip
    committed = open(os.path.join(root, "bench", "zoo_table.md"), encoding="utf-8").read()
    assert committed.endswith(out), "regenerate with: python bench/zoo_table.py"


def test_export_from_a_training_runs_record_keeps_the_attempts_before_it(small_zoo, tmp_path, capsys):
    """`cpd teachers export --record RUN/teachers.json`: the exported attempt's eval.json and curve.json give
    its provenance, and the attempts below the gate before it (their env steps and wall time) are kept."""
    _, task, file = small_zoo
    run = tmp_path / "run"
    attempt = run / "teachers" / task / "ppo-demos"
    attempt.mkdir(parents=True)
    shutil.copy(file, attempt / "policy.pt")
    json.dump({"algorithm": "ppo+demos", "total_steps": 1000, "extra_env_steps": 20, "wall_time_s": 3.0,
               "scripted_success": 1.0}, open(attempt / "eval.json", "w"))  # fmt: skip
    json.dump({"points": [{"env_steps": 500, "success": 0.5}, {"env_steps": 1000, "success": 0.9}],
               "config": {"seed": 7}}, open(attempt / "curve.json", "w"))  # fmt: skip
    history = [{"path": f"runs/x/teachers/{task}/ppo/policy.pt", "algorithm": "ppo", "total_steps": 4000,
                "success_rate": 0.0, "wall_time_s": 9.0},
               {"path": f"runs/x/teachers/{task}/ppo-demos/policy.pt", "algorithm": "ppo+demos",
                "total_steps": 1000, "success_rate": 0.9, "wall_time_s": 3.0}]  # fmt: skip
    json.dump({"teachers": {task: {"history": history}}}, open(run / "teachers.json", "w"))
    out = tmp_path / "zoo2"
    argv = [
        "teachers",
        "export",
        "--zoo",
        str(out),
        "--task",
        task,
        "--checkpoint",
        str(attempt / "policy.pt"),
        "--record",
        str(run / "teachers.json"),
        "--goals",
        "3",
        "--num-envs",
        "3",
        "--threshold",
        "0",
    ]
    assert cpd(argv) == 0
    rec = load_teachers_json(out)[task]
    assert rec.algorithm == "ppo+demos" and rec.env_steps == 1020 and rec.wall_time_s == 3.0
    prov = rec.history[0]
    assert prov["earlier_attempts"] == [{"algorithm": "ppo", "total_steps": 4000, "success_rate": 0.0,
                                         "wall_time_s": 9.0}]  # fmt: skip
    assert prov["curve"] == [[500, 0.5], [1000, 0.9]] and prov["seed"] == 7
    assert prov["scripted_success"] == 1.0
    capsys.readouterr()
    argv[argv.index("--task") + 1] = "push-v3" if task != "push-v3" else "reach-v3"
    assert cpd(argv) == 2  # the run holds no such task
    assert "has no record of" in capsys.readouterr().err


def test_a_run_with_behaviours_collects_a_task_with_another_tasks_teacher(tmp_path, capsys):
    """`behaviours: {reach-v3: push-v3}` (teachers: zoo): push's zoo teacher collects reach's data (the
    manifest names it, its actions are that teacher's), reach's record names it in acts_as and keeps its own
    teacher's success as the yardstick; bad behaviours are refused in one line before anything is written."""
    _, records = zoo_records("metaworld-v3")
    tiny = ["distill.steps_per_stage=2", "distill.episodes_per_task=1", "distill.eval_goals=1",
            "distill.eval_envs=1", "distill.batch_size=8", "fidelity.episodes=0", "methods=[cpd]",
            "tasks=[reach-v3, push-v3]", "tasks_per_stage=1"]  # fmt: skip

    def run(out, behaviours: str, preset: str = "mt25") -> int:
        argv = ["run", "--preset", preset, "--out", str(out), "--no-progress"]
        for item in [*tiny, f"behaviours={behaviours}"]:
            argv += ["--set", item]
        return cpd(argv if preset == "quick" else [*argv, "--teachers", "zoo"])

    out = tmp_path / "run"
    assert run(out, "{reach-v3: push-v3}") == 0
    gate = json.load(open(out / "teachers.json"))
    reach = gate["teachers"]["reach-v3"]
    assert reach["acts_as"] == "push-v3" and reach["success_rate"] == records["reach-v3"].success_rate
    assert "acts_as" not in gate["teachers"]["push-v3"]
    assert gate["settings"]["behaviours"] == {"reach-v3": "push-v3"}
    manifest = json.load(open(out / "datasets" / "reach-v3.collected.json"))
    assert manifest["spec"]["teacher"] == "zoo:metaworld-v3/push-v3@reach-v3"
    own = evaluate_teacher(zoo_teacher("reach-v3"), "reach-v3", num_goals=1, num_envs=1)["success_rate"]
    assert manifest["teacher_success"] == own  # the yardstick: reach's own teacher, on the run's 1 goal
    data = load_teacher_data(["reach-v3"], out / "datasets")
    obs, means = data.obs[:16].numpy(), data.action_mean[:16].numpy()
    np.testing.assert_allclose(means, zoo_teacher("push-v3").action_mean(obs), atol=1e-5)
    assert not np.allclose(means, zoo_teacher("reach-v3").action_mean(obs), atol=1e-3)
    capsys.readouterr()
    for bad, why in [
        ("{reach-v3: reach-v3}", "must be another task"), ("{door-open-v3: push-v3}", "not among"),
        ("{reach-v3: push-v3, push-v3: reach-v3}", "must be another task"),
        ("{reach-v9: push-v3}", "unknown Meta-World v3 task"),
    ]:  # fmt: skip
        assert run(tmp_path / "bad", bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (bad, err)
        assert not (tmp_path / "bad").exists()
    assert run(tmp_path / "bad", "{reach-v3: push-v3}", preset="quick") == 2
    assert "only with teachers: zoo" in capsys.readouterr().err
