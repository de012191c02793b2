"""The project's expected errors: each class carries the exit code the CLI gives it.

Anything raised that is not a :class:`DigitflowError` (nor a missing file) is a bug, and
the CLI keeps its traceback (flows/cli/errors.py). Importing this module costs nothing, so
a light command names no torch or Prefect module to classify an error.
"""

from __future__ import annotations

USAGE_EXIT = 2  # what the command was pointed at is wrong (Click's own code for bad usage)
WORK_EXIT = 1  # the work failed on its data


class DigitflowError(Exception):
    """An expected error: bad params, a path or file that is not usable, no source or server."""

    exit_code: int = USAGE_EXIT


class WorkError(DigitflowError):
    """The work failed on its data (a malformed IDX or dataset file)."""

    exit_code = WORK_EXIT
