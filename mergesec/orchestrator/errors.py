"""Errors the CLI turns into one line each and exit status 2."""

from __future__ import annotations


class StudyError(Exception):
    """One or more problems with a study file, each ``(key_path, message)``."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.file}: {path or '<root>'}: {msg}" for path, msg in self.problems]


class InfeasibleResources(ValueError):
    """A step asks for more than any Ray node has (the CLI prints it as one line, exit status 2)."""
