"""docs/BENCHMARKS.md is what bench/report.py renders from the benches' records (docs/bench/*.json),
every rendered section names its command, its runs and their spread, and the template's prose
states no figure of its own (issue 32: every figure traceable to a command and a run)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import record  # noqa: E402
import report  # noqa: E402

TEMPLATE = ROOT / "bench" / report.TEMPLATE


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {part.splitlines()[0]: part for part in parts}


def test_the_document_is_what_the_records_render():
    assert (ROOT / "docs" / "BENCHMARKS.md").read_text() == report.render(), \
        "docs/BENCHMARKS.md is stale: run python bench/report.py"


def test_every_record_names_its_command_load_runs_and_spread():
    found = report.records()
    for name, rec in found.items():
        assert rec["command"].startswith("python bench/"), name
        assert rec["load_before"] is None or len(rec["load_before"]) == 3, name
        assert len(rec["load_after"]) == 3, name
        assert rec["measures"], name
        for m in rec["measures"]:
            assert m["n"] == len(m["runs"]) >= 1, (name, m["key"])
            assert m["min"] <= m["median"] <= m["max"], (name, m["key"])
            if m["baseline"] is not None:
                assert any(b["key"] == m["baseline"] for b in rec["measures"]), (name, m["key"])
                assert "ratio" in m, (name, m["key"])


def test_each_rendered_section_names_command_runs_and_spread():
    text = report.render()
    found = report.records()
    rendered = [body for body in sections(text).values() if "No record:" not in body and "Command: `" in body]
    assert len(rendered) == len(found)
    for body in rendered:
        command = re.search(r"Command: `([^`]+)`", body).group(1)
        assert command in {rec["command"] for rec in found.values()}
        assert "Load average" in body
        assert "| runs | median | min to max |" in body


def test_a_section_without_its_record_says_so_and_is_listed(tmp_path):
    text = report.render(tmp_path)  # no record at all
    for title, body in sections(text).items():
        if title != "What has no record":
            assert "No record:" in body and "Made by `python " in body, title
    assert "`branch`" in sections(text)["What has no record"]


def test_records_render_with_their_ratios_and_percentiles(tmp_path):
    """A record written by bench/record.py renders its runs, spread and ratio, unrounded facts aside."""
    rec = record.Record("moves", argv=[str(ROOT / "bench" / "moves.py"), "--rows", "10"])
    rec.measure("parallel1", "one at a time", [10.0, 12.0, 11.0], "s")
    rec.measure("parallel2", "two at a time", [5.0, 9.0, 5.5], "s", baseline="parallel1", paired=True)
    rec.measure("apart", "measured in a block of its own", [22.0, 33.0, 11.0], "s", baseline="parallel1")
    rec.cycles("pause", "pause", [100.0, 300.0, 200.0], "ms")
    rec.fact("rows", 10)
    path = rec.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["command"] == "python bench/moves.py --rows 10"
    ratio = data["measures"][1]["ratio"]
    assert ratio["paired"] and ratio["min"] == pytest.approx(0.5) and ratio["max"] == pytest.approx(0.75)
    assert data["measures"][2]["ratio"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 1, "paired": False}
    assert data["measures"][3]["percentiles"] == {"p50": 200.0, "p99": 300.0, "max": 300.0, "n": 3}
    body = sections(report.render(tmp_path))["Moves in parallel: one at a time against two (`bench/moves.py`)"]
    assert "`python bench/moves.py --rows 10`" in body
    assert "| one at a time (`parallel1`) | 3 | 11.0 s | 10.0 to 12.0 | 10.0, 12.0, 11.0 | - |" in body
    assert "0.500x (0.500 to 0.750, run by run) vs `parallel1`" in body
    assert "2.00x (median / median) vs `parallel1`" in body


def test_the_prose_states_no_figure():
    """Outside the template's {{ }} and {% %} parts and `code` spans, no digit: a figure in the
    document comes from a record, never from the prose around it."""
    text = TEMPLATE.read_text()
    text = re.sub(r"\{#.*?#\}", "", text, flags=re.DOTALL)
    text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\bissue \d+|\bp(50|99)\b", "", text)
    assert not re.findall(r".{0,30}\d.{0,30}", text)
