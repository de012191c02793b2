"""The CLI's one error policy, applied to every ``digitflow`` command.

Expected errors (bad params, a path that is not there, a model file that is not ours, no
data source, Dask scheduler or Prefect server reachable) are one line on stderr and exit 2,
before any work; a failure of the work on its data (a malformed IDX or dataset file) is one
line and exit 1; anything else is a bug and keeps its traceback. A command's own result
(predict's "some rows failed", a failed flow run) is its business, not this policy's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer

USAGE_EXIT = 2  # what the command was pointed at is wrong (Click's own code for bad usage)
WORK_EXIT = 1  # the work failed on its data


class UsageError(Exception):
    """An expected error the CLI finds itself (a default file missing, no server to use)."""


# Each expected error and its exit code: the one place that maps them. By module and class
# name, looked up in sys.modules rather than imported, so that a light command (download,
# split) does not import torch or Prefect only to name their errors; an exception of a
# module that was never imported cannot have been raised. First match wins (none of these
# subclasses another). tests/test_cli_errors.py checks that every entry names an exception class.
EXPECTED_ERRORS: tuple[tuple[str, str, int], ...] = (
    (__name__, "UsageError", USAGE_EXIT),
    ("builtins", "FileNotFoundError", USAGE_EXIT),
    ("tasks.config", "ParamsError", USAGE_EXIT),
    # no source configured, none reachable or none with the right files, a bad checksum file
    ("tasks.download", "DownloadError", USAGE_EXIT),
    ("tasks.model", "ModelFileError", USAGE_EXIT),
    # no inputs, bad options, an unreachable Dask scheduler
    ("tasks.predict", "PredictUsageError", USAGE_EXIT),
    # retrain/serve: not a git repo, no commit, a bad or forbidden override
    ("flows.retrain", "RetrainError", USAGE_EXIT),
    ("tasks.idx", "IdxError", WORK_EXIT),
    ("tasks.predict", "PredictOutputError", WORK_EXIT),  # the output's disk is full
    ("tasks.data", "DatasetError", WORK_EXIT),
)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an expected error; None for anything else (a bug)."""
    for module_name, class_name, code in EXPECTED_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(exc, cls):
            return code
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
