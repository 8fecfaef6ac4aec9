"""Recorded samples: a YAML or JSON file in the shape the catalog stores, for what-if planning,
reviews in CI without database access, and tests of the detector. Cleaned on the way in
(engine.observe.cleaning); a time must carry its zone.

    samples:
      - shard: orders/-40
        server: a
        at: 2026-11-26T10:00:00Z
        metrics:
          queries_per_second: 12000          # a bare number: source "recorded"
          cpu_percent: {value: 41.5, source: pg_stat_database active_time}
          latency_ms: null                   # unknown
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import files
from engine.errors import UserError
from engine.observe import cleaning
from engine.observe.metrics import METRICS, Sample
from engine.observe.series import Series


@dataclass(frozen=True)
class Recording:
    """A recorded-samples file read once: the CLI reads it before it starts or touches anything,
    and hands it on (a file that cannot be read fails the command before any server is started)."""

    path: str
    samples: dict[str, Series]
    notes: tuple[str, ...]


def read(path: str | Path) -> Recording:
    samples, notes = load_with_notes(path)
    return Recording(str(path), samples, notes)


def load(path: str | Path) -> dict[str, Series]:
    return load_with_notes(path)[0]


def load_with_notes(path: str | Path) -> tuple[dict[str, Series], tuple[str, ...]]:
    """The samples per shard, cleaned (engine.observe.cleaning), and the notes of what cleaning
    folded or rejected. A time without a zone is refused, naming the file and the sample. The
    file must be a regular file of at most MAX_METRICS_BYTES, nested at most MAX_JSON_DEPTH."""
    path = Path(path)
    if path.suffix == ".json":
        data = files.load_json(path, "metrics file", files.MAX_METRICS_BYTES)
    else:
        data = _load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise UserError(f"{path}: expected a mapping with a `samples:` list",
                        "write one with `shardctl metrics export -o FILE`")
    out: dict[str, list[Sample]] = {}
    for i, raw in enumerate(data["samples"]):
        try:
            sample = Sample.model_validate(_normalise(raw))
        except (ValidationError, ValueError, TypeError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            where = ".".join(map(str, exc.errors()[0]["loc"])) if isinstance(exc, ValidationError) else ""
            raise UserError(f"{path}: sample {i + 1}{' ' + where if where else ''}: {detail}") from None
        if sample.at.tzinfo is None:
            raise UserError(
                f"{path}: sample {i + 1} ({sample.shard}): the time {sample.at.isoformat()} has no time zone",
                "write times in UTC with a Z, e.g. 2026-11-26T10:00:00Z, or with an offset such as +02:00",
            )
        out.setdefault(sample.shard, []).append(sample)
    return cleaning.clean(out)


def _load_yaml(path: Path) -> Any:
    """YAML (ruamel's safe loader: aliases are shared, never copied), after the same size and
    flow-nesting bounds as JSON; block nesting deep enough to exhaust the parser is refused too.
    ruamel is imported here: a plan without --metrics reads no YAML but its config (cached)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    text = files.read_text(path, "metrics file", files.MAX_METRICS_BYTES)
    if files.json_depth(_YAML_QUOTED.sub("", text), files.MAX_JSON_DEPTH) > files.MAX_JSON_DEPTH:
        raise UserError(f"metrics file {path} nests deeper than {files.MAX_JSON_DEPTH} levels",
                        "a recording of samples never nests so deep")
    try:
        return YAML(typ="safe").load(text)
    except RecursionError:
        raise UserError(f"metrics file {path} nests too deeply to be read",
                        "a recording of samples never nests so deep") from None
    except YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None


_YAML_QUOTED = re.compile(r"""'(?:[^']|'')*'|#[^\n]*""")


def _normalise(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("a sample is a mapping with shard, server, at and metrics")
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError("metrics must be a mapping")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    full = {}
    for name in METRICS:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"value": float(value), "source": "recorded"}
        full[name] = value
    return {**raw, "metrics": full}


def dump(samples: list[Sample]) -> dict[str, Any]:
    return {"samples": [s.model_dump(mode="json") for s in sorted(samples, key=lambda s: (s.at, s.shard))]}
