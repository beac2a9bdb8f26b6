"""Writes deploy/docker/requirements.lock, the pins both container images install with.

The lock is pyproject.toml's base dependencies and its `coordinator` and `worker` extras,
resolved by pip for Linux x86_64 and CPython 3.11 (the images' platform), with torch and Ray at
the versions the Dockerfiles' ARGs name (TORCH_VERSION, RAY_VERSION). torch and the CUDA stack
it pulls (triton, nvidia-*, cuda-*) are left out: each image installs torch from its own index
(a CPU build for the coordinator, a CUDA build for the worker), and those builds differ in
exactly these packages.

    .venv/bin/python deploy/docker/lock.py          # rewrites requirements.lock (needs the index)

Run it under the project's venv (CPython 3.11 on Linux x86_64): pip evaluates environment
markers with the interpreter that runs it. tests/deploy/test_images.py checks the result
against pyproject.toml and the Dockerfiles.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCK = HERE / "requirements.lock"
DOCKERFILES = (HERE / "Dockerfile.coordinator", HERE / "Dockerfile.worker")
EXTRAS = ("coordinator", "worker")
# Oldest to newest glibc the images' bases have (Debian 12: 2.36, Ubuntu 22.04: 2.35); pip
# does not expand a manylinux tag to the older ones on its own.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]


def left_out(name: str) -> bool:
    """torch and the packages only its build chooses (CPU or CUDA)."""
    name = canonicalize_name(name)
    return name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))


def dockerfile_arg(name: str) -> str:
    """The default of `ARG name=...`, which both Dockerfiles must give alike."""
    values = set()
    for path in DOCKERFILES:
        found = re.findall(rf"^ARG {name}=(\S+)\s*$", path.read_text(), flags=re.MULTILINE)
        if len(found) != 1:
            raise SystemExit(f"{path.relative_to(ROOT)}: expected one `ARG {name}=...` line")
        values.add(found[0])
    if len(values) != 1:
        raise SystemExit(f"the Dockerfiles disagree on {name}: {sorted(values)}")
    return values.pop()


def requirements(torch_version: str, ray_version: str) -> list[str]:
    """What the images install, as pip requirement strings, torch and Ray pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    pinned: dict[str, str] = {}
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":
            pinned[name] = f"torch=={torch_version}"
        elif name == "ray":
            extras = ",".join(sorted(req.extras))
            pinned[name] = f"ray[{extras}]=={ray_version}" if extras else f"ray=={ray_version}"
        else:
            # The same package in two extras: pip intersects the specifiers.
            pinned[name] = f"{pinned[name]}, {req.specifier}" if name in pinned else str(req)
    return [pinned[name] for name in sorted(pinned)]


def resolve(reqs: list[str], python: str) -> dict[str, str]:
    """pip's resolution of `reqs` for the images' platform: {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        argv = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            f"--report={report}",
            "--only-binary=:all:",
            f"--python-version={python}",
            "--implementation=cp",
            f"--abi=cp{python.replace('.', '')}",
            *(f"--platform={tag}" for tag in PLATFORMS),
            *reqs,
        ]
        subprocess.run(argv, check=True)
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}


def render(resolved: dict[str, str], python: str, torch_version: str, ray_version: str) -> str:
    lines = [
        "# Pins for the container images (pip install -c), written by deploy/docker/lock.py:",
        "# pyproject.toml's base dependencies and its coordinator and worker extras, resolved for",
        f"# Linux x86_64 and CPython {python} with torch=={torch_version} and ray=={ray_version}.",
        "# torch, triton, nvidia-* and cuda-* are left out: each image installs its own torch",
        "# build. Do not edit by hand: change pyproject.toml or the Dockerfiles' ARGs, then run",
        "#   .venv/bin/python deploy/docker/lock.py",
    ]
    names = sorted((n for n in resolved if not left_out(n)), key=canonicalize_name)
    lines += [f"{canonicalize_name(name)}=={resolved[name]}" for name in names]
    return "\n".join(lines) + "\n"


def main() -> int:
    python = dockerfile_arg("PYTHON_VERSION")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    here = (sys.implementation.name, platform.system(), platform.machine(), running)
    if here != ("cpython", "Linux", "x86_64", python):
        raise SystemExit(
            f"run this under CPython {python} on Linux x86_64 (the images' platform: pip "
            f"evaluates markers with the interpreter running it), not {' '.join(here)}"
        )
    torch_version = dockerfile_arg("TORCH_VERSION")
    ray_version = dockerfile_arg("RAY_VERSION")
    resolved = resolve(requirements(torch_version, ray_version), python)
    LOCK.write_text(render(resolved, python, torch_version, ray_version))
    kept = sum(1 for name in resolved if not left_out(name))
    print(f"wrote {LOCK.relative_to(ROOT)}: {kept} pins (ray=={resolved.get('ray', '?')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
