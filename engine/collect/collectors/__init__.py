"""Metric collectors: a registry others can extend.

A collector reads one server's shards in one round and returns or enriches `Reading`s. The
built-in ones are `postgres` (statistics views, one connection per server) and `proc` (real
CPU of backends from the host's /proc, for servers on this host). Third-party collectors
register through the `shardctl.collectors` entry-point group, or `register()` at run time.
"""

from __future__ import annotations

from engine.collect.collectors.base import Collector, available, register

__all__ = ["Collector", "available", "default_collectors", "register"]


def default_collectors() -> list[Collector]:
    from engine.collect.collectors import postgres, proc  # noqa: F401  (registers them)

    found = available()
    return [found["postgres"](), found["proc"]()] + [
        cls() for name, cls in sorted(found.items()) if name not in ("postgres", "proc")
    ]
