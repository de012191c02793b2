"""SIGTERM as a clean unwind, for every ``digitflow`` command.

Python's default for SIGTERM (``kill``, a scheduler's or systemd's stop, ``docker stop``)
is to die on the spot: no ``finally`` block or ``with`` exit runs, so a temp file of
``tasks.io.atomic_path`` stays behind in the output folder. Raising SystemExit instead
unwinds the stack the way Ctrl-C does: temp files are removed, worker threads stopped,
the previous output kept. The CLI package (flows/cli/) installs it in main() and again in
the predict commands, which tests and benchmarks also run without main().
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# What a shell reports for a process killed by a signal: 128 + its number (143 for SIGTERM).
SIGNAL_EXIT_BASE = 128


def _unwind(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(SIGNAL_EXIT_BASE + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread.

    The previous handler comes back on exit, so nesting is harmless (Prefect's flow
    engine installs its own for a flow run, then passes the signal on to this one).
    Signal handlers can only be set from the main thread: elsewhere (a command run in
    a worker thread) SIGTERM keeps its current handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
