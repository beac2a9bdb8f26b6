"""A .dockerignore matcher with Docker's rules (moby's patternmatcher), to tell what a build
context sends: patterns in order, `!` re-includes, the last match wins, and a pattern that
matches a parent folder matches everything under it.

    ignore = DockerIgnore.read(Path("deploy/docker/Dockerfile.worker.dockerignore"))
    ignore.excludes("tests/conftest.py")     # True
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!` line: re-includes what it matches


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's translation: `*` and `?` stop at `/`, `**` spans folders, [..] as in regex."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*" and pattern[i + 1 : i + 2] == "*":
            i += 1
            if pattern[i + 1 : i + 2] == "/":
                i += 1
            out += ".*" if i + 1 == len(pattern) else "(.*/)?"
        elif ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


@dataclass(frozen=True)
class DockerIgnore:
    path: Path
    patterns: tuple[Pattern, ...]

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        patterns = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            line = posixpath.normpath(line[1:].strip() if exclusion else line).lstrip("/")
            patterns.append(Pattern(compile_pattern(line), exclusion))
        return cls(path, tuple(patterns))

    def excludes(self, relative: str) -> bool:
        """Whether the context leaves out `relative` (a path from its root, with /)."""
        parents = relative.split("/")[:-1]
        ancestors = ["/".join(parents[: i + 1]) for i in range(len(parents))]
        matched = False
        for pattern in self.patterns:
            # An exclusion can only undo a match, an inclusion only make one.
            if pattern.exclusion != matched:
                continue
            if any(pattern.regex.match(p) for p in (relative, *ancestors)):
                matched = not pattern.exclusion
        return matched
