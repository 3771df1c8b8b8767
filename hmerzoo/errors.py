"""Errors that end in a message a user can act on.

Every error hmerzoo raises on purpose derives from :class:`HmerzooError`; the CLI prints its message without
a traceback (``--debug`` shows it). Messages name the file, line or recipe key and say what to do.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class HmerzooError(Exception):
    """Base class of all errors with a user-facing message."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _unwrap_worker_message(text: str, cls: type) -> str:
    """The original message of an error re-raised by a DataLoader worker (or pin-memory thread).

    PyTorch re-raises a worker's exception as ``cls("Caught X in DataLoader worker process N.\nOriginal Traceback
    ...")``, the worker's whole traceback in the message; the message ends with the traceback's last line
    ``module.X: original message``, which is what the user needs.
    """
    if not text.startswith("Caught ") or "\nOriginal Traceback (most recent call last):" not in text:
        return text
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    start = text.rfind(f"\n{name}: ")
    return text[start + len(name) + 3:].rstrip("\n") if start >= 0 else text


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
