"""Habits users bring from git, kubectl and Terraform: global options after the command too,
NO_COLOR on a terminal, progress on one stream, an interrupt that says what to do next, and
help written for shardctl rather than inherited from Terraform."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import click
import pytest

from conftest import EXAMPLES, ROOT, run_cli
from engine import cli as cli_module


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("order", ["before", "after", "mixed"])
def test_global_options_before_or_after_the_command(tmp_path, order):
    example = str(EXAMPLES / "quickstart")
    args = {"before": ["-C", example, "--no-color", "validate"],
            "after": ["validate", "-C", example, "--no-color"],
            "mixed": ["--no-color", "validate", "--config-dir=" + example, "--debug"]}[order]
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 0, result.both
    assert "Success! The configuration is valid: 2 server(s), 1 database(s)" in result.out


def test_every_command_takes_the_global_options_after_its_name(tmp_path):
    for path in _commands(cli_module.cli):
        result = run_cli(*path, "--help", cwd=tmp_path)
        assert result.code == 0, (path, result.both)
        for option in ("-C, --config-dir DIR", "--no-color", "--debug"):
            assert option in result.out, (path, option)


def test_option_after_the_command_wins_over_the_one_before(tmp_path):
    result = run_cli("-C", str(tmp_path / "nowhere"), "validate", "-C", str(EXAMPLES / "quickstart"), cwd=tmp_path)
    assert result.code == 0, result.both


def _on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run the CLI with its standard output on a pseudo-terminal; return what it wrote."""
    leader, follower = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCTL_") and k != "NO_COLOR"}
    full_env.update(env, COLUMNS="160")
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=follower, stderr=follower,
                            stdin=subprocess.DEVNULL, env=full_env, cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode()


def test_no_color_on_a_terminal_means_no_escape_codes_at_all(fleet):
    # status of a fleet never applied: the servers are stopped, so this starts nothing
    args = ["-C", str(fleet.path), "status"]
    coloured = _on_a_terminal(args, {})
    assert "\x1b[" in coloured, "on a terminal without NO_COLOR, status is styled (the test needs a terminal)"
    for env in ({"NO_COLOR": "1"}, {}):
        extra = [] if env else ["--no-color"]
        plain = _on_a_terminal([*args, *extra], env)
        assert "Servers" in plain and "stopped" in plain, plain
        assert "\x1b[" not in plain, repr(plain)
    # NO_COLOR set but empty does not count (no-color.org)
    assert "\x1b[" in _on_a_terminal(args, {"NO_COLOR": ""})


def test_embedded_server_messages_go_to_standard_error_from_every_command(fleet):
    planned = fleet.cli("plan", "-out", "q.plan")
    assert planned.code == 0, planned.both
    assert "Starting embedded server a..." in planned.err and "Starting embedded server" not in planned.out
    assert fleet.cli("down").code == 0
    applied = fleet.cli("apply", "q.plan")
    assert applied.code == 0, applied.both
    assert "Starting embedded server a..." in applied.err, applied.both
    assert "Starting embedded server" not in applied.out
    assert "Apply complete!" in applied.out
    assert fleet.cli("down").code == 0
    up = fleet.cli("up")
    assert "Starting embedded server a..." in up.err and "server a: started" in up.out, up.both
    assert "Starting embedded server" not in up.out


def _interrupted(capsys, args: list[str]) -> tuple[int, str]:
    @cli_module.cli.command("interrupt-me", hidden=True)
    def interrupt_me() -> None:
        raise KeyboardInterrupt  # a second Ctrl-C: raised from the signal handler mid-step

    try:
        with pytest.raises(SystemExit) as exited:
            cli_module.main(args)
    finally:
        del cli_module.cli.commands["interrupt-me"]
    return exited.value.code, capsys.readouterr().err


def test_a_second_interrupt_says_what_to_do_next(capsys):
    code, err = _interrupted(capsys, ["interrupt-me"])
    assert code == 130
    assert "Aborted." not in err
    assert "Interrupted" in err and "rerun it" in err


def test_the_interrupt_hint_of_a_writing_command_names_the_next_commands():
    hint = cli_module.interrupted_hint(["-C", "fleet", "apply", "x.plan"])
    assert "shardctl status" in hint and "shardctl apply" in hint and "shardctl abort N" in hint
    assert "journal" in hint
    assert "rerun it" in cli_module.interrupted_hint(["plan"])


def test_help_and_plan_carry_no_terraform_leftovers(tmp_path):
    texts = [run_cli("--help", cwd=tmp_path).out]
    texts += [run_cli(*path, "--help", cwd=tmp_path).out for path in _commands(cli_module.cli)]
    template = (ROOT / "engine" / "render" / "templates" / "plan.txt.j2").read_text()
    for text in [*texts, template]:
        assert "tf.plan" not in text
        assert "execution plan" not in text
        assert "Resource actions" not in text
        assert "terraform" not in text.lower()
