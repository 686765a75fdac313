"""Every user mistake on the ``cpd`` command line: one actionable line on stderr, exit status 2, no
traceback (``cpd --debug`` shows it). In-process through ``cpd_fast.cli.main``; a few via the executable."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cpd_fast.cli.demo
from cpd_fast.cli import build_parser, main
from cpd_fast.errors import format_error
from cpd_fast.pipeline import Pipeline
from cpd_fast.teachers import jobs
from cpd_fast.teachers.checkpoint import CheckpointTeacher
from cpd_fast.teachers.gate import TeacherRecord, write_teachers_json
from cpd_fast.teachers.jobs import RAY_CONNECT_TIMEOUT_S, check_ray_address
from cpd_fast.teachers.ppo import ActorCritic, PPOConfig, policy_payload


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr); argparse's usage errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(argv: list[str], capsys, *fragments: str, prog: str | None = None) -> str:
    code, out, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, out, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err + out and "internal error" not in err
    line = lines[0]
    assert line.startswith(prog or "cpd "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def cpd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("cpd")
    cmd = [exe] if exe else [sys.executable, "-m", "cpd_fast.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def _options() -> list[tuple[list[str], argparse.ArgumentParser, argparse.Action]]:
    """(subcommand path such as ``["teachers", "train"]``, its parser, the action) for every option and
    argument of every command."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            else:
                found.append((path, parser, action))

    walk(build_parser(), [])
    return found


def _parser_with(option: str) -> list[list[str]]:
    """Subcommand paths (``["distill"]``, ``["teachers", "train"]``) whose parser has ``option``."""
    return [path for path, _, action in _options() if option in action.option_strings]


# ----------------------------------------------------------------------------- unknown names


def test_unknown_task_suite_method(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert_one_line(["distill", "--tasks", "reach-v9", "push-v3", "--out", out], capsys,
                    "cpd distill: unknown Meta-World v3 task 'reach-v9'", "reach-v3")  # fmt: skip
    assert not os.path.exists(out)  # refused before the run directory is made
    assert_one_line(["distill", "--suite", "mt99", "--out", out], capsys, "unknown suite or task 'mt99'")
    assert_one_line(["teachers", "train", "--suite", "mt99", "--run-dir", out], capsys,
                    "cpd teachers train: unknown suite or task 'mt99'")  # fmt: skip
    assert_one_line(["envs", "check", "--tasks", "reach"], capsys, "cpd envs check: unknown", "reach-v3")
    assert_one_line(["teachers", "eval", "--task", "reach-v9", "--source", "scripted"], capsys,
                    "cpd teachers eval: unknown Meta-World v3 task")  # fmt: skip
    assert_one_line(["distill", "--method", "pack-net", "--out", out], capsys,
                    "cpd distill: error: argument --method: invalid choice: 'pack-net'")  # fmt: skip
    assert_one_line(["distill", "--method", "packnet", "--out", out], capsys,
                    "cpd distill: packnet", "no task-free evaluation", "--eval-modes prototype")  # fmt: skip
    assert_one_line(["frobnicate"], capsys, "cpd: error: argument COMMAND: invalid choice", prog="cpd:")
    assert_one_line(["distill", "--tasks", "reach-v3", "push-v3", "drawer-close-v3", "--out", out], capsys,
                    "does not split into stages of 2")  # fmt: skip


def test_every_command_is_registered():
    """A command whose registration broke is missing here (its tests would fail on argparse's usage)."""
    commands = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for name, sub in subs[0].choices.items() if subs else ():
            walk(sub, [*path, name])
        if not subs:
            commands.append(" ".join(path))

    walk(build_parser(), [])
    assert sorted(commands) == sorted([
        "dpp-demo", "envs check", "teachers train", "teachers export", "teachers collect", "teachers eval",
        "distill", "report", "run",
    ])  # fmt: skip
    assert ["run"] in _parser_with("--preset")


def test_no_option_overwrites_the_parsers_own_destinations():
    """A sub-command's option whose dest is the top-level ``command`` (or another level's sub-command) would
    overwrite it: `cpd teachers export` without `--command` once printed the top-level help, did nothing."""
    parsers = {id(p): p for _, p, _ in _options()}.values()
    subs = [a for p in parsers for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    reserved = {"debug"} | {a.dest for a in subs}
    assert {"command", "teachers_command"} <= reserved
    clashes = [(path, a.dest) for path, _, a in _options() if path and a.dest in reserved]
    assert clashes == []


def test_unknown_preset(capsys):
    assert_one_line(["run", "--preset", "huge"], capsys, "cpd run: error: argument --preset", "'huge'")


def test_missing_required_argument_is_one_line(capsys):
    assert_one_line(["distill"], capsys, "cpd distill: error:", "--out")
    assert_one_line(["teachers"], capsys, "cpd teachers: error:", "TEACHERS_COMMAND")


# ----------------------------------------------------------------------------- budgets and counts


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["distill", "--budget", "0"], "argument --budget: must be a finite number > 0, got '0'"),
        (["distill", "--budget", "-1"], "argument --budget: must be a finite number > 0"),
        (["distill", "--budget", "nan"], "argument --budget: must be a finite number, got 'nan'"),
        (["distill", "--budget", "inf"], "argument --budget: must be a finite number"),
        (["distill", "--budget", "lots"], "argument --budget: expected a number, got 'lots'"),
        (["distill", "--steps-per-stage", "0"], "argument --steps-per-stage: must be a positive int"),
        (["distill", "--episodes", "0"], "argument --episodes: must be a positive int (>= 1), got '0'"),
        (["distill", "--episodes", "-3"], "argument --episodes: must be a positive int"),
        (["distill", "--lr", "nan"], "argument --lr: must be a finite number"),
        (["distill", "--replay-fraction", "0"], "argument --replay-fraction: must be a finite number > 0"),
        (["distill", "--threads", "-1"], "argument --threads: must be an int >= 0"),  # 0: torch default
        (["distill", "--seed", "-1"], "argument --seed: must be an int in [0, 2**31)"),
        (["teachers", "train", "--total-steps", "0"], "argument --total-steps: must be a positive int"),
        (["teachers", "train", "--threshold", "nan"], "argument --threshold: must be a finite number"),
        (["teachers", "train", "--threshold", "1.5"], "argument --threshold: must be in [0, 1]"),
        (
            ["teachers", "train", "--retrain-factor", "0"],
            "argument --retrain-factor: must be a finite number > 0",
        ),
        (["teachers", "train", "--workers", "0"], "argument --workers: must be a positive int"),
        (["teachers", "train", "--give-up", "5:2"], "argument --give-up: SUCCESS must be in (0, 1]"),
        (["teachers", "train", "--give-up", "0:0.1"], "argument --give-up: must be a positive int"),
        (["teachers", "train", "--give-up", "500"], "argument --give-up: expected STEPS:SUCCESS"),
        (["teachers", "collect", "--episodes", "0"], "argument --episodes: must be a positive int"),
        (
            ["teachers", "collect", "--noise-std", "-0.1"],
            "argument --noise-std: must be a finite number >= 0",
        ),
        (["teachers", "eval", "--goals", "0"], "argument --goals: must be a positive int"),
        (["envs", "check", "--episodes", "0"], "argument --episodes: must be a positive int"),
        (["dpp-demo", "--k", "0"], "argument --k: must be a positive int"),
    ],
)
def test_invalid_budgets_and_counts(argv, fragment, tmp_path, capsys):
    required = {"distill": ["--out", str(tmp_path)], "train": ["--run-dir", str(tmp_path)],
                "collect": ["--run-dir", str(tmp_path)], "eval": ["--task", "reach-v3"]}  # fmt: skip
    words = [a for a in argv[:2] if not a.startswith("-")]
    assert_one_line([*argv, *required.get(words[-1], [])], capsys, fragment, prog=f"cpd {' '.join(words)}:")


def test_dpp_demo_k_above_n(capsys):
    assert_one_line(["dpp-demo", "--n", "5", "--k", "10"], capsys, "cpd dpp-demo: --k 10 is more than --n 5")


# ----------------------------------------------------------------------------- teacher files


def _teachers_json(run_dir, path: str | None) -> None:
    rec = TeacherRecord(task="reach-v3", source="ppo", path=path, success_rate=0.9, protocol="official",
                        threshold=0.8, passed=True, status="ok", used=True, flagged=False,
                        history=[])  # fmt: skip
    write_teachers_json(run_dir, {"reach-v3": rec}, tasks=["reach-v3"])


def test_missing_teacher_files(tmp_path, capsys):
    empty = tmp_path / "teachers"
    empty.mkdir()
    assert_one_line(["teachers", "collect", "--run-dir", str(empty)], capsys,
                    "cpd teachers collect: no teachers.json at",
                    "run `cpd teachers train` first")  # fmt: skip
    assert_one_line(["distill", "--tasks", "reach-v3", "push-v3", "--teachers", str(empty), "--out",
                     str(tmp_path / "run")], capsys, "cpd distill: no teachers.json")  # fmt: skip

    _teachers_json(empty, str(tmp_path / "gone" / "policy.pt"))  # points at a checkpoint that is not there
    assert_one_line(["teachers", "collect", "--run-dir", str(empty), "--tasks", "reach-v3"], capsys,
                    "cpd teachers collect: no PPO policy checkpoint at", "gone/policy.pt")  # fmt: skip
    assert not (empty / "datasets").exists()  # every teacher loads before any collection starts
    missing = str(tmp_path / "x.pt")
    assert_one_line(["teachers", "eval", "--task", "reach-v3", "--checkpoint", missing], capsys,
                    "cpd teachers eval: no PPO policy checkpoint at")  # fmt: skip
    assert_one_line(["teachers", "eval", "--task", "reach-v3"], capsys, "--checkpoint PATH is required")
    assert_one_line(["teachers", "train", "--tasks", "reach-v3", "--run-dir", str(tmp_path / "r"),
                     "--fidelity", str(tmp_path / "nope.json")], capsys,
                    "cpd teachers train: no fidelity report at", "cpd envs check --out")  # fmt: skip


def _bad_checkpoint(path, obs_dim: int = 39, act_dim: int = 4, garbage: bool = False) -> str:
    """A policy.pt whose network takes ``obs_dim`` observations / gives ``act_dim`` actions."""
    if garbage:
        path.write_bytes(b"PK\x03\x04 truncated")  # a torch zip cut short
        return str(path)
    payload = policy_payload(ActorCritic(PPOConfig()), PPOConfig(), "reach-v3")
    resized = {}
    for k, v in payload["state_dict"].items():
        shape = list(v.shape)
        if k.startswith("obs_norm.") and shape:
            shape = [obs_dim]
        elif k.endswith(".0.weight"):
            shape[1] = obs_dim
        elif k == "actor_logstd" or (k.startswith("actor.4") and shape):
            shape[0] = act_dim
        resized[k] = torch.zeros(shape, dtype=v.dtype)
    payload["state_dict"] = resized
    torch.save(payload, path)
    return str(path)


def test_teacher_observation_dim_mismatch(tmp_path, capsys):
    ckpt = _bad_checkpoint(tmp_path / "policy.pt", obs_dim=50)
    assert_one_line(["teachers", "eval", "--task", "reach-v3", "--checkpoint", ckpt], capsys,
                    "cpd teachers eval: teacher checkpoint", "takes 50-dim observations",
                    "use 39", "cpd teachers train")  # fmt: skip
    _teachers_json(tmp_path, ckpt)  # the same checkpoint behind a gate: collection refuses it too
    assert_one_line(["teachers", "collect", "--run-dir", str(tmp_path)], capsys, "takes 50-dim observations")

    ckpt = _bad_checkpoint(tmp_path / "act.pt", act_dim=6)
    assert_one_line(["teachers", "eval", "--task", "reach-v3", "--checkpoint", ckpt], capsys,
                    "outputs 6-dim actions but Meta-World v3 tasks use 4")  # fmt: skip
    ckpt = _bad_checkpoint(tmp_path / "junk.pt", garbage=True)
    assert_one_line(["teachers", "eval", "--task", "reach-v3", "--checkpoint", ckpt], capsys,
                    "cannot read teacher checkpoint", "corrupt")  # fmt: skip


def test_checkpoint_teacher_api_names_the_dims(tmp_path):
    with pytest.raises(ValueError, match=r"takes 7-dim observations but .* use 39"):
        CheckpointTeacher(_bad_checkpoint(tmp_path / "p.pt", obs_dim=7), task="reach-v3")


# ----------------------------------------------------------------------------- device and Ray


def test_device_that_is_not_there(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    paths = _parser_with("--device")
    assert ["distill"] in paths
    required = {"distill": ["--out", str(tmp_path / "d")], "run": ["--out", str(tmp_path / "r")]}
    for path in paths:
        argv = [*path, *required.get(path[-1], []), "--device", "cuda"]
        assert_one_line(argv, capsys, f"cpd {' '.join(path)}: --device cuda but torch", "sees no CUDA device",
                        "use --device cpu")  # fmt: skip
    assert not os.listdir(tmp_path)  # refused before anything was written


def _fake_connect(monkeypatch, error: OSError | None) -> list[tuple[tuple[str, int], float | None]]:
    """Replace check_ray_address's TCP connect: raise ``error`` at once (``None``: a cluster answers).

    Returns the list of ``(address, timeout)`` the connects were given.
    """
    calls = []

    def create_connection(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        if error is not None:
            raise error
        return contextlib.nullcontext()

    monkeypatch.setattr(jobs.socket, "create_connection", create_connection)
    return calls


def _written(run_dir) -> list[str]:
    """Files under ``run_dir`` other than its lock (``cpd teachers train`` locks the directory first)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != ".lock")


def test_ray_address_that_does_not_answer(tmp_path, capsys, monkeypatch):
    """Refused before any teacher job starts: one connect with the bounded timeout, nothing written."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connects = _fake_connect(monkeypatch, TimeoutError("timed out"))
    started = []
    monkeypatch.setattr(jobs, "_run_ray", lambda *a, **kw: started.append(a) or [])
    monkeypatch.setattr(jobs, "_run_local", lambda *a, **kw: started.append(a) or [])
    run_dir = tmp_path / "r"
    argv = ["teachers", "train", "--backend", "ray", "--ray-address", "127.0.0.1:1", "--tasks", "reach-v3",
            "--run-dir", str(run_dir)]  # fmt: skip
    timeout = jobs.RAY_CONNECT_TIMEOUT_S
    assert_one_line(argv, capsys, "cpd teachers train: no Ray cluster answers at 127.0.0.1:1",
                    f"(timed out, {timeout:g} s connect timeout)", "ray start --head")  # fmt: skip
    assert connects == [(("127.0.0.1", 1), timeout)]
    assert started == [] and _written(run_dir) == []

    argv[argv.index("127.0.0.1:1")] = "headnode"
    assert_one_line(argv, capsys, "--ray-address 'headnode' is not HOST:PORT")
    assert len(connects) == 1  # a malformed address is refused without a connect
    assert started == [] and _written(run_dir) == []


def test_cpd_run_checks_the_ray_address_before_any_step(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connects = _fake_connect(monkeypatch, ConnectionRefusedError(111, "Connection refused"))

    def no_step(self):
        raise AssertionError("a pipeline step ran")

    monkeypatch.setattr(Pipeline, "run", no_step)
    out = tmp_path / "run"
    argv = ["run", "--teachers", "ppo", "--ray-address", "10.0.0.7:6379", "--no-progress", "--out", str(out)]
    assert_one_line(argv, capsys, "cpd run: no Ray cluster answers at 10.0.0.7:6379 (Connection refused",
                    "ray start --head")  # fmt: skip
    assert connects == [(("10.0.0.7", 6379), jobs.RAY_CONNECT_TIMEOUT_S)]
    assert not out.exists()  # not even config.yaml: the fidelity step would have come first


def test_ray_address_check_gives_the_connect_its_timeout(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connects = _fake_connect(monkeypatch, TimeoutError("timed out"))
    timed_out = r"no Ray cluster answers at 192\.0\.2\.1:6379 \(timed out, 0\.5 s connect timeout\)"
    with pytest.raises(ConnectionError, match=timed_out):
        check_ray_address("192.0.2.1:6379", timeout=0.5)
    with pytest.raises(ConnectionError, match=r"answers at ray://\[::1\]:10001 .* fix --ray-address"):
        check_ray_address("ray://[::1]:10001")  # Ray Client address, IPv6 host
    assert connects == [(("192.0.2.1", 6379), 0.5), (("::1", 10001), RAY_CONNECT_TIMEOUT_S)]
    assert 0 < RAY_CONNECT_TIMEOUT_S < float("inf")  # the default never waits for the OS's own timeout
    check_ray_address(None)  # a local Ray / Ray's own discovery: nothing to connect to
    check_ray_address("auto")
    assert len(connects) == 2

    connects = _fake_connect(monkeypatch, None)  # something listens: the check passes
    check_ray_address("10.0.0.7:6379", timeout=2)
    assert connects == [(("10.0.0.7", 6379), 2)]


def test_ray_address_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # what ray.init() / ray.init("auto") would join
    for address in (None, "auto"):
        with pytest.raises(ConnectionError, match=r"answers at 127\.0\.0\.1:1 .* fix RAY_ADDRESS"):
            check_ray_address(address)
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")
    with pytest.raises(ValueError, match="RAY_ADDRESS 'nonsense' is not HOST:PORT"):
        check_ray_address(None)


# ----------------------------------------------------------------------------- the executable, --debug, bugs


def test_executable_one_line_and_debug_traceback(tmp_path):
    r = cpd("teachers", "train", "--backend", "ray", "--ray-address", "127.0.0.1:1", "--tasks", "reach-v3",
            "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("cpd teachers train: no Ray cluster answers") and "Traceback" not in r.stderr

    r = cpd("distill", "--suite", "mt99", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and r.stderr.strip() == (
        "cpd distill: unknown suite or task 'mt99'. Suites: mt10, mt25, mt50, cw10, cw20; or pass a list of "
        "-v3 task names."
    )
    r = cpd("--debug", "distill", "--suite", "mt99", "--out", str(tmp_path / "d"))
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr
    assert "ValueError: unknown suite or task 'mt99'" in r.stderr

    r = cpd("distill", "--budget", "0", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--budget" in r.stderr


def test_bug_is_one_line_with_debug_hint(capsys, monkeypatch):
    def broken(**kw):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cpd_fast.cli.demo, "dpp_demo", broken)
    code, _, err = run_main(["dpp-demo", "--n", "10", "--k", "2"], capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert err.strip() == (
        "cpd dpp-demo: internal error: RuntimeError: boom second line (a bug in cpd_fast; re-run with "
        "`cpd --debug ...` for the traceback)"
    )
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "dpp-demo", "--n", "10", "--k", "2"])


def test_collect_checks_episode_length_before_allocating(tmp_path, capsys):
    argv = ["teachers", "collect", "--run-dir", str(tmp_path), "--source", "scripted", "--tasks", "reach-v3",
            "--max-episode-steps", "1000000000"]  # fmt: skip
    assert_one_line(argv, capsys, "cpd teachers collect: max_episode_steps must be in 1..500")


def test_error_classification():
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 400000000000000 bytes.")  # fmt: skip
    line, code = format_error("cpd x", oom)
    assert code == 2 and line.startswith("cpd x: out of memory (") and "choose smaller sizes" in line
    assert format_error("cpd x", MemoryError())[1] == 2
    assert format_error("cpd x", KeyError("teachers")) == (
        "cpd x: missing entry 'teachers' (re-run with `cpd --debug ...` for the traceback)",
        2,
    )
    assert format_error("cpd x", ConnectionError("refused")) == ("cpd x: refused", 2)
    assert format_error("cpd x", ValueError("two\r\nlines \x1b[31m")) == ("cpd x: two lines \\x1b[31m", 2)
    line, code = format_error("cpd x", AttributeError("oops"))
    assert code == 1 and line.startswith("cpd x: internal error: AttributeError: oops (a bug in cpd_fast;")


@pytest.mark.parametrize(
    "ppo, fragments",
    [
        (["lr=3"], ("unknown key(s) in --ppo: lr", "known: total_steps")),
        (["backend=mujoco"], ("--ppo: backend", "'envpool' or 'gymnasium'", "got 'mujoco'")),
        (["seed=3"], ("set seed with its own flag (--seed), not --ppo",)),
        (["learning_rate"], ("expects KEY=VALUE",)),
    ],
)
def test_teachers_train_refuses_bad_ppo_settings_before_training(tmp_path, capsys, ppo, fragments):
    argv = ["teachers", "train", "--tasks", "reach-v3", "--run-dir", str(tmp_path / "r")]
    for item in ppo:
        argv += ["--ppo", item]
    assert_one_line(argv, capsys, "cpd teachers train:", *fragments)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- choices


def _choice_options() -> list[tuple[list[str], argparse.ArgumentParser, argparse.Action]]:
    """:func:`_options` with a fixed set of values (argparse ``choices``)."""
    return [(p, parser, a) for p, parser, a in _options() if a.choices is not None and a.option_strings]


CHOICE_OPTIONS = [(path, action.option_strings[-1]) for path, _, action in _choice_options()]


def test_every_option_with_choices_lists_them_in_its_help(monkeypatch):
    """``cpd distill --help`` once showed ``--method METHOD  default: cpd``: the choices were there but the
    help hid them. Every option's own help block (its name and text) lists every choice."""
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside a choice (online-ewc)
    options = _choice_options()
    assert {
        ("distill", "--method"),
        ("distill", "--precision"),
        ("distill", "--eval-modes"),
        ("run", "--methods"),
        ("run", "--preset"),
        ("teachers train", "--on-fail"),
        ("teachers train", "--recipe"),
    } <= {(" ".join(p), a.option_strings[-1]) for p, _, a in options}
    for path, parser, action in options:
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        text = formatter.format_help()
        missing = [c for c in action.choices if str(getattr(c, "value", c)) not in text]
        assert not missing, (path, action.option_strings, missing, text)


@pytest.mark.parametrize(
    ("path", "option"), CHOICE_OPTIONS, ids=[" ".join([*p, o]) for p, o in CHOICE_OPTIONS]
)
def test_a_bad_choice_is_one_line_naming_every_choice(path, option, capsys):
    action = next(a for p, _, a in _choice_options() if p == path and a.option_strings[-1] == option)
    line = assert_one_line([*path, option, "no-such-choice"], capsys, f"argument {option}", "no-such-choice",
                           prog=f"cpd {' '.join(path)}:")  # fmt: skip
    for choice in action.choices:
        assert repr(str(getattr(choice, "value", choice))) in line, (choice, line)


def test_config_fields_with_fixed_values_are_choice_options():
    """Every Literal field of DistillConfig gets its values as choices from its type (a new one too), and
    the plain-string fields checked against a fixed set get theirs."""
    import typing

    from cpd_fast.cli.flags import field_choices
    from cpd_fast.distill.config import DistillConfig
    from cpd_fast.distill.methods import METHODS

    distill = {a.dest: a for p, _, a in _choice_options() if p == ["distill"]}
    hints = typing.get_type_hints(DistillConfig, include_extras=True)
    literal = {name: field_choices(hint) for name, hint in hints.items() if field_choices(hint)}
    assert {"lr_schedule", "loss_positions", "precision", "replay_selection", "replay_quality",
            "eval_modes"} <= set(literal)  # fmt: skip
    for name, values in literal.items():
        assert list(distill[f"cfg_{name}"].choices) == list(values), name
    assert list(distill["cfg_method"].choices) == list(METHODS)
    assert list(distill["cfg_device"].choices) == ["cpu", "cuda"]


class _Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class _EnumConfig:
    colour: _Colour = _Colour.RED


def test_enum_fields_become_choice_options(capsys):
    from cpd_fast.cli.flags import add_config_flags, flag_values

    parser = argparse.ArgumentParser(prog="t")
    fields = add_config_flags(parser, _EnumConfig)
    assert "one of: red, blue (default: red)" in " ".join(parser.format_help().split())
    assert flag_values(parser.parse_args(["--colour", "blue"]), fields) == {"colour": _Colour.BLUE}
    with pytest.raises(SystemExit):
        parser.parse_args(["--colour", "green"])
    assert "invalid choice: 'green' (choose from 'red', 'blue')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["distill", "--set", "lr_schedule=cosin"], ("--lr-schedule", "'cosine' or 'constant'", "'cosin'")),
        (["distill", "--set", "student.expert_routing=gated"], ("expert_routing must be one of", "'task'")),
        (["distill", "--set", "method=pack-net"], ("unknown method 'pack-net'; choose one of cpd",)),
        (["run", "--set", "gate.on_fail=ignore", "--print-config"], ("unknown gate.on_fail 'ignore'",
                                                                       "retrain, demos, scripted, exclude")),
        (["run", "--set", "distill.precision=fp16", "--print-config"], ("'fp32' or 'bf16'", "'fp16'")),
    ],
)  # fmt: skip
def test_a_bad_value_of_a_key_with_choices_names_them(argv, fragments, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")] if argv[0] == "distill" else []
    assert_one_line([*argv, *out], capsys, *fragments)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", [["--stop-at", "0.9"], ["--give-up", "1000:0.05"]])
def test_measured_training_rules_need_eval_every(flag, tmp_path, capsys):
    run = tmp_path / "run"
    assert_one_line(["teachers", "train", "--tasks", "reach-v3", "--run-dir", str(run), *flag], capsys,
                    f"{flag[0]} needs --eval-every STEPS", prog="cpd teachers train:")  # fmt: skip
    assert not run.exists()
