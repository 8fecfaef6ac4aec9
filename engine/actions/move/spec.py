"""What a move is, as data: its links, its settings, the names it gives what it creates, and the
pause it measures. Frozen values only; nothing here opens a connection but `settings_for` and
`database_steps`, which read what an older operation did not record from the catalog.

A move is a set of links, each from a source shard to a target shard with an optional hash
range filter (a split: one source, N filtered links; a merge: N sources, one target,
unfiltered; a relocation: one source, one unfiltered link to its transit name).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from pydantic import ValidationError

from engine.actions.base import ApplyContext
from engine.config.models import Moves, Policy
from engine.observe import strays
from engine.plan.models import MoveSettings, ShardSpec, StepSpec, transit_name
from engine.rows import one


@dataclass(frozen=True)
class Link:
    index: int
    source: ShardSpec
    target: ShardSpec
    filtered: bool  # split links carry the target's range as a row filter

    def name(self, operation: int) -> str:
        return f"shardctl_op{operation}_{self.index}"


@dataclass(frozen=True)
class MoveSpec:
    """One move's fixed facts: what every stage reads, none changes."""

    operation: int
    database: str
    key_column: str
    key_type: str
    sources: tuple[ShardSpec, ...]
    targets: tuple[ShardSpec, ...]
    links: tuple[Link, ...]
    label: str  # e.g. "split orders/40-80"
    settings: Moves
    steps: tuple[StepSpec, ...]  # every schema step the shards ran: a target runs the same
    kind: str  # the action's kind: a relocation flips names as well as routing

    @property
    def relocation(self) -> bool:
        """A whole shard to another server: its target carries the transit name NAME@SERVER."""
        return self.kind == "move_shard"

    def link_name(self, link: Link) -> str:
        return link.name(self.operation)

    def verify_slot(self, source: ShardSpec) -> str:
        """The comparison's test_decoding slot on a source."""
        return f"shardctl_op{self.operation}_v{self.sources.index(source)}"

    def range_filter(self, target: ShardSpec) -> sql.Composable:
        h = strays.key_hash(self.key_column, self.key_type)
        parts = []
        if target.lo is not None:
            parts.append(sql.SQL("{} >= {}").format(h, sql.Literal(target.lo)))
        if target.hi is not None:
            parts.append(sql.SQL("{} < {}").format(h, sql.Literal(target.hi)))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")

    def feeding(self, target: ShardSpec) -> tuple[Link, ...]:
        return tuple(link for link in self.links if link.target == target)


@dataclass(frozen=True)
class Pause:
    """Where the pause stands: since when (monotonic) the range has been unwritable, whether an
    interrupted run's fence began it, and when each point inside it was reached (ms since the
    fence armed; each step's journal row written, each wait over), kept in the flip's history
    row. New values, never changed in place."""

    since: float | None = None
    inherited: bool = False
    marks: tuple[tuple[str, float], ...] = ()

    def ms(self, now: float) -> float:
        """From the fence armed (writes to the range fail) to NOW (monotonic); 0 unfenced."""
        return round((now - self.since) * 1000, 1) if self.since is not None else 0.0

    def marked(self, point: str, now: float) -> Pause:
        """With POINT reached at NOW (nothing is noted before the fence is armed)."""
        if self.since is None:
            return self
        marks = dict(self.marks)
        marks[point] = self.ms(now)
        return Pause(self.since, self.inherited, tuple(marks.items()))


def for_action(ctx: ApplyContext, action, operation: int, label: str | None = None) -> MoveSpec:
    """The move a SplitShard, MergeShards or MoveShard action describes (also used to abort one)."""
    if action.kind == "split_shard":
        sources, targets = (action.source,), action.targets
        links = tuple(Link(i, action.source, t, filtered=True) for i, t in enumerate(targets))
        label = label or f"split {action.database}/{action.source.name}"
    elif action.kind == "move_shard":
        # the target goes by its transit name until the flip: both copies are in the catalog meanwhile
        sources = (action.source,)
        targets = (action.target.model_copy(update={"name": transit_name(action.target.name, action.target.server)}),)
        links = (Link(0, action.source, targets[0], filtered=False),)
        label = label or f"move {action.database}/{action.source.name}"
    else:
        sources, targets = action.sources, (action.target,)
        links = tuple(Link(i, s, action.target, filtered=False) for i, s in enumerate(sources))
        label = label or f"merge {action.database}/{action.target.name}"
    settings = settings_for(ctx, action)
    moves = Moves(converge_timeout=settings.converge_timeout, pause_budget=settings.pause_budget,
                  fence_timeout=settings.fence_timeout, copy_streams=settings.copy_streams, parallel=settings.parallel)
    return MoveSpec(operation=operation, database=action.database, key_column=settings.key_column,
                    key_type=settings.key_type, sources=tuple(sources), targets=tuple(targets), links=links,
                    label=label, settings=moves, steps=settings.steps, kind=action.kind)


def settings_for(ctx: ApplyContext, action) -> MoveSettings:
    """What a split, merge or move runs with: its plan's, recorded with its operation, so that a
    resumed or aborted one runs with what it started with; never the YAML's. An operation begun
    by a shardctl whose plans did not carry them reads the catalog: the shard key and policy
    recorded at the database's last apply, and the schema steps every shard ran."""
    if action.settings is not None:
        return action.settings
    key_column, key_type, recorded = one(ctx.catalog.execute(
        "SELECT key_column, key_type, policy FROM shardctl.databases WHERE name = %s", (action.database,)))
    try:
        policy = Policy.model_validate(recorded)
    except ValidationError:
        policy = Policy()
    moves = policy.moves
    return MoveSettings(key_column=key_column, key_type=key_type, steps=database_steps(ctx, action.database),
                        converge_timeout=moves.converge_timeout, pause_budget=moves.pause_budget,
                        fence_timeout=moves.fence_timeout, copy_streams=moves.copy_streams, parallel=moves.parallel,
                        retire_after=policy.autosplit.retire_after)


def database_steps(ctx: ApplyContext, database: str) -> tuple[StepSpec, ...]:
    """The schema steps every shard of the database has run, as the catalog records them (for an
    operation whose action does not carry them); a step without its SQL there is taken from the
    YAML by its hash, or left without SQL (creating a target then fails, naming it)."""
    recorded = ctx.catalog.execute("SELECT seq, name, sha256, sql FROM shardctl.schema_steps WHERE database = %s"
                                   " ORDER BY seq", (database,)).fetchall()
    desired = ctx.fleet.desired.databases.get(database)
    by_hash = {s.sha256: s.sql for s in desired.schema_steps} if desired else {}
    return tuple(StepSpec(seq=seq, name=name, sha256=sha, sql=text or by_hash.get(sha, ""))
                 for seq, name, sha, text in recorded)
