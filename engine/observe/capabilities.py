"""What a server lets shardctl's role do, read in one query: version, settings that moves need,
free capacity for them, and the role's privileges. Read-only; works as any role."""

from __future__ import annotations

import psycopg

from engine.clock import system_clock
from engine.observe.models import Capabilities
from engine.rows import one

QUERY = """
SELECT current_setting('server_version_num')::int,
       r.rolsuper, r.rolcreatedb, r.rolreplication,
       pg_has_role(current_user, 'pg_monitor', 'USAGE')
         OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       CASE WHEN current_setting('server_version_num')::int >= 160000
            THEN pg_has_role(current_user, 'pg_create_subscription', 'USAGE') ELSE false END,
       has_function_privilege('pg_replication_origin_progress(text, boolean)', 'EXECUTE'),
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
       current_setting('max_worker_processes')::int,
       current_setting('max_logical_replication_workers')::int,
       (SELECT setting::bigint * CASE unit WHEN 'MB' THEN 1048576 WHEN 'kB' THEN 1024 ELSE 1 END
          FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
       -- its settings exist once the library is loaded (shared_preload_libraries itself is
       -- readable only with pg_read_all_settings)
       EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pg_stat_statements.max'),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_buffercache'),
       coalesce((SELECT setting FROM pg_settings WHERE name = 'pg_stat_statements.track'), ''),
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'
          AND application_name IS DISTINCT FROM 'shardctl-inventory')::int,
       r.rolconnlimit,
       current_user::text,
       coalesce((SELECT setting FROM pg_settings WHERE name = 'ssl_library'), ''),
       has_function_privilege('pg_create_restore_point(text)', 'EXECUTE')
         AND has_function_privilege('pg_switch_wal()', 'EXECUTE'),
       has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE')
         AND has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE'),
       extract(epoch FROM clock_timestamp())::float8,
       coalesce(current_setting('max_active_replication_origins', true),
                current_setting('max_replication_slots'))::int,
       (SELECT count(*) FROM pg_subscription)::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'logical replication %'
          AND backend_type <> 'logical replication launcher')::int,
       current_setting('max_sync_workers_per_subscription')::int,
       coalesce(current_setting('max_parallel_apply_workers_per_subscription', true), '0')::int,
       coalesce((SELECT array_agg(name::text ORDER BY name) FROM pg_settings WHERE pending_restart), '{}')
FROM pg_roles r WHERE r.rolname = current_user
"""
ORIGINS = "SELECT count(*)::int FROM pg_replication_origin_status"

FIELDS = ("version_num", "superuser", "createdb", "replication", "monitor", "create_subscription",
          "origin_progress", "wal_level", "max_replication_slots", "used_replication_slots", "max_wal_senders",
          "used_wal_senders", "max_worker_processes", "max_logical_replication_workers",
          "max_slot_wal_keep_size_bytes", "stat_statements_loaded", "stat_statements_created",
          "buffercache_created", "stat_statements_track", "max_connections", "reserved_connections",
          "connections", "role_connection_limit", "role", "ssl_library", "restore_points", "backup_functions",
          "clock_epoch", "max_replication_origins", "used_replication_origins", "used_replication_workers",
          "max_sync_workers_per_subscription", "max_parallel_apply_workers_per_subscription", "pending_restart")


def read(conn: psycopg.Connection) -> Capabilities:
    """The server's capabilities; its clock as an offset from this host's (the midpoint of the
    round trip), so that two servers' offsets give their skew."""
    before = system_clock().timestamp()
    row = one(conn.execute(QUERY))
    after = system_clock().timestamp()
    values = dict(zip(FIELDS, row, strict=True))
    values["clock_offset_s"] = round(values.pop("clock_epoch") - (before + after) / 2, 3)
    values["pending_restart"] = tuple(values["pending_restart"])
    if values["superuser"]:
        # the origins with state (table-sync workers' too); only a superuser may read them, and a
        # CASE cannot guard it: a function's EXECUTE privilege is checked when the plan starts
        values["used_replication_origins"] = one(conn.execute(ORIGINS))[0]
    if values["max_slot_wal_keep_size_bytes"] is not None and values["max_slot_wal_keep_size_bytes"] < 0:
        values["max_slot_wal_keep_size_bytes"] = -1  # unlimited
    return Capabilities(**values)
