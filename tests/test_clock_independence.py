"""No test depends on the date or the hour it runs at: the planning, detection, review and
daemon-replay tests pass with the clock moved days ahead, to another hour, and into the past."""

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from conftest import ROOT

IN_PROCESS = ["tests/test_load_planning.py", "tests/test_watch_replay.py", "tests/test_detector.py",
              "tests/test_autonomy.py", "tests/test_review.py",
              "tests/test_clock_independence.py::test_the_clock_is_where_the_run_says"]


def test_the_clock_is_where_the_run_says(pytestconfig):
    """Inside a moved run, the clock really is moved (else the test below would prove nothing)."""
    destination = pytestconfig.getoption("--travel")
    if destination is None:
        pytest.skip("only meaningful inside a run with --travel")
    moved = datetime.fromisoformat(destination)
    assert abs((datetime.now(UTC) - moved).total_seconds()) < 600


@pytest.mark.parametrize("instant", [
    "2026-12-03T03:17:00+00:00",   # a week after the recorded traces, in the middle of the night
    "2027-06-30T23:59:30+00:00",   # months later, half a minute before midnight
    "2026-11-25T14:05:00+00:00",   # the day before the recordings were made
])
def test_planning_and_replay_tests_pass_with_the_clock_moved(instant, tmp_path):
    # its own --basetemp: without one, a pytest session resets /tmp/pytest-of-<user> to 0700,
    # and a server that the other xdist worker is just making (as the embedded user) could
    # no longer reach its directory
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--travel", instant,
                           "--basetemp", str(tmp_path / "inner"), *IN_PROCESS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
