"""The layout's rules, read from the imports: each room imports only the rooms below it.

The flow of a build is request → resolve → db (the queue) → worker → artifacts, served by
api, kept by janitor, used by client; gomod (Go's rules) is under all of them, and wiring is
where a Config becomes objects. These checks read every import of kiln/ and functions/
(module level, inside functions, and under TYPE_CHECKING) with the ast module, so a change
that puts code in the wrong room fails here, naming the import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: what each room may import from kiln (besides itself and the modules at kiln/'s top that
#: every room may use: config, errors, logconfig); None: anything
ALLOWED: dict[str, set[str] | None] = {
    "kiln.gomod": set(),
    "kiln.request": {"kiln.gomod"},
    "kiln.resolve": {"kiln.gomod", "kiln.request", "kiln.db"},
    "kiln.artifacts": {"kiln.gomod", "kiln.request"},
    "kiln.db": {"kiln.gomod", "kiln.request", "kiln.artifacts"},
    # the fleet module cache: a Go module proxy over the artifact store
    "kiln.modproxy": {"kiln.gomod", "kiln.artifacts"},
    # the fleet build cache: the worker's side of GOCACHEPROG, over the artifact store
    "kiln.buildcache": {"kiln.artifacts"},
    "kiln.worker": {"kiln.gomod", "kiln.request", "kiln.db", "kiln.artifacts", "kiln.metrics",
                    "kiln.buildcache", "kiln.modproxy"},
    "kiln.janitor": {"kiln.gomod", "kiln.request", "kiln.db", "kiln.artifacts", "kiln.resolve",
                     "kiln.metrics", "kiln.modproxy", "kiln.buildcache"},
    "kiln.api": {"kiln.gomod", "kiln.request", "kiln.resolve", "kiln.db", "kiln.artifacts",
                 "kiln.metrics", "kiln.readiness"},
    # the client is installed on machines that never run a server: no database, no sandbox
    "kiln.client": {"kiln.gomod", "kiln.request", "kiln.artifacts.signing",
                    "kiln.artifacts.provenance"},
    # top-level modules: metrics and readiness read the database; the configuration checks
    # a signing key when it is loaded
    "kiln.config": {"kiln.artifacts.signing"},
    "kiln.metrics": {"kiln.db"},
    "kiln.readiness": {"kiln.db"},
    # where Config becomes objects, and the programs that start from there
    "kiln.wiring": None,
    "kiln.programs": None,
    "kiln.cli": None,
    "kiln.standalone": None,
}
EVERYWHERE = {"kiln.config", "kiln.errors", "kiln.logconfig"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for root in ("kiln", "functions"):
        for path in sorted((REPO / root).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(name: str) -> Iterator[tuple[str, int]]:
    """Yield (imported kiln/functions module, line) for every import in module ``name``."""
    path = modules()[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                # `from kiln.api import admin` imports the module kiln.api.admin
                yield (target if target in modules() else base), node.lineno


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in modules():
        graph[name] = {target for target, _ in imports(name)
                       if target in modules() and target != name}
    return graph


def room(name: str) -> str:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name


def test_no_module_imports_itself_back_through_others() -> None:
    """No import cycle, even through imports inside functions or under TYPE_CHECKING."""
    graph = edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, f"modules that import each other: {cycles}"


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("kiln")))
def test_each_room_imports_only_the_rooms_below_it(name: str) -> None:
    mine = room(name)
    allowed = ALLOWED.get(mine)
    if allowed is None and mine in ALLOWED:
        return
    wrong = []
    for target, line in imports(name):
        if target.startswith("functions"):
            wrong.append(f"line {line}: {target} (kiln never imports its entry points)")
            continue
        if not target.startswith("kiln") or target in modules() and room(target) == mine:
            continue
        if target == "kiln" or any(target == e or target.startswith(e + ".") for e in EVERYWHERE):
            continue
        if allowed is not None and any(target == a or target.startswith(a + ".")
                                       for a in allowed):
            continue
        wrong.append(f"line {line}: {target}")
    assert not wrong, f"{name} ({mine}) imports outside what it may use: {wrong}"


def test_package_inits_run_nothing() -> None:
    """Importing kiln.x.y never runs a factory or a route table as a side effect."""
    for name, path in modules().items():
        if path.name != "__init__.py" or not name.startswith("kiln"):
            continue
        body = ast.parse(path.read_text()).body
        code = [n for n in body if not (isinstance(n, ast.Expr)
                                        and isinstance(n.value, ast.Constant))]
        code = [n for n in code if not (isinstance(n, ast.ImportFrom)
                                        and n.module == "__future__")]
        assert not code, f"{path.relative_to(REPO)} has code: keep package inits empty"


def test_only_the_entry_points_and_wiring_read_the_configuration_file() -> None:
    readers = sorted(name for name in modules() for target, _ in imports(name)
                     if target == "kiln.config" and _calls(name, "load_config"))
    assert set(readers) <= {
        "kiln.cli", "kiln.programs", "kiln.standalone", "kiln.wiring",
        "functions.api", "functions.api.gunicorn_conf", "functions.api.lambda_handler",
        "functions.janitor.lambda_handler",
        # gunicorn makes its logger class itself, from a dotted name: it reads the logging
        # settings where it is made
        "kiln.logconfig",
        # the client's own settings (server URL, key) for `kiln build` and friends
        "kiln.client.builds"}, readers


def _calls(name: str, function: str) -> bool:
    tree = ast.parse(modules()[name].read_text())
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", ""))
               == function for n in ast.walk(tree))


#: lines a module may have: past it, it holds more than one job
MAX_MODULE_LINES = 600
#: lines an entry point under functions/ may have: it calls kiln, it does not do the work
MAX_ENTRY_POINT_LINES = 100


def test_no_module_is_too_big_to_hold_one_job() -> None:
    big = {}
    for name, path in modules().items():
        limit = MAX_ENTRY_POINT_LINES if name.startswith("functions") else MAX_MODULE_LINES
        lines = len(path.read_text().splitlines())
        if lines > limit:
            big[str(path.relative_to(REPO))] = f"{lines} lines (at most {limit})"
    assert not big, f"split these: {big}"


def test_only_the_wiring_turns_configuration_sections_into_objects() -> None:
    """No class builds itself from a Config (``from_config``): wiring.py's make_… functions do."""
    found = []
    for name, path in modules().items():
        if name in ("kiln.wiring", "kiln.config"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    node.name == "from_config" or node.name.endswith("_from_config")):
                found.append(f"{name}:{node.lineno} {node.name}")
    assert not found, f"move into kiln/wiring.py: {found}"


def test_only_db_runs_sql() -> None:
    """Every query lives in kiln/db/sql/ and is run by its owner in kiln/db/."""
    outside = sorted(f"{name} (line {line})" for name in modules() if name.startswith("kiln")
                     and not name.startswith("kiln.db")
                     for target, line in imports(name) if target == "kiln.db.sql")
    assert not outside, f"these load SQL outside kiln/db/: {outside}"
