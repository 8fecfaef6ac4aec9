"""Renders docs/BENCHMARKS.md from the benches' records (docs/bench/*.json) and the template
bench/BENCHMARKS.md.j2, which holds the prose of each section.

    python bench/report.py            # write docs/BENCHMARKS.md
    python bench/report.py --check    # exit 1 if docs/BENCHMARKS.md is not what the records render

Every figure in the document comes from a record (bench/record.py): the template's prose
explains and names no figure of its own (tests/test_benchmarks_doc.py checks both). A section
whose record is missing says so, with the command that makes it, and is listed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jinja2

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RECORDS = ROOT / "docs" / "bench"
DOC = ROOT / "docs" / "BENCHMARKS.md"
TEMPLATE = "BENCHMARKS.md.j2"
SHOWN_RUNS = 6  # at most this many runs listed one by one in a table; the record holds them all


def number(value: float) -> str:
    """Three significant figures at most, thousands separated: what a reader compares."""
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    if size >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}" if value else "0"


def figure(value: float, unit: str) -> str:
    if unit == "x":
        return f"{number(value)}x"
    if unit in ("%", "B"):
        return f"{number(value)}{' ' if unit == 'B' else ''}{unit}"
    return f"{number(value)} {unit}"


def load(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def records(directory: Path = RECORDS) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def render(directory: Path = RECORDS) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(BENCH), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=number, figure=figure, load=load)
    found = records(directory)
    text = env.get_template(TEMPLATE).render(records=found, shown_runs=SHOWN_RUNS)
    text = "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)  # the template's blocks leave runs of blank lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if DOC.read_text() != text:
            sys.exit(f"{DOC.relative_to(ROOT)} is stale: run python bench/report.py")
        return
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
