"""What a user-supplied value must satisfy, as data: the vocabulary of the input tables.

Two tables are written in it: every flag of ``launch/train.py`` (``options.FLAGS``) and every
key of the ``checkfree`` section (``checkfree.KEY_RULES``). Each entry names a constraint
from this module (a range, a closed set, a path that must exist or be creatable and writable,
a parser) and the fix to print. The checks run from those tables before any process group,
so a bad value ends in one line, ``KEY = VALUE: PROBLEM. Fix: FIX.``, with exit status 2,
instead of a traceback from every rank. Nothing here touches the disk beyond looking.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["ConfigError", "Invalid", "fail", "Constraint", "Range", "OneOf", "ReadableFile", "WritableDir",
           "WritableFile", "HasCheckpoint", "Parses", "Delegated", "check_value"]


class ConfigError(ValueError):
    """A config problem; the message names the key, the value and the fix."""


class Invalid(ValueError):
    """Raised by a ``Parses`` function: what is wrong with the value, and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {problem}. Fix: {fix}.")


class Constraint:
    """What a value must satisfy besides its type."""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (one clause), or None when it is fine."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Constraint):
    """A finite number between ``lo`` and ``hi`` (either may be open or absent)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = True
    #: what the number is, e.g. "a per-step probability" ("must be a per-step probability in [0, 1)")
    what: str = ""

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            span = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
            return f"{self.what} in {span}".strip()
        if self.lo is not None:
            return f"{self.what} {'>' if self.lo_open else '>='} {self.lo}".strip()
        return f"{self.what} {'<' if self.hi_open else '<='} {self.hi}".strip()

    def problem(self, value: Any) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        lo_bad = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
        hi_bad = self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))
        return f"must be {self.describe()}" if lo_bad or hi_bad else None


@dataclass(frozen=True)
class OneOf(Constraint):
    """A closed set of names; a near miss is named back (did you mean ...?)."""
    choices: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if value in self.choices:
            return None
        close = difflib.get_close_matches(str(value), list(self.choices), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        return f"must be one of {list(self.choices)}{hint}"


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _dir_problem(path: str) -> str | None:
    """A directory that exists and is writable, or that ``os.makedirs`` could create."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            return "exists and is not a directory"
        if not os.access(full, os.W_OK | os.X_OK):
            return "is a directory this user cannot write to"
        return None
    base = _nearest_existing(full)
    if not os.path.exists(base):
        return f"cannot be created: {base!r} is a broken symbolic link"
    if not os.path.isdir(base):
        return f"cannot be created: {base!r} is a file, not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot be created: this user cannot write to {base!r}"
    return None


class WritableDir(Constraint):
    """An output directory: existing and writable, or creatable."""

    def problem(self, value: Any) -> str | None:
        return _dir_problem(value)


class WritableFile(Constraint):
    """An output file: not a directory, writable, its directory existing or creatable."""

    def problem(self, value: Any) -> str | None:
        full = os.path.abspath(value)
        if os.path.isdir(full):
            return "is a directory, not a file"
        if os.path.exists(full) and not os.access(full, os.W_OK):
            return "is a file this user cannot write to"
        problem = _dir_problem(os.path.dirname(full))
        return None if problem is None else f"its directory {problem}"


class ReadableFile(Constraint):
    """An input file that exists and can be read."""

    def problem(self, value: Any) -> str | None:
        full = os.path.abspath(value)
        if not os.path.exists(full):
            return f"file not found (resolved to {full!r})"
        if os.path.isdir(full):
            return "is a directory, not a file"
        if not os.access(full, os.R_OK):
            return "is a file this user cannot read"
        return None


class HasCheckpoint(Constraint):
    """A DeepSpeed checkpoint directory (it holds a ``latest`` file)."""

    def problem(self, value: Any) -> str | None:
        if os.path.isfile(os.path.join(value, "latest")):
            return None
        return "no DeepSpeed checkpoint there (no 'latest' file)"


@dataclass(frozen=True)
class Parses(Constraint):
    """A value that ``parse`` accepts; it raises ``Invalid`` (problem and fix), or ValueError,
    OSError or ImportError, whose text is the problem."""
    parse: Callable[[Any], Any]

    def problem(self, value: Any) -> str | None:
        try:
            self.parse(value)
        except Invalid as err:
            return err.problem if err.fix is None else f"{err.problem}. Fix: {err.fix}"
        except (ValueError, OSError, ImportError) as err:
            return str(err)
        return None


@dataclass(frozen=True)
class Delegated(Constraint):
    """Checked elsewhere, before any process group too; ``where`` names the check."""
    where: str

    def problem(self, value: Any) -> str | None:
        return None


def check_value(key: str, value: Any, constraint: Constraint | None, fix: str) -> None:
    """Raise the one-line ``ConfigError`` when ``value`` breaks ``constraint``."""
    problem = None if constraint is None else constraint.problem(value)
    if problem is None:
        return
    if ". Fix: " in problem:  # the parser named its own fix
        raise ConfigError(f"{key} = {value!r}: {problem}.")
    raise fail(key, value, problem, fix)
