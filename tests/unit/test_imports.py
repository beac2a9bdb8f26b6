"""The package's structure holds: roles apart, layers in order, no circles, light installs light
(STYLE.md rules 1 and 2; docs/architecture.md has the map).

Every import counts, including those behind `if TYPE_CHECKING:` and those inside functions:
a circle hidden behind either is still a circle.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "redis", "boto3", "botocore", "fastapi", "transformers", "peft", "optuna")
TOP = {"orchestrator": "cotune.orchestrator", "worker": "cotune.worker"}

# Rooms of cotune.orchestrator, lowest first: a room imports only rooms at or below its rank.
# `settings` is the one module that reads the environment; `merge` is a library beside the
# rest (it imports nothing else of cotune); api and runtime share a rank but runtime may
# compose the api (never the reverse, checked below).
RANKS: dict[str, int] = {
    "settings": 0,
    "protocol": 0,
    "merge": 0,
    "verify": 1,
    "data": 1,
    "control": 2,
    "pipeline": 3,
    "api": 4,
    "runtime": 4,
    "cli": 5,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    name = ".".join((TOP[rel.parts[0]], *rel.parts[1:]))
    return name.removesuffix(".__init__")


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for top in TOP for p in sorted((ROOT / top).rglob("*.py"))}


MODULE_NAMES = set(all_modules())


def imports_of(path: Path, name: str) -> list[str]:
    """Every module `path` imports (absolute names; relative ones resolved), anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from pkg import module` depends on the module (every import runs its parent
            # package's __init__, which counts for no import here); `from m import name` on m.
            submodules = [
                f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULE_NAMES
            ]
            found.extend(submodules or [base])
    return found


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the cotune modules it imports (only names that are modules)."""
    return {
        name: {dep for dep in imports_of(path, name) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["cotune", "orchestrator"] or len(parts) < 3:
        return None
    return parts[2]


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in edges.items():
        src_room = room(src)
        if src_room is None:
            continue
        for dep in deps:
            dep_room = room(dep)
            if dep_room is None or dep_room == src_room:
                continue
            if src_room == "merge":
                bad.append(f"{src} -> {dep} (merge/ is a library: it imports no other room)")
            elif src_room == "verify" and dep_room not in ("protocol", "merge"):
                bad.append(f"{src} -> {dep} (verify/ is a library: only protocol and merge)")
            elif dep_room == "runtime" and src_room == "api":
                bad.append(f"{src} -> {dep} (runtime composes the api, not the reverse)")
            elif RANKS[dep_room] > RANKS[src_room]:
                bad.append(
                    f"{src} ({src_room}) -> {dep} ({dep_room}): a lower room imports a higher"
                )
    return sorted(bad)


MODULES = all_modules()
EDGES = graph(MODULES)


def test_every_folder_is_a_room_with_a_rank() -> None:
    rooms = {room(m) for m in MODULES} - {None, "__init__"}
    assert rooms <= set(RANKS), f"rooms without a rank in RANKS: {rooms - set(RANKS)}"


def test_layers_hold() -> None:
    assert layer_violations(EDGES) == []


def test_no_import_circles() -> None:
    assert cycles(EDGES) == []


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both defects is caught."""
    edges: dict[str, set[str]] = {
        "cotune.orchestrator.control.state": {"cotune.orchestrator.control.queue"},
        "cotune.orchestrator.control.queue": {"cotune.orchestrator.control.state"},
        "cotune.orchestrator.data.sharding": {"cotune.orchestrator.pipeline.rounds"},
        "cotune.orchestrator.pipeline.rounds": set(),
    }
    assert cycles(edges) == [
        ["cotune.orchestrator.control.queue", "cotune.orchestrator.control.state"]
    ]
    assert layer_violations(edges) == [
        "cotune.orchestrator.data.sharding (data) -> cotune.orchestrator.pipeline.rounds "
        "(pipeline): a lower room imports a higher"
    ]


def _offenders(prefix: str, allowed: Iterable[str], forbidden: str) -> list[str]:
    return sorted(
        f"{src} imports {dep}"
        for src, path in MODULES.items()
        if src.startswith(prefix)
        for dep in imports_of(path, src)
        if (dep == forbidden or dep.startswith(forbidden + "."))
        and not any(dep == a or dep.startswith(a + ".") for a in allowed)
    )


def test_orchestrator_never_imports_worker() -> None:
    assert _offenders("cotune.orchestrator", (), "cotune.worker") == []


def test_worker_imports_only_the_protocol_from_orchestrator() -> None:
    allowed = ("cotune.orchestrator.protocol",)
    assert _offenders("cotune.worker", allowed, "cotune.orchestrator") == []


def test_nothing_imports_the_bare_folder_names() -> None:
    """Installed, the code is cotune.orchestrator / cotune.worker; the folder names are not
    importable outside the repository, so nothing may use them."""
    bare = sorted(
        f"{src} imports {dep}"
        for src, path in MODULES.items()
        for dep in imports_of(path, src)
        if dep.split(".")[0] in TOP
    )
    assert bare == []


def test_redis_is_reached_only_through_the_control_plane() -> None:
    """Only control/ (and the embedded redis-server wrapper) import redis, and no module
    outside control/ reaches into a `.redis` client: Redis access goes through control/."""
    owners = ("cotune.orchestrator.control", "cotune.orchestrator.runtime.services")
    offenders = []
    for src, path in MODULES.items():
        if src.startswith(owners):
            continue
        tree = ast.parse(path.read_text())
        offenders += [
            f"{src} imports {dep}" for dep in imports_of(path, src) if dep.split(".")[0] == "redis"
        ]
        offenders += [
            f"{src}:{node.lineno} uses .redis"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and node.attr == "redis"
            and isinstance(node.value, ast.Attribute | ast.Name)
            and getattr(node.value, "attr", getattr(node.value, "id", "")) in ("state", "c", "self")
        ]
    assert sorted(offenders) == []


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p) for top in TOP for p in (ROOT / top).rglob("__init__.py")}
    data_only = set(config.get("package-data", {})) - folders  # e.g. control/lua: Lua sources
    assert set(config["packages"]) == folders | data_only
    assert config["package-dir"] == {v: k for k, v in TOP.items()}


def test_no_module_is_too_long() -> None:
    long = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 450
    }
    assert long == {}


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    return sorted({m.split(".")[0] for m in loaded} & set(HEAVY))


def test_protocol_is_light() -> None:
    mods = sorted(m for m in MODULES if m.startswith("cotune.orchestrator.protocol"))
    assert _loaded_after("\n".join(f"import {m}" for m in mods)) == []


def test_cli_and_worker_plugin_are_light() -> None:
    code = "import cotune.orchestrator.cli.app as c\nc._load_plugins()"
    assert _loaded_after(code) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_with_all_extras(module: str) -> None:
    importlib.import_module(module)
