"""The one way a span of time is written for people: `30m10s`, `2h`, `1d6h`, `45s`, `0.25s`.

Every plan, status line, dashboard cell and message that shows a duration writes it here, so a
value reads the same wherever it appears. Each unit is a unit the YAML takes (`d`, `h`, `m`,
`s`), largest first, none of them zero; whole seconds from a minute up.
"""

UNITS = (("d", 86400), ("h", 3600), ("m", 60))


def span(seconds: float) -> str:
    """1810 -> '30m10s', 7200 -> '2h', 5400 -> '1h30m', 45 -> '45s', 2.5 -> '2.5s', -90 -> '-1m30s'."""
    if seconds < 0:
        return "-" + span(-seconds)
    if seconds < 60 and not float(seconds).is_integer() and float(f"{seconds:.3g}") < 60:
        return f"{seconds:.3g}s"
    rest = round(seconds)
    parts = []
    for unit, size in UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    if rest or not parts:
        parts.append(f"{rest}s")
    return "".join(parts)
