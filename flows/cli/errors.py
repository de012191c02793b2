"""The CLI's one error policy, applied to every ``digitflow`` command.

Expected errors (bad params, a path that is not there, a model file that is not ours, no
data source, Dask scheduler or Prefect server reachable) are one line on stderr and exit 2,
before any work; a failure of the work on its data (a malformed IDX or dataset file) is one
line and exit 1; anything else is a bug and keeps its traceback. A command's own result
(predict's "some rows failed", a failed flow run) is its business, not this policy's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer

from tasks.errors import USAGE_EXIT, DigitflowError


class UsageError(DigitflowError):
    """An expected error the CLI finds itself (a default file missing, no server to use)."""


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an expected error; None for anything else (a bug).

    Each project error carries its own (tasks/errors.py); a missing file is the one
    built-in exception that is a user's doing.
    """
    if isinstance(exc, DigitflowError):
        return exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return USAGE_EXIT
    return None


P = ParamSpec("P")
R = TypeVar("R")


def expected_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: its expected errors become ``error: ...`` and their exit code."""

    @wraps(func)  # Typer reads the options from the wrapped signature
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            code = exit_code_for(exc)
            if code is None:
                raise  # a bug: its traceback is what a developer needs
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code) from exc

    return wrapper
