"""The daemon's dashboard page: server-rendered HTML (jinja2, autoescaped) from its snapshot.

No build step and no JavaScript: charts are inline SVG drawn here, and the page refreshes
itself with a meta tag, so it reads the same in a terminal browser or with scripts off.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import jinja2

from engine.clock import system_clock
from engine.durations import span
from engine.observe.metrics import METRICS, UNITS
from engine.snapshot import Snapshot, move_eta_seconds

CHART_W, CHART_H = 160, 40
CHARTED = ("queries_per_second", "cpu_percent", "latency_ms")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)


def _num(value: float | None) -> str:
    if value is None:
        return "unknown"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ago(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "never"
    seconds = (now - at).total_seconds()
    future = seconds < 0
    text = span(abs(seconds))
    return f"in {text}" if future else f"{text} ago"


def chart(points: list[tuple], metric: str, threshold: float | None) -> dict:
    """An SVG polyline of one metric over the series; gaps (unknown) break the line."""
    index = 1 + METRICS.index(metric)
    known = [(p[0], p[index]) for p in points if p[index] is not None]
    if not points:
        return {"lines": [], "threshold_y": None, "peak": None, "latest": None, "last_known": None,
                "last_known_at": None}
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1e-9)
    top = max([v * 1.2 for _, v in known] + ([threshold * 1.15] if threshold else []) + [1e-9])
    lines: list[str] = []
    current: list[str] = []
    for p in points:
        v = p[index]
        if v is None:
            if current:
                lines.append(" ".join(current))
            current = []
            continue
        x = (p[0] - t0) / span * CHART_W if len(points) > 1 else CHART_W
        y = CHART_H - (v / top) * (CHART_H - 4) - 2
        current.append(f"{x:.1f},{y:.1f}")
    if current:
        lines.append(" ".join(current))
    threshold_y = CHART_H - (threshold / top) * (CHART_H - 4) - 2 if threshold else None
    # `latest` is the newest point's value: None when the newest round did not know it. The last
    # known value is kept apart, with its time, so a stale figure is never captioned as current.
    return {"lines": lines, "threshold_y": threshold_y, "peak": max((v for _, v in known), default=None),
            "latest": points[-1][index], "last_known": known[-1][1] if known else None,
            "last_known_at": datetime.fromtimestamp(known[-1][0], UTC) if known else None}


def forecast_chart(forecast, threshold: float | None) -> dict | None:
    """The forecast ahead as an SVG: its band (a polygon from the lower to the upper edge), the
    point forecast (of the peaks where known: what a crossing is judged on) and the hot threshold,
    on the forecast's own time axis (the next hours)."""
    if forecast is None or not forecast.values:
        return None
    values = forecast.deciding
    top = max([(v + forecast.band) * 1.1 for v in values] + ([threshold * 1.15] if threshold else []) + [1e-9])
    step = CHART_W / max(len(values) - 1, 1)

    def y(v: float) -> str:
        return f"{CHART_H - (max(v, 0.0) / top) * (CHART_H - 4) - 2:.1f}"

    upper = [f"{i * step:.1f},{y(v + forecast.band)}" for i, v in enumerate(values)]
    lower = [f"{i * step:.1f},{y(v - forecast.band)}" for i, v in reversed(list(enumerate(values)))]
    crossing = forecast.crossing(threshold) if threshold else None
    return {"band": " ".join(upper + lower), "line": " ".join(f"{i * step:.1f},{y(v)}" for i, v in enumerate(values)),
            "threshold_y": float(y(threshold)) if threshold else None, "hours": len(values),
            "peak": max(values), "plus_minus": forecast.band, "crossing": crossing}


SPACE = 1 << 64  # the unsigned keyspace
HALF = 1 << 63
WARN_PERCENT = 80.0  # a server's summed use over this is drawn as a warning


def keyspace(shards) -> list[dict]:
    """Per database, its shards as segments of the keyspace, in key order: the width is the share
    of the keyspace the shard owns, the colour its load state."""
    by_db: dict[str, list] = {}
    for shard in shards:
        by_db.setdefault(shard.database, []).append(shard)
    out = []
    for database, members in sorted(by_db.items()):
        segments = []
        for shard in sorted(members, key=lambda s: 0 if s.lo is None else s.lo + HALF):
            lo = 0 if shard.lo is None else shard.lo + HALF
            hi = SPACE if shard.hi is None else shard.hi + HALF
            share = (hi - lo) / SPACE * 100
            qps = shard.latest.get("queries_per_second")
            segments.append({"address": shard.address, "name": shard.name, "load": shard.load, "server": shard.server,
                             "share": share, "width": f"{share:.3f}", "qps": _num(qps)})
        out.append({"database": database, "segments": segments,
                    "covered": sum(seg["share"] for seg in segments)})
    return out


def servers(snapshot: Snapshot) -> list[dict]:
    """Each server with active shards: their summed use of the server's capacity (the shards'
    percentages are all against the same declared or reported capacity), and whether it answers."""
    by_server: dict[str, list] = {}
    for shard in snapshot.shards:
        by_server.setdefault(shard.server, []).append(shard)
    out = []
    for server, members in sorted(by_server.items()):
        meters = []
        for metric, label in (("cpu_percent", "cpu"), ("memory_percent", "memory"), ("storage_percent", "storage")):
            values = [m.latest.get(metric) for m in members]
            known = [v for v in values if v is not None]
            total = sum(known) if known else None
            meters.append({"label": label, "value": total, "text": "unknown" if total is None else f"{total:.1f}%",
                           "width": f"{min(100.0, total or 0.0):.1f}", "partial": len(known) < len(values) and known,
                           "warn": total is not None and total > WARN_PERCENT})
        connections = [m.latest.get("connections") for m in members]
        out.append({"name": server, "shards": len(members), "answering": server not in snapshot.silent_servers,
                    "meters": meters, "hot": sum(1 for m in members if m.load == "hot"),
                    "connections": _num(sum(c for c in connections if c is not None))
                    if any(c is not None for c in connections) else "unknown"})
    return out


def move(snapshot: Snapshot, now: datetime) -> dict | None:
    """The split or merge running now, the daemon's or another process's (a person's apply):
    its phase and how far it has got."""
    activity, since, progress, reported = snapshot.running()
    if since is None:
        return None
    p = progress or {}
    phase = p.get("phase")
    done, detail = None, ""
    if phase == "copy" and p.get("rows_expected"):
        done = min(100.0, 100.0 * (p.get("rows_copied") or 0) / p["rows_expected"])
        detail = f"{_num(p.get('rows_copied') or 0)} of ~{_num(p['rows_expected'])} rows copied"
    elif phase == "catch-up":
        detail = f"replication lag {(p.get('lag_bytes') or 0) / 1e6:.1f} MB"
    elif phase in ("caught up", "compared"):
        done = 100.0 if phase == "caught up" else None
        detail = "caught up" if phase == "caught up" else f"{_num(p.get('keys_left') or 0)} keys left to compare"
    eta = move_eta_seconds(p)
    return {"step": p.get("step") or activity, "phase": phase or "starting", "done": done,
            "width": f"{done:.1f}" if done is not None else None, "detail": detail,
            "eta": None if eta is None else span(eta), "since": _ago(since, now),
            "reported": _ago(reported, now) if reported else None, "text": p.get("text"),
            "by": None if snapshot.activity_since is not None else activity}


def render_dashboard(snapshot: Snapshot, series: dict[str, list[tuple]], now: datetime | None = None) -> str:
    now = now or system_clock()
    shards = []
    for shard in snapshot.shards:
        points = series.get(shard.address, [])
        shards.append({
            "view": shard,
            "charts": [{"metric": m, "unit": UNITS.get(m, ""), **chart(points, m, shard.hot_thresholds.get(m)),
                        "forecast": forecast_chart(next((f for f in shard.forecasts if f.metric == m), None),
                                                   shard.hot_thresholds.get(m))}
                       for m in CHARTED],
            "values": [(m, _num(shard.latest.get(m)), UNITS.get(m, "")) for m in METRICS],
        })
    refresh = 10
    return _env.get_template("dashboard.html.j2").render(
        s=snapshot, shards=shards, now=now, ago=lambda at: _ago(at, now), num=_num,
        chart_w=CHART_W, chart_h=CHART_H, refresh=refresh,
        keyspace=keyspace(snapshot.shards), servers=servers(snapshot), move=move(snapshot, now),
    )


def render_picture(name: str, snapshot: Snapshot, now: datetime) -> str:
    """One picture of the page alone (keyspace, servers, move), as the page draws it."""
    template = _env.get_template("dashboard.html.j2")
    context = template.new_context({"s": snapshot, "keyspace": keyspace(snapshot.shards), "servers": servers(snapshot),
                                    "move": move(snapshot, now), "num": _num, "ago": lambda at: _ago(at, now)})
    return "".join(template.blocks[name](context))
