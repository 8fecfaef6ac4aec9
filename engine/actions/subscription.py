"""CREATE SUBSCRIPTION without the source's password in any statement text.

A subscription's connection string must carry the source's password: PostgreSQL 16+ refuses a
non-superuser's subscription whose CONNECTION has none (a passfile or service on the subscriber's
side does not count), and the walsender it connects to must ask for it. Written into the
statement, that password lands in `pg_stat_statements` (readable by any pg_monitor member),
in `pg_stat_activity` while it runs, and in the server log whenever the statement fails or
`log_statement` covers DDL. A bound parameter is no cure: `log_statement = all` and
`log_min_duration_statement` log parameters in full (`log_parameter_max_length` is the
superuser's to lower).

So the connection string never travels in a statement. In one transaction:

1. a temporary table (ON COMMIT DROP) receives the name, connection string and options through
   `COPY ... FROM STDIN`: COPY data is never logged, nor kept in any statistics view;
2. a constant DO block reads them and runs CREATE SUBSCRIPTION with `EXECUTE format(...)`. Only
   top-level statements reach `pg_stat_statements` (with its default `track = top`),
   `pg_stat_activity` and `log_statement`; the nested one never does. Were it to fail, its text
   would be the error's CONTEXT in the log, so the block catches the error and raises it again
   with the same SQLSTATE, message, detail and hint, without that context.

CREATE SUBSCRIPTION runs inside a transaction because the slot is made beforehand
(`create_slot = false`). `pg_subscription.subconninfo` keeps the string, readable only by
superusers (its column privilege is revoked from PUBLIC), as PostgreSQL intends.
"""

from __future__ import annotations

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

SUBSCRIBE = """
DO $shardctl$
DECLARE
    r record;
    state text; message text; detail text; hint text;
BEGIN
    SELECT * INTO STRICT r FROM pg_temp.shardctl_subscription;
    BEGIN
        EXECUTE format('CREATE SUBSCRIPTION %I CONNECTION %L PUBLICATION %I WITH (slot_name = %L,'
                       ' create_slot = false, copy_data = %s, synchronous_commit = ''off'','
                       ' binary = true, streaming = %s, enabled = %s%s)',
                       r.name, r.conninfo, r.publication, r.slot,
                       CASE WHEN r.copy_data THEN 'true' ELSE 'false' END, r.streaming,
                       CASE WHEN r.enabled THEN 'true' ELSE 'false' END,
                       CASE WHEN r.origin IS NULL THEN '' ELSE format(', origin = %L', r.origin) END);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        IF detail <> '' AND hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, DETAIL = detail, HINT = hint;
        ELSIF detail <> '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, DETAIL = detail;
        ELSIF hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, HINT = hint;
        END IF;
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message;
    END;
END
$shardctl$
"""

STREAMING = {"on", "off", "parallel"}


def create_subscription(conn: psycopg.Connection, name: str, conninfo: str, publication: str, slot: str,
                        streaming: str, enabled: bool = True, copy_data: bool = True,
                        origin: str | None = None) -> None:
    """CREATE SUBSCRIPTION name CONNECTION conninfo PUBLICATION publication WITH (slot_name = slot,
    create_slot = false, copy_data, synchronous_commit = off, binary = true, streaming, enabled
    [, origin]), with no part of conninfo in any statement text. ORIGIN (PostgreSQL 16+) 'none'
    takes only the changes made on the source itself, not those it replicated from elsewhere."""
    if streaming not in STREAMING:  # formatted with %s: only these constants ever reach it
        raise ValueError(f"streaming must be one of {sorted(STREAMING)}")
    if origin not in (None, "none", "any"):
        raise ValueError("origin must be 'none' or 'any'")
    with conn.transaction():
        conn.execute("CREATE TEMPORARY TABLE shardctl_subscription (name text, conninfo text, publication text,"
                     " slot text, streaming text, enabled boolean, copy_data boolean, origin text) ON COMMIT DROP")
        with conn.cursor().copy("COPY pg_temp.shardctl_subscription FROM STDIN") as copy:
            copy.write_row((name, conninfo, publication, slot, streaming, enabled, copy_data, origin))
        conn.execute(SUBSCRIBE)


# what a subscriber's libpq (PostgreSQL 15 and later) understands, of what shardctl resolved
PORTABLE = ("host", "hostaddr", "port", "user", "password", "dbname", "connect_timeout", "options", "keepalives",
            "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "sslmode", "sslcert",
            "sslkey", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
            "ssl_max_protocol_version", "gssencmode", "krbsrvname", "channel_binding", "target_session_attrs")


def resolved_conninfo(conn: psycopg.Connection) -> str:
    """The connection string a subscription needs to reach the server CONN is connected to, as
    libpq resolved it here: a `service:` entry, PG* environment variables and a passfile are
    this host's, not the subscriber's, so their values are spelled out (the password too: a
    non-superuser's subscription must carry it). Values equal to libpq's defaults are left out."""
    compiled = {o.keyword.decode(): (o.compiled or b"").decode() for o in pq.Conninfo.get_defaults()}
    values = {o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}
    if conn.info.password:  # from a passfile, libpq keeps it per host, outside the options
        values["password"] = conn.info.password
    return make_conninfo(**{k: values[k] for k in PORTABLE if values.get(k) not in (None, "", compiled.get(k))})
