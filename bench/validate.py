"""Validating a large config against ruamel.yaml's own safe load of the same file, and the
time to refuse an alias bomb.

    python bench/validate.py [--mib 10] [--repeat 3] [--shape databases|policies]

Writes a config of about --mib MiB to a temporary directory: `databases` (50 servers, 200
policies, databases with inline schema steps) or `policies` (60,000 policies of about 170 bytes,
each extending the one before: one inheritance chain as long as the file allows, which took
quadratic time and memory before issue 26). The baseline, measured in the same run, is
`YAML(typ="safe").load_all` of the same text: the least any loader must do. `validate` is
`engine.config.loader.load` (positions, limits, models, cross-references, every schema step's
SQL parsed and checked). Best of --repeat runs each. Goal (issue 13): at most 2x the baseline;
the alias bomb refused in under 1 s. Writes its record (bench/record.py) to docs/bench/validate.json
(validate-policies.json with --shape policies).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ruamel.yaml import YAML

from engine.config import loader
from engine.errors import ConfigError
from record import Record

BOMB = "servers:\n  a: {embedded: true}\n" + "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
    for p, c in pairwise([None, *"abcdefghi"]))


def config(target_bytes: int) -> str:
    servers = [f"s{i:03d}" for i in range(50)]
    out = ["servers:"] + [f"  {s}:\n    embedded: true\n    capacity: {{storage: 500GiB, memory: 64GiB, cpus: 16}}"
                          for s in servers]
    out.append("policies:")
    for i in range(200):
        out.append(f"  p{i:03d}:\n    description: policy number {i}\n    hot: {{queries_per_second: {5000 + i},"
                   f" cpu_percent: 70, latency_ms: 50}}\n    cold: {{queries_per_second: 50}}\n"
                   f"    detection: {{hot_samples: 3, window: 5}}\n    autosplit: {{cooldown: 45m, max_shards: 64}}")
    out.append("databases:")
    size, i = sum(len(x) + 1 for x in out), 0
    while size < target_bytes:
        block = (f"  db{i:05d}:\n    shard_key: {{column: tenant_id, type: bigint}}\n    schema:\n"
                 f"      - {{name: 001_init, sql: \"CREATE TABLE t{i} (tenant_id bigint, id bigint, note text,"
                 f" PRIMARY KEY (tenant_id, id));\"}}\n"
                 f"      - {{name: 002_index, sql: \"CREATE INDEX t{i}_note ON t{i} (note);\"}}\n"
                 f"    shards: {1 + i % 8}\n    placement: [{servers[i % 50]}, {servers[(i + 1) % 50]}]\n"
                 f"    policy: p{i % 200:03d}\n    thresholds:\n      hot: {{connections: {500 + i % 100}}}")
        out.append(block)
        size += len(block) + 1
        i += 1
    return "\n".join(out) + "\n"


def policies_config(target_bytes: int) -> str:
    """Policies only, each extending the one before (p00000 extends nothing, so `default`)."""
    out = ["servers:", "  a: {embedded: true}", "policies:"]
    size, i = sum(len(x) + 1 for x in out), 0
    while size < target_bytes:
        extends = f"    extends: p{i - 1:05d}\n" if i else ""
        block = (f"  p{i:05d}:\n{extends}    description: policy number {i} of a long chain\n"
                 f"    hot: {{queries_per_second: {5000 + i}, cpu_percent: {50 + i % 40}}}\n"
                 f"    autosplit: {{cooldown: {30 + i % 30}m}}")
        out.append(block)
        size += len(block) + 1
        i += 1
    return "\n".join(out) + "\n"


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def best(fn, repeat: int) -> float:
    return min(timed(fn, repeat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", choices=["databases", "policies"], default="databases")
    args = parser.parse_args()
    record = Record("validate" if args.shape == "databases" else f"validate-{args.shape}")
    tmp = Path(tempfile.mkdtemp(prefix="shardctl-bench-validate-"))
    text = (config if args.shape == "databases" else policies_config)(int(args.mib * 2**20))
    (tmp / "fleet.yaml").write_text(text)
    print(f"config: {len(text.encode()) / 2**20:.1f} MiB, {text.count('shard_key:'):,} databases,"
          f" {text.count(chr(10) + '  p'):,} policies, {text.count(chr(10)):,} lines")

    # baseline and validate alternate, so that a change in the machine's load hits both
    baselines, validates = [], []
    for _ in range(args.repeat):
        baselines += timed(lambda: list(YAML(typ="safe").load_all(text)), 1)
        validates += timed(lambda: loader.load(tmp, cwd=tmp), 1)
    baseline, validate = min(baselines), min(validates)
    ratios = sorted(v / b for v, b in zip(validates, baselines, strict=True))
    print(f"baseline: ruamel.yaml safe load      {baseline:8.2f} s"
          f"   (runs: {', '.join(f'{t:.2f}' for t in baselines)})")
    print(f"shardctl validate (loader.load)      {validate:8.2f} s   {validate / baseline:.2f}x the baseline"
          f"   (runs: {', '.join(f'{t:.2f}' for t in validates)}; per-run ratios {ratios[0]:.2f}-{ratios[-1]:.2f})")

    bomb = tmp / "bomb"
    bomb.mkdir()
    (bomb / "fleet.yaml").write_text(BOMB)

    def refuse():
        try:
            loader.load(bomb, cwd=bomb)
        except ConfigError as exc:
            assert "aliases expand" in exc.render()
        else:
            raise AssertionError("the alias bomb was accepted")

    bombs = timed(refuse, args.repeat)
    print(f"alias bomb (9 levels x 9 aliases) refused in {min(bombs) * 1000:.0f} ms")
    record.fact("mib", round(len(text.encode()) / 2**20, 1))
    record.fact("databases", text.count("shard_key:"))
    record.fact("policies", text.count("\n  p"))
    record.fact("lines", text.count("\n"))
    record.measure("safe_load", "baseline: ruamel.yaml `YAML(typ=\"safe\").load_all` of the same text", baselines, "s")
    record.measure("validate", "`shardctl validate` (engine.config.loader.load)", validates, "s",
                   baseline="safe_load", paired=True)  # they alternate
    record.measure("bomb", "alias bomb (9 levels of 9 aliases) refused", [b * 1000 for b in bombs], "ms")
    record.write()


if __name__ == "__main__":
    main()
