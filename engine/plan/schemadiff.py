"""Schema diff and lint for merging a branch's schema changes back into every shard.

The diff compares two schema snapshots (`observe.introspect.snapshot`: tables with their
columns, constraints and indexes) and writes the DDL that turns the first into the second. It
covers what development branches change in practice: tables, columns (added, dropped, type,
nullability, default), constraints and indexes. Anything else it cannot express is reported,
never guessed. Written here rather than taken from migra (unmaintained since 2022, and it
pulls in SQLAlchemy) because the snapshots are already ours and the cases are few.

The lint parses the DDL with pglast, PostgreSQL's own parser, and names the risks a reviewer
must see: index builds that lock writes, table rewrites, and destructive statements.
"""

from __future__ import annotations

from typing import Any

import pglast
from pglast import ast
from psycopg import sql


def _ident(qualified: str) -> str:
    return sql.Identifier(*qualified.split(".", 1)).as_string(None)


def _col(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _parse_column(definition: str) -> tuple[str, bool, str | None]:
    """'bigint not null default 5' -> ('bigint', True, '5')."""
    default = None
    if " default " in definition:
        definition, default = definition.split(" default ", 1)
    not_null = definition.endswith(" not null")
    return definition.removesuffix(" not null"), not_null, default


class Unsupported(Exception):
    pass


def diff(base: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """DDL statements turning schema `base` into schema `target`, in a safe order."""
    before, after = base.get("tables", {}), target.get("tables", {})
    out: list[str] = []
    for name in sorted(set(after) - set(before)):
        table = after[name]
        if table.get("kind") != "table":
            raise Unsupported(f"{name} is a new {table.get('kind')}; only tables are merged")
        cols = ", ".join(f"{_col(c)} {d}" for c, d in table["columns"].items())
        out.append(f"CREATE TABLE {_ident(name)} ({cols});")
        out += [
            f"ALTER TABLE {_ident(name)} ADD CONSTRAINT {_col(c)} {d};" for c, d in sorted(table["constraints"].items())
        ]
        out += [f"{d};" for i, d in sorted(table["indexes"].items()) if i not in table["constraints"]]
    for name in sorted(set(before) & set(after)):
        out += _alter(name, before[name], after[name])
    for name in sorted(set(before) - set(after)):
        out.append(f"DROP TABLE {_ident(name)};")
    return out


def _alter(name: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    t = _ident(name)
    out: list[str] = []
    for con in sorted(set(old["constraints"]) - set(new["constraints"])) + sorted(
        c for c in set(old["constraints"]) & set(new["constraints"]) if old["constraints"][c] != new["constraints"][c]
    ):
        out.append(f"ALTER TABLE {t} DROP CONSTRAINT {_col(con)};")
    for idx in sorted(set(old["indexes"]) - set(new["indexes"])):
        if idx not in old["constraints"]:
            out.append(f"DROP INDEX {_ident(name.split('.', 1)[0] + '.' + idx)};")
    for col in sorted(set(new["columns"]) - set(old["columns"])):
        out.append(f"ALTER TABLE {t} ADD COLUMN {_col(col)} {new['columns'][col]};")
    for col in sorted(set(old["columns"]) & set(new["columns"])):
        if old["columns"][col] == new["columns"][col]:
            continue
        (otype, onn, odef), (ntype, nnn, ndef) = _parse_column(old["columns"][col]), _parse_column(new["columns"][col])
        c = _col(col)
        if otype != ntype:
            out.append(f"ALTER TABLE {t} ALTER COLUMN {c} TYPE {ntype};")
        if odef != ndef:
            out.append(f"ALTER TABLE {t} ALTER COLUMN {c} " + (f"SET DEFAULT {ndef};" if ndef else "DROP DEFAULT;"))
        if onn != nnn:
            out.append(f"ALTER TABLE {t} ALTER COLUMN {c} {'SET' if nnn else 'DROP'} NOT NULL;")
    for col in sorted(set(old["columns"]) - set(new["columns"])):
        out.append(f"ALTER TABLE {t} DROP COLUMN {_col(col)};")
    for con in sorted(set(new["constraints"]) - set(old["constraints"])) + sorted(
        c for c in set(old["constraints"]) & set(new["constraints"]) if old["constraints"][c] != new["constraints"][c]
    ):
        out.append(f"ALTER TABLE {t} ADD CONSTRAINT {_col(con)} {new['constraints'][con]};")
    for idx in sorted(set(new["indexes"]) - set(old["indexes"])):
        if idx not in new["constraints"]:
            out.append(f"{new['indexes'][idx]};")
    return out


DESTRUCTIVE = "destructive"


def lint(statements: list[str]) -> list[tuple[str, str, str]]:
    """(severity, statement, finding) for each risk; severity is 'destructive' or 'warning'."""
    findings: list[tuple[str, str, str]] = []
    for text in statements:
        for raw in pglast.parse_sql(text):
            stmt = raw.stmt
            kind = type(stmt).__name__
            if isinstance(stmt, ast.IndexStmt) and not stmt.concurrent:
                findings.append(("warning", text, "index built without CONCURRENTLY: writes to the table wait for it"))
            elif kind == "DropStmt":
                findings.append((DESTRUCTIVE, text, "drops an object and its data"))
            elif isinstance(stmt, ast.AlterTableStmt):
                for cmd in stmt.cmds or ():
                    sub = cmd.subtype.name
                    if sub == "AT_DropColumn":
                        findings.append((DESTRUCTIVE, text, "drops a column and its data"))
                    elif sub == "AT_AlterColumnType":
                        findings.append(("warning", text, "changes a column type: rewrites the table under a lock"))
                    elif sub == "AT_SetNotNull":
                        findings.append(("warning", text, "SET NOT NULL scans the table under a lock"))
                    elif sub == "AT_AddConstraint":
                        findings.append(("warning", text, "adds a constraint: validated under a lock"))
    return findings
