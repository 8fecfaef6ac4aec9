"""The control database's own schema, versioned and migrated forward.

Each entry of MIGRATIONS is applied once, in order, in one transaction, under a transaction
advisory lock so two processes starting at once cannot both migrate. Never edit an entry that
has shipped; append a new one.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from engine.errors import UserError
from engine.rows import one

MIGRATION_LOCK_KEY = 0x5348_4443_4D49  # "SHDCMI"

V1 = r"""
CREATE SCHEMA IF NOT EXISTS shardctl;

CREATE TABLE shardctl.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- one row: the serial every apply bumps (saved plans are checked against it) and the routing
-- epoch clients cache the shard map by
CREATE TABLE shardctl.state (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    serial     bigint NOT NULL,
    epoch      bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shardctl.state (serial, epoch) VALUES (0, 1);

-- the declared servers as last seen by an apply (connection text never holds a password)
CREATE TABLE shardctl.servers (
    name       text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('embedded', 'external')),
    connection text NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardctl.databases (
    name        text PRIMARY KEY,
    key_column  text NOT NULL,
    key_type    text NOT NULL CHECK (key_type IN ('bigint', 'text')),
    protect     boolean NOT NULL,
    policy_name text NOT NULL,
    policy      jsonb NOT NULL,
    placement   text[] NOT NULL,
    state       text NOT NULL CHECK (state IN ('creating', 'active', 'destroying')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- the schema steps every active shard of a database has applied, in order
CREATE TABLE shardctl.schema_steps (
    database   text NOT NULL REFERENCES shardctl.databases (name) ON DELETE CASCADE,
    seq        int NOT NULL,
    name       text NOT NULL,
    sha256     text NOT NULL,
    sql        text,            -- kept so new shards (splits) run steps that came from a branch merge
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (database, seq)
);

CREATE TABLE shardctl.shards (
    database           text NOT NULL REFERENCES shardctl.databases (name) ON DELETE CASCADE,
    name               text NOT NULL,              -- Vitess-style range name: -40, 40-80, 80-
    lo                 bigint,                     -- NULL: bottom of the keyspace
    hi                 bigint,                     -- NULL: top of the keyspace (2^63 is no bigint)
    server             text NOT NULL,
    dbname             text NOT NULL,
    state              text NOT NULL CHECK (state IN ('creating', 'moving', 'active', 'retired')),
    retired_at         timestamptz,                -- when a split or merge retired it (kept read-only)
    schema_fingerprint text,
    schema_snapshot    jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (database, name),
    UNIQUE (server, dbname),
    CHECK (lo IS NULL OR hi IS NULL OR lo < hi)
);

CREATE TABLE shardctl.operations (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    address     text NOT NULL,
    state       text NOT NULL CHECK (state IN ('running', 'done', 'failed', 'aborted')),
    plan_serial bigint NOT NULL,
    who         text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    detail      jsonb NOT NULL DEFAULT '{}'
);

-- every step of an operation, recorded before ('begin') and after ('done' / 'failed') it runs
CREATE TABLE shardctl.journal (
    operation bigint NOT NULL REFERENCES shardctl.operations (id),
    seq       bigserial,
    step      text NOT NULL,
    status    text NOT NULL CHECK (status IN ('begin', 'done', 'failed')),
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    detail    jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (operation, seq)
);

CREATE TABLE shardctl.history (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    event   text NOT NULL,
    address text NOT NULL,
    serial  bigint NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);

-- who holds the apply lock (the lock itself is a session advisory lock)
CREATE TABLE shardctl.lock_info (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    lock_id   text NOT NULL,
    operation text NOT NULL,
    who       text NOT NULL,
    version   text NOT NULL,
    created   timestamptz NOT NULL DEFAULT now()
);

-- routing: the shard that owns a key (only active shards own ranges)
-- plpgsql, not sql: an inlined SQL function would constant-fold p_key::bigint even in the
-- CASE branch a text-keyed database never takes, and fail on 'acct-1'
CREATE FUNCTION shardctl.key_hash(p_database text, p_key text) RETURNS bigint
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v_type text;
BEGIN
    SELECT key_type INTO v_type FROM shardctl.databases WHERE name = p_database;
    IF v_type = 'bigint' THEN
        RETURN hashint8extended(p_key::bigint, 0);
    ELSIF v_type = 'text' THEN
        RETURN hashtextextended(p_key, 0);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION shardctl.route(p_database text, p_key text)
RETURNS TABLE (shard text, server text, dbname text, epoch bigint)
LANGUAGE sql STABLE STRICT AS $$
    SELECT s.name, s.server, s.dbname, st.epoch
    FROM shardctl.shards s, shardctl.state st, (SELECT shardctl.key_hash(p_database, p_key) AS h) h
    WHERE s.database = p_database
      AND s.state = 'active'
      AND (s.lo IS NULL OR h.h >= s.lo)
      AND (s.hi IS NULL OR h.h < s.hi)
$$;

CREATE FUNCTION shardctl.route(p_database text, p_key bigint)
RETURNS TABLE (shard text, server text, dbname text, epoch bigint)
LANGUAGE sql STABLE STRICT AS $$
    SELECT * FROM shardctl.route(p_database, p_key::text)
$$;
"""

V2 = r"""
-- metric history: what the daemon (or `shardctl metrics collect`) recorded, so a plan run from a
-- laptop or CI sees the same window. `reading` holds raw counters (rates need the previous
-- one); `metrics` the derived sample the detector judges.
CREATE TABLE shardctl.metric_samples (
    id       bigserial PRIMARY KEY,
    shard    text NOT NULL,          -- address, e.g. orders/-40
    server   text NOT NULL,
    at       timestamptz NOT NULL,
    reading  jsonb NOT NULL,
    metrics  jsonb NOT NULL
);
CREATE INDEX metric_samples_by_shard ON shardctl.metric_samples (shard, at DESC);
"""

V3 = r"""
-- development branches: one ordinary database each, made from every shard of a parent
CREATE TABLE shardctl.branches (
    name           text PRIMARY KEY,
    parent         text NOT NULL,
    data           text NOT NULL CHECK (data IN ('schema', 'sample', 'full')),
    sample_percent double precision,
    server         text NOT NULL,
    dbname         text NOT NULL,
    state          text NOT NULL CHECK (state IN ('creating', 'active', 'expired')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    base_schema    jsonb,          -- the parent's schema at creation: the base of a schema merge
    size_bytes     bigint
);
"""

V4 = r"""
-- the watch daemon: its kill switch (honoured within one interval) and who leads. The leader
-- lock itself is a session advisory lock; this row only tells people and standbys who holds it.
CREATE TABLE shardctl.daemon_control (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    paused     boolean NOT NULL DEFAULT false,
    reason     text NOT NULL DEFAULT '',
    changed_by text NOT NULL DEFAULT '',
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shardctl.daemon_control (paused) VALUES (false);

CREATE TABLE shardctl.daemon_leader (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    who        text NOT NULL,
    listen     text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    heartbeat  timestamptz NOT NULL DEFAULT now()
);
"""

V5_HISTORY = r"""
-- long metric history: raw samples stay for a few hours (metrics.retention.raw); each one is also
-- added to a 1-minute and a 1-hour bucket here, kept for days and weeks. Per metric: the sum and
-- count of its known values (the mean is sum / n; unknown values are not counted, never zero) and
-- the greatest value. Buckets are upserted a round at a time, so no raw row has to outlive its bucket.
CREATE TABLE shardctl.metric_rollups (
    shard      text NOT NULL,
    resolution integer NOT NULL CHECK (resolution IN (60, 3600)),   -- seconds a bucket covers
    bucket     timestamptz NOT NULL,                                -- its start
    samples    integer NOT NULL,
    queries_per_second_sum double precision NOT NULL DEFAULT 0,
    queries_per_second_n   integer NOT NULL DEFAULT 0,
    queries_per_second_max double precision,
    cpu_percent_sum double precision NOT NULL DEFAULT 0,
    cpu_percent_n   integer NOT NULL DEFAULT 0,
    cpu_percent_max double precision,
    memory_percent_sum double precision NOT NULL DEFAULT 0,
    memory_percent_n   integer NOT NULL DEFAULT 0,
    memory_percent_max double precision,
    storage_percent_sum double precision NOT NULL DEFAULT 0,
    storage_percent_n   integer NOT NULL DEFAULT 0,
    storage_percent_max double precision,
    connections_sum double precision NOT NULL DEFAULT 0,
    connections_n   integer NOT NULL DEFAULT 0,
    connections_max double precision,
    latency_ms_sum double precision NOT NULL DEFAULT 0,
    latency_ms_n   integer NOT NULL DEFAULT 0,
    latency_ms_max double precision,
    PRIMARY KEY (shard, resolution, bucket)
);
CREATE INDEX metric_rollups_by_age ON shardctl.metric_rollups (resolution, bucket);
"""

V6_BRANCHES = r"""
-- branches can be reset (re-made from the parent's current data under the same name, server,
-- connection string and expiry): the declared `reset` value last acted on, when, and the state
-- a reset is in until its rebuild is done
ALTER TABLE shardctl.branches ADD COLUMN reset_token text, ADD COLUMN reset_at timestamptz;
ALTER TABLE shardctl.branches DROP CONSTRAINT branches_state_check;
ALTER TABLE shardctl.branches ADD CONSTRAINT branches_state_check
    CHECK (state IN ('creating', 'resetting', 'active', 'expired'));
"""

V7_CAPACITY = r"""
-- the shard count the YAML declared when last applied: lowering `shards:` below it plans merges,
-- while shards that load split beyond it are kept (NULL: recorded before shardctl kept it)
ALTER TABLE shardctl.databases ADD COLUMN declared_shards integer;
"""

V8_REPLICA = r"""
-- a branch can be a replica: all rows, kept current by logical replication from every shard
ALTER TABLE shardctl.branches DROP CONSTRAINT branches_data_check;
ALTER TABLE shardctl.branches ADD CONSTRAINT branches_data_check
    CHECK (data IN ('schema', 'sample', 'full', 'replica'));
"""

V9_BACKUPS = r"""
-- backups (engine/backups.py). The shard map of every moment, so that a branch restored to any
-- time reads each range from the shard that owned it then: a row per change of a database's
-- active shards, written when the transaction that made the change commits (a deferred trigger
-- sees its final state: a split's flip retires the source and activates the targets in one
-- transaction, recorded once) and stamped with that transaction's start (a flip starts after
-- its fence, when the targets hold every row of the range)
CREATE TABLE shardctl.shard_maps (
    id       bigserial PRIMARY KEY,
    database text NOT NULL,
    at       timestamptz NOT NULL,
    shards   jsonb NOT NULL          -- [{name, lo, hi, server, dbname}] of its active shards
);
CREATE INDEX shard_maps_by_time ON shardctl.shard_maps (database, at DESC, id DESC);

CREATE FUNCTION shardctl.shard_map(p_database text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', name, 'lo', lo, 'hi', hi, 'server', server,
                                                 'dbname', dbname) ORDER BY lo NULLS FIRST, name), '[]')
      FROM shardctl.shards WHERE database = p_database AND state = 'active'
$$;

CREATE FUNCTION shardctl.record_shard_map() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_database text;
BEGIN
    FOR v_database IN
        SELECT DISTINCT d FROM unnest(ARRAY[CASE WHEN TG_OP <> 'INSERT' THEN OLD.database END,
                                            CASE WHEN TG_OP <> 'DELETE' THEN NEW.database END]) d
         WHERE d IS NOT NULL
    LOOP
        IF shardctl.shard_map(v_database) IS DISTINCT FROM (
                SELECT shards FROM shardctl.shard_maps WHERE database = v_database ORDER BY at DESC, id DESC
                 LIMIT 1) THEN
            INSERT INTO shardctl.shard_maps (database, at, shards)
                 VALUES (v_database, now(), shardctl.shard_map(v_database));
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER shard_map_history AFTER INSERT OR UPDATE OR DELETE ON shardctl.shards
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION shardctl.record_shard_map();
INSERT INTO shardctl.shard_maps (database, at, shards)
    SELECT DISTINCT database, now(), shardctl.shard_map(database) FROM shardctl.shards;

-- the base backups shardctl took (Barman's ids), and the restore points it placed on every
-- backed-up server at once: each with the shard map of that moment and, for `backups create`,
-- every shard's rows counted and checksummed per table as of the point (the restore drill
-- compares a restored copy with them)
CREATE TABLE shardctl.backups (
    server     text NOT NULL,
    backup_id  text NOT NULL,
    operation  bigint,
    begin_at   timestamptz,
    end_at     timestamptz,
    size_bytes bigint,
    PRIMARY KEY (server, backup_id)
);
CREATE TABLE shardctl.restore_points (
    name       text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('backup', 'branch')),
    operation  bigint,
    created_at timestamptz NOT NULL,
    pause_ms   double precision,
    servers    jsonb NOT NULL,       -- server -> {lsn, wal, at}: where the point is in each server's WAL
    shard_map  jsonb NOT NULL,       -- database -> [{name, lo, hi, server, dbname}]
    checksums  jsonb                 -- database/shard -> {schema.table: [rows, checksum]}
);

-- a branch restored from backups, and the moment it was restored to
ALTER TABLE shardctl.branches DROP CONSTRAINT branches_data_check;
ALTER TABLE shardctl.branches ADD CONSTRAINT branches_data_check
    CHECK (data IN ('schema', 'sample', 'full', 'replica', 'backup'));
ALTER TABLE shardctl.branches ADD COLUMN source_at text;
"""

V10_OWNERSHIP = r"""
-- the fleet's identity, made once: a saved plan records it, and apply refuses a plan made for
-- another fleet (two fleets planned from one repository share names and can share a serial)
INSERT INTO shardctl.meta (key, value) VALUES ('fleet_id', gen_random_uuid()::text) ON CONFLICT (key) DO NOTHING;

-- every database shardctl created, by server: it drops or reuses only these, and only while the
-- database is the one it created (same oid); one made by hand under the same name is left alone.
-- A row is written before CREATE DATABASE (oid NULL until it exists), so a create killed halfway
-- is recognised as its own by the rerun. Databases recorded before this table are trusted as
-- before (oid NULL: their oid is recorded the next time shardctl reuses them).
CREATE TABLE shardctl.owned_databases (
    server     text NOT NULL,
    dbname     text NOT NULL,
    oid        bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (server, dbname)
);
INSERT INTO shardctl.owned_databases (server, dbname)
    SELECT server, dbname FROM shardctl.shards
    UNION SELECT server, dbname FROM shardctl.branches WHERE state <> 'expired'
    ON CONFLICT DO NOTHING;
"""

V11_REFERENCE = r"""
-- a database's reference tables and their source (engine/actions/reference.py): the tables, and
-- the server and database they are written in, {"tables": [...], "server": ..., "dbname": ...};
-- NULL: it declares none
ALTER TABLE shardctl.databases ADD COLUMN reference jsonb;
"""

MIGRATIONS: list[str] = [V1, V2, V3, V4, V5_HISTORY, V6_BRANCHES, V7_CAPACITY, V8_REPLICA, V9_BACKUPS,
                         V10_OWNERSHIP, V11_REFERENCE]
VERSION = len(MIGRATIONS)


def installed_version(conn: psycopg.Connection) -> int:
    """0 when the catalog schema does not exist yet."""
    exists = one(conn.execute("SELECT to_regclass('shardctl.meta') IS NOT NULL"))[0]
    if not exists:
        return 0
    row = conn.execute("SELECT value FROM shardctl.meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def check_readable(version: int) -> None:
    if version > VERSION:
        raise UserError(
            f"the catalog was written by a newer shardctl (catalog schema v{version}, this one knows v{VERSION})",
            "upgrade shardctl before using this fleet",
        )


def migrate(conn: psycopg.Connection) -> int:
    """Bring the catalog schema up to VERSION; returns the version found before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        found = installed_version(conn)
        check_readable(found)
        for version in range(found + 1, VERSION + 1):
            conn.execute(sql.SQL(MIGRATIONS[version - 1]))  # static text shipped with the code
            conn.execute(
                "INSERT INTO shardctl.meta (key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(version),),
            )
    return found
