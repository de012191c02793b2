"""Peak memory of a `digitflow` command run in its own process, for the bounded-memory tests.

Not ``ru_maxrss``: a forked child starts with its parent's high-water mark and keeps it
across exec, so late in a test session a tiny child would report pytest's own peak (over a
GB). The child's VmHWM (/proc/self/status), read at its exit, counts its own memory only.
"""

from __future__ import annotations

import sys
from pathlib import Path

_WRAPPER = """
import atexit, re, runpy, sys
from pathlib import Path
peak = Path(sys.argv.pop(1))
def record():
    peak.write_text(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])
atexit.register(record)
runpy.run_module("flows.cli", run_name="__main__", alter_sys=True)
"""


def digitflow_argv(peak_file: Path, args: list[str]) -> list[str]:
    """argv running ``digitflow ARGS`` that writes the process's peak RSS (KiB) to peak_file."""
    return [sys.executable, "-c", _WRAPPER, str(peak_file), *args]


def peak_mb(peak_file: Path) -> float:
    """The peak RSS, in MB, that :func:`digitflow_argv`'s process recorded at its exit."""
    return int(peak_file.read_text()) / 1024
