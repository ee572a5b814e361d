"""The import contract of the package, read from the source (an AST walk: nothing is imported).

Every `import x` and `from x import y` of every module of trinityx_ds counts, at module level or
inside a function, relative imports resolved; `from pkg import name` means the module pkg.name
when there is one. The rooms (trinityx_ds.<room>) form layers, lowest first:

    errors < storage < config < parallel < model, data, calibration, launch < plan < train
    < convert, eval < experiments < demo < cli

A room imports only rooms strictly below it (rooms of one level not each other); eval does not
import train either; nothing imports trinityx_ds.cli; the package's own __init__ imports only
convert.register (the HF Auto-class registration). A failure lists every offending edge as
`module -> imported module`. Inside a room, modules import one way too (no circles). tools/*.py
sit above it all: they import the package and libraries only, never each other nor tests/.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "trinityx_ds"
SOURCE = Path(__file__).resolve().parents[2] / PACKAGE
ROOT = "<root>"  # trinityx_ds/__init__.py

LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # nothing of the package: the one-line user errors, CheckpointError
    ("storage",),  # pathlib and json; raises errors.CheckpointError
    ("config",),
    ("parallel",),
    ("model", "data", "calibration", "launch"),  # launch: starting processes (local, Slurm)
    ("plan",),
    ("train",),
    ("convert", "eval"),
    ("experiments",),  # the project's own measurements, over the evaluation library
    ("demo",),
    ("cli",),
]
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
FORBIDDEN = {  # room -> rooms it may not import although they are below it
    "eval": {"train"},
}
ROOT_MAY_IMPORT = {f"{PACKAGE}.convert.register"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that module `name` names in its import statements."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in MODULES else module)
    return {m for m in out if m == PACKAGE or m.startswith(PACKAGE + ".")}


EDGES: dict[str, set[str]] = {name: _imports(name, path) for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _report(title: str, edges: list[tuple[str, str]]) -> str:
    return f"{title}:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(set(edges)))


def _importing(pred) -> list[tuple[str, str]]:
    return [(a, b) for a, bs in EDGES.items() for b in bs if pred(a, b)]


def test_the_walk_sees_the_package():
    """The walk itself: known modules and a known function-local edge are found."""
    assert {f"{PACKAGE}.cli", f"{PACKAGE}.config.load", f"{PACKAGE}.storage.layout"} <= set(MODULES)
    assert f"{PACKAGE}.config.schema" in EDGES[f"{PACKAGE}.config.load"]
    assert f"{PACKAGE}.train.stages" in EDGES[f"{PACKAGE}.cli"]  # inside _train
    assert f"{PACKAGE}.convert.register" in EDGES[PACKAGE]


def test_every_room_has_a_layer():
    rooms = {room(m) for m in MODULES} - {ROOT}
    assert rooms <= set(LEVEL), f"rooms without a place in LAYERS: {sorted(rooms - set(LEVEL))}"


def test_nothing_imports_the_cli():
    """`trinityx_ds.cli` is the top: code that needs a command runs it as a process
    (`python -m trinityx_ds.cli ...`)."""
    bad = _importing(lambda a, b: b == f"{PACKAGE}.cli" and a != f"{PACKAGE}.cli")
    assert not bad, _report("modules importing trinityx_ds.cli", bad)


def test_convert_never_imports_train():
    bad = _importing(lambda a, b: room(a) == "convert" and room(b) == "train")
    assert not bad, _report("convert/ importing train/", bad)


def test_model_never_imports_the_config_loader():
    """model/ may read config.schema (the dataclasses), not config.load nor the config package
    (whose __init__ re-exports load)."""
    loader = {f"{PACKAGE}.config", f"{PACKAGE}.config.load"}
    bad = _importing(lambda a, b: room(a) == "model" and b in loader)
    assert not bad, _report("model/ importing the config loader", bad)


def test_the_package_init_imports_only_the_registration():
    bad = [(PACKAGE, b) for b in EDGES[PACKAGE] if b not in ROOT_MAY_IMPORT and room(b) != ROOT]
    assert not bad, _report(f"{PACKAGE}/__init__.py importing more than {sorted(ROOT_MAY_IMPORT)}", bad)


def _may_import(a: str, b: str) -> bool:
    if b == ROOT:  # `import trinityx_ds` from inside: the registration, which is convert's
        b = "convert"
    return a in LEVEL and b in LEVEL and LEVEL[b] < LEVEL[a] and b not in FORBIDDEN.get(a, ())


@pytest.mark.parametrize("src", [r for rooms in LAYERS for r in rooms])
def test_room_imports_only_rooms_below_it(src):
    """One case per room: its imports of other rooms go strictly down LAYERS."""
    bad = _importing(lambda a, b: room(a) == src and room(b) != src and not _may_import(src, room(b)))
    below = [r for r in LEVEL if _may_import(src, r)]
    assert not bad, _report(f"{src}/ may import only {', '.join(below) or 'no other room'}; it imports", bad)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(comp)

    for v in sorted(set(graph)):
        if v not in index:
            visit(v)
    return cycles


def test_rooms_form_no_cycle():
    """The room graph is acyclic."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in _importing(lambda a, b: room(a) != room(b) and ROOT not in (room(a), room(b))):
        graph[room(a)].add(room(b))
    cycles = _cycles(graph)
    bad = _importing(lambda a, b: any(room(a) in c and room(b) in c and room(a) != room(b) for c in cycles))
    assert not cycles, _report(f"import cycles among rooms {[sorted(c) for c in cycles]}", bad)


def _package_of(module: str) -> str:
    """A module's own package: where `from . import x` would look (a package __init__ is its own)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_modules_of_a_room_form_no_cycle():
    """Inside each room the modules import one way too: every import counts (function-local and
    type-checking ones included), except a package's __init__ re-exporting its own modules. Found
    by this test on b86774b: eval/heldout <-> eval/suites (bootstrap), convert/formats <->
    convert/inputs (ExportSource)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in _importing(lambda a, b: a != b and room(a) == room(b) != ROOT
                           and not (MODULES[a].name == "__init__.py" and _package_of(b) == a)
                           and not (MODULES.get(b) and MODULES[b].name == "__init__.py" and _package_of(a) == b)):
        graph[a].add(b)
    cycles = _cycles(graph)
    bad = [(a, b) for a, bs in graph.items() for b in bs if any(a in c and b in c for c in cycles)]
    assert not cycles, _report(f"import cycles among modules {[sorted(c) for c in cycles]}", bad)


# ------------------------------------------------------------------------------ the tools layer
TOOLS = SOURCE.parent / "tools"


def _tool_problems(path: Path, tools: set[str]) -> list[str]:
    """What tool `path` does against the contract: tools import the package (and libraries), never
    each other, never tests/, never a private name of the package, and never edit sys.path (the
    package is installed: `pip install -e .`, or gpu_check.sh's PYTHONPATH on a bare node)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        where = f"tools/{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "", a.name) for a in node.names] if not node.level else [(".", None)]
        else:
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                out.append(f"{where}: sys.path")
            continue
        for module, name in names:
            top = module.split(".")[0]
            if module == ".":
                out.append(f"{where}: a relative import")
            elif top == "tests":
                out.append(f"{where}: imports {module} (tests/)")
            elif top in tools:
                out.append(f"{where}: imports tools/{top}.py")
            elif top == PACKAGE and ((name or "").startswith("_") or any(part.startswith("_")
                                                                         for part in module.split(".")[1:])):
                out.append(f"{where}: imports the private {module}{'.' + name if name else ''}")
    return out


def test_the_tools_walk_sees_the_tools(tmp_path):
    """The walk itself, on a tool that breaks every rule once (and imports a library's private
    module, which is the library's business, not the contract's)."""
    assert (TOOLS / "gpu_check.py").is_file() and len(list(TOOLS.glob("*.py"))) >= 5
    fake = tmp_path / "probe.py"
    fake.write_text("import sys\nsys.path.insert(0, 'x')\nimport hhh_efficacy\nfrom tests.dist import run_dist\n"
                    "from trinityx_ds.experiments.heldout import _n_scored\nfrom pip._vendor import tomli\n")
    found = _tool_problems(fake, {"hhh_efficacy"})
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "imports tests.dist (tests/)", "imports the private trinityx_ds.experiments.heldout._n_scored",
        "imports tools/hhh_efficacy.py", "sys.path"], found


def test_tools_import_only_the_package():
    """tools/ is a thin layer over the package (issue 29): on b7aec83 this found 8 sys.path edits in
    6 tools, 2 tools importing tools (hhh_dev, gap_attribution) and 2 imports of tests/ (gpu_check)."""
    tools = {p.stem for p in TOOLS.glob("*.py")}
    bad = sorted({line for p in TOOLS.glob("*.py") for line in _tool_problems(p, tools)})
    assert not bad, "tools breaking the tools contract:\n  " + "\n  ".join(bad)
