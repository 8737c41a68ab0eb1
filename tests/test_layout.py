"""The code's layering, as the README describes it: the domain (ccat_dt) never imports
Dagster; every stage of a package's journey has one module in ccat_assets/stages holding its
assets, checks and job; the sensors use only Dagster-layer modules that never reach back
into the sensors (no import cycle between modules)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ccat_dt", "ccat_assets", "sensors", "resources")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours imported at module level (imports inside functions are lazy on
    purpose and cannot form an import-time cycle)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) for name, path in known.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_domain_never_imports_dagster() -> None:
    for name, path in _modules().items():
        if name.startswith("ccat_dt"):
            tree = ast.parse(path.read_text())
            imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                        if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            assert not imported & {"dagster", "dagster_celery"}, name


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    cycles = [name for name in graph if name in _reach(graph, name)
              and not name.endswith("stages")]  # a package's __init__ importing its modules
    assert cycles == [], f"import cycles through: {cycles}"


def test_sensors_use_only_what_never_reaches_back_into_the_sensors() -> None:
    graph = _graph()
    for name in (n for n in graph if n.startswith("sensors")):
        for used in graph[name]:
            if used.startswith("ccat_assets"):
                back = {m for m in _reach(graph, used)
                        if m.startswith("sensors") or m == "ccat_assets.definitions"}
                assert not back, f"{name} imports {used}, which imports {back}"


def test_each_stage_has_one_module_with_its_assets_checks_and_job() -> None:
    from ccat_assets.stages import JOBS, MODULES
    from ccat_dt.stages import Stage

    assert set(MODULES) == set(Stage)
    for stage, module in MODULES.items():
        assert module.job is JOBS[stage]
        assert callable(module.assets) and callable(module.checks) and module.ASSETS
