"""Hypothesis fuzzing of the user surface: the ``cpd`` argument parser and the public API with bad values.

CLI: argv lists built from the real subcommands and options (found by walking ``build_parser()``) with
bad values — zero, negative, NaN, huge, unknown names, empty strings, odd unicode — must end in success or
in exactly one line on stderr with exit status 2: never an uncaught exception, a traceback, or a user
mistake reported as an internal error. So that a *valid* argv returns at once, the entry points where real
work starts (distillation, teacher training, collection, evaluation, the fidelity check, the DPP demo, the
pipeline) are stubbed to raise :class:`Reached`; everything before them — parsing, config validation,
task resolution, teacher loading, the Ray address check — runs for real.

API: ``MoELayer`` (constructor and forward), ``greedy_map`` (the argument checks that
``test_dpp_properties.py`` does not cover, and kernels at extreme magnitudes) and ``load_teacher_data`` must
either work or raise ``ValueError`` / ``TypeError`` (``FileNotFoundError`` for missing data) naming the bad
argument.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpd_fast import MoELayer, greedy_map
from cpd_fast.cli import build_parser, main
from cpd_fast.data import load_teacher_data


def fast(examples: int) -> settings:
    """No per-example deadline (a busy 2-core CI machine), few enough examples to keep the file < 60 s."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


NO_CUDA = not torch.cuda.is_available()


# ----------------------------------------------------------------------------- the CLI


class Reached(BaseException):
    """Raised by a stubbed heavy entry point: the argv was valid and the command got to its real work.

    A BaseException, so that ``main``'s handler (``except Exception``) lets it through to the test."""


def _reached(*args, **kwargs):
    raise Reached


# (module, attribute) where each command's real work starts, as the CLI module that calls it names it (a
# stub on the defining module would not reach a name the CLI imported); validation happens before these
HEAVY = [
    ("cpd_fast.cli.distill", "run_distill"),  # cpd distill
    ("cpd_fast.teachers.jobs", "_run_local"),  # cpd teachers train (after train_teachers' checks)
    ("cpd_fast.teachers.jobs", "_run_ray"),  # ... after check_ray_address
    ("cpd_fast.cli.teachers", "collect_dataset"),  # cpd teachers collect (after every teacher loaded)
    ("cpd_fast.cli.teachers", "evaluate_teacher"),  # cpd teachers eval
    ("cpd_fast.cli.teachers", "add_teacher"),  # cpd teachers export
    ("cpd_fast.cli.envs", "check_fidelity"),  # cpd envs check
    ("cpd_fast.cli.demo", "dpp_demo"),  # cpd dpp-demo
    ("cpd_fast.cli.run", "run_pipeline"),  # cpd run
]


@pytest.fixture(scope="module")
def stubbed_cli(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for module, name in HEAVY:
            # raising=True: a renamed entry point fails here, loudly
            mp.setattr(importlib.import_module(module), name, _reached)
        cwd = tmp_path_factory.mktemp("cwd")
        mp.chdir(cwd)  # relative paths from the fuzzer (and default run dirs) land in a scratch dir
        yield cwd


def _commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf command of ``cpd`` (``("distill",)``, ``("teachers", "train")``, ...) and its parser."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, sub in subs[0].choices.items():
                walk(sub, (*path, name))
        elif path:
            found[path] = parser

    walk(build_parser(), ())
    return found


COMMANDS = _commands()

# values that are wrong somewhere: numbers out of range, names that do not exist, odd text
BAD = [
    "0", "-1", "-7", "nan", "-nan", "inf", "-inf", "1e308", "1e-320", "99999999999999999999999", "2147483648",
    "0.5", "1", "2", "3", "", " ", "abc", "-", "None", "ünïcødé", "💥", "\u202e\u200b", "reach-v3",
    "reach-v9", "push-v3", "mt10", "mt99", "MT10", "cpu", "cuda", "cuda:7", "127.0.0.1:1", "ray://",
    "x:99999",
]  # fmt: skip
# no free text for options that may resolve a host name (a DNS lookup can take seconds)
NO_FREE_TEXT = {"--ray-address"}


TASKS = ["reach-v3", "push-v3", "drawer-close-v3", "window-open-v3"]


def _good(action: argparse.Action) -> st.SearchStrategy[str]:
    """A value the option accepts, so that argv often gets past the parser into the command."""
    kind = getattr(action.type, "__name__", "")
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices])
    if kind in ("positive_int", "seed", "nonnegative_int", "int"):
        return st.sampled_from(["1", "2", "4"])
    if kind == "fraction":
        return st.sampled_from(["0", "0.5", "1"])
    if kind in ("positive_float", "nonnegative_float", "finite_float", "float"):
        return st.sampled_from(["0.5", "1", "2"])
    if action.dest in ("tasks", "task"):
        return st.sampled_from(TASKS)
    if action.dest == "suite":
        return st.sampled_from(["mt10", "mt25", "reach-v3"])
    if action.dest == "ray_address":
        return st.sampled_from(["127.0.0.1:1", "auto"])
    return st.sampled_from(["runA", "runB/x", "."])  # paths; none holds a run


def _bad(option: str) -> st.SearchStrategy[str]:
    if option in NO_FREE_TEXT:
        return st.sampled_from(BAD)
    return st.one_of(st.sampled_from(BAD), st.text(max_size=12))


@st.composite
def argvs(draw) -> list[str]:
    """A real command with ~30% of its options (required ones ~always), good values except 0-3 bad ones."""
    path = draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[path]
    chosen = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positionals (cpd report RUN_DIR...)
            chosen += [("", action)] * draw(st.integers(0, 3))
        elif draw(st.integers(0, 19)) < (19 if action.required else 6):
            chosen.append((action.option_strings[-1], action))
    bad = draw(st.sets(st.integers(0, max(len(chosen) - 1, 0)), max_size=3)) if chosen else set()
    argv = list(path)
    for i, (option, action) in enumerate(chosen):
        value = _bad(option) if i in bad else _good(action)
        if not option:
            argv.append(draw(value))
        elif action.nargs == 0:  # a flag
            argv.append(option)
        elif action.nargs in ("+", "*"):
            argv += [option, *draw(st.lists(st.one_of(_good(action), value), min_size=1, max_size=4))]
        else:
            v = draw(value)
            argv += [f"{option}={v}"] if draw(st.booleans()) else [option, v]
    if draw(st.integers(0, 19)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--frobnicate", "extra", "-x"])))
    return argv


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except Reached:
            code = 0
        except SystemExit as exit_:  # argparse: usage errors (2), --help (0)
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return code, out.getvalue(), err.getvalue()


@fast(250)
@given(argv=argvs())
def test_cli_fuzz_one_line_errors(stubbed_cli, argv):
    code, out, err = run_cli(argv)
    assert "Traceback" not in err + out, (argv, err)
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("cpd"), (argv, err)
        assert code == 2 and "internal error" not in err, (argv, err)  # a user mistake, not a bug


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_valid_argv_of_every_command_reaches_its_stub(stubbed_cli, path, tmp_path):
    """Each command's valid argv really returns at once (the stubs cover every command)."""
    required = {"distill": ["--out", str(tmp_path / "d")], "train": ["--run-dir", str(tmp_path / "t")],
                "collect": ["--run-dir", str(tmp_path), "--source", "scripted", "--tasks", "reach-v3"],
                "eval": ["--task", "reach-v3", "--source", "scripted"], "check": ["--tasks", "reach-v3"],
                "report": [str(tmp_path / "missing")], "dpp-demo": [], "run": ["--out", str(tmp_path / "r")],
                "export": ["--zoo", str(tmp_path / "z"), "--task", "reach-v3",
                           "--checkpoint", str(tmp_path / "p.pt")],
                }  # fmt: skip
    extra = {"train": ["--tasks", "reach-v3"]}
    argv = [*path, *required.get(path[-1], []), *extra.get(path[-1], [])]
    code, _, err = run_cli(argv)
    if path == ("report",):
        assert code == 2 and "results" in err and err.count("\n") == 1
    else:
        assert code == 0, (argv, err)


# ----------------------------------------------------------------------------- MoELayer


def _arg(ok: st.SearchStrategy, bad: list) -> st.SearchStrategy[tuple[object, bool]]:
    return st.one_of(ok.map(lambda v: (v, True)), st.sampled_from(bad).map(lambda v: (v, False)))


SIZE_BAD = [0, -1, -(10**12), 2.0, 2.5, math.nan, "4", None, True, [4]]
DEVICE_BAD = ["gpu", "", "cpu:x", *(["cuda", 5] if NO_CUDA else [])]


@st.composite
def moe_kwargs(draw):
    kw, bad = {}, set()
    for name in ("d_model", "d_hidden", "num_experts"):
        kw[name], ok = draw(_arg(st.integers(1, 6) | st.integers(1, 6).map(np.int64), SIZE_BAD))
        if not ok:
            bad.add(name)
    top_k = draw(st.one_of(st.integers(-2, 8), st.sampled_from([True, 1.0, "2", None, math.nan])))
    experts_ok = "num_experts" not in bad
    valid_k = (
        isinstance(top_k, int)
        and not isinstance(top_k, bool)
        and experts_ok
        and 1 <= top_k <= kw["num_experts"]
    )
    kw["top_k"] = top_k
    if not valid_k:
        bad.add("top_k")
    pools = {
        "activation": (st.sampled_from(["gelu", "relu", "silu"]), ["tanh", "", "GELU", None, ["gelu"], 3]),
        "backend": (st.sampled_from(["auto", "torch"]), ["cuda", "", None, ("torch",)]),
        "new_expert_gate_bias": (st.floats(-10, 10), [math.nan, math.inf, -math.inf, "x", None, True]),
        "aux_loss_weight": (st.floats(0, 1), [-0.1, math.nan, math.inf, "0.01", None]),
        "dtype": (st.sampled_from([None, torch.float32, torch.float64]),
                  [torch.int64, torch.bool, torch.complex64, "float32", np.float32]),
        "device": (st.sampled_from([None, "cpu", torch.device("cpu")]), DEVICE_BAD),
    }  # fmt: skip
    for name, (ok_values, bad_values) in pools.items():
        if draw(st.booleans()):
            kw[name], ok = draw(_arg(ok_values, bad_values))
            if not ok:
                bad.add(name)
    kw["bias"] = draw(st.booleans())
    kw["normalize_topk"] = draw(st.booleans())
    return kw, bad


def _names_one_of(message: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


@fast(150)
@given(case=moe_kwargs())
def test_moe_constructor_fuzz(case):
    kw, bad = case
    if bad:
        with pytest.raises((ValueError, TypeError)) as info:
            MoELayer(**kw)
        # a bad size makes top_k's range unknowable: either name is right
        names = bad | ({"top_k"} if bad & {"num_experts"} else set())
        assert _names_one_of(str(info.value), names), (kw, bad, info.value)
        return
    layer = MoELayer(**kw)
    x = torch.randn(3, kw["d_model"], dtype=kw.get("dtype") or torch.float32)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


LAYER_DIM = 4


@st.composite
def moe_inputs(draw):
    kind = draw(st.sampled_from(["tensor"] * 6 + ["numpy", "list", "none", "scalar"]))
    if kind == "numpy":
        return np.zeros((2, LAYER_DIM), np.float32), False
    if kind == "list":
        return [[0.0] * LAYER_DIM], False
    if kind == "none":
        return None, False
    if kind == "scalar":
        return 1.5, False
    lead = draw(st.lists(st.integers(0, 4), max_size=3))
    last = draw(st.sampled_from([LAYER_DIM] * 4 + [0, 1, 3, 5]))
    others = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
    dtype = draw(st.sampled_from([torch.float32] * 4 + others))
    x = torch.randn(*lead, last, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    finite = True
    if x.numel() and draw(st.booleans()):
        special = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0]))
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
        finite = math.isfinite(special)
    x = x.to(dtype)
    if draw(st.booleans()) and x.dim() >= 2:
        x = x.transpose(0, -2)  # non-contiguous, same last dim
    valid = last == LAYER_DIM and dtype == torch.float32 and finite
    return x, valid


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return MoELayer(LAYER_DIM, 8, 3, top_k=2)


@fast(150)
@given(case=moe_inputs())
def test_moe_forward_fuzz(layer, case):
    x, valid = case
    if not valid:
        with pytest.raises((ValueError, TypeError)) as info:
            layer(x)
        assert re.match(r"x (must|has|contains|is)\b", str(info.value)), info.value
        return
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert layer.aux_loss is not None and torch.isfinite(layer.aux_loss)


# ----------------------------------------------------------------------------- greedy_map


@st.composite
def greedy_map_calls(draw):
    """Argument values tests/test_dpp_properties.py does not try: wrong types for k/kernel/method/gamma/
    eps/quality, numpy inputs (big-endian, object, int), requires_grad and non-contiguous features."""
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    x = torch.randn(
        n, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))), dtype=torch.float64
    )
    bad = set()
    form = draw(st.sampled_from(["torch32", "torch64", "grad", "strided", "np32", "np64", "np_big",
                                 "np_int", "np_object", "list", "none"]))  # fmt: skip
    features = {
        "torch32": lambda: x.float(),
        "torch64": lambda: x,
        "grad": lambda: x.float().requires_grad_(),
        "strided": lambda: torch.cat([x, x], 1)[:, ::2],
        "np32": lambda: x.numpy().astype(np.float32),
        "np64": lambda: x.numpy(),
        "np_big": lambda: x.numpy().astype(">f8"),
        "np_int": lambda: x.numpy().astype(np.int64),
        "np_object": lambda: x.numpy().astype(object),
        "list": lambda: x.tolist(),
        "none": lambda: None,
    }[form]()
    if form in ("np_int", "np_object", "list", "none"):
        bad.add("features")
    kw = {}
    k, ok = draw(_arg(st.integers(1, n) | st.integers(1, n).map(np.int64),
                      [0, -1, n + 1, 10**20, 2.0, "3", None, True]))  # fmt: skip
    if not ok:
        bad.add("k")
    for name, ok_values, bad_values in (
        ("kernel", st.sampled_from(["linear", "cosine", "rbf"]), ["RBF", "", None, ["rbf"], 1]),
        ("method", st.sampled_from(["auto", "greedy", "lazy"]), ["fast", "", None]),
        ("gamma", st.sampled_from([None, 0.1, 2.0, np.float32(0.5), 3]),
         [0, -1.0, math.nan, math.inf, "1", True]),
        ("eps", st.sampled_from([0, 0.0, 1e-10, np.float64(1e-6), 1e-3]),
         [-1e-9, math.nan, math.inf, "0", None]),
        ("return_gains", st.booleans(), []),
    ):  # fmt: skip
        if draw(st.booleans()):
            kw[name], ok = draw(
                _arg(ok_values, bad_values) if bad_values else ok_values.map(lambda v: (v, True))
            )
            if not ok:
                bad.add(name)
    if draw(st.booleans()):
        q = torch.rand(n, dtype=torch.float64) + 0.1
        options = {
            "torch": (q, True), "numpy": (q.numpy(), True), "grad": (q.float().requires_grad_(), True),
            "shape": (torch.ones(n + 1), False), "2d": (q[None], False), "zero": (q * 0, False),
            "negative": (-q, False), "nan": (q * math.nan, False),
            "int": (torch.ones(n, dtype=torch.int64), False),
            "list": (q.tolist(), False), "np_object": (q.numpy().astype(object), False),
        }  # fmt: skip
        kw["quality"], ok = options[draw(st.sampled_from(sorted(options)))]
        if not ok:
            bad.add("quality")
    return features, k, kw, bad, n


@fast(200)
@given(case=greedy_map_calls())
def test_greedy_map_bad_arguments_fuzz(case):
    features, k, kw, bad, n = case
    if bad:
        with pytest.raises((ValueError, TypeError)) as info:
            greedy_map(features, k, **kw)
        assert _names_one_of(str(info.value), bad), (bad, info.value)
        return
    out = greedy_map(features, k, **kw)
    idx = out[0] if kw.get("return_gains") else out
    assert idx.dtype == torch.int64 and idx.dim() == 1 and len(idx) <= k
    assert len(set(idx.tolist())) == len(idx) and all(0 <= i < n for i in idx.tolist())


@fast(60)
@given(
    exponent=st.integers(-300, 300),
    seed=st.integers(0, 99),
    n=st.integers(2, 10),
    d=st.integers(1, 4),
)
def test_greedy_map_cosine_is_scale_invariant(exponent, seed, n, d):
    """Cosine similarity ignores each row's scale, at any magnitude the dtype holds (rows of ~1e±300
    once lost their norm to overflow/underflow: greedy_map returned nothing or arbitrary picks)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = min(n, d)
    expected = greedy_map(x, k, kernel="cosine")
    scaled = greedy_map(x * 10.0**exponent, k, kernel="cosine")
    assert torch.equal(scaled, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_map_kernel_overflow_is_a_value_error(dtype):
    huge = torch.finfo(dtype).max ** 0.5 * 4  # finite features whose squared norm is not
    x = torch.randn(6, 3, dtype=dtype, generator=torch.Generator().manual_seed(0)) * huge
    with pytest.raises(ValueError, match="features are too large: the linear kernel's diagonal overflows"):
        greedy_map(x, 3)
    q = torch.full((6,), huge, dtype=dtype)
    with pytest.raises(ValueError, match="features and quality are too large"):
        greedy_map(torch.randn(6, 3, dtype=dtype), 3, kernel="rbf", quality=q)
    assert len(greedy_map(x, 3, kernel="rbf")) == 3  # rbf of far-apart points: the identity kernel


# ----------------------------------------------------------------------------- load_teacher_data


@st.composite
def loader_calls(draw, root_dir: str):
    names = st.one_of(
        st.sampled_from(["reach-v3", "cpd/reach-v3-v0", "reach-v9", "", "mt10", "a/b", "ünïcødé"]),
        st.text(max_size=10),
    )
    ids = draw(st.one_of(
        st.lists(names, max_size=3),
        st.sampled_from(["reach-v3", None, 3, b"reach-v3", [3], ["reach-v3", None], ("push-v3",),
                         {"reach-v3": 1}]),
    ))  # fmt: skip
    root = draw(st.sampled_from([root_dir, os.path.join(root_dir, "missing"), os.path.join(root_dir, "file"),
                                 None, 5, ["x"]]))  # fmt: skip
    return ids, root


@pytest.fixture(scope="module")
def loader_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    (root / "file").write_text("not a directory")
    return str(root)


@fast(80)
@given(data=st.data())
def test_load_teacher_data_fuzz(loader_root, data):
    ids, root = data.draw(loader_calls(loader_root))
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:  # no dataset exists anywhere
        load_teacher_data(ids, root)
    message = str(info.value)
    assert message and "\n" not in message.strip()
    assert re.search(r"ids_or_tasks|root|unknown Meta-World v3 task|no Minari dataset", message), message
    assert not os.path.exists(os.path.join(loader_root, "missing"))  # a missing root is never created
