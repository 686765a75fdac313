"""The tables README and docs/ quote are the committed files' tables (bench/readme_tables.py)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "readme_tables", os.path.join(ROOT, "bench", "readme_tables.py")
)
readme_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_tables)


def test_every_quoted_table_is_the_committed_one(capsys):
    assert readme_tables.main(["--check"]) == 0, capsys.readouterr().out


def test_readme_quotes_the_study_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "<!-- table: bench/mt25_study/results.md -->" in text
    assert readme_tables.tables(text), "README quotes no table"


def test_a_stale_quote_is_rewritten_from_its_source():
    source = "bench/mt25_study/results.md"
    doc = f"intro\n<!-- table: {source} -->\n| old | table |\n|---|---|\n<!-- /table -->\nafter\n"
    new = readme_tables.refresh(doc, "doc.md")
    assert "| old | table |" not in new
    assert new.startswith("intro\n") and new.endswith("<!-- /table -->\nafter\n")
    assert readme_tables.tables(new) == [readme_tables.quoted(source, 1)]
    assert readme_tables.refresh(new, "doc.md") == new


def test_a_quote_without_its_end_or_past_the_last_table_is_refused():
    with pytest.raises(SystemExit, match="no closing"):
        readme_tables.refresh("<!-- table: bench/mt25_study/results.md -->\n| a |\n", "doc.md")
    with pytest.raises(SystemExit, match="#9"):
        readme_tables.refresh("<!-- table: bench/mt25_study/results.md #9 -->\n<!-- /table -->\n", "doc.md")
