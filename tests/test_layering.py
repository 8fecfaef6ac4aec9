"""The layers stay apart: planning, rendering and what the daemon serves never reach a database,
no package or module imports itself back through others, and nothing imports upward.

The layers of engine/, bottom first; a module imports only from its own layer or those below:

1. foundation: the clock, errors, files, rows, the keyspace, the shared frozen model and the
   duration format (engine/*.py helpers), and engine/client.py (routing for applications).
2. config: the declared fleet (YAML models, loader, names, SQL checks).
3. observe: observations as values (what the catalog and servers were seen to hold, metric
   samples and series) and pure readings of them. No connection is opened here.
4. detect: hot/cold detection and forecasts over observations.
5. plan: desired versus observed, the plan's model; engine/snapshot.py (what the daemon shows).
6. render: plans, drift and the dashboard as text; never a database (see below).
7. catalog: the control database (schema, store, journal, locks): stores plans and observations.
8. servers: embedded servers and connections to the declared ones (the fleet).
9. collect: reading the fleet and the catalog into observations (observer, sampling, history).
10. actions and engine/backups.py: what changes the fleet, one module per action kind.
11. engine/workflow.py, status.py, doctor.py: plan and apply, status, doctor.
12. watch: the daemon, its HTTP API and /metrics.
13. engine/cli.py and __main__: the command line.

Checked on the import statements of each module (top level, inside functions and under
TYPE_CHECKING alike), so a shortcut through another layer fails here rather than in review.
"""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
DATABASE_LAYER = ("psycopg", "psycopg_pool", "engine.catalog", "engine.servers", "engine.collect.observer",
                  "engine.collect.sampling", "engine.collect.history", "engine.actions", "engine.workflow")
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


LAYERS = (  # bottom first; a module belongs to the first layer with a prefix that matches it
    ("engine", "engine.clock", "engine.errors", "engine.files", "engine.rows", "engine.keyspace",
     "engine.frozen", "engine.durations", "engine.client"),
    ("engine.config",),
    ("engine.observe",),
    ("engine.detect",),
    ("engine.plan", "engine.snapshot"),
    ("engine.render",),
    ("engine.catalog",),
    ("engine.servers",),
    ("engine.collect",),
    ("engine.actions", "engine.backups"),
    ("engine.workflow", "engine.status", "engine.doctor"),
    ("engine.watch",),
    ("engine.cli", "engine.__main__"),
)

# Known file cycles, each with the issue that removes it. The lead deletes the entry at the merge
# of the branch that removes the cycle; an entry whose cycle is gone fails the test too.
ALLOWED_FILE_CYCLES: set[frozenset[str]] = set()  # none: a new cycle is a design question, not an entry here


def _layer(module: str) -> int:
    best = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
            if module == prefix or (prefix != "engine" and module.startswith(prefix + "."))]
    assert best, f"{module} is in no layer: add it to LAYERS (and the docstring) where it belongs"
    return max(best)[1]


def _package(module: str) -> str:
    """engine.plan.models -> engine.plan; a top-level module (engine.workflow) is its own."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def _full_module_graph() -> dict[str, set[str]]:
    """Every engine module to the engine modules it imports, packages (their __init__) included."""
    modules = {}
    for path in ENGINE.rglob("*.py"):
        name = "engine." + ".".join(path.relative_to(ENGINE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in modules:
                    if candidate != name:
                        graph[name].add(candidate)
                    break
    return graph


def test_no_package_imports_itself_back():
    """Packages (and engine's top-level modules, each its own) form no cycle: what two of them
    share lives below both."""
    graph: dict[str, set[str]] = {}
    for module, imported in _full_module_graph().items():
        graph.setdefault(_package(module), set()).update(
            _package(i) for i in imported if _package(i) != _package(module))
    assert _cycles(graph) == []


def test_no_module_imports_itself_back():
    """No file imports another that imports it back, directly or through others."""
    cycles = [frozenset(c) for c in _cycles(_full_module_graph())]
    assert sorted(map(sorted, set(cycles) - ALLOWED_FILE_CYCLES)) == []
    assert sorted(map(sorted, ALLOWED_FILE_CYCLES - set(cycles))) == [], "gone: remove it from ALLOWED_FILE_CYCLES"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{module} (layer {_layer(module) + 1}) imports {imported} (layer {_layer(imported) + 1})"
                    for module, imports in _full_module_graph().items() for imported in imports
                    if _layer(imported) > _layer(module))
    assert upward == []


# Modules that still read the wall clock themselves, each with the issue that ends it.
OWN_CLOCK: set[str] = set()  # none: every now comes from engine/clock.py


def test_every_now_comes_from_the_clock():
    """engine/clock.py is the one source of now (tests pin it); a monotonic timer that measures
    a duration is not a now and stays allowed."""
    calls = ("datetime.now(", "datetime.utcnow(", "time.time(", "date.today(")
    reading = sorted(str(path.relative_to(ENGINE)) for path in ENGINE.rglob("*.py")
                     if path.name != "clock.py" and any(call in path.read_text() for call in calls))
    assert reading == sorted(OWN_CLOCK)


def test_every_model_is_frozen_on_the_one_base():
    """engine/frozen.py's Frozen (or its Declared, for what users write) under every pydantic model."""
    import importlib
    import pkgutil

    from pydantic import BaseModel

    import engine
    from engine.frozen import Frozen

    others = set()
    for info in pkgutil.walk_packages(engine.__path__, "engine."):
        if info.name == "engine.__main__":
            continue
        module = importlib.import_module(info.name)
        others |= {f"{value.__module__}.{value.__qualname__}" for value in vars(module).values()
                   if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == info.name
                   and not issubclass(value, Frozen) and value is not Frozen}
    assert sorted(others) == []
