"""The daemon's dashboard page: server-rendered HTML (jinja2, autoescaped) from its snapshot.

No build step and no JavaScript: charts are inline SVG drawn here, and the page refreshes
itself with a meta tag, so it reads the same in a terminal browser or with scripts off.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import jinja2

from engine.observe.metrics import METRICS, UNITS
from engine.watch.view import Snapshot

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
    seconds = abs(seconds)
    text = (f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200
            else f"{seconds / 3600:.1f}h" if seconds < 172800 else f"{seconds / 86400:.1f}d")
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
    lines, current = [], []
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
            "last_known_at": datetime.fromtimestamp(known[-1][0], timezone.utc) if known else None}


def render_dashboard(snapshot: Snapshot, series: dict[str, list[tuple]], now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    shards = []
    for shard in snapshot.shards:
        points = series.get(shard.address, [])
        shards.append({
            "view": shard,
            "charts": [{"metric": m, "unit": UNITS.get(m, ""), **chart(points, m, shard.hot_thresholds.get(m))}
                       for m in CHARTED],
            "values": [(m, _num(shard.latest.get(m)), UNITS.get(m, "")) for m in METRICS],
        })
    refresh = 10
    return _env.get_template("dashboard.html.j2").render(
        s=snapshot, shards=shards, now=now, ago=lambda at: _ago(at, now), num=_num,
        chart_w=CHART_W, chart_h=CHART_H, refresh=refresh,
    )
