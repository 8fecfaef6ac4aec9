"""Saved plans run exactly or not at all; applies exclude each other with Terraform's texts."""

import subprocess
import sys

import pytest

from conftest import Background, run_cli
from engine.catalog.lock import apply_lock


@pytest.fixture
def applied(fleet):
    assert fleet.cli("apply", "--auto-approve").code == 0
    return fleet


def test_a_saved_plan_applies_without_a_prompt(fleet):
    saved = fleet.cli("plan", "-out", "orders.plan")
    assert saved.code == 0
    assert 'Saved the plan to: orders.plan' in saved.out
    assert 'shardctl -C fleet apply "orders.plan"' in saved.out
    shown = fleet.cli("show", "orders.plan")
    assert shown.out.startswith("Plan: 1 to add, 0 to change, 0 to destroy.")
    result = fleet.cli("apply", "orders.plan")  # stdin is not a terminal: no prompt is needed
    assert result.code == 0, result.both
    assert "Apply complete! Resources: 1 added, 0 changed, 0 destroyed." in result.out


def test_a_stale_saved_plan_is_refused_and_changes_nothing(applied):
    applied.write("fleet.yaml", applied.read("fleet.yaml").replace("    policy: default\n",
                                                                     "    policy: default\n    protect: true\n"))
    assert applied.cli("plan", "-out", "first.plan").code == 0
    assert applied.cli("plan", "-out", "second.plan").code == 0
    assert applied.cli("apply", "first.plan").code == 0
    with applied.catalog() as conn:
        serial = conn.execute("SELECT serial FROM shardctl.state").fetchone()[0]
    result = applied.cli("apply", "second.plan")
    assert result.code == 1
    assert result.err.startswith("Error: Saved plan is stale")
    assert "can no longer be applied because the state was changed by another" in result.err
    with applied.catalog() as conn:
        assert conn.execute("SELECT serial FROM shardctl.state").fetchone()[0] == serial


def test_apply_without_a_terminal_needs_auto_approve(fleet):
    result = fleet.cli("apply")
    assert result.code == 1
    assert "Error: no terminal to ask for approval" in result.err
    assert "--auto-approve" in result.err
    assert not (fleet.path / ".shardctl").exists()  # failed before touching anything


def test_a_concurrent_apply_is_refused_with_lock_info(applied):
    with applied.catalog() as conn, apply_lock(conn, "apply"):
        result = applied.cli("apply", "--auto-approve")
        assert result.code == 1
        assert "Error: Error acquiring the state lock" in result.err
        for field in ("Lock Info:", "ID:", "Operation: apply", "Who:", "Version:", "Created:"):
            assert field in result.err
        assert "--lock-timeout" in result.err


def test_lock_timeout_waits_for_the_holder(applied):
    applied.write("fleet.yaml", applied.read("fleet.yaml").replace("    policy: default\n",
                                                                     "    policy: default\n    protect: true\n"))
    conn = applied.catalog()
    with apply_lock(conn, "apply"):
        apply = Background("-C", "fleet", "apply", "--auto-approve", "--lock-timeout", "60s", cwd=applied.base,
                           err_path=applied.base / "apply.err")
        # a notice: standard error, as in every command
        apply.wait_for_err("Acquiring state lock. This may take a few moments...")
        assert apply.proc.poll() is None, "apply should wait while the lock is held"
    conn.close()
    result = apply.finish()
    assert result.code == 0, result.both
    assert "Apply complete!" in result.out


def test_prompt_accepts_only_yes(applied):
    applied.write("fleet.yaml", applied.read("fleet.yaml").replace("    policy: default\n",
                                                                     "    policy: default\n    protect: true\n"))
    # a pseudo-terminal stands in for a person at the keyboard
    script = (
        "import os, pty, sys\n"
        "pid, fd = pty.fork()\n"
        "if pid == 0:\n"
        "    os.execvp(sys.executable, [sys.executable, '-m', 'engine', '-C', 'fleet', 'apply'])\n"
        "out = b''\n"
        "while b'Enter a value:' not in out:\n"
        "    out += os.read(fd, 4096)\n"
        "os.write(fd, sys.argv[1].encode() + b'\\n')\n"
        "while True:\n"
        "    try:\n"
        "        chunk = os.read(fd, 4096)\n"
        "    except OSError:\n"
        "        break\n"
        "    if not chunk:\n"
        "        break\n"
        "    out += chunk\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.stdout.write(out.decode())\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    no = subprocess.run([sys.executable, "-c", script, "no"], cwd=applied.base, capture_output=True, text=True,
                        timeout=120, env={**__import__("os").environ, "NO_COLOR": "1"})
    assert no.returncode == 1, no.stdout + no.stderr
    assert "Only 'yes' will be accepted to approve." in no.stdout
    assert "Apply cancelled." in no.stdout
    yes = subprocess.run([sys.executable, "-c", script, "yes"], cwd=applied.base, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "NO_COLOR": "1"})
    assert yes.returncode == 0, yes.stdout + yes.stderr
    assert "Apply complete! Resources: 0 added, 1 changed, 0 destroyed." in yes.stdout


def test_show_refuses_a_file_that_is_not_a_plan(tmp_path):
    (tmp_path / "x.plan").write_text("{\"hello\": 1}")
    result = run_cli("show", "x.plan", cwd=tmp_path)
    assert result.code == 1
    assert "is not a shardctl plan file" in result.err
