"""The package's import graph, read statically from the source (``ast``), is the one a reader sees.

Every ``import`` of every module under ``cpd_fast/`` (and ``kernels/``, installed as ``cpd_fast.kernels``)
counts, inside functions too. The tests fail on

* an import circle among cpd_fast modules;
* an import that runs up the layer order (:data:`LAYERS`: a module imports only from its own layer or
  lower ones);
* an import inside a function, unless it is one of the optional heavy dependencies in :data:`LAZY`, each
  kept lazy for the reason given there;
* a kernel module (:data:`KERNEL_MODULES`) that reaches the RL stack (:data:`RL_STACK`), directly or
  through the cpd_fast modules it imports: the GPU machines that run the kernels lack it.

``bench/import_graph.py`` prints the layer graph these tests check.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cpd_fast"
# source folder -> the package name it is installed under (setup.py maps kernels/ to cpd_fast.kernels)
SOURCES = {ROOT / "cpd_fast": PACKAGE, ROOT / "kernels": f"{PACKAGE}.kernels"}

# The layer order, bottom to top, by module name (a name covers its submodules; the longest match wins).
# A module may import from its own layer and the ones below it.
LAYERS: dict[str, int] = {
    # L0: errors and messages, the config schema, run-directory files, loading the compiled extension
    "cpd_fast.errors": 0,
    "cpd_fast.config": 0,
    "cpd_fast.runio": 0,
    "cpd_fast._ext": 0,
    # L1: the model's building blocks and the compiled kernels (no RL stack)
    "cpd_fast": 1,  # the package itself: imports _ext, dpp and moe only
    "cpd_fast.moe": 1,
    "cpd_fast.kernels": 1,
    "cpd_fast.dpp": 1,
    "cpd_fast.student.adapters": 1,
    # what made a result (git commit, library versions, CPU): reads the package's __version__, so it sits
    # beside the package itself; distill (results.json) and the pipeline (pipeline.json) record it
    "cpd_fast.provenance": 1,
    # L2: task names, the one env factory
    "cpd_fast.tasks": 2,
    "cpd_fast.envs": 2,
    # L3: evaluation (the official protocol), rollouts of any policy into datasets, worker processes, metrics
    "cpd_fast.evaluation": 3,
    "cpd_fast.data": 3,  # below teachers: PPO with demonstrations records its demos with it
    "cpd_fast.workers": 3,
    "cpd_fast.metrics": 3,
    # L4: teachers (training jobs, the zoo, scripted experts, the gate, one entry point: provide)
    "cpd_fast.teachers": 4,
    "cpd_fast.fidelity": 4,  # runs the scripted experts (teachers.scripted) under both env backends
    # L5: replay selection
    "cpd_fast.replay": 5,
    # L6: the student model and its official evaluation (one task, or many in worker processes)
    "cpd_fast.student": 6,
    "cpd_fast.evalpool": 6,
    # L7: training: penalties and parameter isolation, data parallelism, the distillation stage loop
    "cpd_fast.ewc": 7,
    "cpd_fast.packnet": 7,
    "cpd_fast.ddp": 7,
    "cpd_fast.distill": 7,
    # L8: reports over finished runs
    "cpd_fast.report": 8,
    # L9: the run pipeline (presets, the step ledger, parallel methods)
    "cpd_fast.pipeline": 9,
    "cpd_fast.demo": 9,
    # L10: the command line (all argparse)
    "cpd_fast.cli": 10,
}

# Kernel modules (with their submodules) and the package itself: what a GPU machine without the RL stack
# imports.
KERNEL_MODULES = ("cpd_fast.kernels", "cpd_fast.moe", "cpd_fast.dpp", "cpd_fast._ext")
RL_STACK = ("gymnasium", "metaworld", "envpool", "ray", "minari")

# Imports allowed inside functions: optional or heavy dependencies a plain run does not load.
LAZY: dict[str, str] = {
    "ray": "optional extra (pip install cpd_fast[ray]); only the Ray teacher backend needs it",
    "matplotlib": "plots only; loading it costs every `cpd` command that does not draw",
    "triton": "GPU kernels only; absent on CPU-only and non-Linux installs",
    "cpd_fast.kernels": "imports triton at its top (see triton)",
    "torch.distributed": "process-group setup only where data parallelism is used",
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (for ``from M import x``: M.x when that is a module, else M)
    line: int
    lazy: bool  # inside a function (or lambda)

    def __str__(self) -> str:
        where = "in a function" if self.lazy else "at module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def module_files() -> dict[str, Path]:
    """Every module's dotted name -> its file (a package's name -> its ``__init__.py``)."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def _absolute(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a ``from`` import names, with relative imports resolved against ``source``."""
    if not node.level:
        return node.module or ""
    base = source.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(node: ast.AST, lazy: bool = False):
    """(import node, inside a function?) for every import statement under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, inner)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node, lazy in _walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _absolute(module, path.name == "__init__.py", node)
            if base == "__future__":
                continue
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out.extend(Import(module, t, node.lineno, lazy) for t in dict.fromkeys(targets))
    return out


def all_imports() -> list[Import]:
    return [imp for module in MODULES for imp in imports_of(module)]


def internal(imp: Import) -> bool:
    return imp.target == PACKAGE or imp.target.startswith(PACKAGE + ".")


def layer_of(module: str) -> int | None:
    """The layer of ``module``: its longest name prefix in :data:`LAYERS` (None: not classified)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def packages_run_first(source: str, target: str) -> list[str]:
    """The packages whose ``__init__`` importing ``target`` from ``source`` runs first: the target's parent
    packages, except those ``source`` itself lives in (they are initialised before ``source`` runs)."""
    parts = target.split(".")
    parents = [".".join(parts[:n]) for n in range(1, len(parts))]
    return [p for p in parents if p in MODULES and source != p and not source.startswith(p + ".")]


def graph(with_packages: bool = False) -> dict[str, set[str]]:
    """cpd_fast module -> the cpd_fast modules it imports (all imports, module-level and lazy); with
    ``with_packages``, also the packages whose ``__init__`` those imports run (:func:`packages_run_first`),
    as Python does: ``import cpd_fast.teachers.scripted`` runs ``cpd_fast/teachers/__init__.py`` first."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in all_imports():
        if internal(imp) and imp.target != imp.source and imp.target in MODULES:
            edges[imp.source].add(imp.target)
            if with_packages:
                edges[imp.source].update(packages_run_first(imp.source, imp.target))
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def lazy_reason(target: str) -> str | None:
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAZY:
            return LAZY[".".join(parts[:n])]
    return None


def _fail_on(title: str, lines: list[str]) -> None:
    """Fail with ``title`` and the violations grouped by the file they are in (nothing: pass)."""
    if not lines:
        return
    by_module: dict[str, list[str]] = {}
    for line in lines:
        by_module.setdefault(line.split(":")[0].split(" ")[0], []).append(line)
    out = [f"{title} ({len(lines)}):"]
    for module in sorted(by_module):
        out.append(f"  {MODULES[module].relative_to(ROOT) if module in MODULES else module}:")
        out.extend(f"    {line}" for line in by_module[module])
    pytest.fail("\n".join(out), pytrace=False)


# ----------------------------------------------------------------------------- the tests


def test_the_sources_are_found_and_parse():
    assert {"cpd_fast", "cpd_fast.errors", "cpd_fast.moe.layer", "cpd_fast.kernels.moe_grouped"} <= set(
        MODULES
    )
    assert any(internal(imp) for imp in all_imports())


def test_relative_imports_resolve_to_modules():
    unresolved = [str(i) for i in all_imports() if internal(i) and i.target not in MODULES]
    _fail_on("imports of cpd_fast modules that do not exist", unresolved)


def test_every_module_has_a_layer():
    unclassified = [f"{m}: add it to LAYERS" for m in MODULES if layer_of(m) is None]
    _fail_on("modules outside the layer table", unclassified)


def test_no_import_circles():
    """Counting the package ``__init__`` an import runs: a circle through one fails at run time as well,
    depending on which module is imported first."""
    found = circles(graph(with_packages=True))
    lines = []
    for component in found:
        inside = set(component)
        lines.append(" <-> ".join(component))
        for imp in all_imports():
            if imp.source not in inside:
                continue
            if imp.target in inside:
                lines.append(f"      {imp}")
            lines.extend(
                f"      {imp}, which runs {MODULES[package].relative_to(ROOT)} first"
                for package in packages_run_first(imp.source, imp.target)
                if package in inside and package != imp.target
            )
    if found:
        title = f"import circles ({len(found)}), with the imports that close them:"
        pytest.fail("\n".join([title, *lines]), pytrace=False)


def test_no_import_runs_up_the_layers():
    upward = [
        f"{imp} [L{layer_of(imp.source)} -> L{layer_of(imp.target)}]"
        for imp in all_imports()
        if internal(imp)
        and layer_of(imp.source) is not None
        and layer_of(imp.target) is not None
        and layer_of(imp.target) > layer_of(imp.source)
    ]
    _fail_on("imports that run up the layers", upward)


def test_imports_sit_at_module_top_except_lazy_optional_dependencies():
    hidden = [str(imp) for imp in all_imports() if imp.lazy and lazy_reason(imp.target) is None]
    _fail_on("imports inside functions (move them to the module top; only LAZY entries may stay)", hidden)


def comment_above(lines: list[str], line: int) -> str:
    """The comment on 1-based ``line`` and the comment lines right above it, joined."""
    found = [lines[line - 1].partition("#")[2]]
    above = line - 2
    while above >= 0 and lines[above].lstrip().startswith("#"):
        found.insert(0, lines[above].lstrip()[1:])
        above -= 1
    return " ".join(text.strip() for text in found)


def test_every_lazy_import_is_marked_with_its_reason():
    """A lazy import keeps a ``# lazy: <why>`` comment on its line or right above it, for the reader."""
    unmarked = []
    for imp in all_imports():
        if imp.lazy and lazy_reason(imp.target) is not None:
            lines = MODULES[imp.source].read_text().splitlines()
            if "lazy:" not in comment_above(lines, imp.line):
                unmarked.append(str(imp))
    _fail_on("lazy imports without a `# lazy: <why>` comment", unmarked)


def test_kernel_modules_do_not_reach_the_rl_stack():
    edges = graph()
    kernel = [
        m for m in MODULES if any(m == k or m.startswith(k + ".") for k in KERNEL_MODULES if k != PACKAGE)
    ]
    kernel.append(PACKAGE)
    reached: dict[str, str] = {}  # module -> the kernel module it is reached from
    todo = [(m, m) for m in kernel]
    while todo:
        module, root = todo.pop()
        if module in reached:
            continue
        reached[module] = root
        todo.extend((t, root) for t in edges[module])
    bad = [
        f"{imp} (reached from kernel module {reached[imp.source]})"
        for imp in all_imports()
        if imp.source in reached and imp.target.split(".")[0] in RL_STACK
    ]
    _fail_on("kernel modules that reach the RL stack", bad)


def test_import_cpd_fast_loads_no_rl_stack_and_no_lazy_dependency():
    """The same at run time: ``import cpd_fast`` in a fresh interpreter loads none of them."""
    heavy = (*RL_STACK, "matplotlib", "pydantic", "yaml")
    code = f"import sys, cpd_fast\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == []


# ----------------------------------------------------------------------------- the checks can fail


def test_an_import_runs_its_parent_packages_but_not_its_own():
    assert packages_run_first("cpd_fast.fidelity", "cpd_fast.teachers.scripted") == ["cpd_fast.teachers"]
    assert packages_run_first("cpd_fast.moe.layer", "cpd_fast.moe.experts") == []


def test_circles_finds_a_two_module_circle_and_ignores_a_chain():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_layer_of_takes_the_longest_prefix():
    assert layer_of("cpd_fast.teachers.zoo") == LAYERS["cpd_fast.teachers"]
    assert layer_of("cpd_fast.cli.teachers") == LAYERS["cpd_fast.cli"]
    assert layer_of("cpd_fast.student.adapters") < layer_of("cpd_fast.student.model")
    assert layer_of("numpy") is None


def test_comment_above_reads_a_comment_block_and_the_line_itself():
    lines = ["x = 1", "# lazy: one", "# two", "import a  # three"]
    assert comment_above(lines, 4) == "lazy: one two three"
    assert comment_above(["x = 1", "import a"], 2) == ""


def test_walk_sees_imports_inside_functions_and_methods():
    tree = ast.parse("import a\nclass C:\n    def f(self):\n        import b\ng = lambda: __import__('c')\n")
    assert [(n.names[0].name, lazy) for n, lazy in _walk(tree)] == [("a", False), ("b", True)]
