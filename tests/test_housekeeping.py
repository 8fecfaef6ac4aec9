"""Small things that rub: --compare-policy leaves no temporary directory behind, the daemon
answers a wrong method with 405 (not 404), and the preset in the wheel points its schema
modeline at a file the wheel has."""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from types import SimpleNamespace

import pytest

from conftest import EXAMPLES, ROOT
from engine.config.loader import load_baseline
from engine.errors import UserError
from engine.watch.http import serve
from engine.watch.view import Snapshot, View, now

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def _repo(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "quickstart", repo / "fleet", ignore=shutil.ignore_patterns(".shardctl"))
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    subprocess.run([*GIT, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-qm", "fleet"], check=True)
    return repo


def test_compare_policy_at_a_git_ref_leaves_no_temporary_directory(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = _repo(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for _ in range(3):
        desired, label = load_baseline(str(repo / "fleet"), "HEAD")
        assert label == "HEAD" and "orders" in desired.databases
    assert list(scratch.iterdir()) == []


def test_an_invalid_config_at_the_ref_is_reported_with_its_line_and_cleaned_up(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = _repo(tmp_path)
    fleet = repo / "fleet" / "fleet.yaml"
    fleet.write_text(fleet.read_text().replace("shards: 4", "shardz: 4"))
    subprocess.run([*GIT, "-C", str(repo), "commit", "-qam", "typo"], check=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError) as raised:
        load_baseline(str(repo / "fleet"), "HEAD")
    text = raised.value.render()
    assert "--compare-policy HEAD: the configuration at that ref is invalid" in text
    assert "HEAD:fleet/fleet.yaml:18:5: error: unknown key 'shardz'" in text
    assert "    shardz: 4" in text  # the line as it is at the ref, read before the copy is removed
    assert list(scratch.iterdir()) == []


@pytest.fixture
def http_daemon():
    daemon = SimpleNamespace(view=View(Snapshot(who="t", config_dir="/x", started_at=now())),
                             options=SimpleNamespace(token_env="SHARDCTL_TEST_NO_SUCH_TOKEN"))
    server = serve(daemon, "127.0.0.1:0")
    port = server.httpd.server_address[1]
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def _call(url: str, method: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


@pytest.mark.parametrize("path, method, allow", [
    ("/api/pause", "GET", "POST"), ("/api/resume", "GET", "POST"),
    ("/api/status", "POST", "GET, HEAD"), ("/metrics", "POST", "GET, HEAD"),
])
def test_a_wrong_method_is_405_with_allow(http_daemon, path, method, allow):
    code, headers, body = _call(http_daemon + path, method)
    assert code == 405 and headers["Allow"] == allow and body["allow"] == allow, (code, body)


def test_an_unknown_endpoint_is_still_404(http_daemon):
    assert _call(http_daemon + "/api/nope", "GET")[0] == 404
    assert _call(http_daemon + "/api/nope", "POST")[0] == 404
    assert _call(http_daemon + "/api/status", "GET")[0] == 200


def test_the_preset_in_the_wheel_points_its_modeline_at_a_schema_in_the_wheel(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = tmp_path.glob("shardctl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        presets = sorted(n for n in names if n.startswith("engine/presets/") and n.endswith(".yaml"))
        assert presets, names
        for preset in presets:
            first = zf.read(preset).decode().splitlines()[0]
            target = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first).group(1)
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(preset), target))
            assert resolved in names, f"{preset} points at {resolved}, which the wheel lacks"
            assert json.loads(zf.read(resolved)) == json.loads((ROOT / "schemas" / "shardctl.schema.json").read_text())
