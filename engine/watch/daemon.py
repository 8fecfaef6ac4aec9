"""The daemon's loops, wired together: leadership, config reload, metrics collection and the
auto-split check, applying through the same apply path, lock and journal as a person.

Threads: the main thread leads (or stands by), reloads config and runs checks and applies; a
collector thread samples the fleet every policy interval into the catalog while this daemon
leads; the config watcher and the HTTP server have their own. They share only the `View`
(a snapshot replaced whole) and a few events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from engine import backups, workflow
from engine.catalog import backups as backup_catalog
from engine.catalog import control, journal, lock, schema, store
from engine.catalog.lock import who as lock_who
from engine.collect import history
from engine.collect.observer import inspect_shards, observe
from engine.collect.sampling import LiveSampler
from engine.config import loader
from engine.config.loader import Desired
from engine.detect.forecast import shard_outlook
from engine.errors import ConfigError, LockHeldError, UserError, redact
from engine.observe import replication
from engine.observe.metrics import METRICS, Sample
from engine.observe.models import Observation
from engine.observe.replica_links import broken_text, replica_links
from engine.plan import load_rules, planner, rightsizing
from engine.plan.forecast import lineages
from engine.plan.models import Plan
from engine.render.renderers import render_text
from engine.servers.fleet import Fleet
from engine.watch import autonomy, settle
from engine.watch.configwatch import ConfigWatcher
from engine.watch.http import serve
from engine.watch.leader import LeaderLock, LeadershipLost
from engine.watch.view import (
    BackupView,
    BranchLinkView,
    BranchView,
    HistoryEntry,
    OperationView,
    OrphanView,
    ReplicaView,
    ShardView,
    Snapshot,
    View,
    now,
)

HEARTBEAT_EVERY = 5.0
LAYOUT_EVERY = 60.0  # the collector re-reads catalog and servers this often at most, unless the serial moves
SCHEMA_EVERY = 600.0  # shard schemas are re-read on every catalog change, else this often (drift)
BACKUP_RETRY = 300.0  # seconds after a failed scheduled backup before the next try


@dataclass(frozen=True)
class WatchOptions:
    config_dir: Path
    listen: str | None = "127.0.0.1:8470"
    token_env: str = "SHARDCTL_DAEMON_TOKEN"
    allow_hosts: tuple[str, ...] = ()  # Host names the HTTP listener answers besides its address
    standby_poll: float = 1.0
    debounce_ms: int = 500
    backup_tick: float = 10.0  # how often WAL streaming is looked after and due base backups are taken


class Daemon:
    def __init__(self, options: WatchOptions, desired: Desired, out: Callable[[str], None] = print,
                 log: Callable[[str], None] | None = None):
        self.options = options
        self.desired = desired
        self.fleet = Fleet(desired)
        self.out = out
        self._log_line = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.who = lock_who()
        self.view = View(Snapshot(who=self.who, config_dir=str(options.config_dir), started_at=now()))
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._config_changed = threading.Event()
        self._collected = threading.Event()  # set by the first collection round
        self._fleet_generation = 0
        self._reported = settle.Reported()
        self._silent_servers: set[str] = set()
        self._catalog_ready = False  # created and migrated (done once, when it first answers)
        self._layout_cache: tuple[int, int, float, Observation] | None = None  # collector thread only
        self._schema_cache: tuple[int, float, dict, dict] | None = None  # serial, when, shards, branch schemas
        self._unknown: dict[str, Sample] = {}  # the last round's unknown samples (late servers' shards)

    # ------------------------------------------------------------------------------ running

    def run(self) -> int:
        self._install_signals()
        # the pool's own warnings would break the one-JSON-object-per-line log; a server that
        # stops answering is reported below as a `server_silent` event instead
        logging.getLogger("psycopg").setLevel(logging.CRITICAL)
        self.fleet.start_embedded(lambda line: self.log("server_start", message=line))
        http = None
        if self.options.listen:
            http = serve(self, self.options.listen, self.options.allow_hosts)
            self.log("listening", url=f"http://{self.options.listen}/")
        watcher = ConfigWatcher(self.options.config_dir, self._on_config_change, self.options.debounce_ms).start()
        try:
            while not self.stopping.is_set():
                leader = self._stand_by()
                if leader is None:
                    break
                try:
                    self._lead(leader)
                except LeadershipLost as exc:
                    self.log("leadership_lost", error=str(exc))
                finally:
                    leader.release()
        finally:
            self.view.update(role="stopping")
            watcher.stop()
            if http is not None:
                http.shutdown()
            self.log("stopped")
        return 0

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            self.log("stopping", reason=why)
        self.stopping.set()
        journal.request_stop()  # an apply in flight parks at its next safe step
        self._wake.set()

    def _install_signals(self) -> None:
        def handler(signum, frame):
            if self.stopping.is_set():  # a second signal: stop at once; the journal lets the next start resume
                raise KeyboardInterrupt
            self.stop(signal.Signals(signum).name)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests drive the daemon in-process)
                signal.signal(sig, handler)

    def _catalog_connection(self) -> psycopg.Connection:
        handle = self.fleet.catalog_server
        params = {"connect_timeout": "5", "application_name": "shardctl-watch",
                  **handle.params(self.desired.catalog_database)}
        return psycopg.connect(**params, autocommit=True)

    # ------------------------------------------------------------------------------ leadership

    def _stand_by(self) -> LeaderLock | None:
        """Wait until this daemon leads; None when stopping first."""
        leader = LeaderLock(self._catalog_connection, self.who, self.options.listen or "")
        told = None
        while not self.stopping.is_set():
            try:
                if not self._catalog_ready:
                    with self.fleet.catalog(create=True) as conn:
                        assert conn is not None
                        schema.migrate(conn)
                    self._catalog_ready = True
                if leader.try_acquire():
                    return leader
                current = leader.current()
                holder = current.who if current else "another daemon"
                self.view.update(role="standby", leader=holder)
                if told != holder:
                    self.log("standby", leader=holder)
                    told = holder
            except (psycopg.Error, UserError) as exc:
                leader.release()
                message = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.view.update(role="standby", last_error=f"catalog unavailable: {message}")
                if told != "unreachable":
                    self.log("catalog_unavailable", error=message)
                    told = "unreachable"
            self.stopping.wait(self.options.standby_poll)
        leader.release()
        return None

    def _lead(self, leader: LeaderLock) -> None:
        self.view.update(role="leader", leader=self.who, last_error=None)
        self.log("leader", who=self.who)
        collector_stop = threading.Event()
        collector = threading.Thread(target=self._collect_loop, args=(collector_stop,), name="shardctl-collect",
                                     daemon=True)
        collector.start()
        backup_thread = threading.Thread(target=self._backups_loop, args=(collector_stop,), name="shardctl-backups",
                                         daemon=True)
        backup_thread.start()
        # the first check waits for the first collection round (at most two intervals): judged on
        # no sample at all, every shard would read `unknown` until the next check, a minute later
        deadline = time.monotonic() + 2 * self._interval()
        while not (self._collected.is_set() or self.stopping.is_set()) and time.monotonic() < deadline:
            self._collected.wait(timeout=0.2)
        next_check = 0.0  # then at once: an interrupted operation in the journal is resumed first
        next_beat = time.monotonic() + HEARTBEAT_EVERY
        try:
            while not self.stopping.is_set():
                if self._config_changed.is_set():
                    self._config_changed.clear()
                    if self._reload():
                        next_check = 0.0
                if time.monotonic() >= next_check:
                    acted = self._check()
                    # after an action, look again soon: the plan and the page should show the new layout
                    next_check = time.monotonic() + (1.0 if acted else self._check_every())
                if time.monotonic() >= next_beat:
                    leader.heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_EVERY
                self._wake.wait(max(0.05, min(next_check, next_beat) - time.monotonic()))
                self._wake.clear()
        finally:
            collector_stop.set()
            collector.join(timeout=30)
            backup_thread.join(timeout=60)

    # ------------------------------------------------------------------------------ config

    def _on_config_change(self, paths: list[str]) -> None:
        self._config_changed.set()
        self._wake.set()

    def _reload(self) -> bool:
        try:
            desired = loader.load(self.options.config_dir)
        except UserError as exc:
            text = exc.render()
            self.view.update(config_error=text)
            first = exc.diagnostics[0] if isinstance(exc, ConfigError) and exc.diagnostics else None
            self.log("config_invalid", where=str(first.location) if first else "",
                     error=first.message if first else exc.summary, kept="the last valid config stays in force")
            self.out("Config change rejected; the last valid config stays in force:\n" + text)
            return False
        self.desired = desired
        self.fleet = Fleet(desired)
        self.fleet.start_embedded(lambda line: self.log("server_start", message=line))
        self._fleet_generation += 1
        self._schema_cache = None
        self.view.update(config_error=None)
        self.log("config_reloaded", files=list(desired.files))
        return True

    def _check_every(self) -> float:
        values = [db.effective_policy.autosplit.check_every for db in self.desired.databases.values()]
        return min(values, default=60.0)

    def _interval(self) -> float:
        values = [db.effective_policy.metrics.interval for db in self.desired.databases.values()]
        return min(values, default=10.0)

    # ------------------------------------------------------------------------------ collection

    def _collect_loop(self, stop: threading.Event) -> None:
        """Sample every monitored shard each interval into the catalog. A server that does not
        answer gives unknown values for its shards, and the loop goes on."""
        conn: psycopg.Connection | None = None
        sampler: LiveSampler | None = None
        generation = -1
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if conn is None or conn.closed:
                        conn = self._catalog_connection()
                        generation = -1  # reseed from the catalog too
                    if generation != self._fleet_generation or sampler is None:
                        if sampler is not None:
                            sampler.close()
                        generation = self._fleet_generation
                        sampler = LiveSampler(self.fleet, deadline=history.deadline(self.desired))
                        # rates need a previous reading: the stored one, when recent, saves a second read
                        history.seed_recent(sampler, self.desired, history.stored_history(conn, per_shard=1)[1])
                    self._collect_once(conn, sampler)
                except (psycopg.Error, UserError) as exc:
                    message = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    self.view.update(last_error=f"collection failed: {message}")
                    self.view.record_collection_failure()
                    self.log("collection_failed", error=message)
                    if conn is not None:
                        conn.close()
                    conn = None
                stop.wait(max(0.1, self._interval() - (time.monotonic() - started)))
        finally:
            if sampler is not None:
                sampler.close()
            if conn is not None:
                conn.close()

    def _collect_once(self, conn: psycopg.Connection, sampler: LiveSampler) -> None:
        started = time.monotonic()
        desired = self.desired
        observation = self._layout(conn)
        fresh = history.collect(desired, conn, observation, sampler)
        pairs = fresh.pairs
        self._unknown = fresh.unknown  # for the next check: late servers' shards are unknown now
        state = control.read_control(conn)
        operations = _operations(conn)  # whoever runs them: a person's `apply -split` shows here too
        took = time.monotonic() - started
        at = now()
        shards = [s for d in observation.catalog.databases.values() if d.state == "active"
                  for s in d.shards if s.state == "active"]
        points = {}
        for shard in shards:
            sample = pairs.get(shard.address, (None, None))[1]
            points[shard.address] = (sample.at if sample else at,
                                     {m: sample.value(m) if sample else None for m in METRICS})
        silent = sorted({s.server for s in shards if s.address not in pairs})
        for server in sorted(set(silent) ^ self._silent_servers):
            if server in silent:
                self.log("server_silent", server=server, reason=_silence(server, fresh.missing, observation),
                         effect="its shards' metrics are unknown; nothing acts on them; other servers are unaffected")
            else:
                self.log("server_answering", server=server, effect="")
        self._silent_servers = set(silent)
        replicas = tuple(ReplicaView(server=server, name=name, lag_bytes=lag_bytes, lag_seconds=lag_seconds)
                         for server, found in sorted(sampler.replication(
                             sorted({s.server for s in shards} - set(silent))).items())
                         for name, lag_bytes, lag_seconds in found)
        # shardctl's slots and subscriptions, read each round: a link that breaks (a password rotated,
        # a server gone) or a slot left behind shows within one interval
        objects = sampler.replication_objects(sorted(set(self.fleet.servers) - set(silent)))  # not twice late
        links, orphans = replication_views(observation.model_copy(update={"servers": {
            name: live.model_copy(update={"replication": objects.get(name)})
            for name, live in observation.servers.items()}}))
        self.view.add_points(points)
        self.view.forget(set(points))
        if state.paused != self.view.get().paused:
            self.log("paused" if state.paused else "resumed", by=state.changed_by, reason=state.reason)

        def changes(snapshot: Snapshot) -> dict:
            previous = {s.address: s for s in snapshot.shards}
            views = tuple(
                (previous.get(s.address) or ShardView(address=s.address, database=s.database, name=s.name,
                                                      server=s.server))
                .model_copy(update={"latest": points[s.address][1], "sampled_at": points[s.address][0],
                                    "server": s.server, "lo": s.lo, "hi": s.hi})
                for s in sorted(shards, key=lambda s: s.address))
            return dict(shards=views, last_collect_at=at, last_collect_seconds=round(took, 4),
                        paused=state.paused, pause_reason=state.reason, paused_by=state.changed_by,
                        replicas=replicas, silent_servers=tuple(silent), branch_links=links, orphans=orphans,
                        operations=operations,
                        **_cleared(snapshot, "collection failed"))
        self.view.update_with(changes)
        self.view.record_collection(took)
        self._collected.set()

    def _layout(self, conn: psycopg.Connection) -> Observation:
        """The catalog and servers as last observed, read again when the catalog serial moves or
        after LAYOUT_EVERY, or every round while a server is silent (to see it come back); else
        one `SELECT serial` a round. A server that stops answering shows at once anyway: the
        sampler gets no reading from it."""
        serial = store.current_serial(conn)
        cached = self._layout_cache
        if cached and cached[0] == serial and cached[1] == self._fleet_generation and not self._silent_servers \
                and time.monotonic() - cached[2] < LAYOUT_EVERY:
            return cached[3]
        # servers at once, each within the metrics deadline: a hung server must not hold the round
        observation = observe(self.fleet, conn, inspect_schemas=False, deadline=history.deadline(self.desired))
        self._layout_cache = (serial, self._fleet_generation, time.monotonic(), observation)
        return observation

    # ------------------------------------------------------------------------------ backups

    def _backups_loop(self, stop: threading.Event) -> None:
        """While this daemon leads: WAL of every backed-up server streaming (one supervised `barman
        receive-wal` each), and a base backup with a restore point whenever one is due
        (`backups.every`; not while automation is paused). Nothing when no server is backed up."""
        supervisor = backups.Supervisor(self.log)
        failed_at: float | None = None
        try:
            while not stop.is_set():
                desired, fleet = self.desired, self.fleet
                if desired.backups:
                    try:
                        failed_at = self._backups_round(supervisor, desired, fleet, failed_at)
                    except (UserError, psycopg.Error) as exc:
                        self.log("backups_failed", error=redact(str(exc).splitlines()[0] if str(exc) else ""))
                stop.wait(self.options.backup_tick)
        finally:
            supervisor.stop()

    def _backups_round(self, supervisor: backups.Supervisor, desired: Desired, fleet: Fleet,
                       failed_at: float | None) -> float | None:
        status = supervisor.tick(desired, fleet)
        with fleet.catalog(create=False) as conn:
            if conn is None or not backup_catalog.available(conn):
                return failed_at
            states = backups.states(desired, fleet, conn, status)
            last = backup_catalog.last_backups(conn)
            paused = control.read_control(conn).paused
        self.view.update(backups=tuple(BackupView(**vars(state)) for state in states))
        due = backups.due(desired, last, now())
        if not due or paused or (failed_at is not None and time.monotonic() - failed_at < BACKUP_RETRY) \
                or self.stopping.is_set():
            return failed_at
        self.log("backup_started", servers=due, reason="backups.every elapsed since the last base backup")
        try:
            point = backups.create(desired, say=lambda line: self.log("progress", message=line), servers=due,
                                   actor=f"daemon {self.who}")
        except journal.Interrupted as exc:
            self.log("backup_parked", message=str(exc), resume="the next `backups create` resumes it")
            return failed_at
        except (UserError, psycopg.Error) as exc:
            message = redact(exc.render() if isinstance(exc, UserError) else str(exc))
            self.log("backup_failed", servers=due, error=message.splitlines()[0] if message else "",
                     retry=f"in {BACKUP_RETRY:.0f}s")
            return time.monotonic()
        self.log("backup_done", servers=due, restore_point=point.name, pause_ms=point.pause_ms)
        return None

    # ------------------------------------------------------------------------------ check and act

    def _observe(self, conn: psycopg.Connection):
        desired = self.desired
        observation = observe(self.fleet, conn, inspect_schemas=False, deadline=history.deadline(desired))
        observation = history.stored_window(desired, conn, observation)
        observation = _with_unknown(observation, self._unknown)
        # shard schemas change through apply (which moves the serial) or by hand (drift, seen
        # within SCHEMA_EVERY); reading them from every shard each minute would be most of
        # the daemon's idle work
        cache = self._schema_cache
        if cache is not None and cache[0] == observation.serial and time.monotonic() - cache[1] < SCHEMA_EVERY \
                and set(cache[2]) >= {s.address for d in observation.catalog.databases.values() for s in d.shards
                                      if s.state != "retired"}:
            return observation.model_copy(update={"shards": cache[2], "branch_schemas": cache[3]})
        observation = inspect_shards(self.fleet, observation)
        self._schema_cache = (observation.serial, time.monotonic(), observation.shards, observation.branch_schemas)
        return observation

    def _check(self) -> bool:
        """Plan; show it when it changed; apply what automation may. True when it acted."""
        desired = self.desired
        try:
            with self.fleet.catalog(create=False) as conn:
                if conn is None:
                    raise UserError("the catalog does not exist")
                observation = self._observe(conn)
                state = control.read_control(conn)
                plan, decision = decide_round(desired, observation, state.paused)
                recent = store.history(conn, 50)
        except (psycopg.Error, UserError) as exc:
            message = redact(exc.render() if isinstance(exc, UserError) else str(exc).splitlines()[0])
            self.view.update(last_error=f"check failed: {message}")
            self.log("check_failed", error=message)
            return False
        verdicts = load_rules.assessments(desired, observation)
        self.view.update_with(lambda snapshot: _cleared(snapshot, "check failed"))
        self._publish(plan, decision, verdicts, observation, recent, state)
        self._show_if_changed(plan)
        if not decision.autonomous or self.stopping.is_set():
            return False
        return self._apply(plan, decision, desired)

    def _publish(self, plan: Plan, decision: autonomy.Decision, verdicts, observation, recent, state) -> None:
        branches = tuple(BranchView(name=b.name, parent=b.parent, data=b.data, server=b.server, state=b.state,
                                    created_at=b.created_at, expires_at=b.expires_at, size_bytes=b.size_bytes)
                         for b in sorted(observation.catalog.branches.values(), key=lambda b: b.name))
        advice = tuple(a.describe() for a in rightsizing.fleet_advice(self.desired, observation))
        links, orphans = replication_views(observation)
        self.view.update_with(lambda snapshot: dict(
            plan=plan, plan_text=render_text(plan), planned_at=now(),
            autonomous=tuple(a.address for a in decision.autonomous), pending=decision.pending,
            notes=tuple(w for w in plan.warnings if w not in advice), advice=advice,  # advice has its own place
            shards=self._judged(snapshot, verdicts, observation),
            history=tuple(_history_entry(h) for h in recent), branches=branches, branch_links=links, orphans=orphans,
            paused=state.paused, pause_reason=state.reason, paused_by=state.changed_by))

    def _judged(self, snapshot: Snapshot, verdicts, observation) -> tuple[ShardView, ...]:
        """The active shards with the detector's verdicts, keeping their latest collected values."""
        current = {s.address: s for s in snapshot.shards}
        families = lineages(observation)
        shards = []
        for d in observation.catalog.databases.values():
            for s in d.shards:
                if s.state != "active":
                    continue
                verdict = verdicts.get(s.address)
                base = current.get(s.address) or ShardView(address=s.address, database=s.database, name=s.name,
                                                           server=s.server)
                db = self.desired.databases.get(s.database)
                hot = db.effective_policy.hot.model_dump() if db else {}
                lines, forecasts = shard_outlook(s.address, observation.hourly.get(s.address, ()),
                                                 db.effective_policy, observation.metrics_at or observation.now(),
                                                 families.get(s.address)) if db else ([], [])
                shards.append(base.model_copy(update={
                    "outlook": tuple(lines), "forecasts": tuple(forecasts),
                    "hot_thresholds": {m: float(v) for m, v in hot.items() if v is not None},
                    "server": s.server, "lo": s.lo, "hi": s.hi, "load": verdict.state if verdict else "unknown",
                    "evidence": tuple(e.describe() for e in verdict.evidence) if verdict else ()}))
        return tuple(sorted(shards, key=lambda s: s.address))

    def _show_if_changed(self, plan: Plan) -> None:
        """Print and log the plan when it changed: at once for a person's change, after it held
        for a check for a load-driven one (engine.watch.settle), so a flip is never reported."""
        self._reported, report = settle.settle(self._reported, plan)
        if not report:
            return
        self.out(render_text(plan).rstrip("\n"))
        self.log("plan_changed", actions=[f"{a.kind} {a.address}" for a in plan.actions])

    def _apply(self, plan: Plan, decision: autonomy.Decision, desired: Desired) -> bool:
        subset = plan.model_copy(update={"actions": decision.autonomous})
        for action in decision.autonomous:
            self.log("autonomous_action", action=action.address, kind=action.kind, reason=action.reason.text,
                     evidence=[e.describe() for e in getattr(action, "evidence", ())],
                     operation=getattr(action, "operation", None))
        names = ", ".join(a.address for a in decision.autonomous)
        self.view.update(activity=f"applying {names}", activity_since=now(), progress=None, progress_at=None)
        kinds = [a.kind for a in decision.autonomous]
        try:
            result = workflow.apply(desired, subset, lock_timeout=0, actor=f"daemon {self.who}",
                                    say=lambda line: self.log("progress", message=line), start_servers=False,
                                    own_signals=False,
                                    progress=self._progress)
        except LockHeldError as exc:
            self._count(kinds, "deferred")
            self.log("apply_deferred", actions=[a.address for a in decision.autonomous],
                     reason="the apply lock is held; the next check tries again",
                     holder=exc.info.who if exc.info else "unknown")
            return False
        except journal.Interrupted as exc:
            self._count(kinds, "parked")
            self.log("apply_parked", message=str(exc), resume="the next start resumes it from the journal")
            return True
        except (workflow.StalePlan, workflow.PremiseFailed) as exc:
            self._count(kinds, "refused")
            self.log("apply_refused", reason=exc.summary)
            return True
        except (UserError, psycopg.Error) as exc:
            self._count(kinds, "failed")
            message = redact(exc.render() if isinstance(exc, UserError) else str(exc))
            self.log("apply_failed", error=message.splitlines()[0] if message else "")
            self.view.update(last_error=f"apply failed: {message}")
            return True
        finally:
            self.view.update(activity="idle", activity_since=None, progress=None, progress_at=None)
        self._count(kinds, "applied")
        self.view.update_with(lambda snapshot: _cleared(snapshot, "apply failed"))
        self.log("applied", actions=[a.address for a in decision.autonomous], counts=result.counts)
        return True

    def _progress(self, figures: dict) -> None:
        self.view.update(progress=figures, progress_at=now())

    def _count(self, kinds: list[str], result: str) -> None:
        for kind in kinds:
            self.view.count_action(kind, result)

    # ------------------------------------------------------------------------------ control

    def set_paused(self, paused: bool, reason: str, by: str) -> control.Control:
        """The kill switch, from the HTTP API: stored in the catalog like `shardctl pause`."""
        with self._catalog_connection() as conn:
            state = control.set_paused(conn, paused, reason, by)
        self.view.update(paused=state.paused, pause_reason=state.reason, paused_by=state.changed_by)
        self.log("paused" if paused else "resumed", by=by, reason=reason)
        self._wake.set()
        return state

    # ------------------------------------------------------------------------------ audit log

    def log(self, event: str, **fields) -> None:
        """One structured line per event (JSON), passwords redacted."""
        line = json.dumps({"ts": now().isoformat(timespec="milliseconds"), "event": event, **fields},
                          default=str, sort_keys=False)
        self._log_line(redact(line))


def replication_views(observation: Observation) -> tuple[tuple[BranchLinkView, ...], tuple[OrphanView, ...]]:
    """The replica branches' links (a broken one with why and what to do) and the leftover
    replication, as the dashboard, the API and /metrics show them."""
    links = tuple(BranchLinkView(branch=r.branch, shard=link.shard, server=link.server, state=link.state,
                                 lag_bytes=link.lag_bytes,
                                 error=broken_text(r.branch, r.server, link.shard, link.server, link.error)
                                 if link.state == "broken" else None)
                  for r in replica_links(observation.catalog, observation.servers) for link in r.links)
    orphans = tuple(OrphanView(server=o.server, kind=o.object.kind, name=o.object.name, database=o.object.database,
                               operation=o.operation, retained_bytes=o.object.retained_bytes,
                               text=o.text)
                    for o in replication.orphans(observation.catalog, observation.servers))
    return links, orphans


def decide_round(desired: Desired, observation: Observation, paused: bool) -> tuple[Plan, autonomy.Decision]:
    """One check of the loop, without side effects: the plan, and what automation may apply of
    it. Recorded traces are replayed through this same function (tests/test_watch_replay.py)."""
    plan = planner.plan(desired, observation)
    return plan, autonomy.decide(plan, paused)


def _cleared(snapshot: Snapshot, failure: str) -> dict:
    """The last error goes once what failed works again (it is about now, not a log)."""
    return {"last_error": None} if (snapshot.last_error or "").startswith(failure) else {}


def _operations(conn: psycopg.Connection) -> tuple[OperationView, ...]:
    """The operations the catalog records as running, in progress (and by whom) or interrupted."""
    by = lock.held_elsewhere(conn)
    return tuple(OperationView(id=op["id"], kind=op["kind"], address=op["address"], step=op["last_step"], by=by,
                               started_at=op["started_at"], progress=op["progress"])
                 for op in journal.interrupted(conn))


def _silence(server: str, missing: dict[str, str], observation: Observation) -> str:
    """Why a server gave no reading: the round's reason, else the inventory's."""
    live = observation.servers.get(server)
    return missing.get(server) or (live.error if live is not None and live.error else "no reading")


def _with_unknown(observation: Observation, unknown: dict[str, Sample]) -> Observation:
    """The stored window plus the last round's unknown samples of late servers' shards, when newer
    than what is stored: the check then judges those shards unknown at once, not on older samples
    until they go stale (unknown samples are not stored in the catalog)."""
    if not unknown:
        return observation
    window = dict(observation.metrics)
    for address, sample in unknown.items():
        stored = window.get(address)
        if stored is not None and (not stored or stored[-1].at < sample.at):
            window[address] = stored.appended(sample)
    return observation.model_copy(update={"metrics": window})


def _history_entry(row: dict) -> HistoryEntry:
    detail = row.get("detail") or {}
    evidence = tuple(_evidence_line(e) for e in detail.get("evidence", [])
                     if isinstance(e, dict) and isinstance(e.get("threshold"), (int, float)) and "metric" in e
                     and all(isinstance(e.get(k), (int, float)) for k in ("low", "high", "samples")))
    targets = detail.get("targets") or []
    summary = {
        "split_shard": f"into {', '.join(t.get('name', '?') for t in targets)}" if targets else "",
        "merge_shards": f"into {(detail.get('target') or {}).get('name', '')}",
        "move_shard": f"to server {(detail.get('target') or {}).get('server', '?')}",
    }.get(row["event"], "")
    at = row["at"] if isinstance(row["at"], datetime) else datetime.fromisoformat(str(row["at"]))
    pause = detail.get("pause_ms")
    return HistoryEntry(at=at, event=row["event"], address=row["address"], actor=str(detail.get("actor", "apply")),
                        summary=summary or str(detail.get("reason", ""))[:200], evidence=evidence,
                        pause_ms=float(pause) if isinstance(pause, (int, float)) and pause is not True
                        and pause is not False else None)


def _evidence_line(e: dict) -> str:
    """A stored split's or merge's evidence, short: the judged range of values and the rule."""
    side = "over" if e.get("kind") == "hot" else "under"
    return (f"{e['metric']} {e['low']:.4g} to {e['high']:.4g}, all {side} {e['threshold']:g}, in {e['samples']} samples"
            f" from {e.get('since', '?')} to {e.get('until', '?')}")
