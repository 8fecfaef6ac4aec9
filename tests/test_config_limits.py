"""Input limits and confinement: no input hangs, crashes or reads outside the config directory.
Each refusal is a clear error at file:line:column (or the file, when the file itself is wrong)."""

import os
import re
import time
from itertools import pairwise

import pytest

from engine.config import loader
from engine.errors import ConfigError

SERVERS = "servers:\n  a: {embedded: true}\n"
BOMB = "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in pairwise([None, *"abcdefghi"]))


def _problems(tmp_path, text: str | bytes, name="fleet.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    return info.value.render()


def test_an_alias_bomb_is_refused_in_under_a_second(tmp_path):
    started = time.perf_counter()
    err = _problems(tmp_path, SERVERS + BOMB)
    assert time.perf_counter() - started < 1.0
    assert "fleet.yaml:11:1: error: aliases expand this document by more than 100,000 values" in err


@pytest.mark.parametrize("text,expected", [
    (SERVERS + "policies: " + "[" * 3000 + "]" * 3000 + "\n", "fleet.yaml:3:75: error: the YAML nests deeper than 64"),
    (SERVERS + "policies:\n  p:\n    metrics: {interval: " + "9" * 400 + "}\n", "fleet.yaml:5:25: error: the number"),
    (SERVERS + "policies:\n  p:\n    metrics: {interval: " + "9" * 400 + "s}\n", "fleet.yaml:5:25: error: expected a duration"),
    (SERVERS + "policies:\n  p:\n    autosplit: {cooldown: 999999d}\n", "fleet.yaml:5:27: error: a duration cannot exceed"),
    (SERVERS.replace("true}", "true, capacity: {storage: " + "9" * 400 + "GiB}}"), "fleet.yaml:2:43: error: expected a size"),
    (SERVERS + "policies:\n  p:\n    metrics: {interval: .nan}\n", "fleet.yaml:5:25: error: '.nan' is not a finite number"),
    (SERVERS + "policies:\n  p:\n    hot: {cpu_percent: -.inf}\n", "fleet.yaml:5:24: error: '-.inf' is not a finite number"),
    (SERVERS + "# a\0b\n", "fleet.yaml:3:4: error: a NUL byte is not allowed"),
    (SERVERS + "policies:\n  p: {description: \"a\x07\"}\n", "fleet.yaml:4:22: error: the control character U+0007"),
    (SERVERS.encode() + b"policies:\n  p: {description: caf\xe9}\n", "fleet.yaml:4:23: error: the file is not UTF-8"),
    (SERVERS + "policies:\n  p:\n    description: \"never closed\n    hot: {}\n", "fleet.yaml:5:18: error: YAML syntax: while scanning a quoted scalar that is never closed"),
    (SERVERS + "---\n5\n", "fleet.yaml:4:1: error: a config document must be a mapping"),
    (SERVERS + "policies: !!omap [{p: {}}]\n", "fleet.yaml:3:11: error: the YAML tag !!omap is not supported"),
    (SERVERS + "policies:\n  p: !!set {a: null}\n", "fleet.yaml:4:6: error: the YAML tag !!set is not supported"),
    (SERVERS + "policies:\n  p:\n    <<: [1, 2]\n", "fleet.yaml:5:10: error: a merge key (<<) takes a mapping"),
    (SERVERS + "policies:\n  ? [a]\n  : {}\n", "fleet.yaml:4:5: error: a mapping key must be a plain value"),
    ("", "fleet.yaml:1:1: error: no servers are declared"),
])
def test_hostile_yaml_is_refused_at_its_position(tmp_path, text, expected):
    err = _problems(tmp_path, text)
    assert err.startswith(expected), err


def test_merge_keys_work(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "servers:\n  a: &s {embedded: true}\n  b:\n    <<: *s\n"
        "policies:\n  p: &p {hot: {cpu_percent: 50}, cold: {cpu_percent: 1}}\n"
        "  q:\n    <<: [*p, {cold: {cpu_percent: 5}, description: merged}]\n    description: own\n")
    desired = loader.load(tmp_path, cwd=tmp_path)
    assert desired.servers["b"].embedded
    q = desired.policies["q"].effective
    assert q.hot.cpu_percent == 50 and q.cold.cpu_percent == 1 and q.description == "own"


def test_a_1500_deep_extends_chain_resolves(tmp_path):
    chain = "".join(f"  p{i}: {{extends: p{i + 1}}}\n" for i in range(1500))
    (tmp_path / "fleet.yaml").write_text(SERVERS + "policies:\n" + chain + "  p1500: {hot: {latency_ms: 7}}\n")
    desired = loader.load(tmp_path, cwd=tmp_path)
    assert desired.policies["p0"].effective.hot.latency_ms == 7
    assert len(tuple(desired.policies["p0"].chain())) == 1502


def test_a_broken_symlink_or_a_directory_among_the_config_files_is_an_error(tmp_path):
    (tmp_path / "fleet.yaml").write_text(SERVERS)
    os.symlink(tmp_path / "gone.yaml", tmp_path / "more.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    err = info.value.render()
    assert "more.yaml: error: the file is a broken symbolic link" in err
    assert "dir.yaml: error: not a regular file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_config_file_is_an_error(tmp_path):
    (tmp_path / "fleet.yaml").write_text(SERVERS)
    (tmp_path / "fleet.yaml").chmod(0)
    with pytest.raises(ConfigError) as info:
        loader.load(tmp_path, cwd=tmp_path)
    assert "fleet.yaml: error: cannot read the file: Permission denied" in info.value.render()


DB = SERVERS + "databases:\n  o:\n    shard_key: {column: id, type: bigint}\n    schema: {schema}\n    placement: [a]\n"


@pytest.mark.parametrize("schema,expected", [
    ("/proc/self/environ", "is an absolute path"),
    ("../" * 40 + "etc/passwd", "is outside the config directory"),
    ("../no-such-directory/x.sql", "is outside the config directory"),  # never "not found": nothing outside is probed
    ("out.sql", "is outside the config directory"),
    ("loop.sql", "cannot be resolved: a symbolic link loop"),
    ("x" * 300 + ".sql", "cannot be resolved: File name too long"),
    ("broken.sql", "is a broken symbolic link"),
    ("nul.sql", "a NUL byte is not allowed in a schema file"),
])
def test_schema_files_are_confined_and_their_content_never_shown(tmp_path, schema, expected):
    secret = tmp_path.parent / f"secret-{tmp_path.name}.sql"
    secret.write_text("CREATE TABLE t (id bigint PRIMARY KEY); -- TOP-SECRET-CONTENT\n")
    os.symlink(secret, tmp_path / "out.sql")
    os.symlink("loop.sql", tmp_path / "loop.sql")
    os.symlink("nowhere.sql", tmp_path / "broken.sql")
    (tmp_path / "nul.sql").write_bytes(b"CREATE TABLE t (id bigint PRIMARY KEY);\n\0DROP TABLE t;\n")
    err = _problems(tmp_path, DB.replace("{schema}", schema))
    assert expected in err, err
    assert "TOP-SECRET-CONTENT" not in err and "root:" not in err and "PATH=" not in err


def test_sizes_are_whole_bytes():
    from engine.config.models import parse_size

    assert (parse_size("0.5KB"), parse_size("1.5KiB"), parse_size("20GiB"), parse_size("3B")) == (
        500, 1536, 20 * 2**30, 3)
    for text, bytes_ in (("0.5B", "0.5"), ("0.1KiB", "102.4"), ("1.000001B", "1.000001"), ("0.123456KB", "123.456")):
        with pytest.raises(ValueError, match=f"a size is a whole number of bytes, and {re.escape(text)} is"
                                             f" {re.escape(bytes_)} bytes"):
            parse_size(text)
