"""Every file a command reads on a user's say-so is bounded (issue 26, item 7): a plan file, a
recorded-samples file or a schema file to check must be a regular file under its size limit,
and JSON nests at most 64 levels. `/dev/zero`, a FIFO, a directory, a sparse file of gigabytes,
100,000 `[` or bytes that are not text: exit 1 with the file's name, no
MemoryError or RecursionError, and before any server is started. The refusals name the size
or the depth they saw, so the file was never read whole; how long a refusal takes belongs to
the hostile corpus (tests/test_corpus_hostile.py) and the machine's load, not here."""

from __future__ import annotations

import os

import pytest

from conftest import FleetDir

COMMANDS = {
    "apply": ("apply", "{f}"),
    "show": ("show", "{f}"),
    "plan --metrics": ("plan", "--metrics", "{f}"),
    "apply --metrics": ("apply", "--auto-approve", "--metrics", "{f}"),
    "drift --metrics": ("drift", "--metrics", "{f}"),
    "status --metrics": ("status", "--metrics", "{f}"),
    "forecast --metrics": ("forecast", "--metrics", "{f}"),
    "schema --check": ("schema", "--check", "{f}"),
}
WHAT = {"apply": "plan file", "show": "plan file", "schema --check": "schema file"}


def _shapes(base) -> dict[str, tuple[str, str]]:
    """name -> (path, what the error says about it)."""
    deep = base / "deep.json"
    deep.write_text("[" * 100_000)
    deep_yaml = base / "deep.yaml"
    deep_yaml.write_text("samples: " + "[" * 100_000 + "\n")
    deep_mapping = base / "mapping.json"
    deep_mapping.write_text('{"a": ' * 5_000 + "1" + "}" * 5_000)
    huge = base / "huge.json"
    with huge.open("wb") as handle:  # sparse: it costs no disk, and must cost no memory either
        handle.truncate(3 * 2**30)
    fifo = base / "pipe.json"
    os.mkfifo(fifo)
    binary = base / "binary.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    return {
        "dev-zero": ("/dev/zero", "not a regular file (a character device)"),
        "fifo": (str(fifo), "not a regular file (a named pipe)"),
        "directory": (str(base), "not a regular file (a directory)"),
        "sparse-3-gib": (str(huge), "the file is 3,221,225,472 bytes; the limit is"),
        "100000-brackets": (str(deep), "nests deeper than 64 levels"),
        "100000-brackets-yaml": (str(deep_yaml), "nests deeper than 64 levels"),
        "5000-mappings": (str(deep_mapping), "nests deeper than 64 levels"),
        "not-text": (str(binary), "is not UTF-8 text"),
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    fleet = FleetDir(base)  # never applied: every command below must fail before starting it
    shapes = base / "shapes"
    shapes.mkdir()
    return fleet, _shapes(shapes)


CASES = [(c, s) for c in COMMANDS for s in ("dev-zero", "fifo", "directory", "sparse-3-gib", "100000-brackets",
                                              "100000-brackets-yaml", "5000-mappings", "not-text")
         # YAML is a recorded-samples form only; schema --check compares text and reads no JSON
         if not (s == "100000-brackets-yaml" and c in ("apply", "show", "schema --check"))
         and not (c == "schema --check" and s in ("100000-brackets", "5000-mappings"))]


@pytest.mark.parametrize("command, shape", CASES)
def test_a_hostile_input_file_is_refused_cleanly_before_anything_starts(workdir, command, shape):
    fleet, shapes = workdir
    path, says = shapes[shape]
    args = [a.format(f=path) for a in COMMANDS[command]]
    result = fleet.cli(*args, timeout=60)  # a FIFO opened, or /dev/zero read, would never return
    assert result.code == 1, (command, shape, result.both)
    if shape == "directory":  # the command line refuses it before shardctl reads anything
        assert "is a directory" in result.err, result.err
        assert not (fleet.path / ".shardctl").exists()
        return
    first = result.err.splitlines()[0] if result.err else ""
    assert first.startswith("Error: "), (command, shape, result.err)
    assert says in first and path in first, (command, shape, first)
    assert WHAT.get(command, "metrics file") in first, first
    for bad in ("Traceback", "MemoryError", "RecursionError", "This is a bug"):
        assert bad not in result.both, (command, shape, result.both)
    assert not (fleet.path / ".shardctl").exists(), "a server was started for a file that cannot be read"


def test_a_file_that_is_in_bounds_still_works(workdir, tmp_path):
    fleet, _ = workdir
    samples = tmp_path / "empty.json"
    samples.write_text('{"samples": []}')
    result = fleet.cli("schema", "--check", str(tmp_path / "absent.json"))
    assert result.code == 1 and "is stale" in result.err  # a missing file is simply not the schema
    from engine.observe import recorded

    assert recorded.read(samples).samples == {}
