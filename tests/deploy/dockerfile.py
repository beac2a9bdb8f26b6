"""A Dockerfile read the way `docker build` reads it, for the checks in test_images.py:
instructions with their continuation lines joined, ARG defaults, COPY sources.

    parsed = Dockerfile.read(Path("deploy/docker/Dockerfile.worker"))
    parsed.args["RAY_VERSION"]      # "2.60.0"
    parsed.copy_sources()           # ["deploy/docker/requirements.lock", "pyproject.toml", ...]
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    text: str  # the rest, continuation lines joined
    line: int  # where it starts (1-based)


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    instructions: tuple[Instruction, ...]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        found: list[Instruction] = []
        pending: list[str] = []
        start = 0
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            # Comment lines end nothing: docker drops them, inside continuations too.
            if not line or line.startswith("#"):
                continue
            if not pending:
                start = number
            continued = line.endswith("\\")
            pending.append(line[:-1].strip() if continued else line)
            if not continued:
                keyword, _, rest = " ".join(pending).partition(" ")
                found.append(Instruction(keyword.upper(), rest.strip(), start))
                pending = []
        assert not pending, f"{path}: the file ends inside a continued instruction"
        return cls(path, tuple(found))

    def named(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    @property
    def args(self) -> dict[str, str]:
        """Each ARG's default (the last one given, as docker uses it)."""
        defaults: dict[str, str] = {}
        for instruction in self.named("ARG"):
            name, sep, value = instruction.text.partition("=")
            if sep:
                defaults[name] = value.strip('"')
        return defaults

    def expand(self, text: str) -> str:
        """`text` with $NAME and ${NAME} replaced by the ARG defaults."""
        args = self.args
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)

    def base_images(self) -> list[str]:
        return [self.expand(i.text.split()[0]) for i in self.named("FROM")]

    def copy_sources(self) -> list[str]:
        """The build-context paths every COPY and ADD reads (COPY --from=stage excluded)."""
        sources: list[str] = []
        for instruction in self.named("COPY") + self.named("ADD"):
            words = instruction.text.split()
            flags = [w for w in words if w.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            rest = " ".join(w for w in words if not w.startswith("--"))
            paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            assert len(paths) >= 2, f"{self.path}:{instruction.line}: COPY needs SRC... DEST"
            sources += [self.expand(p) for p in paths[:-1]]
        return sources
