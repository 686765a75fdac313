"""One config schema (cpd_fast.config): typed validation, one rule for unknown keys, one-line errors,
``cpd distill`` flags generated from DistillConfig, and settings a run would ignore refused."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

import cpd_fast.cli.distill
import cpd_fast.cli.run
import cpd_fast.cli.teachers
from cpd_fast import cli
from cpd_fast.cli import build_parser
from cpd_fast.config import from_mapping, parse_set
from cpd_fast.distill.config import DistillConfig
from cpd_fast.errors import format_error
from cpd_fast.pipeline import PipelineConfig, resolve_config
from cpd_fast.pipeline.config import inactive_given
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
    # a nested section merges key by key: one student field of one method keeps the preset's others
    plus = resolve_config("mt25-plus", overrides={"per_method": {"cpd": {"student": {"adapter_rank": 4}}}})
    student = plus.distill_config("cpd").student
    assert student.adapter_rank == 4 and student.expert_routing == "task"
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


# ----------------------------------------------------------------------------- settings that do not act

ROUTED = ["--set", "student.expert_routing=task"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            [*ROUTED, "--gate-bias", "-3"],
            "cpd distill: --gate-bias does nothing in this run: the experts are task-routed "
            "(student.expert_routing=task) and the gate never consulted, so a new expert's gate bias is "
            "never read; drop it",
        ),
        (
            [*ROUTED, "--set", "student.top_k=1"],
            "cpd distill: --set student.top_k does nothing in this run: the experts are task-routed "
            "(student.expert_routing=task) and the gate never consulted, so no top-k choice is made; drop it",
        ),
        (
            [*ROUTED, "--no-phase2", "--set", "student.aux_loss_weight=0.1"],
            "cpd distill: --set student.aux_loss_weight, --no-phase2 do nothing in this run: the experts are "
            "task-routed (student.expert_routing=task) and the gate never consulted (--set "
            "student.aux_loss_weight: there is no load-balancing loss; --no-phase2: a stage trains in one "
            "phase, with no Phase 1/2 split); drop them",
        ),
        (
            ["--method", "replay", "--replay-quality", "error"],
            "cpd distill: --replay-quality does nothing in this run: replay is selected uniformly "
            "(replay_selection=uniform), so there is no DPP selection for the error to weight; drop it",
        ),
    ],
)
def test_distill_refuses_a_setting_that_would_not_act(argv, line, tmp_path, capsys):
    """``--gate-bias -3`` with task-routed experts once ran and recorded gate_bias -3: it is refused, by
    name and with why, before anything is written (as a flag the method does not read is)."""
    out = tmp_path / "r"
    code = cli.main(["distill", "--tasks", "reach-v3", "push-v3", *argv, "--out", str(out)])
    assert (code, capsys.readouterr().err.strip()) == (2, line)
    assert not out.exists()


def test_distill_runs_settings_that_act(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(
        cpd_fast.cli.distill, "run_distill", lambda cfg, out, data_parallel=None: seen.append(cfg)
    )
    base = ["distill", "--tasks", "reach-v3", "push-v3", "--out", str(tmp_path / "r")]
    for argv in (
        ["--gate-bias", "-3", "--no-phase2"],  # the gate routes: they act
        [*ROUTED, "--set", "student.adapter_rank=4", "--lr", "1e-3"],  # task routing, nothing inactive set
        ["--method", "replay", "--replay-selection", "dpp", "--replay-quality", "error"],
    ):
        with pytest.raises(AttributeError):  # the stub returns None, which has no metrics(): it ran
            cli.main(["--debug", *base, *argv])
    assert [c.gate_bias for c in seen] == [-3.0, -5.0, -5.0]
    # left at their defaults, the inactive ones are recorded as inactive and left out of the label
    assert seen[1].inactive() == ["student.top_k", "student.aux_loss_weight", "gate_bias", "phase2",
                                  "phase1_fraction", "route_new_experts"]  # fmt: skip


def test_inactive_settings_are_recorded_beside_their_values_and_left_out_of_the_label():
    routed = DistillConfig(student={"expert_routing": "task"}, gate_bias=-3.0, phase2=False)  # from Python
    assert routed.label == "cpd (task-routed experts)"  # not "gate bias -3, no phase 2"
    assert DistillConfig(gate_bias=-3.0).label == "cpd (gate bias -3)"  # the gate routes: it acts
    record = routed.to_record()
    assert record["inactive_settings"] == routed.inactive() and record["gate_bias"] == -3.0
    assert DistillConfig.from_dict(record) == routed
    assert DistillConfig(method="replay", replay_quality="error").label == "replay"
    # top_k sizes a student whose first stage has fewer task experts than top_k: then it acts
    one = DistillConfig(tasks=["reach-v3", "push-v3"], tasks_per_stage=1, student={"expert_routing": "task"})
    assert (
        "student.top_k" not in one.inactive() and "student.top_k" in one.replace(tasks_per_stage=2).inactive()
    )


def test_run_refuses_a_setting_that_would_act_in_no_method(tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        resolve_config("mt25-plus", overrides={"distill": {"gate_bias": -3.0}})
    assert str(info.value) == (
        "distill.gate_bias does nothing in this run: the experts are task-routed "
        "(student.expert_routing=task) and the gate never consulted, so a new expert's gate bias is never "
        "read; drop it"
    )
    with pytest.raises(ValueError, match=r"per_method.cpd.route_new_experts does nothing in this run"):
        resolve_config("mt25-plus", overrides={"per_method": {"cpd": {"route_new_experts": False}}})
    code = cli.main(["run", "--preset", "mt25-plus", "--set", "distill.phase2=false", "--print-config"])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2 and err.startswith("cpd run: distill.phase2 does nothing in this run") and "\n" not in err
    )
    # acts in one of the methods: kept (cpd under the gate; finetune does not read it, which only warns)
    resolve_config("quick", overrides={"distill": {"gate_bias": -3.0}})
    assert resolve_config("mt25-plus", overrides={"methods": ["cpd", "replay"],
                                                  "distill": {"replay_quality": "error"}})  # fmt: skip


def test_presets_set_nothing_that_would_not_act_and_a_run_config_file_still_loads(tmp_path):
    """A preset is held to the rule (every key it sets must act); a ``--config`` file only for values
    other than the default, since a run's own config.yaml lists every value."""
    from cpd_fast.pipeline import PRESETS

    for name in PRESETS:
        resolve_config(name)
    full = resolve_config("mt25-plus").to_dict()  # as config.yaml holds it: gate_bias -5.0, top_k 2, ...
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full))
    assert resolve_config(config_file=str(path)).to_dict() == full
    full["distill"]["gate_bias"] = -3.0
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(
        ValueError, match=rf"distill.gate_bias \(set in {re.escape(str(path))}\) does nothing"
    ):
        resolve_config(config_file=str(path))
    # a preset that set one would be refused, naming the preset
    layer = {"preset": "p", "distill": {"gate_bias": -5.0}}  # at its default: a preset is held to the rule
    refusal = inactive_given(resolve_config("mt25-plus"), [(layer, " (set by the preset p)", True)])
    assert refusal.startswith("distill.gate_bias (set by the preset p) does nothing in this run: the experts")
