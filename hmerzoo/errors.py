"""Errors that end in a message a user can act on.

Every error hmerzoo raises on purpose derives from :class:`HmerzooError`; the CLI prints its message without
a traceback (``--debug`` shows it). Messages name the file, line or recipe key and say what to do.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class HmerzooError(Exception):
    """Base class of all errors with a user-facing message."""


class RecipeError(HmerzooError):
    """A recipe (or an override) is wrong. ``problems`` holds every problem found, one line each."""

    def __init__(self, problems: Iterable[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"recipe {source}: " if source else "recipe: "
        if len(self.problems) == 1:
            msg = head + self.problems[0]
        else:
            msg = head + f"{len(self.problems)} problems\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(HmerzooError):
    """A data file is missing, unreadable or inconsistent."""


class CheckpointError(HmerzooError):
    """A checkpoint or model directory cannot be used."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x'?)' or '' - for the end of an error message."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    if len(close) == 1:
        return f" (did you mean '{close[0]}'?)"
    return " (did you mean " + ", ".join(f"'{c}'" for c in close) + "?)"
