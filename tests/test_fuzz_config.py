"""Property-based fuzzing of the loader over mutations of every example in examples/: whatever
the bytes, loading either succeeds or raises a ConfigError whose every diagnostic renders with
a location; never another exception, never a hang. What the loader accepts, the JSON Schema
accepts too. 2,000 examples in the normal suite; 20,000 with `pytest --fuzz-slow`."""

from __future__ import annotations

import json
import shutil
import signal
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, ROOT
from engine.config import loader
from engine.errors import ConfigError

EXAMPLE_FILES = sorted((ex.name, f.name) for ex in EXAMPLES.iterdir() if ex.is_dir()
                       for f in ex.glob("*.yaml"))
TOKENS = [":", ": ", "-", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "<<: *a", "!!omap ", "!x ", '"', "'", "#",
          "\n", "\n  ", "  ", "\t", "\0", "\x07", "\x85", "\ufeff", "\udc80"[:0] + "\u2028", "~", "null", "yes", "1",
          '"4"', "4.0", ".nan", "-.inf", "9" * 60, "1e999", "0x" + "f" * 50, "99999999d", "1" * 30 + "GiB", "-5",
          "password: hunter2", "../../etc/passwd", "/proc/self/environ", "--- \n", "...\n", "? ", "|\n", ">\n",
          "orders", "a", "b", "default", "customer", "text", "true", "false", "0", "256", "257", "\\0", "%", "@"]


def _mutation():
    position = st.floats(min_value=0, max_value=1, allow_nan=False)
    insert = st.tuples(st.just("insert"), position, st.sampled_from(TOKENS) | st.text(max_size=8))
    delete = st.tuples(st.just("delete"), position, st.integers(min_value=1, max_value=40))
    replace_line = st.tuples(st.just("line"), position, st.sampled_from(["dup", "drop", "indent", "dedent", "swap"]))
    replace_value = st.tuples(st.just("value"), position, st.sampled_from(TOKENS))
    return st.one_of(insert, delete, replace_line, replace_value)


def _apply(text: str, ops) -> str:
    for kind, where, arg in ops:
        if kind == "insert":
            at = int(where * len(text))
            text = text[:at] + arg + text[at:]
        elif kind == "delete":
            at = int(where * len(text))
            text = text[:at] + text[at + arg:]
        elif kind == "value":  # replace what follows a colon on some line
            lines = text.split("\n")
            i = int(where * (len(lines) - 1))
            if ": " in lines[i]:
                lines[i] = lines[i].split(": ", 1)[0] + ": " + arg
            text = "\n".join(lines)
        else:
            lines = text.split("\n")
            i = int(where * (len(lines) - 1))
            if arg == "dup":
                lines.insert(i, lines[i])
            elif arg == "drop":
                lines.pop(i)
            elif arg == "indent":
                lines[i] = "  " + lines[i]
            elif arg == "dedent":
                lines[i] = lines[i][2:]
            elif lines and i + 1 < len(lines):
                lines[i], lines[i + 1] = lines[i + 1], lines[i]
            text = "\n".join(lines)
    return text


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("loading took more than 5 s")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    for example in {e for e, _ in EXAMPLE_FILES}:
        shutil.copytree(EXAMPLES / example, base / example, ignore=shutil.ignore_patterns(".shardctl"))
    return base


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads((ROOT / "schemas" / "shardctl.schema.json").read_text()))


STATS = {"examples": 0, "accepted": 0, "refused": 0, "seconds": 0.0}


def _check(workdirs, validator, example: str, file: str, ops) -> None:
    work = workdirs / example
    original = (EXAMPLES / example / file).read_text()
    mutated = _apply(original, ops)
    try:
        (work / file).write_bytes(mutated.encode("utf-8", errors="surrogatepass"))
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(5)
        started = time.perf_counter()
        try:
            desired = loader.load(work, cwd=work)
        except ConfigError as exc:
            text = exc.render()
            assert exc.diagnostics and text
            for d in exc.diagnostics:
                assert d.location.file, d
            STATS["refused"] += 1
            return
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            STATS["seconds"] += time.perf_counter() - started
            STATS["examples"] += 1
        STATS["accepted"] += 1
        assert desired.servers
        # what the CLI accepts, the JSON Schema accepts
        from ruamel.yaml import YAML

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for doc in YAML(typ="safe", pure=True).load_all(mutated):
                if doc is not None:
                    errors = [e.message for e in validator.iter_errors(json.loads(json.dumps(doc, default=str)))]
                    assert not errors, (f"the CLI accepts {file} but the JSON Schema refuses it: {errors[:2]}",
                                        mutated)
    finally:
        (work / file).write_text(original)


MUTATIONS = st.lists(_mutation(), min_size=1, max_size=4)
FAST = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("example", sorted({e for e, _ in EXAMPLE_FILES}))
def test_mutated_examples_never_crash_or_hang(example, workdirs, validator):
    files = [f for e, f in EXAMPLE_FILES if e == example]
    STATS.update(examples=0, accepted=0, refused=0, seconds=0.0)

    @FAST
    @given(st.sampled_from(files), MUTATIONS)
    def run(file, ops):
        _check(workdirs, validator, example, file, ops)

    run()
    assert STATS["examples"] >= 1000 and STATS["accepted"] and STATS["refused"], STATS


@pytest.mark.fuzz_slow
@pytest.mark.parametrize("example", sorted({e for e, _ in EXAMPLE_FILES}))
def test_mutated_examples_slow(example, workdirs, validator):
    files = [f for e, f in EXAMPLE_FILES if e == example]
    STATS.update(examples=0, accepted=0, refused=0, seconds=0.0)

    @settings(FAST, max_examples=10_000, derandomize=False)
    @given(st.sampled_from(files), MUTATIONS)
    def run(file, ops):
        _check(workdirs, validator, example, file, ops)

    started = time.perf_counter()
    run()
    print(f"\nfuzz {example}: {STATS['examples']} examples ({STATS['accepted']} accepted, {STATS['refused']} refused),"
          f" 0 crashes, 0 hangs, {time.perf_counter() - started:.0f} s")
