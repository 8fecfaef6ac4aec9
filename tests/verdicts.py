"""Checks that evidence never contradicts its verdict: every judged value on the verdict's side
of the threshold, the judged span at least the policy's window, and the line saying so."""

from __future__ import annotations

from engine.detect.detector import Assessment, Evidence
from engine.durations import span


def assert_evidence_consistent(evidence: Evidence) -> None:
    e = evidence
    assert e.samples >= 2 and e.low <= e.high, e
    if e.kind == "hot":
        assert e.low > e.threshold, f"hot evidence with a value not over its threshold: {e.describe()}"
    else:
        assert e.high < e.threshold, f"cold evidence with a value not under its threshold: {e.describe()}"
    assert (e.until - e.since).total_seconds() >= e.window_seconds, e.describe()
    line = e.describe()
    word = "over the hot" if e.kind == "hot" else "under the cold"
    assert f"{e.metric} {word} threshold" in line, line
    assert f"in {e.samples} samples" in line and span(e.window_seconds) in line, line


def assert_verdict_consistent(verdict: Assessment) -> None:
    if verdict.state in ("hot", "cold"):
        assert verdict.evidence, verdict
        assert {e.kind for e in verdict.evidence} == {verdict.state}, verdict
    else:
        assert verdict.evidence == (), verdict
    if verdict.state in ("stale", "unknown"):
        assert verdict.why, verdict
    for e in verdict.evidence:
        assert_evidence_consistent(e)
