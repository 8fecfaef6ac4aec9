"""What the schema steps of a database declare, read with pglast without touching a server.

Two checks that `validate` makes so that `plan` never meets them later: every sharded table
carries the shard key column, of the declared type, in its primary key (a declared reference
table instead carries no shard key, and a primary key for its replication); and no statement
reaches outside its own database (server files, programs, roles, server settings, untrusted
languages, other databases) unless the step says `allow_outside_database: true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pglast
from pglast import ast, enums

from engine.config.names import qualified
from engine.errors import Diagnostic, Location

# the type names pglast reports for each declared key type
KEY_TYPES = {"bigint": {"int8", "bigserial", "serial8"}, "text": {"text", "varchar"}}


@dataclass
class _Table:
    location: Location
    columns: dict[str, str] = field(default_factory=dict)  # name -> type name
    primary_key: tuple[str, ...] = ()


def statement_location(sql: str, raw, base: Location) -> Location:
    """Line and column of a statement in its .sql file (past leading blanks and comments);
    the step's own location for inline SQL."""
    if not base.file.endswith(".sql"):
        return base
    data = sql.encode()
    i = raw.stmt_location
    while i < len(data):
        if data[i:i + 1].isspace():
            i += 1
        elif data[i:i + 2] == b"--":
            nl = data.find(b"\n", i)
            i = len(data) if nl < 0 else nl + 1
        elif data[i:i + 2] == b"/*":
            end = data.find(b"*/", i + 2)
            i = len(data) if end < 0 else end + 2
        else:
            break
    before = data[:i].decode(errors="replace")
    line = before.count("\n") + 1
    return Location(base.file, line, len(before) - (before.rfind("\n") + 1) + 1)


def _type_name(type_name) -> str:
    return type_name.names[-1].sval if type_name is not None and type_name.names else ""


def _table_name(rangevar) -> str:
    return f"{rangevar.schemaname}.{rangevar.relname}" if rangevar.schemaname else rangevar.relname


def _primary_key(constraint) -> tuple[str, ...] | None:
    if constraint.contype == enums.ConstrType.CONSTR_PRIMARY and constraint.keys:
        return tuple(k.sval for k in constraint.keys)
    return None


def key_problems(steps, key_column: str, key_type: str,
                 reference: dict[str, Location] | None = None) -> list[Diagnostic]:
    """`steps` are (sql, base location) pairs in order. The tables they leave behind must each
    carry `key_column` of `key_type` in their primary key, except the declared REFERENCE tables
    (name -> where declared), which must exist, have a primary key and no shard key column."""
    tables: dict[str, _Table] = {}
    for sql, base in steps:
        try:
            statements = pglast.parse_sql(sql)
        except pglast.parser.ParseError:
            continue  # reported by the syntax check
        for raw in statements:
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt):
                _create_table(tables, stmt, statement_location(sql, raw, base))
            elif isinstance(stmt, ast.AlterTableStmt) and stmt.relation is not None:
                table = tables.get(_table_name(stmt.relation))
                if table is not None:
                    _alter_table(table, stmt)
            elif isinstance(stmt, ast.DropStmt) and stmt.removeType == enums.ObjectType.OBJECT_TABLE:
                for obj in stmt.objects or ():
                    names = [n.sval for n in obj]
                    tables.pop(".".join(names), None)
                    tables.pop(names[-1], None)
            elif (isinstance(stmt, ast.RenameStmt) and stmt.renameType == enums.ObjectType.OBJECT_TABLE
                  and stmt.relation and stmt.newname):
                renamed = tables.pop(_table_name(stmt.relation), None)
                if renamed is not None:
                    tables[stmt.newname] = renamed
    return _key_findings(tables, key_column, key_type, reference or {})


def _create_table(tables: dict[str, _Table], stmt: ast.CreateStmt, location: Location) -> None:
    if stmt.relation is None or stmt.partbound is not None or stmt.relation.relpersistence == "t":
        return  # a partition has its parent's columns; temporary tables do not persist
    table = _Table(location)
    for element in stmt.tableElts or ():
        if isinstance(element, ast.ColumnDef) and element.colname:
            table.columns[element.colname] = _type_name(element.typeName)
            for constraint in element.constraints or ():
                if constraint.contype == enums.ConstrType.CONSTR_PRIMARY:
                    table.primary_key = (element.colname,)
        elif isinstance(element, ast.Constraint):
            table.primary_key = _primary_key(element) or table.primary_key
    tables[_table_name(stmt.relation)] = table


def _alter_table(table: _Table, stmt: ast.AlterTableStmt) -> None:
    for cmd in stmt.cmds or ():
        definition = cmd.def_
        if cmd.subtype == enums.AlterTableType.AT_AddColumn and isinstance(definition, ast.ColumnDef):
            if definition.colname:
                table.columns[definition.colname] = _type_name(definition.typeName)
                for constraint in definition.constraints or ():
                    if constraint.contype == enums.ConstrType.CONSTR_PRIMARY:
                        table.primary_key = (definition.colname,)
        elif cmd.subtype == enums.AlterTableType.AT_AddConstraint and isinstance(definition, ast.Constraint):
            table.primary_key = _primary_key(definition) or table.primary_key
        elif cmd.subtype == enums.AlterTableType.AT_DropColumn:
            table.columns.pop(cmd.name, None)
            if cmd.name in table.primary_key:
                table.primary_key = ()
        elif cmd.subtype == enums.AlterTableType.AT_AlterColumnType and isinstance(definition, ast.ColumnDef):
            table.columns[cmd.name] = _type_name(definition.typeName)


def _key_findings(tables: dict[str, _Table], key_column: str, key_type: str,
                  reference: dict[str, Location]) -> list[Diagnostic]:
    out = []
    accepted = KEY_TYPES[key_type]
    declared = {qualified(name): (name, where) for name, where in reference.items()}
    made = {qualified(name) for name in tables}
    for full, (name, where) in sorted(declared.items()):
        if full not in made:
            out.append(Diagnostic(where, f"reference table {name} is not created by the schema steps",
                                  "create it in a schema step, or remove it from reference_tables"))
    for name, table in tables.items():
        if qualified(name) in declared:
            if key_column in table.columns:
                out.append(Diagnostic(declared[qualified(name)][1], f"reference table {name} has the shard key"
                                      f" column {key_column}: its rows would belong to shards",
                                      "a reference table is one without the shard key, whole on every shard:"
                                      f" remove it from reference_tables (it is sharded by {key_column}), or drop"
                                      " the column from it"))
            elif not table.primary_key:
                out.append(Diagnostic(table.location, f"reference table {name} has no primary key",
                                      "declare one: every shard's copy is kept by logical replication, which"
                                      " needs it to apply updates and deletes"))
        elif key_column not in table.columns:
            out.append(Diagnostic(table.location, f"table {name} has no column {key_column}, the shard key",
                                  f"every sharded table carries the shard key: add `{key_column} {key_type}` to it"
                                  f" and to its primary key, or fix shard_key.column if it is mistyped; a table"
                                  " whose rows every shard needs whole (countries, currencies) is declared in"
                                  " the database's reference_tables instead"))
        elif table.columns[key_column] not in accepted:
            out.append(Diagnostic(table.location, f"column {name}.{key_column} is {table.columns[key_column]}, but"
                                  f" the shard key is declared {key_type}",
                                  f"declare the column {key_type}, or change shard_key.type to match it"))
        elif key_column not in table.primary_key:
            have = f"({', '.join(table.primary_key)})" if table.primary_key else "no primary key"
            out.append(Diagnostic(table.location, f"table {name} has {have}; its primary key must include"
                                  f" the shard key {key_column}",
                                  f"declare PRIMARY KEY ({key_column}, ...): rows move between shards by logical"
                                  " replication, which needs it"))
    return out


TRUSTED_LANGUAGES = {"sql", "plpgsql"}
OUTSIDE_EXTENSIONS = {"dblink", "postgres_fdw", "file_fdw", "adminpack", "pg_prewarm"}
OUTSIDE_FUNCTIONS = {
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_file_write", "pg_file_rename",
    "pg_file_unlink", "lo_import", "lo_export", "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir",
    "pg_reload_conf", "pg_rotate_logfile", "pg_terminate_backend", "pg_cancel_backend", "pg_promote",
    "dblink", "dblink_exec", "dblink_connect", "pg_logical_emit_message", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_drop_replication_slot",
}
OUTSIDE_STATEMENTS = {
    "AlterSystemStmt": "ALTER SYSTEM changes the whole server's configuration",
    "CreateRoleStmt": "roles belong to the whole server", "AlterRoleStmt": "roles belong to the whole server",
    "AlterRoleSetStmt": "roles belong to the whole server", "DropRoleStmt": "roles belong to the whole server",
    "GrantRoleStmt": "role membership belongs to the whole server",
    "CreateTableSpaceStmt": "a tablespace is a directory on the server",
    "DropTableSpaceStmt": "tablespaces belong to the server",
    "AlterTableSpaceOptionsStmt": "tablespaces belong to the server",
    "LoadStmt": "LOAD loads a library file on the server",
    "AlterDatabaseStmt": "ALTER DATABASE acts on a database, not within one",
    "AlterDatabaseSetStmt": "ALTER DATABASE acts on a database, not within one",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE acts on a database, not within one",
    "CreatePLangStmt": "a procedural language is installed for the server's use",
    "CreateForeignServerStmt": "a foreign server reaches another server",
    "CreateUserMappingStmt": "a user mapping holds credentials for another server",
    "CreateEventTrigStmt": "an event trigger runs on every DDL statement of the database",
}


def outside_problems(sql: str, base: Location) -> list[Diagnostic]:
    """Statements that reach outside the shard's own database; refused unless the step says
    `allow_outside_database: true`. Function bodies (strings) are not looked into."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return []
    out = []
    hint = ("if this step really must, give it `allow_outside_database: true` (in its mapping form:"
            " {file: ..., allow_outside_database: true} or {name: ..., sql: ..., allow_outside_database: true})")
    for raw in statements:
        stmt = raw.stmt
        why = OUTSIDE_STATEMENTS.get(type(stmt).__name__)
        if isinstance(stmt, ast.CopyStmt) and (stmt.is_program or stmt.filename):
            why = (
                "COPY ... PROGRAM runs a program on the server"
                if stmt.is_program
                else "COPY with a file name reads or writes a file on the server"
            )
        elif isinstance(stmt, ast.VariableSetStmt) and stmt.name in ("role", "session_authorization"):
            why = f"SET {stmt.name.upper()} changes who the statements run as"
        elif isinstance(stmt, (ast.CreateFunctionStmt, ast.DoStmt)):
            options = stmt.options if isinstance(stmt, ast.CreateFunctionStmt) else stmt.args
            language = next((o.arg.sval for o in options or () if o.defname == "language"), "plpgsql")
            if language.lower() not in TRUSTED_LANGUAGES:
                why = f"language {language} is untrusted: its code can reach the server's files and programs"
        elif isinstance(stmt, ast.CreateExtensionStmt) and stmt.extname:
            name = stmt.extname.lower()
            if name in OUTSIDE_EXTENSIONS or (name.startswith("pl") and name.endswith("u")):
                why = f"extension {stmt.extname} reaches outside the database"
        if why is None:
            called = _calls(stmt) & OUTSIDE_FUNCTIONS
            if called:
                why = f"{sorted(called)[0]}() reaches the server's files or other sessions"
        if why:
            out.append(Diagnostic(statement_location(sql, raw, base),
                                  f"this statement reaches outside its database: {why}", hint))
    return out


def _calls(stmt) -> set[str]:
    from pglast import visitors

    found: set[str] = set()

    class Calls(visitors.Visitor):
        def visit_FuncCall(self, ancestors, node):
            found.add(node.funcname[-1].sval.lower())

    Calls()(stmt)
    return found
