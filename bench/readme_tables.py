"""Copies generated tables into the documents that quote them, so a quoted table is the committed one.

A document marks a quoted table with two comment lines around it:

    <!-- table: bench/mt25_study/results.md -->        (the first markdown table of that file)
    <!-- table: bench/mt25_study/results.md #2 -->     (its second table)
    | ... the table ... |
    <!-- /table -->

    python bench/readme_tables.py                  # rewrite every quoted table in README.md and docs/*.md
    python bench/readme_tables.py --check          # exit 1 naming each quoted table that differs

The source files are what `cpd report` and the bench scripts write (their commands stand beside the quote).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN = re.compile(r"^<!-- table: (?P<path>\S+)(?: #(?P<index>\d+))? -->$")
CLOSE = "<!-- /table -->"


def tables(text: str) -> list[list[str]]:
    """The markdown tables of ``text``: runs of consecutive lines starting with ``|``."""
    found: list[list[str]] = []
    run: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            run.append(line)
        elif run:
            found.append(run)
            run = []
    return found


def quoted(source: str, index: int) -> list[str]:
    path = os.path.join(ROOT, source)
    with open(path, encoding="utf-8") as f:
        found = tables(f.read())
    if not 1 <= index <= len(found):
        raise SystemExit(f"{source} has {len(found)} table(s); a quote asks for #{index}")
    return found[index - 1]


def refresh(text: str, where: str) -> str:
    """``text`` with every quoted table replaced by its source's current table."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = OPEN.match(lines[i])
        i += 1
        if not m:
            continue
        try:
            end = lines.index(CLOSE, i)
        except ValueError:
            raise SystemExit(f"{where}: '{lines[i - 1]}' has no closing '{CLOSE}'") from None
        out += quoted(m["path"], int(m["index"] or 1))
        out.append(CLOSE)
        i = end + 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def documents() -> list[str]:
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a quoted table differs")
    args = ap.parse_args(argv)
    stale = []
    for doc in documents():
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        new = refresh(text, os.path.relpath(doc, ROOT))
        if new == text:
            continue
        stale.append(os.path.relpath(doc, ROOT))
        if not args.check:
            with open(doc, "w", encoding="utf-8") as f:
                f.write(new)
    if args.check and stale:
        print(f"quoted tables differ from their sources in: {', '.join(stale)} "
              "(python bench/readme_tables.py rewrites them)")  # fmt: skip
        return 1
    print(f"rewrote {', '.join(stale)}" if stale else "every quoted table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
