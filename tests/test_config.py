"""One config schema (cpd_fast.config): typed validation, one rule for unknown keys, one-line errors,
``cpd distill`` flags generated from DistillConfig, and settings a run would ignore refused."""

from __future__ import annotations

import dataclasses

import pytest

import cpd_fast.cli.distill
import cpd_fast.cli.run
import cpd_fast.cli.teachers
from cpd_fast import cli
from cpd_fast.cli import build_parser
from cpd_fast.config import from_mapping, parse_set
from cpd_fast.distill.config import DistillConfig
from cpd_fast.errors import format_error
from cpd_fast.pipeline import PipelineConfig, resolve_config
from cpd_fast.teachers.ppo import RECIPES


def test_unknown_key_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) in distill: stepz_per_stage; known: suite, tasks"
    ):
        from_mapping(DistillConfig, {"stepz_per_stage": 5}, "distill")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in distill config: stepz"):
        DistillConfig.from_dict({"stepz": 1})  # saved configs too: nothing is dropped silently
    with pytest.raises(ValueError, match=r"unknown key\(s\) in the config: metods"):
        resolve_config("quick", overrides={"metods": ["cpd"]})
    with pytest.raises(ValueError) as info:
        DistillConfig(student={"d_modle": 4})
    assert "unknown key 'student.d_modle'" in format_error("cpd distill", info.value)[0]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps_per_stage": "abc"}, "steps_per_stage: input should be a valid integer, got 'abc'"),
        ({"steps_per_stage": 0}, "steps_per_stage: input should be greater than 0, got 0"),
        ({"steps_per_stage": True}, "steps_per_stage: input should be a valid integer, got True"),
        ({"lr": "1e-3"}, "lr: input should be a valid number, got '1e-3'"),  # YAML 1.1 reads 1e-3 as text
        ({"budget": float("nan")}, "budget: input should be a finite number, got nan"),
        ({"ewc_gamma": 1.5}, "ewc_gamma: input should be less than or equal to 1, got 1.5"),
        ({"eval_modes": ["oracle"]}, "eval_modes.0: input should be 'inferred' or 'prototype', got 'oracle'"),
        ({"method": "pack-net"}, "unknown method 'pack-net'; choose one of cpd, finetune"),
    ],
)
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(ValueError) as info:
        from_mapping(DistillConfig, values, "distill")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_direct_constructor_error_prints_as_one_line():
    with pytest.raises(ValueError) as info:
        DistillConfig(batch_size=-1)
    line, status = format_error("cpd distill", info.value)
    assert status == 2 and "\n" not in line and "batch_size: input should be greater than 0, got -1" in line


def test_distill_flags_are_generated_from_the_config():
    parser = build_parser()
    distill = next(a for a in parser._subparsers._actions if a.dest == "command").choices["distill"]
    dests = {a.dest for a in distill._actions}
    fields = [f.name for f in dataclasses.fields(DistillConfig) if f.name != "student"]
    assert {f"cfg_{f}" for f in fields} <= dests  # a new field is a new flag
    flags = {opt for a in distill._actions for opt in a.option_strings}
    assert {"--episodes", "--no-freeze-shared", "--no-phase2", "--steps-per-stage", "--set"} <= flags


def test_distill_cli_builds_the_config_from_flags_and_set(monkeypatch, tmp_path):
    seen = {}
    stub = lambda cfg, out, data_parallel=None: seen.setdefault("cfg", cfg)
    monkeypatch.setattr(cpd_fast.cli.distill, "run_distill", stub)
    argv = ["distill", "--tasks", "reach-v3", "push-v3", "--episodes", "3", "--no-phase2",
            "--set", "student.d_model=64", "--set", "lr=0.002", "--out", str(tmp_path / "r")]  # fmt: skip
    with pytest.raises(AttributeError):  # the stub returns the config, which has no metrics(): it ran
        cli.main(["--debug", *argv])
    cfg = seen["cfg"]
    assert cfg.tasks == ["reach-v3", "push-v3"] and cfg.tasks_per_stage == 2 and cfg.episodes_per_task == 3
    assert not cfg.phase2 and cfg.lr == 0.002 and cfg.student.d_model == 64 and cfg.student.n_layers == 2


def test_a_flag_the_method_does_not_read_is_refused(tmp_path, capsys):
    code = cli.main(["distill", "--method", "finetune", "--no-freeze-shared", "--ewc-lambda", "5",
                     "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--ewc-lambda, --no-freeze-shared: not used by --method finetune" in err
    assert not (tmp_path / "r").exists()


def test_run_refuses_a_ray_address_it_would_not_use(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--preset", "quick", "--ray-address", "127.0.0.1:1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--ray-address: only used to train PPO teachers" in err and "\n" not in err
    assert not out.exists()


def test_run_warns_about_distill_settings_no_method_reads():
    cfg = resolve_config("quick", overrides={"distill": {"ewc_lambda": 3.0}})
    assert cfg.unused_settings({"distill": {"ewc_lambda": 3.0}}) == ["distill.ewc_lambda"]
    cfg = resolve_config("quick", overrides={"methods": ["ewc"], "distill": {"ewc_lambda": 3.0}})
    assert cfg.unused_settings({"distill": {"ewc_lambda": 3.0}}) == []


def test_a_partial_student_sets_fields_of_the_default_student():
    """``--set distill.student.adapter_rank=8`` once gave StudentConfig()'s d_model-256, 3-block model
    instead of the default student with adapters: a partial student mapping goes over the default one."""
    default = dataclasses.asdict(DistillConfig().student)
    for student in (
        DistillConfig.from_dict({"student": {"adapter_rank": 8}}).student,
        DistillConfig(student={"adapter_rank": 8}).student,
        resolve_config("mt25", overrides={"distill": {"student": {"adapter_rank": 8}}}).distill["student"],
    ):
        got = student if isinstance(student, dict) else dataclasses.asdict(student)
        assert got == {**default, "adapter_rank": 8}


def test_pipeline_sections_are_typed():
    expected = r"the config: gate\.threshold: input should be less than or equal to 1, got 2\.0"
    with pytest.raises(ValueError, match=expected):
        PipelineConfig.from_dict({"suite": "mt10", "gate": {"threshold": 2.0}})
    with pytest.raises(ValueError, match=r"unknown gate.on_fail 'x'"):
        PipelineConfig.from_dict({"suite": "mt10", "gate": {"on_fail": "x"}})


def test_set_values_in_exponent_notation_are_numbers():
    # YAML 1.1 alone reads 1e-4 as a string, which a float field then refuses
    got = parse_set(["lr=1e-4", "a.b=2.5E3", "name=x1e5", "n=3"])
    assert got == {"lr": 1e-4, "a": {"b": 2500.0}, "name": "x1e5", "n": 3}


def test_teachers_train_ppo_settings_reach_the_config(monkeypatch, tmp_path):
    seen = {}
    stub = lambda tasks, run_dir, cfg, **kw: seen.setdefault("cfg", cfg) and {}
    monkeypatch.setattr(cpd_fast.cli.teachers, "train_teachers", stub)
    argv = ["teachers", "train", "--tasks", "reach-v3", "--run-dir", str(tmp_path / "r"),
            "--recipe", "metaworld", "--ppo", "learning_rate=1e-4", "--ppo", "target_kl=0.02",
            "--ppo", "backend=gymnasium"]  # fmt: skip
    assert cli.main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.learning_rate, cfg.target_kl, cfg.backend) == (1e-4, 0.02, "gymnasium")
    assert cfg.num_envs == RECIPES["metaworld"]["num_envs"]  # the recipe's other settings stay


def test_per_method_settings_reach_their_method_only():
    cfg = resolve_config("mt25-study")
    assert cfg.distill_config("packnet").eval_modes == ("prototype",)
    assert cfg.distill_config("cpd").eval_modes == ("inferred", "prototype")
    assert "per_method" in cfg.to_dict() and "per_method" not in resolve_config("quick").to_dict()
    tuned = resolve_config("quick", overrides={"per_method": {"finetune": {"lr": 1e-4}}})
    assert tuned.distill_config("finetune").lr == 1e-4 and tuned.distill_config("cpd").lr == 5e-4
    with pytest.raises(ValueError, match="share its teachers and datasets"):
        resolve_config("quick", overrides={"per_method": {"cpd": {"episodes_per_task": 3}}})
    with pytest.raises(ValueError, match="ewc is not among this run's methods"):
        resolve_config("quick", overrides={"per_method": {"ewc": {"ewc_lambda": 10.0}}})
    with pytest.raises(ValueError, match="no task-free evaluation"):
        resolve_config("mt25-study", overrides={"per_method": {"packnet": {"eval_modes": ["inferred"]}}})


def test_run_with_seeds_makes_one_run_per_seed(monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(cpd_fast.cli.run, "run_pipeline", lambda cfg, out: made.append((cfg.seed, out)))
    assert cli.main(["run", "--preset", "quick", "--seeds", "3", "1", "--out", str(tmp_path)]) == 0
    assert made == [(3, str(tmp_path / "s3")), (1, str(tmp_path / "s1"))]
    with pytest.raises(SystemExit):  # one of --seed / --seeds
        cli.main(["run", "--seed", "0", "--seeds", "1"])
    assert cli.main(["run", "--seeds", "2", "2"]) == 2  # a seed twice: a one-line error


def test_the_task_list_is_named_by_what_it_is():
    """A preset's name titles its own task list only: MT25's first ten tasks under the mt25 preset are MT10,
    not "mt25" (results and reports group by this name)."""
    from cpd_fast.pipeline.config import load_preset
    from cpd_fast.tasks import SUITES

    quick = load_preset("quick")["tasks"]
    assert (
        PipelineConfig(preset="quick", tasks=quick, tasks_per_stage=2).distill_config("cpd").task_list_name()
        == "quick"
    )
    first10 = PipelineConfig(preset="mt25", tasks=list(SUITES["mt25"][:10]))
    assert first10.distill_config("cpd").task_list_name() == "mt10"
    assert PipelineConfig(preset="mt25", suite="mt25").distill_config("cpd").task_list_name() == "mt25"
    two = PipelineConfig(preset="quick", tasks=["reach-v3", "push-v3"], tasks_per_stage=1)
    assert two.distill_config("cpd").task_list_name() == "mt10[:2]"
    other = PipelineConfig(preset="quick", tasks=["push-v3", "reach-v3"], tasks_per_stage=1)
    assert other.distill_config("cpd").task_list_name() == "custom"
    assert DistillConfig(suite="mt25", tasks=list(SUITES["mt25"][:10])).task_list_name() == "mt25[:10]"
