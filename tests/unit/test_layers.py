"""The package's layers, enforced: imports point down only, and no module imports itself back.

Ranks (high imports low, never the other way; packages of one rank do not import each other):

    8  app, cli                       wiring and entry points
    7  api                            routes, one blueprint per file
    6  web                            errors, security, Host/Origin guard, request log, shutdown
    5  serving                        API-neutral request handling
    4.5 services                      the typed accessor (web types only under TYPE_CHECKING)
    4  monitoring                     hardware, monitor thread, Prometheus
    3  engine                         the thread that owns MLX; never Flask
    2  store                          models on disk; no MLX, no Flask
    1  schemas, runtime               wire models; process set-up before MLX
    0  config, events, errors         the base every layer may use
   -1  profiles                       what IMPETUS_PROFILE sets and requires (read by config)

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are not counted.
Run it alone to see the graph it checks: ``pytest tests/unit/test_layers.py -q -s``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gerdsen_ai_server"
RANKS: dict[str, float] = {
    "app": 8,
    "cli": 8,
    "api": 7,
    "web": 6,
    "serving": 5,
    "services": 4.5,
    "monitoring": 4,
    "engine": 3,
    "store": 2,
    "schemas": 1,
    "runtime": 1,
    "config": 0,
    "profiles": -1,
    "events": 0,
    "errors": 0,
    "": 0,
}
NO_FLASK = ("engine", "store", "schemas", "runtime", "monitoring")  # below the web: no Flask, no Werkzeug
NO_MLX = ("store", "schemas", "runtime", "config", "profiles", "events", "errors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    """The top-level unit of ``gerdsen_ai_server.x.y``: ``x`` (a package or a base module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import that runs, relative ones made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    own = module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            for alias in node.names:  # ``from pkg import module`` imports the module
                if (PACKAGE.parent / (base.replace(".", "/") + "/" + alias.name + ".py")).exists() or (
                    PACKAGE.parent / base.replace(".", "/") / alias.name / "__init__.py"
                ).exists():
                    found.append((node.lineno, f"{base}.{alias.name}"))
    return found


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_rank() -> None:
    units = {layer(m) for m in graph()}
    assert units <= set(RANKS), f"give these a rank in RANKS (and in the docstring): {sorted(units - set(RANKS))}"


def test_imports_point_down() -> None:
    wrong = []
    for module, deps in graph().items():
        here = layer(module)
        for line, dep in deps:
            top = dep.split(".")[0]
            if top in ("flask", "werkzeug", "flask_socketio", "flask_limiter") and here in NO_FLASK:
                wrong.append(f"{module}:{line} imports {dep} (no Flask below the web layer)")
            if top == "mlx" or top == "mlx_lm":
                if here in NO_MLX:
                    wrong.append(f"{module}:{line} imports {dep} (no MLX in {here or 'the base'})")
            if not dep.startswith("gerdsen_ai_server"):
                continue
            there = layer(dep)
            if there == here or dep == "gerdsen_ai_server":  # within a package; the package's __version__
                continue
            if RANKS.get(there, 99) >= RANKS.get(here, -1):
                wrong.append(
                    f"{module}:{line} imports {dep} ({here or 'base'} {RANKS.get(here)} -> "
                    f"{there or 'base'} {RANKS.get(there)}: up or sideways)"
                )
    assert not wrong, "imports must point down only:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = {
        m: sorted({d for _, d in deps if d.startswith("gerdsen_ai_server") and d != m}) for m, deps in graph().items()
    }
    modules = set(edges)
    # A dependency on a name inside a module counts as one on the module.
    for m, deps in edges.items():
        edges[m] = sorted({d if d in modules else d.rsplit(".", 1)[0] for d in deps} & modules - {m})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own module is not a cycle worth a failure
            if len(component) > 1 and not _init_reexport(component):
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _init_reexport(component: list[str]) -> bool:
    """``cli`` <-> ``cli.commands``: the package's __init__ names its submodule's function."""
    return len(component) == 2 and (
        component[0].startswith(component[1] + ".") or component[1].startswith(component[0] + ".")
    )


@pytest.mark.parametrize("module", ["gerdsen_ai_server.engine", "gerdsen_ai_server.store"])
def test_layer_never_imports_flask_at_runtime(module: str) -> None:
    import subprocess
    import sys

    code = (
        f"import sys, pkgutil, importlib, {module} as p\n"
        f"[importlib.import_module(m.name) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        "print('flask' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", f"importing {module} pulls in Flask"
