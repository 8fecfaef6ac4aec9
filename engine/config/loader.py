"""Loading a config directory: YAML with positions -> validated, cross-checked `Desired` state.

ruamel.yaml keeps the line and column of every key and value; pydantic validates the shape.
This module joins the two so that every problem is reported as `file:line:column: message`,
merges the documents of a directory, checks cross-references, reads schema files (and parses
their SQL with pglast so a typo is caught before any server is touched), and resolves each
database's effective policy. Nothing here touches a server or writes a file.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from engine.config import models, names, yamldocs
from engine.errors import SECRET_KEY, ConfigError, Diagnostic, Location

PRESET_DIRS = (
    Path(__file__).resolve().parent.parent / "presets",  # installed wheel
    Path(__file__).resolve().parent.parent.parent / "policies",  # source checkout
)
RESERVED_DATABASES = {"postgres", "template0", "template1"}
PLURALS = {"policy": "policies"}
_SECRET_FIELD = re.compile(SECRET_KEY, re.IGNORECASE)

Path_ = tuple[Any, ...]


class KnownClean(Protocol):
    """The SQL checks that found nothing before (engine.collect.sql_cache): a check whose key is
    known is not run again, which spares a plan of unchanged files importing pglast."""

    def key(self, check: str, *inputs: str) -> str: ...

    def __contains__(self, key: str) -> bool: ...

    def add(self, key: str) -> None: ...


@dataclass(frozen=True)
class SchemaStep:
    """One schema step (a migration) with its content hash: applied once per shard, in order."""

    name: str
    sql: str
    sha256: str
    location: Location
    sql_location: Location | None = None  # where its SQL is: the .sql file, or the step itself when inline


@dataclass(frozen=True)
class ResolvedPolicy:
    name: str
    policy: models.Policy  # as declared; `effective` has what it inherits filled in
    location: Location
    parent: str | None = None
    parent_location: Location | None = None
    effective: models.Policy | None = None
    # the resolved policy it inherits from: a link, not a copy of the chain (a chain of 60,000
    # policies would otherwise hold 1.8 billion names)
    inherits: ResolvedPolicy | None = field(default=None, repr=False, compare=False)

    def chain(self) -> Iterator[str]:
        """Its own name, then each policy it inherits from, nearest first."""
        entry: ResolvedPolicy | None = self
        while entry is not None:
            yield entry.name
            entry = entry.inherits


@dataclass(frozen=True)
class DesiredDatabase:
    name: str
    spec: models.Database
    schema_steps: tuple[SchemaStep, ...]
    policy_name: str
    effective_policy: models.Policy
    location: Location


@dataclass(frozen=True)
class Desired:
    """The validated desired state of a config directory."""

    directory: Path
    servers: dict[str, models.Server]
    databases: dict[str, DesiredDatabase]
    policies: dict[str, ResolvedPolicy]
    catalog_server: str | None
    catalog_database: str
    files: tuple[str, ...]
    resharding_enabled: bool = True
    branches: dict[str, models.Branch] = field(default_factory=dict)
    # consent to destroy data, by ("database" | "branch", name), with where it was given
    allow_destroy: dict[tuple[str, str], Location] = field(default_factory=dict)
    # declared renames: new name -> (old name, where)
    moved: dict[str, tuple[str, Location]] = field(default_factory=dict)
    # shard-key problems of the schema, when loaded with defer_key_checks: the planner reports
    # them together with what the change would destroy
    key_problems: tuple[Diagnostic, ...] = ()
    sources: dict[Path_, Location] = field(default_factory=dict, repr=False, compare=False)
    # each backed-up server's effective backup settings (`directory` made absolute): the fleet's
    # `backups:` overlaid with the server's own; a server that is not backed up is absent
    backups: dict[str, models.Backups] = field(default_factory=dict)

    def where(self, *path: Any) -> Location | None:
        return self.sources.get(tuple(path))

    def threshold_location(self, database: str, kind: str, metric: str) -> str:
        """Where a database's effective threshold comes from: its override or its policy's line."""
        db = self.databases[database]
        where = self.where("databases", database, "thresholds", kind, metric)
        chain = self.policies[db.policy_name].chain() if db.policy_name in self.policies else iter((db.policy_name,))
        for name in chain:
            where = where or self.where("policies", name.removeprefix("preset:"), kind, metric)
        where = where or self.where("policies", db.policy_name)
        return str(where) if where else f"policy {db.policy_name}"


# ---------------------------------------------------------------------------- YAML with positions


_Doc = yamldocs.Doc


def _display(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _read_documents(files: list[Path], problems: list[Diagnostic], cwd: Path,
                    parsed: yamldocs.ParsedDocs | None) -> list[_Doc]:
    docs: list[_Doc] = []
    for file in files:
        docs.extend(_read(file, _display(file, cwd), problems, parsed))
    return docs


def _read(file: Path, display: str, problems: list[Diagnostic], parsed: yamldocs.ParsedDocs | None) -> list[_Doc]:
    """A file's documents: from `parsed` when its text was parsed before without a problem, else
    parsed now (ruamel is imported only then, engine.config.yamldocs) and added to `parsed`."""
    text, problem = yamldocs.check_file(file, display)
    if problem or text is None:
        problems.append(problem or Diagnostic(Location(display), "cannot read the file"))
        return []
    if parsed is not None and (known := parsed.get(text)) is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # not what `stored` writes: parsed again
            return [yamldocs.restored(k, file, display) for k in known]
    from engine.config import yamlread

    found: list[Diagnostic] = []
    docs = yamlread.read_text(text, file, display, found)
    problems.extend(found)
    if parsed is not None and not found:
        kept = [yamldocs.stored(doc) for doc in docs]
        if all(k is not None for k in kept):
            parsed.put(text, [k for k in kept if k is not None])
    return docs


# ---------------------------------------------------------------------------- pydantic errors -> positions


def _allowed_keys(loc: Path_) -> list[str]:
    """Keys a mapping at `loc` may hold, found by walking the models (for 'did you mean')."""
    current: Any = models.ConfigFile
    items = list(loc)
    while items:
        origin = typing.get_origin(current)
        if origin is typing.Annotated:
            current = typing.get_args(current)[0]
            continue
        if origin in (typing.Union, UnionType):
            members = [a for a in typing.get_args(current) if a is not type(None)]
            models_only = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if not models_only:
                return []
            if items and items[0] in {m.__name__ for m in members if isinstance(m, type)}:
                named = items.pop(0)
                current = next(m for m in models_only if m.__name__ == named)
            else:
                current = models_only[0]
            continue
        item = items.pop(0)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = {(f.alias or n): f for n, f in current.model_fields.items()}
            if item not in fields:
                return []
            current = fields[item].annotation
        elif origin is dict:
            current = typing.get_args(current)[1]
        elif origin is list:
            current = typing.get_args(current)[0]
        else:
            return []
    while typing.get_origin(current) in (typing.Annotated, typing.Union, UnionType):
        args = [a for a in typing.get_args(current) if a is not type(None)]
        current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted((f.alias or n) for n, f in current.model_fields.items())
    return []


def _message(error: Any) -> tuple[str, str | None]:  # a pydantic ErrorDetails
    kind = error["type"]
    msg = error["msg"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        key = loc[-1]
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else (f"allowed keys: {', '.join(allowed)}" if allowed else None)
        return f"unknown key {key!r}", hint
    if kind == "missing":
        return f"missing required key {loc[-1]!r}", None
    if any(isinstance(p, str) and _SECRET_FIELD.fullmatch(p) for p in loc) and kind != "extra_forbidden":
        return f"invalid value for {loc[-1]!r} (not shown: it may be a secret)", None
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern")
        value = error.get("input")
        if pattern == models.NAME_PATTERN:
            return (f"invalid name {value!r}",
                    "names use lower-case letters, digits and _, start with a letter, and have at most 31 characters")
        if pattern == models.COLUMN_PATTERN:
            return f"invalid column name {value!r}", "use a lower-case unquoted PostgreSQL identifier"
        if pattern == models.ENV_PATTERN:
            if isinstance(value, str) and re.search(r"=|@|://|(?:[^:]*:){3}", value):
                # a DSN or a pgpass line pasted where its variable's name belongs: never echoed
                return ("dsn_env names an environment variable, and this looks like a connection string"
                        " (not shown: it may hold a password)",
                        "put the DSN in an environment variable (export PROD_DSN=...) and write its name here:"
                        " dsn_env: PROD_DSN")
            return f"invalid environment variable name {value!r}", None
        return f"invalid value {value!r}", f"must match {pattern}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"invalid value {error.get('input')!r}: expected {expected}", None
    if kind in ("int_type", "float_type", "bool_type", "string_type", "dict_type", "list_type", "model_type"):
        value = error.get("input")
        got = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "a mapping",
               list: "a list", type(None): "nothing (null)"}.get(type(value), type(value).__name__)
        hint = None
        if kind in ("int_type", "float_type") and isinstance(value, str):
            hint = "write the number without quotes"
        elif kind == "bool_type":
            hint = "write true or false (yes, no, 1 and quoted values are not booleans)"
        elif kind == "string_type" and isinstance(value, (int, float, bool)):
            hint = "quote it to make it a string"
        return f"{msg[0].lower() + msg[1:]} (got {got})", hint
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return msg[0].lower() + msg[1:] if msg else msg, None


def _diagnostics_from(exc: ValidationError, doc: _Doc) -> list[Diagnostic]:
    out: dict[tuple, Diagnostic] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        # A union reports once per member; the schema-step union gets one plain message.
        union_tags = {"str", "InlineSchema"}
        if any(isinstance(p, str) and p in union_tags for p in loc):
            base = tuple(p for p in loc if p not in union_tags)
            cut = loc.index(next(p for p in loc if p in union_tags))
            if loc[cut] == "InlineSchema" and (len(loc) > cut + 1 or error["type"] == "value_error"):
                message, hint = _message({**error, "loc": base})
                where = doc.loc(base)
            else:
                message = "a schema step is a .sql file name or a mapping {name: ..., sql: ...}"
                hint, where = None, doc.value_loc(tuple(loc[:cut]))
            out.setdefault((where, message), Diagnostic(where, message, hint))
            continue
        message, hint = _message(error)
        if error["type"] in ("extra_forbidden", "missing") or (loc and loc[-1] == "[key]"):
            where = doc.loc(tuple(p for p in loc if p != "[key]"))
        else:
            where = doc.value_loc(loc)
        out.setdefault((where, message), Diagnostic(where, message, hint))
    return list(out.values())


# ---------------------------------------------------------------------------- the directory


def config_files(directory: Path) -> list[Path]:
    """Every .yaml and .yml entry, whatever it is: a broken link or a directory among them is
    an error when read, never skipped (a later plan would destroy what it declared)."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))


def preset_files() -> list[Path]:
    for d in PRESET_DIRS:
        if d.is_dir():
            return config_files(d)
    return []


def load(directory: str | Path, cwd: Path | None = None, defer_key_checks: bool = False,
         known_clean: KnownClean | None = None, parsed: yamldocs.ParsedDocs | None = None) -> Desired:
    """Load and validate a config directory. Raises ConfigError listing every problem found.
    With `defer_key_checks`, problems of the shard key in the schema are returned in
    `key_problems` (the planner reports them with what a key change would destroy). With
    `known_clean`, the schema SQL checks that found nothing before are not run again, and those
    that find nothing now are added to it. With `parsed`, a file parsed before without a problem
    is not parsed again (engine.config.yamldocs), and those parsed now are added to it.

    In stages, each adding what it finds wrong to the same list of problems: read the files
    (presets first), gather what each file declares, resolve policy inheritance, check the
    references between declarations, resolve the databases (placement, policy, schema steps),
    choose the catalog, then look for settings that contradict each other."""
    cwd = cwd or Path.cwd()
    root, files = _config_directory(directory, cwd)
    found = _Gathered()
    preset_docs = _read_documents(preset_files(), found.problems, cwd, parsed)
    for doc in preset_docs:
        doc.display = f"policies/{doc.file.name}"  # the same on every machine, installed or not
    docs = _read_documents(files, found.problems, cwd, parsed)
    for doc in preset_docs:
        _gather(found, doc, is_preset=True)
    for doc in docs:
        _gather(found, doc, is_preset=False)
    found.policies = _resolve_inheritance(found.policies, found.problems)
    _check_references(found)
    key_problems: list[Diagnostic] = []
    resolved = _resolve_databases(found, root, cwd, key_problems, known_clean)
    catalog_server, catalog_database = _choose_catalog(found, resolved, files, cwd)
    problems = found.problems
    backups = _resolve_backups(found, root)
    problems.extend(_branches_from_backups(found, backups))
    problems.extend(_contradictions(resolved, found.policies, found.sources))
    problems.extend(_name_clashes(found, resolved, catalog_server, catalog_database))
    if not defer_key_checks:
        problems.extend(key_problems)
    if problems:
        raise ConfigError(problems)
    return Desired(
        directory=root, servers=found.servers, databases=dict(sorted(resolved.items())), policies=found.policies,
        catalog_server=catalog_server, catalog_database=catalog_database,
        files=tuple(_display(f, cwd) for f in files), sources=found.sources,
        resharding_enabled=found.resharding[0].enabled if found.resharding else True,
        branches={name: b for name, (b, _) in sorted(found.branches.items())},
        allow_destroy=found.allow_destroy, moved=found.moved, key_problems=tuple(key_problems),
        backups=backups,
    )


@dataclass
class _Gathered:
    """What the files declare, gathered file by file, and the problems found on the way."""

    problems: list[Diagnostic] = field(default_factory=list)
    sources: dict[Path_, Location] = field(default_factory=dict)
    servers: dict[str, models.Server] = field(default_factory=dict)
    databases: dict[str, tuple[models.Database, _Doc]] = field(default_factory=dict)
    policies: dict[str, ResolvedPolicy] = field(default_factory=dict)
    first_seen: dict[tuple[str, str], Location] = field(default_factory=dict)
    catalog: tuple[models.CatalogSettings, _Doc] | None = None
    resharding: tuple[models.ReshardingSettings, _Doc] | None = None
    backups: tuple[models.Backups, _Doc] | None = None
    branches: dict[str, tuple[models.Branch, _Doc]] = field(default_factory=dict)
    allow_destroy: dict[tuple[str, str], Location] = field(default_factory=dict)
    moved: dict[str, tuple[str, Location]] = field(default_factory=dict)
    moved_from: dict[str, Location] = field(default_factory=dict)

    def first(self, kind: str, name: str, where: Location) -> bool:
        """Record a declaration; False (and a problem) when the name was declared before."""
        if (kind, name) in self.first_seen:
            self.problems.append(_duplicate(kind, name, where, self.first_seen[(kind, name)]))
            return False
        self.first_seen[(kind, name)] = where
        return True


def _config_directory(directory: str | Path, cwd: Path) -> tuple[Path, list[Path]]:
    """Stage 1: the directory and its YAML files, or an error saying what to pass instead."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise ConfigError([Diagnostic(Location(str(directory)), "no such config directory",
                                      "pass the directory that holds your YAML files with -C DIR")])
    files = config_files(root)
    if not files:
        raise ConfigError([Diagnostic(Location(_display(root, cwd)), "no .yaml or .yml files in this directory",
                                      "pass the directory that holds your YAML files with -C DIR")])
    return root, files


def _gather(found: _Gathered, doc: _Doc, is_preset: bool) -> None:
    """Stage 2: what one file declares. Presets contribute policies only."""
    try:
        parsed = models.ConfigFile.model_validate(doc.data)
    except ValidationError as exc:
        found.problems.extend(_diagnostics_from(exc, doc))
        return
    _record_sources(doc, found.sources)
    _gather_policies(found, parsed, doc, is_preset)
    if is_preset:
        return
    for name, server in parsed.servers.items():
        if found.first("server", name, doc.loc(("servers", name))):
            found.servers[name] = server
    for name, database in parsed.databases.items():
        if found.first("database", name, doc.loc(("databases", name))):
            found.databases[name] = (database, doc)
    for name, branch in parsed.branches.items():
        if found.first("branch", name, doc.loc(("branches", name))):
            found.branches[name] = (branch, doc)
    if parsed.allow_destroy is not None:
        for kind, key in (("database", "databases"), ("branch", "branches")):
            for i, name in enumerate(getattr(parsed.allow_destroy, key)):
                found.allow_destroy.setdefault((kind, name), doc.value_loc(("allow_destroy", key, i)))
    _gather_moves(found, parsed, doc)
    _gather_settings(found, parsed, doc)


def _gather_settings(found: _Gathered, parsed: models.ConfigFile, doc: _Doc) -> None:
    """The fleet-wide settings, each declared once in the whole directory."""
    if parsed.backups is not None:
        if found.backups is not None:
            found.problems.append(_duplicate("backups", "settings", doc.loc(("backups",)),
                                             found.backups[1].loc(("backups",))))
        else:
            found.backups = (parsed.backups, doc)
    if parsed.resharding is not None:
        if found.resharding is not None:
            found.problems.append(_duplicate("resharding", "settings", doc.loc(("resharding",)),
                                             found.resharding[1].loc(("resharding",))))
        else:
            found.resharding = (parsed.resharding, doc)
    if parsed.catalog is not None:
        if found.catalog is not None:
            found.problems.append(_duplicate("catalog", "settings", doc.loc(("catalog",)),
                                             found.catalog[1].loc(("catalog",))))
        else:
            found.catalog = (parsed.catalog, doc)


def _gather_policies(found: _Gathered, parsed: models.ConfigFile, doc: _Doc, is_preset: bool) -> None:
    policies = found.policies
    for name, policy in parsed.policies.items():
        where = doc.loc(("policies", name))
        if is_preset:
            parent = policy.extends
        else:
            if not found.first("policy", name, where):
                continue
            # a declared policy that shares a preset's name refines that preset
            parent = policy.extends or (f"preset:{name}" if name in policies else
                                        (None if name == "default" else "default"))
            if name in policies:
                policies[f"preset:{name}"] = policies[name]
        policies[name] = ResolvedPolicy(name, policy, where, parent=parent,
                                        parent_location=doc.value_loc(("policies", name, "extends"))
                                        if policy.extends else None)


def _gather_moves(found: _Gathered, parsed: models.ConfigFile, doc: _Doc) -> None:
    for i, move in enumerate(parsed.moved):
        where = doc.loc(("moved", i))
        if move.to in found.moved or move.from_ in found.moved_from:
            first = found.moved[move.to][1] if move.to in found.moved else found.moved_from[move.from_]
            found.problems.append(Diagnostic(where, f"the rename of {move.from_!r} to {move.to!r} conflicts with"
                                             " another `moved` entry", f"it was first declared at {first}"))
            continue
        if move.from_ == move.to:
            found.problems.append(Diagnostic(where, f"`moved` renames {move.from_!r} to itself", "remove the entry"))
            continue
        found.moved[move.to] = (move.from_, where)
        found.moved_from[move.from_] = where


def _check_references(found: _Gathered) -> None:
    """Stage 4: branches name a declared database and server; a rename names a declared new
    database and an old one no longer declared."""
    problems, databases, servers = found.problems, found.databases, found.servers
    for name, (branch, doc) in found.branches.items():
        source = found.branches.get(branch.from_)
        if source is not None and branch.from_ not in databases:  # an instant branch: a clone of a replica
            where = doc.value_loc(("branches", name, "from"))
            if source[0].data != "replica":
                problems.append(Diagnostic(where, f"branch {name!r} is made from branch {branch.from_!r}, which is"
                                           " not a replica", f"name a sharded database, or give {branch.from_!r}"
                                           " `data: replica` (a branch made from a replica is an instant clone)"))
            elif branch.server != source[0].server:
                problems.append(Diagnostic(doc.value_loc(("branches", name, "server")),
                                           f"branch {name!r} clones replica {branch.from_!r}, which lives on server"
                                           f" {source[0].server!r}", f"set `server: {source[0].server}`: a database"
                                           " is cloned on its own server"))
            elif "data" in branch.model_fields_set and branch.data != "full":
                problems.append(Diagnostic(doc.value_loc(("branches", name, "data")),
                                           f"branch {name!r} clones replica {branch.from_!r}: it holds all its rows",
                                           "remove `data:` (or write `data: full`)"))
        elif branch.from_ not in databases:
            problems.append(_unknown_ref("database", branch.from_, doc.value_loc(("branches", name, "from")),
                                         databases))
        if branch.server not in servers:
            problems.append(_unknown_ref("server", branch.server, doc.value_loc(("branches", name, "server")), servers))
    for new, (old, where) in found.moved.items():
        if new not in databases:
            problems.append(_unknown_ref("database", new, where, databases))
        elif old in databases:
            problems.append(Diagnostic(where, f"`moved` renames {old!r} to {new!r}, but {old!r} is still declared",
                                       f"remove the declaration of {old!r} (the rename keeps its shards and rows)"))


def _resolve_backups(found: _Gathered, root: Path) -> dict[str, models.Backups]:
    """Each backed-up server's settings: the fleet's `backups:` (every server, when declared)
    with the server's own `backups:` over it; a relative directory is the config directory's."""
    fleet = found.backups[0] if found.backups is not None else None
    out: dict[str, models.Backups] = {}
    for name, server in sorted(found.servers.items()):
        own = server.backups
        if (fleet is None and own is None) or (own is not None and not own.enabled):
            continue
        settings = (fleet or models.Backups()).model_copy(update={
            key: value for key, value in (own.model_dump(exclude={"enabled"}) if own else {}).items()
            if value is not None})
        directory = Path(settings.directory).expanduser()
        out[name] = settings.model_copy(update={"directory": str(directory if directory.is_absolute()
                                                                 else root / directory)})
    return out


def _branches_from_backups(found: _Gathered, backups: dict[str, models.Backups]) -> list[Diagnostic]:
    """A branch restored from backups needs backups to be declared."""
    out = []
    for name, (branch, doc) in found.branches.items():
        if branch.data == "backup" and not backups:
            out.append(Diagnostic(doc.value_loc(("branches", name, "data")),
                                  f"branch {name!r} is restored from backups, and no server is backed up",
                                  "declare `backups: {}` (every server, Barman's defaults) or a server's own"
                                  " `backups:`, apply, then `shardctl backups create`"))
    return out


def _resolve_databases(found: _Gathered, root: Path, cwd: Path, key_problems: list[Diagnostic],
                       known_clean: KnownClean | None = None) -> dict[str, DesiredDatabase]:
    """Stage 5: each database with its placement checked, its effective policy and its schema steps."""
    problems, servers, policies = found.problems, found.servers, found.policies
    resolved: dict[str, DesiredDatabase] = {}
    for name, (database, doc) in found.databases.items():
        for i, server in enumerate(database.placement):
            if server not in servers:
                problems.append(_unknown_ref("server", server, doc.loc(("databases", name, "placement", i)), servers))
        if database.policy not in policies or database.policy.startswith("preset:"):
            problems.append(
                _unknown_ref("policy", database.policy, doc.value_loc(("databases", name, "policy")), policies)
            )
        steps = _schema_steps(name, database, doc, root, cwd, problems, key_problems, known_clean)
        policy = policies.get(database.policy)
        effective = (_effective_policy(policy.effective or policy.policy, database.thresholds)
                     if policy else models.Policy())
        resolved[name] = DesiredDatabase(
            name=name, spec=database, schema_steps=tuple(steps),
            policy_name=database.policy, effective_policy=effective,
            location=doc.loc(("databases", name)),
        )
    return resolved


def _choose_catalog(found: _Gathered, resolved: dict[str, DesiredDatabase], files: list[Path],
                    cwd: Path) -> tuple[str | None, str]:
    """Stage 6: where the control database lives: as declared, else the first embedded server."""
    problems, servers = found.problems, found.servers
    catalog_server: str | None = None
    catalog_database = "shardctl"
    if found.catalog is not None:
        settings, doc = found.catalog
        catalog_database = settings.database
        if settings.database in RESERVED_DATABASES or settings.database in resolved:
            problems.append(Diagnostic(doc.value_loc(("catalog", "database")),
                                       f"{settings.database!r} cannot be the control database",
                                       "choose a name of its own, such as shardctl"))
        if settings.server is not None:
            if settings.server not in servers:
                problems.append(_unknown_ref("server", settings.server, doc.value_loc(("catalog", "server")), servers))
            catalog_server = settings.server
    if catalog_server is None:
        catalog_server = next((n for n, s in servers.items() if s.embedded), None)
        if catalog_server is None and servers:
            problems.append(Diagnostic(
                Location(_display(files[0], cwd), 1, 1),
                "no server for the catalog: there is no embedded server to default to",
                "add `catalog: {server: NAME}` naming the server that holds shardctl's control database",
            ))
    if not servers and not problems:
        problems.append(Diagnostic(Location(_display(files[0], cwd), 1, 1), "no servers are declared",
                                   "declare at least one server under `servers:`"))
    return catalog_server, catalog_database


METRICS = ("queries_per_second", "cpu_percent", "memory_percent", "storage_percent", "connections", "latency_ms")


def _contradictions(databases: dict[str, DesiredDatabase], policies: dict[str, ResolvedPolicy],
                    sources: dict[Path_, Location]) -> list[Diagnostic]:
    """Settings that are each valid but cannot hold together: a shard both hot and cold, a
    daemon that looks for hot shards faster than metrics arrive, a limit below the start."""
    out: list[Diagnostic] = []
    for name, entry in policies.items():
        if entry.effective is not None and not name.startswith("preset:"):
            out.extend(_policy_contradictions(_Setting(sources, None, entry), entry.effective))
    for name, database in databases.items():
        declared = policies.get(database.policy_name)
        out.extend(
            _policy_contradictions(
                _Setting(sources, database, declared), database.effective_policy
            )
        )
        limit = database.effective_policy.autosplit.max_shards
        if database.spec.shards > limit:
            at = sources.get(("databases", name, "shards")) or database.location
            out.append(
                Diagnostic(
                    at,
                    f"shards ({database.spec.shards}) is above autosplit.max_shards ({limit})"
                    f" of policy {database.policy_name!r}",
                    "lower shards, or raise max_shards in the policy",
                )
            )
    return out


@dataclass(frozen=True)
class _Setting:
    """Where a policy setting was written: the database's own thresholds first, then each policy
    of its chain (a shipped preset's line is no place to point a user at)."""

    sources: dict[Path_, Location]
    database: DesiredDatabase | None
    policy: ResolvedPolicy | None

    def at(self, *path: str) -> Location | None:
        if self.database is not None and path[0] in ("hot", "cold"):
            found = self.sources.get(("databases", self.database.name, "thresholds", *path))
            if found:
                return found
        for name in self.policy.chain() if self.policy is not None else ():
            found = self.sources.get(("policies", name.removeprefix("preset:"), *path))
            if found and not found.file.startswith("policies/"):
                return found
        return None


def _policy_contradictions(where: _Setting, policy: models.Policy) -> list[Diagnostic]:
    out = []
    for metric in METRICS:
        hot, cold = getattr(policy.hot, metric), getattr(policy.cold, metric)
        if hot is not None and cold is not None and hot <= cold:
            at = where.at("hot", metric) or where.at("cold", metric)
            if at:
                out.append(
                    Diagnostic(
                        at,
                        f"the hot threshold of {metric} ({hot:g}) is not above the cold one"
                        f" ({cold:g}): a shard would be hot and cold at once",
                        "make hot greater than cold for every metric",
                    )
                )
    if policy.autosplit.check_every < policy.metrics.interval:
        at = where.at("autosplit", "check_every") or where.at("metrics", "interval")
        if at:
            out.append(
                Diagnostic(
                    at,
                    f"autosplit.check_every ({policy.autosplit.check_every:g}s) is shorter than"
                    f" metrics.interval ({policy.metrics.interval:g}s): the daemon would look again"
                    " before a new sample arrives",
                    "make check_every at least metrics.interval",
                )
            )
    needed = models.needed_samples(policy)
    if policy.metrics.history is not None and needed > policy.metrics.history:
        at = where.at("metrics", "history") or where.at("detection", "cold_for") or where.at("detection", "sustain")
        if at:
            out.append(
                Diagnostic(
                    at,
                    f"metrics.history ({policy.metrics.history} samples) is shorter than the"
                    f" detection windows need ({needed} samples of {policy.metrics.interval:g}s):"
                    " a window could never fill",
                    f"keep at least {needed} samples, leave metrics.history out (it then keeps"
                    " what the windows need), or shorten sustain and cold_for",
                )
            )
    return out


def _name_clashes(found: _Gathered, databases: dict[str, DesiredDatabase], catalog_server: str | None,
                  catalog_database: str) -> list[Diagnostic]:
    """Two declarations that would make the same database on the same server (engine.config.names)."""
    if found.catalog is not None:
        settings, doc = found.catalog
        catalog_at = doc.value_loc(("catalog", "database")) if "database" in settings.model_fields_set \
            else doc.loc(("catalog",))
    else:
        catalog_at = found.sources.get(("servers", catalog_server)) or Location("catalog")
    return names.clashes(names.claims(
        {name: db.location for name, db in databases.items()},
        {new: (old, where) for new, (old, where) in found.moved.items() if new in databases},
        {name: (branch.server, doc.loc(("branches", name))) for name, (branch, doc) in found.branches.items()},
        (catalog_server, catalog_database, catalog_at),
        {name: db.location for name, db in databases.items() if db.spec.reference_tables}))


def _record_sources(doc: _Doc, sources: dict[Path_, Location]) -> None:
    for path, (line, column) in doc.keys.items():
        sources[path] = Location(doc.display, line, column)


def _duplicate(kind: str, name: str, where: Location, first: Location) -> Diagnostic:
    return Diagnostic(where, f"{kind} {name!r} is declared twice", f"it was first declared at {first}")


def _unknown_ref(kind: str, name: str, where: Location, known: dict) -> Diagnostic:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif known:
        hint = f"declared {PLURALS.get(kind, kind + 's')}: {', '.join(sorted(known))}"
    else:
        hint = f"no {PLURALS.get(kind, kind + 's')} are declared"
    return Diagnostic(where, f"unknown {kind} {name!r}", hint)


def _schema_steps(name: str, database: models.Database, doc: _Doc, root: Path, cwd: Path,
                  problems: list[Diagnostic], key_problems: list[Diagnostic],
                  known_clean: KnownClean | None = None) -> list[SchemaStep]:
    steps: list[SchemaStep] = []
    seen: dict[str, Location] = {}
    listed = isinstance(doc.data["databases"][name]["schema"], list)
    for i, step in enumerate(database.schema_):
        key = ("databases", name, "schema")
        where = doc.loc((*key, i)) if listed else doc.value_loc(key)
        allowed = not isinstance(step, str) and step.allow_outside_database
        if not isinstance(step, str) and step.file is not None:
            step = step.file
        if isinstance(step, str):
            path, problem = _schema_file(step, doc, root, cwd, where)
            if problem:
                problems.append(problem)
                continue
            text, problem = yamldocs.check_file(path, _display(path, cwd), printable=False)
            if problem or text is None:
                problem = problem or Diagnostic(Location(_display(path, cwd)), "cannot be read")
                at = problem.location if problem.location.line else where  # the file as a whole: the step's line
                problems.append(Diagnostic(at, f"schema file {_shown(step)}: {problem.message}", problem.hint))
                continue
            sql = text
            step_name = _display(path, root)
            sql_location = Location(_display(path, cwd), 1, 1)
        else:
            sql, step_name, sql_location = step.sql or "", step.name or "", where
            if "\0" in sql:
                problems.append(Diagnostic(where, "a NUL character is not allowed in SQL", "remove it"))
                continue
        if step_name in seen:
            problems.append(
                Diagnostic(where, f"schema step {step_name!r} is listed twice", f"first at {seen[step_name]}")
            )
            continue
        seen[step_name] = where
        checked = known_clean.key("step", "syntax" if allowed else "syntax, outside", sql) if known_clean else ""
        if not known_clean or checked not in known_clean:
            found_wrong = _step_problems(sql, sql_location, allowed)
            if found_wrong:
                problems.extend(found_wrong)
                continue
            if known_clean:
                known_clean.add(checked)
        steps.append(SchemaStep(step_name, sql, hashlib.sha256(sql.encode()).hexdigest(), where, sql_location))
    if len(steps) == len(database.schema_):
        reference = {table: doc.value_loc(("databases", name, "reference_tables", i))
                     for i, table in enumerate(database.reference_tables)}
        key_problems.extend(_key_problems(steps, database.shard_key, reference, known_clean))
    return steps


def _key_problems(steps: list[SchemaStep], shard_key: models.ShardKey, reference: dict[str, Location],
                  known_clean: KnownClean | None) -> list[Diagnostic]:
    """The shard key check of all of a database's steps (engine.config.sqlcheck.key_problems),
    unless it found nothing before for the same steps, key and reference tables."""
    checked = known_clean.key("shard key", shard_key.column, shard_key.type, json.dumps(sorted(reference)),
                              json.dumps([s.sql for s in steps])) if known_clean else ""
    if known_clean and checked in known_clean:
        return []
    from engine.config import sqlcheck  # pglast: only where a check runs

    found_wrong = sqlcheck.key_problems(
        [(s.sql, s.sql_location or s.location) for s in steps], shard_key.column, shard_key.type, reference
    )
    if known_clean and not found_wrong:
        known_clean.add(checked)
    return found_wrong


def _step_problems(sql: str, where: Location, allowed: bool) -> list[Diagnostic]:
    """One step's SQL: its syntax, and unless `allowed`, what reaches outside its database."""
    from engine.config import sqlcheck  # pglast: only where a check runs

    problem = _sql_problem(sql, where)
    if problem:
        return [problem]
    return [] if allowed else sqlcheck.outside_problems(sql, where)


def _shown(step: str) -> str:
    return repr(step if len(step) <= 80 else step[:77] + "...")


def _schema_file(step: str, doc: _Doc, root: Path, cwd: Path, where: Location) -> tuple[Path, Diagnostic | None]:
    """The schema file a step names, confined to the config directory after symlinks are
    resolved. Errors name the path, never what is in the file."""
    base = doc.file.parent
    if "\0" in step:
        return base, Diagnostic(where, "a schema file name cannot hold a NUL character")
    if Path(step).is_absolute():
        return base, Diagnostic(where, f"schema file {_shown(step)} is an absolute path",
                                "schema files live in the config directory; give a path relative to the YAML file")
    # outside by its own words: said before anything outside is looked at (whether a file
    # exists there is none of this config's business, and "not found" would tell)
    if not Path(os.path.normpath(base.resolve() / step)).is_relative_to(root):
        return base, _outside(step, root, cwd, where)
    try:
        path = (base / step).resolve(strict=True)
    except FileNotFoundError:
        if (base / step).is_symlink():
            return base, Diagnostic(where, f"schema file {_shown(step)} is a broken symbolic link")
        return base, Diagnostic(where, f"schema file {_shown(step)} not found",
                                f"paths are relative to {_display(base, cwd)}/")
    except (OSError, RuntimeError) as exc:
        why = getattr(exc, "strerror", None) or "a symbolic link loop"
        return base, Diagnostic(where, f"schema file {_shown(step)} cannot be resolved: {why}")
    if not path.is_relative_to(root):
        return base, _outside(step, root, cwd, where)
    return path, None


def _outside(step: str, root: Path, cwd: Path, where: Location) -> Diagnostic:
    return Diagnostic(where, f"schema file {_shown(step)} is outside the config directory",
                      f"schema files must live under {_display(root, cwd) or '.'}/ (symbolic links are"
                      " followed before this check)")


def _sql_problem(sql: str, where: Location) -> Diagnostic | None:
    import pglast

    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError as exc:
        message, index = exc.args[0], (exc.args[1] if len(exc.args) > 1 else 0)
        if where.line and where.file.endswith(".sql"):
            before = sql.encode()[:index].decode(errors="replace")
            line = before.count("\n") + 1
            column = len(before) - (before.rfind("\n") + 1) + 1
            where = Location(where.file, line, column)
        return Diagnostic(where, f"SQL syntax error: {message}")
    if not statements:
        return Diagnostic(where, "the schema step holds no SQL statement")
    for raw in statements:
        kind = type(raw.stmt).__name__
        if kind in ("TransactionStmt", "CreatedbStmt", "DropdbStmt", "VacuumStmt", "CreateSubscriptionStmt"):
            return Diagnostic(where, f"{kind.removesuffix('Stmt')} statements are not allowed in a schema step",
                              "shardctl runs each step in one transaction on every shard")
    return None


def _deep_update(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = (
            _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _resolve_inheritance(policies: dict[str, ResolvedPolicy], problems: list[Diagnostic]) -> dict[str, ResolvedPolicy]:
    """Fill in what each policy inherits (`extends`, by default the `default` policy)."""
    done: dict[str, ResolvedPolicy] = {}
    failed: set[str] = set()

    def resolve(name: str) -> None:
        # walk up the chain without recursion (a chain may be thousands long), then fill in downwards
        chain = [name]
        on_chain = {name}  # `in` on the list would make a long chain quadratic
        while True:
            entry = policies[chain[-1]]
            if chain[-1] in done or chain[-1] in failed or entry.parent is None:
                break
            if entry.parent not in policies:
                problems.append(_unknown_ref("policy", entry.parent, entry.parent_location or entry.location,
                                             {k: v for k, v in policies.items() if not k.startswith("preset:")}))
                failed.update(chain)
                return
            if entry.parent in on_chain:
                cycle = [*chain[chain.index(entry.parent) :], entry.parent]
                first = policies[cycle[0]]
                problems.append(Diagnostic(first.location, f"policy {cycle[0]!r} extends itself through "
                                           + " -> ".join(cycle[1:])))
                failed.update(chain)
                return
            chain.append(entry.parent)
            on_chain.add(entry.parent)
        for current in reversed(chain):
            if current in done:
                continue
            entry = policies[current]
            if current in failed:
                failed.update(chain)
                return
            if entry.parent is None:
                done[current] = ResolvedPolicy(current, entry.policy, entry.location, None, None, entry.policy)
                continue
            parent = done[entry.parent]
            inherited = parent.effective or parent.policy  # resolved before its children: always set
            merged = _deep_update(inherited.model_dump(), entry.policy.model_dump(exclude_unset=True))
            merged["extends"] = entry.parent.removeprefix("preset:")
            try:
                effective = models.Policy.model_validate(merged)
            except ValidationError as exc:
                problems.append(Diagnostic(entry.location, f"policy {current!r} with what it inherits is invalid: "
                                           + _message(exc.errors(include_url=False)[0])[0]))
                failed.update(chain)
                return
            done[current] = ResolvedPolicy(
                current,
                entry.policy,
                entry.location,
                entry.parent,
                entry.parent_location,
                effective,
                parent,
            )

    for name in list(policies):
        resolve(name)
    return {**policies, **done}


def _effective_policy(policy: models.Policy, overrides: models.PolicyOverrides) -> models.Policy:
    hot = policy.hot.model_copy(update=overrides.hot.model_dump(exclude_none=True))
    cold = policy.cold.model_copy(update=overrides.cold.model_dump(exclude_none=True))
    return policy.model_copy(update={"hot": hot, "cold": cold})


def load_baseline(config_dir: str, ref_or_dir: str) -> tuple[Desired, str]:
    """The configuration to compare against: a directory, or the config directory as it is at a
    git ref (read with `git archive`, nothing checked out). Returns it and a label."""
    import io
    import subprocess
    import tarfile
    import tempfile

    from engine.errors import UserError

    if Path(ref_or_dir).is_dir():
        return load(ref_or_dir), ref_or_dir
    if ref_or_dir.startswith("-"):  # git would take it for an option (--output=FILE writes a file)
        raise UserError(f"--compare-policy {ref_or_dir}: not a directory, and a git ref cannot begin with '-'",
                        "name a branch, tag or commit (e.g. --compare-policy origin/main), or a directory"
                        f" (./{ref_or_dir} for one whose name begins with '-')")
    root_proc = subprocess.run(
        ["git", "-C", config_dir, "rev-parse", "--show-toplevel"], capture_output=True, text=True
    )
    if root_proc.returncode != 0:
        raise UserError(f"--compare-policy {ref_or_dir}: not a directory, and {config_dir} is not in a git repository")
    root = Path(root_proc.stdout.strip())
    rel = Path(config_dir).resolve().relative_to(root.resolve()).as_posix() or "."
    # the ref becomes a commit id before it reaches `git archive`: nothing the user typed is
    # ever in an option's place there (and --end-of-options keeps it a ref here)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", "--end-of-options",
                             f"{ref_or_dir}^{{commit}}"], capture_output=True, text=True)
    if commit.returncode != 0:
        raise UserError(f"--compare-policy {ref_or_dir}: git cannot read {rel} at that ref",
                        f"it is not a directory, nor a branch, tag or commit of the git repository {root}")
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", commit.stdout.strip(), "--", rel],
                             capture_output=True)
    if archive.returncode != 0:
        raise UserError(f"--compare-policy {ref_or_dir}: git cannot read {rel} at that ref",
                        archive.stderr.decode(errors="replace").strip())
    # everything is read by load(); the copy goes when it returns (it used to stay behind, one
    # directory per plan). An error in the old config is rendered while its lines can still be read.
    with tempfile.TemporaryDirectory(prefix="shardctl-baseline-") as tmp_name:
        tmp = Path(tmp_name)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        try:
            return load(tmp / rel, cwd=tmp), ref_or_dir
        except ConfigError as exc:
            # each problem with the line as it is at the ref (not the working tree's), as REF:PATH
            shown = [Diagnostic(Location(str(tmp / d.location.file), d.location.line, d.location.column),
                                d.message, d.hint) for d in exc.diagnostics]
            text = "\n\n".join(d.render() for d in shown).replace(f"{tmp}/", f"{ref_or_dir}:")
            raise UserError(f"--compare-policy {ref_or_dir}: the configuration at that ref is invalid",
                            text) from None
