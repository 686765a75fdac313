"""Task suites and stages (cpd_fast.tasks)."""

import subprocess
import sys

import pytest

from cpd_fast.tasks import CW10, MT10, MT25, MT50, MT50_STREAM, SUITES, resolve_tasks, stages, validate_task


def test_hard_coded_lists_match_metaworld():
    env_dict = pytest.importorskip("metaworld.env_dict")
    assert list(MT10) == list(env_dict.MT10_V3)
    assert list(MT25) == list(env_dict.MT25_V3)
    assert list(MT50) == list(env_dict.MT50_V3)
    assert list(MT50) == list(env_dict.ALL_V3_ENVIRONMENTS)


def test_cw10_is_continual_world_order_and_exists_in_v3():
    assert CW10[0] == "hammer-v3" and CW10[-1] == "peg-unplug-side-v3"
    assert len(set(CW10)) == 10
    assert set(CW10) <= set(MT50)


def test_suite_sizes_and_uniqueness():
    sizes = {"mt10": 10, "mt25": 25, "mt50": 50, "cw10": 10, "cw20": 20}
    assert {name: len(suite) for name, suite in SUITES.items()} == sizes  # exactly these suites, in order
    assert list(SUITES) == list(sizes)  # the order error messages list them in
    for name, n in sizes.items():
        distinct = list(dict.fromkeys(SUITES[name]))
        assert len(distinct) == (10 if name == "cw20" else n)  # only cw20 revisits its tasks
        assert resolve_tasks(name) == distinct and resolve_tasks(name, repeats=True) == list(SUITES[name])
    assert MT25[:10] == MT10
    assert MT25[-1] == "dial-turn-v3"


def test_mt50_stream_is_mt25_then_the_other_25_in_mt50_order():
    st = stages("mt50", 5)
    assert len(st) == 10 and st[:5] == stages("mt25", 5)  # MT50's first half is the MT25 stream
    rest = [t for s in st[5:] for t in s]
    assert rest == [t for t in MT50 if t not in MT25] and set(MT50_STREAM) == set(MT50)
    assert st[5] == ["assembly-v3", "bin-picking-v3", "box-close-v3", "button-press-v3", "coffee-push-v3"]


def test_mt25_stages_are_five_by_five_in_order():
    st = stages("mt25", 5)
    assert len(st) == 5 and all(len(s) == 5 for s in st)
    assert [t for s in st for t in s] == list(MT25)
    assert st[0] == ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3"]
    assert st[4][-1] == "dial-turn-v3"


def test_stages_of_explicit_list_and_bad_sizes():
    assert stages(["reach-v3", "push-v3"], 1) == [["reach-v3"], ["push-v3"]]
    with pytest.raises(ValueError, match="does not split"):
        stages("mt25", 4)
    with pytest.raises(ValueError, match="positive"):
        stages("mt25", 0)


def test_resolve_suite_case_insensitive_and_single_task():
    assert resolve_tasks("MT10") == list(MT10)
    assert resolve_tasks("reach-v3") == ["reach-v3"]
    assert resolve_tasks(["push-v3", "reach-v3"]) == ["push-v3", "reach-v3"]


def test_unknown_task_error_lists_close_matches():
    with pytest.raises(ValueError, match="dial-turn-v3"):
        validate_task("dial-trun-v3")
    with pytest.raises(ValueError, match="reach-v3"):
        validate_task("reach")  # missing -v3 suffix
    with pytest.raises(ValueError, match="reach-v3"):
        resolve_tasks(["reach-v2"])


def test_unknown_suite_error_lists_close_matches():
    with pytest.raises(ValueError, match="mt25"):
        resolve_tasks("mt52")
    with pytest.raises(ValueError, match="duplicate"):
        resolve_tasks(["reach-v3", "reach-v3"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_tasks([])


def test_tasks_module_does_not_import_metaworld():
    code = (
        "import sys, cpd_fast.tasks; "
        "print(any(m in sys.modules for m in ('metaworld', 'envpool', 'gymnasium')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
