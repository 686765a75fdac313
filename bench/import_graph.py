"""Print the package's layer graph: each layer's modules, top to bottom, and the cpd_fast modules each one
imports (every import, inside functions too), read statically by ``tests/test_imports.py``, whose layer
table (``LAYERS``) and checks this script reuses.

    python bench/import_graph.py            # text, for README's layout section
    python bench/import_graph.py --dot      # Graphviz (``| dot -Tsvg > graph.svg``), one cluster a layer
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _graph_module():
    spec = importlib.util.spec_from_file_location("test_imports", ROOT / "tests" / "test_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _short(module: str) -> str:
    return module.removeprefix("cpd_fast.") if module != "cpd_fast" else "cpd_fast"


def text(g) -> str:
    edges = g.graph()
    by_layer: dict[int | None, list[str]] = {}
    for module in g.MODULES:
        by_layer.setdefault(g.layer_of(module), []).append(module)
    lines = []
    for layer in sorted(by_layer, key=lambda x: -1 if x is None else x, reverse=True):
        lines.append(f"L{layer}" if layer is not None else "unclassified")
        for module in sorted(by_layer[layer]):
            targets = ", ".join(sorted(_short(t) for t in edges[module]))
            lines.append(f"    {_short(module):<24}{' -> ' + targets if targets else ''}")
    found = g.circles(edges)
    lines.append(f"circles: {len(found)}" + "".join(f"\n    {' <-> '.join(c)}" for c in found))
    return "\n".join(lines)


def dot(g) -> str:
    edges = g.graph()
    out = ["digraph cpd_fast {", "  rankdir=BT; node [shape=box, fontsize=10];"]
    layers = sorted({g.layer_of(m) for m in g.MODULES if g.layer_of(m) is not None})
    for layer in layers:
        members = " ".join(f'"{_short(m)}";' for m in sorted(g.MODULES) if g.layer_of(m) == layer)
        out.append(f'  subgraph cluster_L{layer} {{ label="L{layer}"; {members} }}')
    for module in sorted(edges):
        out.extend(f'  "{_short(module)}" -> "{_short(t)}";' for t in sorted(edges[module]))
    out.append("}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz instead of text")
    args = parser.parse_args()
    g = _graph_module()
    print(dot(g) if args.dot else text(g))


if __name__ == "__main__":
    main()
