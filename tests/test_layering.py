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
