"""What a check found wrong (`Issue`), and the one error verify/ raises (`VerifyError`).

Checks of untrusted input return issues rather than raise: an upload is judged on all of
them at once, and a caller turns them into a refusal with `where` as the field, e.g.
`protocol.problems.Rejected(summary, issues=[i.pair for i in check.issues])`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One thing wrong with an upload.

    `where` names the place: "file", "header", "header.__metadata__", or a tensor key;
    `message` says what was expected and what was found.
    """

    where: str
    message: str

    @property
    def pair(self) -> tuple[str, str]:
        """(where, message): the shape of `protocol.problems.Problem.issues`."""
        return (self.where, self.message)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class VerifyError(ValueError):
    """A caller's mistake (adapters of different layouts compared, a bad threshold), never
    raised for a hostile upload: those come back as issues."""
