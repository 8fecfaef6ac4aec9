"""Every database name shardctl would create on each server, and the clashes between them.

What shardctl creates, by declaration: the control database (catalog) on its server; every
shard of a sharded database, named `DB_LO_HI` (orders_min_40, orders_40_80, ...) and placed,
moved and retired on any server, so claimed on all of them (a database renamed with `moved`
keeps its old prefix); each branch, `branch_NAME` on its server (replicas and instant
clones are branches); and the reference source `DB_reference` of a database that declares
reference tables, on the catalog's server. Two declarations that would make the same database on the same server
are refused here, at validate, each naming the other's line: one of them would otherwise take
the other's database, or drop it (a branch rebuilt over the catalog once did).

A table's name with its schema (`qualified`) is here too: the SQL checks, the planner and the
reference tables' copy compare tables by it.

Names already taken on the servers (a database made by hand, a shard of a renamed database)
are the planner's to refuse (engine.plan.planner, `_taken_names`), and apply creates or drops
only what the catalog records as its own (engine.actions.base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import Diagnostic, Location

# a shard database's name: its database's name (or the old one, after a rename), then its range's
# bounds, which hold no underscore: the prefix of any name is found in one match
SHARD_NAME = re.compile(r"^(?P<db>.+)_(?:min|[0-9a-f]{2,16})_(?:max|[0-9a-f]{2,16})$")
BRANCH_PREFIX = "branch_"
REFERENCE_SUFFIX = "_reference"


def qualified(table: str) -> str:
    """A table's name with its schema: `countries` is `public.countries`."""
    return table if "." in table else f"public.{table}"


@dataclass(frozen=True)
class Claim:
    """A database name, or for shards every name with a prefix, that one declaration makes."""

    what: str  # "branch 'dev'", "the control database", "database 'orders'"
    kind: str  # catalog | shards | branch | reference
    where: Location
    server: str | None  # None: any server
    dbname: str | None = None  # a name, or
    shard_prefix: str | None = None  # every shard name PREFIX_LO_HI (a database's shards)

    def overlaps(self, other: Claim) -> bool:
        return self.server is None or other.server is None or self.server == other.server


def branch_dbname(name: str) -> str:
    return f"{BRANCH_PREFIX}{name}"


def reference_dbname(database: str) -> str:
    """The reference source's database: where a database's reference tables are written."""
    return f"{database}{REFERENCE_SUFFIX}"


def claims(databases: dict[str, Location], renamed_from: dict[str, tuple[str, Location]],
           branches: dict[str, tuple[str, Location]], catalog: tuple[str | None, str, Location],
           reference: dict[str, Location] | None = None) -> list[Claim]:
    """`databases`: name -> where declared; `renamed_from`: new name -> (old name, where the
    rename is); `branches`: name -> (server, where); `catalog`: (server, database, where);
    `reference`: the databases that declare reference tables -> where."""
    out = [Claim("the control database", "catalog", catalog[2], catalog[0], dbname=catalog[1])]
    for name, where in (reference or {}).items():
        out.append(Claim(f"the reference source of database {name!r}", "reference", where, catalog[0],
                         dbname=reference_dbname(name)))
    for name, where in databases.items():
        out.append(Claim(f"database {name!r}", "shards", where, None, shard_prefix=name))
    for new, (old, where) in renamed_from.items():
        out.append(Claim(f"database {new!r} (renamed from {old!r})", "shards", where, None, shard_prefix=old))
    for name, (server, where) in branches.items():
        out.append(Claim(f"branch {name!r}", "branch", where, server, dbname=branch_dbname(name)))
    return out


def clashes(found: list[Claim]) -> list[Diagnostic]:
    """One problem per pair of claims that would make the same database on the same server,
    at one declaration, the other's line in the message or hint. Linear in the claims: names
    are grouped, and a name's shard prefix is looked up, never matched against each database."""
    out: list[Diagnostic] = []
    by_name: dict[str, list[Claim]] = {}
    by_prefix: dict[str, list[Claim]] = {}
    for claim in found:
        if claim.dbname is not None:
            by_name.setdefault(claim.dbname, []).append(claim)
        if claim.shard_prefix is not None:
            by_prefix.setdefault(claim.shard_prefix, []).append(claim)
    for name, group in by_name.items():
        for i, claim in enumerate(group):
            out.extend(_same_name(claim, other) for other in group[i + 1:] if claim.overlaps(other))
        match = SHARD_NAME.match(name)
        if match is not None:
            out.extend(_named_like_shards(claim, shards) for claim in group
                       for shards in by_prefix.get(match.group("db"), ()))
    return out


def _same_name(first: Claim, second: Claim) -> Diagnostic:
    branch, other = (first, second) if first.kind == "branch" else (second, first)
    return Diagnostic(branch.where, f"{branch.what} would be database {branch.dbname} on server {branch.server},"
                                    f" which is {other.what} (declared at {other.where})",
                      f"choose another {'name for the branch' if branch.kind == 'branch' else 'database name'}:"
                      f" applying both would make {branch.what} replace {other.what}")


def _named_like_shards(claim: Claim, shards: Claim) -> Diagnostic:
    if claim.kind == "catalog":
        return Diagnostic(claim.where, f"the control database {claim.dbname!r} is named like a shard of"
                                       f" {shards.what}", f"{shards.what} is declared at {shards.where}; choose a"
                                                          " name of its own, such as shardctl")
    return Diagnostic(claim.where, f"{claim.what} would be database {claim.dbname}, which is named like a shard of"
                                   f" {shards.what}", f"{shards.what} is declared at {shards.where}; choose another"
                                                      " branch name")
