"""The layers stay apart: planning, rendering and what the daemon serves never reach a database.

Checked on the import statements of each module (top level and inside functions), so a
shortcut through the database layer fails here rather than in review.
"""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
DATABASE_LAYER = ("psycopg", "psycopg_pool", "engine.catalog", "engine.servers", "engine.observe.observer",
                  "engine.observe.sampling", "engine.observe.history", "engine.actions", "engine.workflow")
QUOTING_ONLY = {"psycopg.sql"}  # composes and quotes SQL text; opens no connection
NO_DATABASE = sorted([*ENGINE.glob("render/*.py"), *ENGINE.glob("plan/*.py"), ENGINE / "detect" / "detector.py",
                      ENGINE / "detect" / "forecast.py", ENGINE / "detect" / "backtest.py",
                      *(ENGINE / "watch" / name for name in ("autonomy.py", "view.py", "http.py", "prometheus.py"))])


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("path", NO_DATABASE, ids=lambda p: str(p.relative_to(ENGINE)))
def test_module_does_not_import_the_database_layer(path):
    reached = sorted(i for i in _imports(path) - QUOTING_ONLY
                     if any(i == d or i.startswith(d + ".") for d in DATABASE_LAYER))
    assert reached == [], f"{path.relative_to(ENGINE)} imports {reached}"


def test_renderers_do_not_reach_up_into_the_daemon():
    """The dashboard reads the daemon's snapshot (engine.snapshot); it never imports engine.watch."""
    for path in sorted(ENGINE.glob("render/*.py")):
        reached = sorted(i for i in _imports(path) if i == "engine.watch" or i.startswith("engine.watch."))
        assert reached == [], f"{path.relative_to(ENGINE)} imports {reached}"


def test_the_daemon_and_its_http_module_do_not_import_each_other():
    http = _imports(ENGINE / "watch" / "http.py")  # TYPE_CHECKING imports included: ast sees them all
    assert not any(i == "engine.watch.daemon" or i.startswith("engine.watch.daemon.") for i in http), sorted(http)
    assert "engine.watch.http.serve" in _imports(ENGINE / "watch" / "daemon.py")


def _module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in ENGINE.rglob("*.py"):
        name = "engine." + ".".join(path.relative_to(ENGINE).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        graph[name] = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for cut in range(len(parts), 1, -1):
                candidate = ".".join(parts[:cut])
                if candidate != name and (ENGINE.parent / (candidate.replace(".", "/") + ".py")).exists():
                    graph[name].add(candidate)
                    break
    return graph


def test_no_two_watch_modules_import_each_other():
    graph = _module_graph()
    pairs = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, set())
                   and a.startswith("engine.watch") and b.startswith("engine.watch"))
    assert pairs == [], pairs
