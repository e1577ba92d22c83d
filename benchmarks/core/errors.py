"""Errors shared by every part of the harness.

``NotApplicable`` is not a failure: a method or metric that cannot apply to a model or a
dataset says why, and the runner records the cell with that reason. ``UserError`` and its
subclasses are mistakes in what the user asked for; the CLI prints their message on one
line and exits with status 2.
"""

from __future__ import annotations


class NotApplicable(Exception):
    """A method or metric cannot apply here; the message says why."""


class UserError(ValueError):
    """Bad user input (a name, a file, an option); the message names it and the fix."""


class UnknownNameError(UserError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFound(UserError):
    """Real data the suite names is not where the user pointed (or nowhere was named).

    The runner skips that dataset and says so, unless ``--strict`` makes it an error."""
