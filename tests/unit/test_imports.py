"""Runtime roles stay apart and light installs stay light (STYLE.md rules 1 and 2)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "redis", "boto3", "botocore", "fastapi", "transformers", "peft", "optuna")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_orchestrator_never_imports_worker() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules("orchestrator")
        for name in _imports(path)
        if name == "worker" or name.startswith("worker.")
    ]
    assert offenders == []


def test_worker_imports_only_the_protocol_from_orchestrator() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules("worker")
        for name in _imports(path)
        if (name == "orchestrator" or name.startswith("orchestrator."))
        and not name.startswith("orchestrator.protocol")
    ]
    assert offenders == []


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    return sorted({m.split(".")[0] for m in loaded} & set(HEAVY))


def test_protocol_is_light() -> None:
    mods = [
        "orchestrator.protocol." + p.stem
        for p in sorted((ROOT / "orchestrator" / "protocol").glob("*.py"))
        if p.stem != "__init__"
    ]
    code = "\n".join(f"import {m}" for m in ["orchestrator.protocol", *mods])
    assert _loaded_after(code) == []


def test_cli_and_worker_plugin_are_light() -> None:
    code = "import orchestrator.cli as c\nc._load_plugins()"
    assert _loaded_after(code) == []


@pytest.mark.parametrize(
    "module",
    [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("orchestrator", "worker")
        for p in _modules(pkg)
    ],
)
def test_every_module_imports_with_all_extras(module: str) -> None:
    importlib.import_module(module)
